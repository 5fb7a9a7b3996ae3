"""The paper's unconditional CelebA DDPM: 5,000 evaluated images, border 16.

Faces centre-cropped to a square and resized to 64 px + 2 x 16 border = 96 x 96. Needs CelebA
prepared in a TFDS data dir. Unconditional: every image gets the null condition.

  python train.py --config configs/celeb_a.py --workdir workdirs/celeb_a --config.data.data_dir=DIR
  python evaluate.py --config configs/celeb_a.py --workdir workdirs/celeb_a --config.data.data_dir=DIR
"""

from solidmark_jax.config import default_config


def get_config():
  c = default_config()
  c.data.name = "celeb_a"
  c.data.image_size = 64
  c.data.channels = 3
  c.data.eval_split = "test"
  c.marks.pad = 16
  c.model.condition = "none"
  c.model.block_out_channels = (128, 256, 256, 256)
  c.model.down_block_types = ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D")
  c.model.up_block_types = ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D")
  c.model.layers_per_block = 2
  c.model.cross_attention_dim = 256
  c.train.batch_size = 64
  c.train.learning_rate = 1e-4
  c.train.ema_decay = 0.9995
  c.train.cond_dropout = 0.0
  c.train.num_steps = 225 * 162_770 // 64  # 225 epochs
  c.train.checkpoint_every = 5000
  c.train.sample_every = 10000
  c.eval.num_members = 5000
  c.eval.num_nonmembers = 5000
  c.eval.num_steps = 250
  c.eval.batch_size = 128
  return c
