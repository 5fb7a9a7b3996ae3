"""Statistics of region queries (FB-Mem's view): how well a hidden region comes back, against its null.

Per image, a region query gives per repeat the normalised l2 and the SSIM of the hidden region's
reconstruction against the truth, and the same against another image's truth (the region null:
`evaluation.regions.permuted_region_scores`). A memorised region comes back closer than the null; a
region the model merely fills plausibly (a plain black background) can be as close to any image's as
to its own, which the null makes visible. docs/regions.md.
"""

from __future__ import annotations

import numpy as np
import scipy.stats
from numpy.typing import ArrayLike

from solidmark_jax.metrics.memorisation import mann_whitney, membership_inference


def reduce(values: ArrayLike, statistic: str = "best", higher_is_closer: bool = False) -> np.ndarray:
  """[N, r] per repeat -> [N]: the closest repeat ("best": min l2 / max SSIM) or the mean ("mean")."""
  v = np.asarray(values, np.float64)
  v = v.reshape(len(v), -1)
  if statistic == "mean":
    return np.nanmean(v, axis=1)
  return np.nanmax(v, axis=1) if higher_is_closer else np.nanmin(v, axis=1)


def _stats(v: np.ndarray) -> dict:
  v = v[np.isfinite(v)]
  if not len(v):
    return {"n": 0, "mean": None, "median": None}
  return {"n": int(len(v)), "mean": float(np.mean(v)), "median": float(np.median(v))}


def against_null(own: ArrayLike, null: ArrayLike) -> dict:
  """Paired, per image: is the reconstruction closer to its own truth than to another image's?
  {"closer": fraction with own l2 < null l2, "p_value": one-sided Wilcoxon signed-rank (None below 2)}."""
  a, b = np.asarray(own, np.float64), np.asarray(null, np.float64)
  ok = np.isfinite(a) & np.isfinite(b)
  a, b = a[ok], b[ok]
  if len(a) < 2 or np.all(a == b):
    return {"closer": float(np.mean(a < b)) if len(a) else None, "p_value": None, "n": int(len(a))}
  p = scipy.stats.wilcoxon(a, b, alternative="less").pvalue
  return {"closer": float(np.mean(a < b)), "p_value": float(p), "n": int(len(a))}


def summarize_regions(extras: dict[str, dict[str, np.ndarray]], *, statistic: str = "best",
                      members: str = "members") -> dict:
  """The report's region section.

  Args:
    extras: {group: {"region_l2", "region_ssim", "region_null_l2", "region_null_ssim": [n, r]}}.
    statistic: how an image's repeats are reduced ("best" or "mean").
    members: the members' group name.

  Returns:
    {"statistic", "groups": {group: {"l2", "ssim", "null_l2", "null_ssim": {n, mean, median},
     "vs_null": `against_null` of l2}}, "comparisons": {"members_vs_<g>": {"mann_whitney": members' l2
     smaller, one-sided, "membership_inference": AUC / TPR of l2 (smaller = member)}}}.
  """
  per_image = {}
  groups = {}
  for g, e in extras.items():
    l2 = reduce(e["region_l2"], statistic)
    null_l2 = reduce(e["region_null_l2"], statistic)
    per_image[g] = l2
    groups[g] = {"l2": _stats(l2), "ssim": _stats(reduce(e["region_ssim"], statistic, True)),
                 "null_l2": _stats(null_l2), "null_ssim": _stats(reduce(e["region_null_ssim"], statistic, True)),
                 "vs_null": against_null(l2, null_l2)}
  comparisons = {}
  if members in per_image:
    a = per_image[members][np.isfinite(per_image[members])]
    for g, l2 in per_image.items():
      b = l2[np.isfinite(l2)]
      if g != members and len(a) and len(b):
        comparisons[f"members_vs_{g}"] = {"mann_whitney": mann_whitney(a, b, "less"),
                                          "membership_inference": membership_inference(a, b)}
  return {"statistic": statistic, "groups": groups, "comparisons": comparisons}
