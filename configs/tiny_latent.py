"""Tiny latent text-to-image config for tests and smoke runs: VAE (stage 1) + UNet on its latents,
conditioned on captions through a fresh small text encoder, on 32 captioned Fashion-MNIST images.

  python train.py --config configs/tiny_latent.py --workdir /tmp/sm_tiny_latent
  python evaluate.py --config configs/tiny_latent.py --workdir /tmp/sm_tiny_latent
"""

from configs import tiny


def get_config():
  c = tiny.get_config()
  c.data.name = "captioned_fashion_mnist"  # built offline from Fashion-MNIST on first use
  c.data.train_split = "train[:64]"  # only these records are built and captioned
  c.data.eval_split = "test[:64]"
  c.model.space = "latent"
  c.model.condition = "text"
  c.model.cross_attention_dim = 32  # = text.hidden_size
  c.text.hidden_size = 32
  c.text.num_layers = 1
  c.text.num_heads = 2
  c.text.intermediate_size = 64
  c.text.max_length = 32
  c.vae.block_out_channels = (32, 32)  # one down-sampling: 16 px -> 8 x 8 x 4 latents
  c.vae.latent_channels = 4
  c.vae.train_steps = 4
  c.vae.batch_size = 8
  c.eval.guidance_scale = 2.0
  c.eval.remask_every = 2
  return c
