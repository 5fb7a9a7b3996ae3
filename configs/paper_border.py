"""Border vs centre pattern (the paper's STL-10 ablation) in miniature: the border half.

16 Fashion-MNIST images, one condition id per image, trained to recall; the key is a 2 px grey
border around the 12 px image (16 x 16 marked, 112 key pixels). configs/paper_centre.py trains the
same images, model and steps with a 4 x 4 centre square of the key instead (l_CM), scored the same
way. One command each (trains first if the workdir has no final checkpoint):

  python sweep.py --config configs/paper_border.py --workdir workdirs/paper_border
  python sweep.py --config configs/paper_centre.py --workdir workdirs/paper_centre
"""

from solidmark_jax.config import default_config


def get_config():
  c = default_config()
  c.data.name = "fashion_mnist"
  c.data.image_size = 12
  c.data.channels = 1
  c.data.subset_size = 16
  c.data.eval_split = "test[:64]"
  c.marks.pattern = "border"
  c.marks.pad = 2  # 12 + 2 * 2 = 16 px
  c.model.condition = "image"
  c.model.block_out_channels = (32, 64)
  c.model.down_block_types = ("DownBlock2D", "CrossAttnDownBlock2D")
  c.model.up_block_types = ("CrossAttnUpBlock2D", "UpBlock2D")
  c.model.cross_attention_dim = 64
  c.train.batch_size = 16
  c.train.num_steps = 1500  # half of configs/fashion_mnist_memorize.py: partial recall, no ceiling
  c.train.learning_rate = 1e-3
  c.train.warmup_steps = 50
  c.train.ema_decay = 0.995
  c.train.cond_dropout = 0.1
  c.train.log_every = 100
  c.train.checkpoint_every = 250
  c.train.keep_checkpoints = 2
  c.train.sample_every = 0
  c.eval.num_members = 16
  c.eval.num_nonmembers = 32
  c.eval.repeats = 4
  c.eval.batch_size = 16
  c.eval.num_steps = 50
  c.eval.num_grid = 0
  c.sweep.kind = "mitigation"
  c.sweep.settings = ("none",)
  return c
