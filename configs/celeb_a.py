"""The paper's unconditional CelebA DDPM: 5,000 evaluated images, border 16.

Faces centre-cropped to a square and resized to 64 px + 2 x 16 border = 96 x 96. Needs CelebA
prepared in a TFDS data dir. Unconditional: every image gets the null condition.

  python train.py --config configs/celeb_a.py --workdir workdirs/celeb_a --config.data.data_dir=DIR
  python evaluate.py --config configs/celeb_a.py --workdir workdirs/celeb_a --config.data.data_dir=DIR
"""

from configs import common


def get_config():
  c = common.paper_ddpm("celeb_a", condition="none", num_records=162_770, epochs=225)
  c.data.image_size = 64
  c.data.eval_split = "test"
  c.train.cond_dropout = 0.0
  c.eval.num_members = 5000
  c.eval.num_nonmembers = 5000
  c.eval.batch_size = 128
  return c
