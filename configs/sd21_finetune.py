"""Fine-tune Stable Diffusion 2.1 on bordered image-caption shards (the paper's LAION-5K setting).

The pipeline comes from a local diffusers directory in Stable Diffusion's layout (unet/, vae/,
text_encoder/, tokenizer/, scheduler/), e.g. a copy of `stabilityai/stable-diffusion-2-1-base` (the
512 px epsilon model; the 768 px `stable-diffusion-2-1` predicts v, which its scheduler_config.json
says and diffusion.prediction_type follows). One flag sets all three parts.
Images: 224 px + 2 x 16 px border = 256 px -> 32 x 32 x 4 latents, which SD 2.1's three
down-samplings take (288 px -> 36 would not: the config is validated up front).

  python train.py --config configs/sd21_finetune.py --workdir workdirs/sd21_ft \\
    --config.sd_root=/models/stable-diffusion-2-1-base \\
    --config.data.shards='/data/laion5k/train-*.tar' --config.data.eval_shards='/data/laion5k/heldout-*.tar'
  python evaluate.py --config configs/sd21_finetune.py --workdir workdirs/sd21_ft \\
    --config.sd_root=/models/stable-diffusion-2-1-base \\
    --config.data.shards='/data/laion5k/train-*.tar' --config.data.eval_shards='/data/laion5k/heldout-*.tar'

Shards: webdataset tars (<key>.jpg + <key>.txt) or parquet files with image bytes and captions
(data/shards.py). On a multi-host slice add --coordinator_address=auto (see README).
"""

import ml_collections

from solidmark_jax.config import default_config

SD_ROOT = "/models/stable-diffusion-2-1-base"


def get_config():
  c = default_config()
  root = ml_collections.FieldReference(SD_ROOT)
  c.sd_root = root  # --config.sd_root sets the UNet, VAE and text encoder paths at once
  c.model.pretrained = root
  c.text.pretrained = root
  c.vae.pretrained = root

  c.data.name = "shards"
  c.data.image_size = 224
  c.data.channels = 3
  c.data.subset_size = 5000  # the paper's LAION-5K subset (first 5,000 records of the shards)
  c.data.on_bad_image = "skip"  # web data: broken images and captions are skipped and counted
  c.marks.pad = 16  # 224 + 32 = 256 px

  c.model.space = "latent"
  c.model.condition = "text"
  c.text.max_length = 77
  c.diffusion.schedule = "scaled_linear"  # SD 2.1's training schedule
  c.diffusion.num_steps = 1000

  c.train.batch_size = 32
  c.train.num_steps = 7_800  # ~50 epochs of 5,000 images
  c.train.learning_rate = 1e-5
  c.train.warmup_steps = 500
  c.train.ema_decay = 0.9999
  c.train.cond_dropout = 0.1
  c.train.checkpoint_every = 500
  c.train.sample_every = 2_000
  c.train.num_samples = 8
  c.train.sample_steps = 50

  c.eval.num_members = 5000
  c.eval.num_nonmembers = 1000
  c.eval.batch_size = 64
  c.eval.num_steps = 100  # the public code: 100 DDIM steps, guidance 3
  c.eval.guidance_scale = 3.0
  c.eval.remask_every = 10
  return c
