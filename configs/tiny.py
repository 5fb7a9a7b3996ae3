"""Tiny config for tests and smoke runs: a few steps on 32 Fashion-MNIST images at 12 px.

  python train.py --config configs/tiny.py --workdir /tmp/sm_tiny
  python evaluate.py --config configs/tiny.py --workdir /tmp/sm_tiny
"""

from solidmark_jax.config import default_config


def get_config():
  c = default_config()
  c.data.name = "fashion_mnist"
  c.data.image_size = 12
  c.data.channels = 1
  c.data.subset_size = 32
  c.data.eval_split = "test[:64]"
  c.marks.pad = 2  # 12 + 2 * 2 = 16 px
  c.model.condition = "class"
  c.model.block_out_channels = (32, 32)
  c.model.down_block_types = ("DownBlock2D", "CrossAttnDownBlock2D")
  c.model.up_block_types = ("CrossAttnUpBlock2D", "UpBlock2D")
  c.model.cross_attention_dim = 32
  c.diffusion.num_steps = 100
  c.train.batch_size = 8
  c.train.num_steps = 4
  c.train.learning_rate = 1e-3
  c.train.warmup_steps = 1
  c.train.log_every = 2
  c.train.checkpoint_every = 2
  c.train.sample_every = 0
  c.train.num_samples = 8
  c.train.sample_steps = 4
  c.eval.num_members = 8
  c.eval.num_nonmembers = 8
  c.eval.batch_size = 8
  c.eval.num_steps = 4
  c.eval.num_grid = 8
  return c
