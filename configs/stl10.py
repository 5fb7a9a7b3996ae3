"""The paper's STL-10 DDPM: class-conditional, border 16, trained on STL-10's labelled images.

96 x 96 images + 2 x 16 border = 128 x 128. The paper trains on all 13,000 labelled images (5,000
train + 8,000 test); here the last 1,000 test images are held out as non-members, so that they are
queried, like the members, with their own class: members are the 12,000 images of train +
test[:7000], non-members test[7000:]. (STL-10's 'unlabelled' split has no classes: its records have
label -1, which a class-conditional model refuses rather than condition them on the null class.)
Needs STL-10 prepared in a TFDS data dir (`tfds build stl10 --data_dir DIR` elsewhere).

  python train.py --config configs/stl10.py --workdir workdirs/stl10 --config.data.data_dir=DIR
  python evaluate.py --config configs/stl10.py --workdir workdirs/stl10 --config.data.data_dir=DIR
"""

from configs import common


def get_config():
  c = common.paper_ddpm(
      "stl10", condition="class", num_records=12_000, epochs=500, block_out_channels=(128, 256, 256, 512),
      down_block_types=("DownBlock2D", "DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
      up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D", "UpBlock2D"))
  c.data.train_split = "train+test[:7000]"  # 12,000 labelled members
  c.data.eval_split = "test[7000:]"  # 1,000 labelled non-members, disjoint from the members
  c.eval.num_members = 10000
  c.eval.num_nonmembers = 1000  # all of test[7000:]
  c.eval.batch_size = 128
  return c
