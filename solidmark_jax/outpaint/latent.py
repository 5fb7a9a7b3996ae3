"""Outpainting for latent-space models (the paper's Appendix B, "Latent space"): one jitted, vmapped loop.

The UNet denoises VAE latents; the known region and the mask live in pixels. The reverse process runs
on latents and every s = `SamplerSpec.remask_every` steps goes through pixels to put the known centre
back: decode, re-mask, re-encode. `remask_from="x0"` (default) decodes the predicted clean latent and
re-noises the re-masked, re-encoded estimate with the model's own noise; `"noisy"` decodes z_t itself
(for comparison only). RePaint resampling (j, u) runs on the latents with the pixel loop's schedule. At
the end the latent is decoded, clipped, the known centre pasted back and k_pred read off the key
region(s). docs/latent_sampling.md gives the exact updates and why "x0" is the default.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from solidmark_jax.diffusion import schedule as schedule_lib
from solidmark_jax.diffusion.schedule import NoiseSchedule
from solidmark_jax.models.vae import VAE
from solidmark_jax.outpaint.repaint import Denoiser, Outpainter
from solidmark_jax.outpaint.spec import SamplerSpec

_JUMP_SALT = 0x7A3F0  # the jump noise of row i: fold_in(fold_in(key, salt), i), apart from the u = 1 streams


# ---------------------------------------------------------------------------------------------
# The latent clean estimate (unclipped) and the re-mask grid.


def latent_x0(sched: NoiseSchedule, z_t: jax.Array, t: jax.Array, eps_hat: jax.Array) -> jax.Array:
  """z0_hat = (z_t - sqrt(1 - abar_t) eps_hat) / sqrt(abar_t), not clipped (latents are unbounded)."""
  return schedule_lib.predict_x0(sched, z_t, t, eps_hat, clip=False)


def remask_rows(num_rows: int, remask_every: int, remask_from: str) -> np.ndarray:
  """bool [K]: which of the K sampling steps re-mask (see the module docstring)."""
  i = np.arange(num_rows)
  if remask_every <= 0:
    return np.zeros(num_rows, bool)
  if remask_from == "x0":
    return i % remask_every == 0
  return (i % remask_every == 0) & (i > 0)


# ---------------------------------------------------------------------------------------------
# The jitted function.


class LatentOutpainter(Outpainter):
  """A compiled latent outpainting function; build it with `make_latent_outpaint_fn`.

  Same call convention as the pixel `Outpainter`: `fn(params, known, mask, conditions, rng,
  repeats, ids=None, null_condition=None, return_images=None)` and `.run(...)`, returning {"k_pred": [N, r]} ([N, r, m]
  with m key regions) and on request "images" [N, r, H, W, C] in pixel model space (known region
  pasted back), with:

    params: {"unet": denoiser params, "vae": VAE params}.
    known: [N, H, W, C] pixel model-space images; mask: [H, W, 1] pixels, 1 = unknown.
    conditions: [N] ids or [N, L, D] / [N, D] embeddings.

  Attributes (beyond `Outpainter`'s):
    vae: the VAE.
    remask: bool [K], the steps that decode, re-mask and re-encode (`spec.remask_every`, `spec.remask_from`).
    steps: int32 [K, 3] (t_from, t, t_prev) rows, RePaint jumps included (`repaint.repaint_steps`).
  """

  name = "latent outpaint"  # error messages

  def __init__(self, denoiser: Denoiser, sched: NoiseSchedule, vae: VAE, spec: SamplerSpec, *,
               return_images: bool = False, mesh: Mesh | None = None, key_masks: np.ndarray | None = None):
    self.vae = vae
    super().__init__(denoiser, sched, spec, return_images=return_images, mesh=mesh, key_masks=key_masks)
    self.remask = remask_rows(len(self.steps), spec.remask_every, spec.remask_from)

  @property
  def num_remasks(self) -> int:
    """Decode + encode round trips per image and repeat (with a known region)."""
    return int(self.remask.sum())

  # -- per image -------------------------------------------------------------------------------

  def _encode(self, params_vae, x):
    return self.vae.encode(params_vae, x[None])[0]  # [H, W, C] -> [h, w, c]

  def _decode(self, params_vae, z):
    return self.vae.decode(params_vae, z[None])[0]  # [h, w, c] -> [H, W, C]

  def _remask_clean(self, params_vae, z0, x0_known, mask):
    """z0' = E(m * clip(D(z0)) + (1 - m) * x0_known)."""
    x = jnp.clip(self._decode(params_vae, z0), -1.0, 1.0)  # [H, W, C]
    return self._encode(params_vae, mask * x + (1.0 - mask) * x0_known)

  def _remask_noisy(self, params_vae, z_t, t, x0_known, mask, noise):
    """z_t' = E(m * D(z_t) + (1 - m) * q_sample(x0_known, t))."""
    x_known_t = schedule_lib.q_sample(self.sched, x0_known, t, noise)  # [H, W, C]
    return self._encode(params_vae, mask * self._decode(params_vae, z_t) + (1.0 - mask) * x_known_t)

  def _one(self, params, x0_known, mask, key_mask, condition, null, key):
    """Outpaints one image once: x0_known [H, W, C] pixels -> (k_pred [] or [m], x0 [H, W, C], noise magnitude [])."""
    sched, p_unet, p_vae = self.sched, params["unet"], params["vae"]
    key_init, key_loop = jax.random.split(key)
    latent_shape = self.vae.latent_shape(x0_known.shape[0])
    if x0_known.shape[1] != x0_known.shape[0]:
      latent_shape = (self.vae.latent_size(x0_known.shape[0]), self.vae.latent_size(x0_known.shape[1]),
                      self.vae.latent_channels)
    z = jax.random.normal(key_init, latent_shape, x0_known.dtype)  # z at the noisiest level
    steps = jnp.asarray(self.steps)  # [K, 3] (t_from == t: no jump)
    rows = jnp.concatenate([jnp.arange(steps.shape[0], dtype=jnp.int32)[:, None], steps,
                            jnp.asarray(self.remask, jnp.int32)[:, None]], axis=1)  # [K, 5]
    has_known = jnp.any(key_mask < 0.5)  # the same for every image: lax.cond stays a branch under vmap
    jumps = bool(np.any(self.steps[:, 0] < self.steps[:, 1]))  # static: no jump code without resampling
    key_jump = jax.random.fold_in(key_loop, _JUMP_SALT)

    def step(carry, row):
      z_t, total = carry
      i, t_from, t, t_prev, remask = row[0], row[1], row[2], row[3], (row[4] > 0) & has_known
      k_pixel, k_step = jax.random.split(jax.random.fold_in(key_loop, i))
      if jumps:  # RePaint resampling: back from t_from to the noisier t (no-op row when t_from == t)
        noise_jump = jax.random.normal(jax.random.fold_in(key_jump, i), z_t.shape, z_t.dtype)
        z_t = jnp.where(t_from < t, schedule_lib.forward_jump(sched, z_t, t_from, t, noise_jump), z_t)
      if self.spec.remask_from == "noisy":
        noise_px = jax.random.normal(k_pixel, x0_known.shape, x0_known.dtype)
        z_t = jax.lax.cond(remask, lambda z: self._remask_noisy(p_vae, z, t, x0_known, mask, noise_px),
                           lambda z: z, z_t)
      eps_hat, magnitude = self._eps(p_unet, z_t, t, condition, null)  # [h, w, c], []
      z0 = latent_x0(sched, z_t, t, eps_hat)
      if self.spec.remask_from == "x0":
        z0 = jax.lax.cond(remask, lambda z: self._remask_clean(p_vae, z, x0_known, mask), lambda z: z, z0)
      noise = jax.random.normal(k_step, z_t.shape, z_t.dtype)
      if self.spec.sampler == "ddim":
        z_prev = schedule_lib.ddim_update(sched, t, t_prev, z0, eps_hat, noise, eta=self.spec.eta)
      else:
        z_prev = schedule_lib.ddpm_update(sched, z_t, t, t_prev, z0, noise)
      return (z_prev, self._accumulate(total, i, magnitude)), None

    (z, total), _ = jax.lax.scan(step, (z, jnp.zeros((), jnp.float32)), rows)
    x = jnp.clip(self._decode(p_vae, z), -1.0, 1.0)  # [H, W, C]
    x = mask * x + (1.0 - mask) * x0_known  # paste the known region back
    return self._k_pred(x, key_mask), x, self._magnitude(total)

  def check_call(self, params: Any, known: np.ndarray, mask: np.ndarray, conditions: np.ndarray,
                 regions: np.ndarray | None = None) -> None:
    if not isinstance(params, dict) or set(params) != {"unet", "vae"}:
      raise ValueError("latent outpaint: params must be {'unet': denoiser params, 'vae': VAE params}, got "
                       f"{sorted(params) if isinstance(params, dict) else type(params).__name__}")
    if known.shape[-1] != self.vae.channels:
      raise ValueError(f"latent outpaint: known images have {known.shape[-1]} channels, the VAE takes "
                       f"{self.vae.channels}")
    for side in known.shape[1:3]:
      self.vae.latent_size(side)
    super().check_call(params, known, mask, conditions, regions)


def make_latent_outpaint_fn(denoiser: Denoiser, sched: NoiseSchedule, vae: VAE, spec: SamplerSpec, *,
                            return_images: bool = False, mesh: Mesh | None = None,
                            key_masks: np.ndarray | None = None, prediction_type: str = "epsilon") -> LatentOutpainter:
  """Builds the jitted latent outpainting function (the paper's Appendix B; module docstring).

  Args:
    denoiser: `(params, z_t [B, h, w, c], t [B] int32, condition [B, ...]) -> eps_hat [B, h, w, c]`
      on scaled latents.
    sched: the training noise schedule (T levels).
    vae: the VAE the latents belong to (`models.vae`).
    spec: the sampler settings; `remask_every` / `remask_from` say when and what is re-masked (the
      public code: 100 steps, re-mask every 10, guidance 3).
    return_images: also return the outpainted (decoded) images.
    mesh: shard the image batch over this mesh's batch axes.
    key_masks: m key regions [m, H, W, 1|C] in pixels (`marks.key_masks`): k_pred [N, r, m];
      None reads one key off the call's mask.
    prediction_type: what `denoiser` returns: "epsilon", or "v_prediction" (converted to eps_hat
      by `schedule.eps_denoiser`).

  Returns:
    A `LatentOutpainter`, called like the pixel `Outpainter` with params {"unet", "vae"}.
  """
  denoiser = schedule_lib.eps_denoiser(denoiser, sched, prediction_type)
  return LatentOutpainter(denoiser, sched, vae, spec, return_images=return_images, mesh=mesh, key_masks=key_masks)
