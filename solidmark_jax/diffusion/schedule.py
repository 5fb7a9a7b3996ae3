"""Noise schedules and the DDPM/DDIM steps, as pure functions (epsilon parameterisation).

Notation of Ho et al. (2020): beta_t, alpha_t = 1 - beta_t, abar_t = prod_{s<=t} alpha_s, with
t = 0 .. T-1 indexing the T training noise levels.

The samplers take eps_hat. A model that predicts v = sqrt(abar_t) eps - sqrt(1 - abar_t) x0
(Salimans & Ho 2022; Stable Diffusion 2.x at 768 px) plugs in through `eps_denoiser`, which
converts its output once, eps = sqrt(abar_t) v + sqrt(1 - abar_t) x_t (diffusers' schedulers use
the same identity); training regresses the matching target (`training_target`).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True)
class NoiseSchedule:
  """A discrete schedule; arrays are float32 [T]."""

  betas: jax.Array
  abar: jax.Array

  @property
  def num_steps(self) -> int:
    return int(self.betas.shape[0])


jax.tree_util.register_dataclass(NoiseSchedule, data_fields=["betas", "abar"], meta_fields=[])


SCHEDULES = ("cosine", "linear", "scaled_linear")


def make_schedule(kind: str = "cosine", num_steps: int = 1000) -> NoiseSchedule:
  """Cosine (Nichol & Dhariwal 2021), linear (Ho et al. 2020, scaled to T) or Stable Diffusion's
  "scaled_linear" (betas = linspace(sqrt(0.00085), sqrt(0.012), T)^2, what SD 2.1 was trained with)."""
  if kind == "cosine":
    s = 0.008
    f = lambda t: math.cos((t / num_steps + s) / (1 + s) * math.pi / 2) ** 2
    betas = np.array([min(1 - f(t + 1) / f(t), 0.999) for t in range(num_steps)], np.float64)
  elif kind == "linear":
    scale = 1000 / num_steps
    betas = np.linspace(scale * 1e-4, scale * 0.02, num_steps, dtype=np.float64)
  elif kind == "scaled_linear":
    betas = np.linspace(0.00085**0.5, 0.012**0.5, num_steps, dtype=np.float64) ** 2
  else:
    raise ValueError(f"diffusion.schedule must be one of {SCHEDULES}, got {kind!r}")
  abar = np.cumprod(1.0 - betas)
  return NoiseSchedule(jnp.asarray(betas, jnp.float32), jnp.asarray(abar, jnp.float32))


def _bcast(v, x):
  return jnp.reshape(v, jnp.shape(v) + (1,) * (x.ndim - jnp.ndim(v)))


def q_sample(sched: NoiseSchedule, x0: jax.Array, t: jax.Array, eps: jax.Array) -> jax.Array:
  """x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps; t may be a scalar or [B]."""
  abar_t = _bcast(sched.abar[t], x0)
  return jnp.sqrt(abar_t) * x0 + jnp.sqrt(1.0 - abar_t) * eps


def abar_at(sched: NoiseSchedule, t: jax.Array) -> jax.Array:
  """abar_t with the convention abar_{-1} = 1 (the clean image)."""
  return jnp.where(t >= 0, sched.abar[jnp.maximum(t, 0)], 1.0)


PREDICTION_TYPES = ("epsilon", "v_prediction")  # diffusers' names (scheduler_config.json)


def check_prediction_type(prediction_type: str) -> str:
  if prediction_type not in PREDICTION_TYPES:
    raise ValueError(f"diffusion.prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}")
  return prediction_type


def velocity(sched: NoiseSchedule, x0: jax.Array, t: jax.Array, eps: jax.Array) -> jax.Array:
  """v = sqrt(abar_t) eps - sqrt(1 - abar_t) x0, the v-parameterisation's target; t [B] or scalar."""
  abar_t = _bcast(sched.abar[t], x0)
  return jnp.sqrt(abar_t) * eps - jnp.sqrt(1.0 - abar_t) * x0


def v_to_eps(sched: NoiseSchedule, x_t: jax.Array, t: jax.Array, v: jax.Array) -> jax.Array:
  """eps = sqrt(abar_t) v + sqrt(1 - abar_t) x_t: a v prediction as the eps prediction it implies."""
  abar_t = _bcast(sched.abar[t], x_t)
  return jnp.sqrt(abar_t) * v + jnp.sqrt(1.0 - abar_t) * x_t


def training_target(sched: NoiseSchedule, prediction_type: str, x0: jax.Array, t: jax.Array,
                    eps: jax.Array) -> jax.Array:
  """What the model regresses at x_t = q_sample(x0, t, eps): eps itself, or v (`velocity`)."""
  if check_prediction_type(prediction_type) == "epsilon":
    return eps
  return velocity(sched, x0, t, eps)


Denoiser = Callable[[Any, jax.Array, jax.Array, Any], jax.Array]


def eps_denoiser(denoiser: Denoiser, sched: NoiseSchedule, prediction_type: str) -> Denoiser:
  """`denoiser` (params, x_t, t, condition) -> its `prediction_type` output, as an eps_hat denoiser.

  The one place where a v-predicting model's output becomes eps_hat (`v_to_eps`); "epsilon"
  returns `denoiser` itself.
  """
  if check_prediction_type(prediction_type) == "epsilon":
    return denoiser

  def eps_from_v(params, x_t, t, condition):
    return v_to_eps(sched, x_t, t, denoiser(params, x_t, t, condition))

  return eps_from_v


def predict_x0(sched: NoiseSchedule, x_t: jax.Array, t: jax.Array, eps_hat: jax.Array, clip: bool = True) -> jax.Array:
  abar_t = _bcast(abar_at(sched, t), x_t)
  x0 = (x_t - jnp.sqrt(1.0 - abar_t) * eps_hat) / jnp.sqrt(abar_t)
  return jnp.clip(x0, -1.0, 1.0) if clip else x0


def ddim_update(sched: NoiseSchedule, t: jax.Array, t_prev: jax.Array, x0: jax.Array, eps: jax.Array, noise: jax.Array,
                eta: float = 0.0) -> jax.Array:
  """DDIM from level t to t_prev < t given the clean estimate x0 and the noise estimate eps.

  x_prev = sqrt(abar_prev) x0 + sqrt(1 - abar_prev - sigma^2) eps + sigma noise, with
  sigma = eta sqrt((1 - abar_prev) / (1 - abar_t) (1 - abar_t / abar_prev)); t_prev = -1 is the
  clean image. eta = 1 gives the DDPM posterior variance on the strided sequence. The one DDIM
  update of the pixel (`ddim_step`) and the latent (`outpaint.latent`) loops.
  """
  abar_t = _bcast(abar_at(sched, t), x0)
  abar_prev = _bcast(abar_at(sched, t_prev), x0)
  sigma = eta * jnp.sqrt((1 - abar_prev) / (1 - abar_t) * (1 - abar_t / abar_prev))
  dir_xt = jnp.sqrt(jnp.maximum(1 - abar_prev - sigma**2, 0.0)) * eps
  return jnp.sqrt(abar_prev) * x0 + dir_xt + sigma * noise


def ddpm_update(sched: NoiseSchedule, x_t: jax.Array, t: jax.Array, t_prev: jax.Array, x0: jax.Array,
                noise: jax.Array) -> jax.Array:
  """A sample of the posterior q(x_{t_prev} | x_t, x0), strided (beta taken between the two levels).

  The one DDPM update of the pixel (`ddpm_step`) and the latent loops.
  """
  abar_t = _bcast(abar_at(sched, t), x_t)
  abar_prev = _bcast(abar_at(sched, t_prev), x_t)
  beta = 1.0 - abar_t / abar_prev
  coef_x0 = jnp.sqrt(abar_prev) * beta / (1.0 - abar_t)
  coef_xt = jnp.sqrt(abar_t / abar_prev) * (1.0 - abar_prev) / (1.0 - abar_t)
  var = beta * (1.0 - abar_prev) / (1.0 - abar_t)
  return coef_x0 * x0 + coef_xt * x_t + jnp.sqrt(var) * noise


def ddim_step(sched: NoiseSchedule, x_t: jax.Array, t: jax.Array, t_prev: jax.Array, eps_hat: jax.Array,
              noise: jax.Array, eta: float = 0.0) -> jax.Array:
  """One pixel-space DDIM step t -> t_prev: x0 predicted and clipped to [-1, 1], eps made consistent."""
  abar_t = _bcast(abar_at(sched, t), x_t)
  x0 = predict_x0(sched, x_t, t, eps_hat)
  eps = (x_t - jnp.sqrt(abar_t) * x0) / jnp.sqrt(1.0 - abar_t)  # consistent with the clipped x0
  return ddim_update(sched, t, t_prev, x0, eps, noise, eta)


def ddpm_step(sched: NoiseSchedule, x_t: jax.Array, t: jax.Array, t_prev: jax.Array, eps_hat: jax.Array,
              noise: jax.Array) -> jax.Array:
  """One pixel-space ancestral DDPM step t -> t_prev (x0 predicted and clipped to [-1, 1])."""
  return ddpm_update(sched, x_t, t, t_prev, predict_x0(sched, x_t, t, eps_hat), noise)


def forward_jump(sched: NoiseSchedule, x_t: jax.Array, t: jax.Array, t_next: jax.Array, noise: jax.Array) -> jax.Array:
  """q(x_{t_next} | x_t) for t_next > t: RePaint's jump back to a noisier level."""
  ratio = _bcast(abar_at(sched, t_next) / abar_at(sched, t), x_t)
  return jnp.sqrt(ratio) * x_t + jnp.sqrt(1.0 - ratio) * noise


def sampling_timesteps(num_train_steps: int, num_sample_steps: int) -> np.ndarray:
  """Descending noise levels t_S > ... > t_1 evenly spaced over [0, T-1], int32 [S]."""
  if not 1 <= num_sample_steps <= num_train_steps:
    raise ValueError(f"sampling steps must be in [1, {num_train_steps}], got {num_sample_steps}")
  ts = np.round(np.linspace(0, num_train_steps - 1, num_sample_steps)).astype(np.int32)
  return ts[::-1].copy()
