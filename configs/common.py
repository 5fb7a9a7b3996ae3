"""Setups shared by several configs: the paper's DDPM, and the Fashion-MNIST miniatures of its experiments.

Not a config itself (no get_config): each config in configs/ starts from one of these functions and
sets what is its own, so that no config builds on a config that builds on another.
"""

from typing import Sequence

import ml_collections

from solidmark_jax.config import default_config

# The paper's UNet for 32 and 64 px images: attention at the two middle resolutions.
DDPM_BLOCKS = (128, 256, 256, 256)
DDPM_DOWN = ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D")
DDPM_UP = ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D")


def paper_ddpm(name: str, condition: str, num_records: int, epochs: int,
               block_out_channels: Sequence[int] = DDPM_BLOCKS, down_block_types: Sequence[str] = DDPM_DOWN,
               up_block_types: Sequence[str] = DDPM_UP) -> ml_collections.ConfigDict:
  """The paper's DDPM setup on TFDS dataset `name`: border 16, AdamW 1e-4, batch 64, EMA 0.9995, 250 sampling steps.

  Args:
    name: the TFDS dataset (data.name).
    condition: model.condition ("class" or "none").
    num_records: training images per epoch (to count train.num_steps).
    epochs: training epochs.
    block_out_channels: the UNet's channels per resolution.
    down_block_types: its down blocks.
    up_block_types: its up blocks.

  Returns:
    The config; the caller sets its evaluation sizes and anything else of its own.
  """
  c = default_config()
  c.data.name = name
  c.data.channels = 3
  c.marks.pad = 16
  c.model.condition = condition
  c.model.block_out_channels = tuple(block_out_channels)
  c.model.down_block_types = tuple(down_block_types)
  c.model.up_block_types = tuple(up_block_types)
  c.model.layers_per_block = 2
  c.model.cross_attention_dim = 256
  c.train.batch_size = 64
  c.train.learning_rate = 1e-4
  c.train.ema_decay = 0.9995
  c.train.num_steps = epochs * num_records // c.train.batch_size
  c.train.checkpoint_every = 5000
  c.train.sample_every = 10000
  c.eval.num_steps = 250
  return c


def fashion_mnist_memorize() -> ml_collections.ConfigDict:
  """16 Fashion-MNIST images at 12 px + 2 px border, one condition id per image, a small UNet.

  configs/fashion_mnist_memorize.py as it is; the paper miniatures start from it.
  """
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


def paper_miniature() -> ml_collections.ConfigDict:
  """The paper's experiments in miniature: `fashion_mnist_memorize()` trained half as long, scored by a sweep.

  configs/paper_border.py as it is: the key is the 2 px border, one sweep setting ("none").
  """
  c = fashion_mnist_memorize()  # 16 images, one condition per image, 16 px
  c.data.eval_split = "test[:64]"
  c.marks.pattern = "border"
  c.train.num_steps = 1500  # half of configs/fashion_mnist_memorize.py: partial recall, no ceiling
  c.train.log_every = 100
  c.train.keep_checkpoints = 2
  c.train.sample_every = 0
  c.eval.num_nonmembers = 32
  c.eval.num_steps = 50
  c.eval.num_grid = 0
  c.sweep.kind = "mitigation"
  c.sweep.settings = ("none",)
  return c


def paper_text_miniature() -> ml_collections.ConfigDict:
  """`paper_miniature()` on 16 captioned Fashion-MNIST images, with a fresh small text encoder.

  The model and data of configs/paper_table3_mitigations.py, paper_gni_figure.py and
  paper_table4_augment.py (one checkpoint for the three); each sets its own sweep.
  """
  c = paper_miniature()  # 16 images at 12 px + 2 px border, the same UNet and training
  c.data.name = "captioned_fashion_mnist"
  c.data.train_split = "train[:16]"
  c.data.eval_split = "test[:64]"
  c.model.condition = "text"
  c.text.hidden_size = 64  # == model.cross_attention_dim
  c.text.max_length = 32  # the captions are 10-20 tokens; longer ones would be counted as truncated
  c.train.num_steps = 3000
  c.eval.num_nonmembers = 16  # per setting, queried with their own (mitigated) captions
  # DoRI's search as the miniature tables of docs/experiments.md were measured: learning rate 0.01 and one
  # (t, eps) draw per Adam step. The paper's setting (0.1, 8 draws) is the config default; its miniature
  # run is configs/paper_dori_defaults.py.
  c.eval.dori.learning_rate = 0.01
  c.eval.dori.draws = 1
  return c
