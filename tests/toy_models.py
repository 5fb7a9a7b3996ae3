"""A toy conditional model for the DoRI and adversarial tests: the clean image it knows for a condition c
has the border tanh(w . c) and a learnt content, and its denoiser is that image's oracle eps, so the right
answer of every search is known in closed form."""

import jax.numpy as jnp


def tanh_border_model(sched, mask):
  """(x0_fn, denoiser) for key mask `mask` [H, W, 1] under schedule `sched`.

  x0_fn(params, c [B, D]) -> [B, H, W, 1]: border tanh(c @ params["w"]), content params["content"].
  denoiser(params, x_t, t, c) -> eps = (x_t - sqrt(abar_t) x0(c)) / sqrt(1 - abar_t).
  """

  def x0_fn(params, c):
    border = jnp.tanh(c @ params["w"])  # [B]
    return mask * border[:, None, None, None] + (1.0 - mask) * params["content"]

  def denoiser(params, x_t, t, c):
    abar_t = sched.abar[t][:, None, None, None]
    return (x_t - jnp.sqrt(abar_t) * x0_fn(params, c)) / jnp.sqrt(1.0 - abar_t)

  return x0_fn, denoiser
