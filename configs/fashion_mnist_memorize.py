"""The embedded default: memorisation shown on a CPU, 16 Fashion-MNIST images, one condition per image.

Each image gets its own condition id (like a unique caption), which a small model learns to tie to
the image and its key within minutes on 2 CPU cores. 12 x 12 images + 2 px border = 16 x 16.
Non-members (held-out test images with fresh keys) are queried with the null condition.

  python train.py --config configs/fashion_mnist_memorize.py --workdir workdirs/memorize --evaluate

trains, then evaluates as `python evaluate.py --config configs/fashion_mnist_memorize.py --workdir
workdirs/memorize` does and prints the summary table.

docs/results.md records the figures this gave and how long it took.
"""

from solidmark_jax.config import default_config


def get_config():
  c = default_config()
  c.data.name = "fashion_mnist"
  c.data.image_size = 12
  c.data.channels = 1
  c.data.subset_size = 16
  c.data.eval_split = "test"
  c.marks.pad = 2
  c.model.condition = "image"
  c.model.block_out_channels = (32, 64)
  c.model.down_block_types = ("DownBlock2D", "CrossAttnDownBlock2D")
  c.model.up_block_types = ("CrossAttnUpBlock2D", "UpBlock2D")
  c.model.cross_attention_dim = 64
  c.train.batch_size = 16
  c.train.num_steps = 3000
  c.train.learning_rate = 1e-3
  c.train.warmup_steps = 50
  c.train.ema_decay = 0.995
  c.train.cond_dropout = 0.1
  c.train.log_every = 50
  c.train.checkpoint_every = 250
  c.train.sample_every = 1000
  c.eval.num_members = 16
  c.eval.num_nonmembers = 64
  c.eval.repeats = 4
  c.eval.batch_size = 16
  c.eval.num_steps = 100
  c.eval.num_grid = 16
  return c
