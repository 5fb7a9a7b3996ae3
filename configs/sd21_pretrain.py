"""Pretrain a fresh Stable Diffusion 2.1 UNet on bordered image-caption shards (the paper's 200k
LAION subset, as the SolidMark paper), with SD 2.1's frozen VAE and OpenCLIP text encoder, laid out for a TPU pod.

The UNet has SD 2.1's architecture (865.9M parameters, widths 320/640/1280/1280, linear-projection
transformers, cross-attention dim 1024) initialised at random; the VAE and text encoder come from a
local Stable Diffusion 2.1 directory (`sd_root`: vae/, text_encoder/, tokenizer/).
Images: 224 px + 2 x 16 px border = 256 px -> 32 x 32 x 4 latents.

Mesh: parameters and optimizer state sharded over an 8-way "fsdp" axis, the batch over "data" (all
devices the fsdp axis leaves): on a v4-64 pod slice (32 chips) that is 4 x 8. The paper trained
500k steps at batch 8 (4M samples); here the same samples at global batch 256.

  python train.py --config configs/sd21_pretrain.py --workdir /mnt/workdirs/sd21_pretrain \\
    --config.sd_root=/models/stable-diffusion-2-1-base --config.data.shards='/data/laion200k/*.tar' \\
    --coordinator_address=auto
  python evaluate.py --config configs/sd21_pretrain.py --workdir /mnt/workdirs/sd21_pretrain \\
    --config.sd_root=/models/stable-diffusion-2-1-base --config.data.shards='/data/laion200k/*.tar' \\
    --config.data.eval_shards='/data/laion_heldout/*.tar' --coordinator_address=auto
"""

import ml_collections

from solidmark_jax.config import default_config

SD_ROOT = "/models/stable-diffusion-2-1-base"


def get_config():
  c = default_config()
  root = ml_collections.FieldReference(SD_ROOT)
  c.sd_root = root  # the frozen VAE and text encoder
  c.text.pretrained = root
  c.vae.pretrained = root

  c.data.name = "shards"
  c.data.image_size = 224
  c.data.channels = 3
  c.data.subset_size = 200_000
  c.data.on_bad_image = "skip"
  c.marks.pad = 16

  c.model.space = "latent"
  c.model.condition = "text"
  c.model.block_out_channels = (320, 640, 1280, 1280)
  c.model.down_block_types = ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D")
  c.model.up_block_types = ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D")
  c.model.layers_per_block = 2
  # heads' dims per block (the default config's field is one int for every block)
  c.model = ml_collections.ConfigDict({**c.model.to_dict(), "attention_head_dim": (5, 10, 20, 20)})
  c.model.use_linear_projection = True
  c.model.cross_attention_dim = 1024  # OpenCLIP ViT-H's hidden size
  c.text.max_length = 77
  c.diffusion.schedule = "scaled_linear"
  c.diffusion.num_steps = 1000

  c.train.batch_size = 256
  c.train.num_steps = 15_625  # 4M samples, as 500k steps at batch 8
  c.train.learning_rate = 1e-4
  c.train.warmup_steps = 1_000
  c.train.ema_decay = 0.9999
  c.train.cond_dropout = 0.1
  c.train.checkpoint_every = 1_000
  c.train.sample_every = 2_500
  c.train.num_samples = 16
  c.train.sample_steps = 50

  c.mesh.fsdp = 8
  c.mesh.data = -1

  c.eval.num_members = 10_000
  c.eval.num_nonmembers = 2_000
  c.eval.batch_size = 256
  c.eval.num_steps = 100
  c.eval.guidance_scale = 3.0
  c.eval.remask_every = 10
  return c
