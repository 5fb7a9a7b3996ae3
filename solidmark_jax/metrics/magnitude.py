"""Wen et al.'s (2024) memorisation detector beside SolidMark's keys: the text-conditional noise magnitude.

Wen, Liu, Chen, Lyu, "Detecting, Explaining, and Mitigating Memorization in Diffusion Models" (ICLR 2024)
flag a memorised prompt by how far its conditional noise prediction lies from the unconditional one,
||eps(x_t, c) - eps(x_t, null)||_2, in the first sampling steps: no training data is needed. The
outpainting loop returns it per image and repeat whenever guidance runs (`SamplerSpec.magnitude_steps`);
here it is reduced per image (the mean over its repeats, as the paper averages over generations per
prompt) and set beside l_SM: does the detector that needs no training data agree with the one that
does? A larger magnitude means "memorised", a smaller l_SM does. docs/noise_magnitude.md.
"""

from __future__ import annotations

import numpy as np
import scipy.stats
from numpy.typing import ArrayLike

from solidmark_jax.metrics.memorisation import membership_inference, roc_curve


def per_image(noise_magnitude: ArrayLike) -> np.ndarray:
  """[N, r] magnitudes per repeat (NaN where an image has fewer repeats) -> [N] the mean over repeats."""
  m = np.asarray(noise_magnitude, np.float64)
  m = m.reshape(len(m), -1)
  counts = np.sum(~np.isnan(m), axis=1)
  if np.any(counts == 0):
    raise ValueError(f"noise magnitude: {int(np.sum(counts == 0))} image(s) have no value")
  return np.nansum(m, axis=1) / counts


def _stats(values: np.ndarray) -> dict:
  if not len(values):
    return {"n": 0, "mean": None, "sd": None, "median": None}
  return {"n": int(len(values)), "mean": float(np.mean(values)),
          "sd": float(np.std(values, ddof=1)) if len(values) > 1 else 0.0, "median": float(np.median(values))}


def rank_correlation(magnitude: ArrayLike, l_sm: ArrayLike) -> dict:
  """Spearman's rho of the magnitude against l_SM, with its two-sided p (None below 3 images or with a
  constant input). Agreement of the two detectors is a negative rho: a larger magnitude, a smaller l_SM."""
  a = np.asarray(magnitude, np.float64).reshape(-1)
  b = np.asarray(l_sm, np.float64).reshape(-1)
  if len(a) != len(b):
    raise ValueError(f"rank correlation: {len(a)} magnitudes but {len(b)} l_SM values")
  if len(a) < 3 or np.ptp(a) == 0 or np.ptp(b) == 0:
    return {"rho": None, "p_value": None, "n": int(len(a))}
  res = scipy.stats.spearmanr(a, b)
  return {"rho": float(res.statistic), "p_value": float(res.pvalue), "n": int(len(a))}


def summarize_magnitude(magnitude: dict[str, ArrayLike], l_sm: dict[str, ArrayLike], *, members: str = "members",
                        steps: int | None = None) -> dict:
  """The report's noise-magnitude section.

  Args:
    magnitude: {group: [n] per-image magnitude (`per_image`)}.
    l_sm: {group: [n] the scored per-image l_SM of the same images, in the same order}.
    members: the members' group name.
    steps: k, the denoiser calls averaged (recorded as is).

  Returns:
    {"steps", "groups": {group: {n, mean, sd, median, rank_correlation}},
     "pooled_rank_correlation": over every image, "comparisons": {"members_vs_<g>": membership-inference
     figures of the magnitude (larger = member: AUC, TPR at 1% / 0.1% FPR)}}.
  """
  groups = {}
  for g, values in magnitude.items():
    values = np.asarray(values, np.float64).reshape(-1)
    groups[g] = {**_stats(values), "rank_correlation": rank_correlation(values, l_sm[g])}
  comparisons = {}
  if members in magnitude:
    for g in magnitude:
      if g != members:
        # membership_inference counts smaller scores as members: the negated magnitude
        comparisons[f"members_vs_{g}"] = membership_inference(-np.asarray(magnitude[members], np.float64),
                                                              -np.asarray(magnitude[g], np.float64))
  pooled_m = np.concatenate([np.asarray(v, np.float64).reshape(-1) for v in magnitude.values()]) if magnitude else []
  pooled_l = np.concatenate([np.asarray(l_sm[g], np.float64).reshape(-1) for g in magnitude]) if magnitude else []
  return {"steps": steps, "doc": "||eps(x_t, c) - eps(x_t, null)||_2 averaged over the first k denoiser calls, then "
                                 "over an image's repeats (Wen et al. 2024); larger = memorised",
          "groups": groups, "pooled_rank_correlation": rank_correlation(pooled_m, pooled_l),
          "comparisons": comparisons}


def magnitude_roc(member_magnitude: ArrayLike, other_magnitude: ArrayLike) -> dict[str, np.ndarray]:
  """ROC of "member when the magnitude >= t" (`memorisation.roc_curve` on the negated magnitudes)."""
  return roc_curve(-np.asarray(member_magnitude, np.float64), -np.asarray(other_magnitude, np.float64))
