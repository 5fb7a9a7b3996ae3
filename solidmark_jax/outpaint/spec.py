"""How the reverse process runs: one small frozen dataclass, built once, shared by the pixel and latent loops."""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

SAMPLERS = ("ddim", "ddpm")
REMASK_FROM = ("x0", "noisy")
Sampler = Literal["ddim", "ddpm"]


def check_jump(num_steps: int, jump_length: int, resamples: int) -> None:
  """The sampling steps and RePaint's j and u, each >= 1; a clear ValueError otherwise."""
  if num_steps < 1:
    raise ValueError(f"outpaint: num_steps must be >= 1, got {num_steps}")
  if jump_length < 1:
    raise ValueError(f"outpaint: jump_length must be >= 1, got {jump_length}")
  if resamples < 1:
    raise ValueError(f"outpaint: resamples must be >= 1 (1 = no resampling), got {resamples}")


@dataclasses.dataclass(frozen=True)
class SamplerSpec:
  """The sampler settings of an outpainting (or plain sampling) run.

  Attributes:
    num_steps: S strided sampling timesteps (the paper: 250 of T = 1000; the public code's latent
      runs: 100).
    sampler: "ddim" (deterministic for eta = 0) or "ddpm" (ancestral).
    eta: DDIM noise scale (eta = 1 is the DDPM variance on the strided sequence).
    jump_length: RePaint's j (Lugmayr et al. 2022).
    resamples: RePaint's u; 1 means no resampling (the public SolidMark code), RePaint uses 10.
    guidance_scale: classifier-free guidance s; eps_hat = eps_u + s (eps_c - eps_u) when s != 1 (the
      call then needs the null condition).
    remask_every: latent models: s steps between decode / re-mask / re-encode round trips (the paper:
      10); 0 never re-masks.
    remask_from: latent models: "x0" (decode the predicted clean latent) or "noisy" (decode z_t).
    magnitude_steps: k: with guidance, the loop also returns Wen et al.'s (2024) memorisation
      detector, the text-conditional noise magnitude ||eps(x_t, c) - eps(x_t, null)||_2 averaged over
      the first k denoiser calls (the paper's headline detector: the first step; docs/noise_magnitude.md).
      Free: both predictions are computed for guidance anyway.
  """

  num_steps: int
  sampler: Sampler = "ddim"
  eta: float = 0.0
  jump_length: int = 10
  resamples: int = 1
  guidance_scale: float = 1.0
  remask_every: int = 10
  remask_from: Literal["x0", "noisy"] = "x0"
  magnitude_steps: int = 1

  def __post_init__(self):
    if self.sampler not in SAMPLERS:
      raise ValueError(f"outpaint: sampler must be one of {SAMPLERS}, got {self.sampler!r}")
    check_jump(self.num_steps, self.jump_length, self.resamples)
    if self.remask_from not in REMASK_FROM:
      raise ValueError(f"latent outpaint: remask_from must be one of {REMASK_FROM}, got {self.remask_from!r}")
    if self.remask_every < 0:
      raise ValueError(f"latent outpaint: remask_every must be >= 0 (0: never), got {self.remask_every}")
    if self.magnitude_steps < 1:
      raise ValueError(f"outpaint: magnitude_steps must be >= 1 (the first k steps' noise magnitude), got "
                       f"{self.magnitude_steps}")

  @property
  def guided(self) -> bool:
    """Whether classifier-free guidance runs (s != 1)."""
    return self.guidance_scale != 1.0

  @classmethod
  def from_config(cls, section: Any, **overrides) -> "SamplerSpec":
    """From a config section with the fields above (`config.eval`); `overrides` replace fields."""
    names = [f.name for f in dataclasses.fields(cls)]
    values = {name: section.get(name) for name in names if section.get(name) is not None}
    values.update(overrides)
    return cls(**values)

  def replace(self, **changes) -> "SamplerSpec":
    return dataclasses.replace(self, **changes)
