"""The paper's class-conditional DDPM setup on CIFAR-10, border 16.

32 x 32 images + 2 x 16 border = 64 x 64. Needs CIFAR-10 prepared in a TFDS data dir
(`tfds build cifar10 --data_dir DIR` on a machine with network, copied here).

  python train.py --config configs/cifar10.py --workdir workdirs/cifar10 --config.data.data_dir=DIR
  python evaluate.py --config configs/cifar10.py --workdir workdirs/cifar10 --config.data.data_dir=DIR

Paper setup: 1000 diffusion steps, cosine schedule, AdamW 1e-4, batch 64, EMA 0.9995, 500 epochs,
250 sampling steps.
"""

from solidmark_jax.config import default_config


def get_config():
  c = default_config()
  c.data.name = "cifar10"
  c.data.channels = 3
  c.marks.pad = 16
  c.model.condition = "class"
  c.model.block_out_channels = (128, 256, 256, 256)
  c.model.down_block_types = ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D")
  c.model.up_block_types = ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D")
  c.model.layers_per_block = 2
  c.model.cross_attention_dim = 256
  c.train.batch_size = 64
  c.train.learning_rate = 1e-4
  c.train.ema_decay = 0.9995
  c.train.num_steps = 500 * 50_000 // 64  # 500 epochs
  c.train.checkpoint_every = 5000
  c.train.sample_every = 10000
  c.eval.num_members = 5000
  c.eval.num_nonmembers = 5000
  c.eval.num_steps = 250
  c.eval.batch_size = 256
  return c
