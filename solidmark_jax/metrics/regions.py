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


# ---------------------------------------------------------------------------------------------
# FB-Mem on generations: which region of a generation copies which training image.

CATEGORIES = ("both", "foreground", "background", "neither")  # both = verbatim


def region_distances(gen: ArrayLike, gen_fg: ArrayLike, ref: ArrayLike, ref_fg: ArrayLike) -> dict[str, np.ndarray]:
  """Per-region normalised l2 of every generation against every reference image: {"foreground",
  "background"}: float64 [G, N].

  The foreground is compared over the union of the two images' foregrounds (an object elsewhere in the
  reference is a difference), the background over the pixels background in both (inf where there are
  none); l2 = sqrt of the mean squared difference over those pixels and the channels.

  Args:
    gen: [G, h, w, C] generations in [0, 1]; gen_fg: [G, h, w] their foreground masks.
    ref: [N, h, w, C] reference images (training images, or held-out ones for the null); ref_fg: [N, h, w].
  """
  g, r = np.asarray(gen, np.float64), np.asarray(ref, np.float64)
  gf, rf = np.asarray(gen_fg, bool), np.asarray(ref_fg, bool)
  if g.shape[1:] != r.shape[1:] or gf.shape != g.shape[:3] or rf.shape != r.shape[:3]:
    raise ValueError(f"region_distances: generations {g.shape} / masks {gf.shape} and references {r.shape} / masks "
                     f"{rf.shape} must be [G, h, w, C] / [G, h, w] and [N, h, w, C] / [N, h, w] of one size")
  d2 = np.mean((g[:, None] - r[None]) ** 2, axis=-1)  # [G, N, h, w]
  union = gf[:, None] | rf[None]
  shared_bg = ~gf[:, None] & ~rf[None]
  out = {}
  for name, m in (("foreground", union), ("background", shared_bg)):
    count = m.sum(axis=(2, 3))
    total = np.where(m, d2, 0.0).sum(axis=(2, 3))
    with np.errstate(invalid="ignore", divide="ignore"):
      out[name] = np.where(count > 0, np.sqrt(total / np.maximum(count, 1)), np.inf)
  return out


def classify_generations(fg_l2: ArrayLike, bg_l2: ArrayLike, fg_threshold: float, bg_threshold: float) -> np.ndarray:
  """FB-Mem's categories from each generation's nearest per-region l2: "both" (verbatim), "foreground" only,
  "background" only or "neither"; a region is memorised at or below its threshold."""
  fg = np.asarray(fg_l2, np.float64) <= fg_threshold
  bg = np.asarray(bg_l2, np.float64) <= bg_threshold
  return np.where(fg & bg, "both", np.where(fg, "foreground", np.where(bg, "background", "neither")))


def fb_mem(gen: ArrayLike, gen_fg: ArrayLike, ref: ArrayLike, ref_fg: ArrayLike, thresholds: tuple[float, float],
           memory_mb: float = 256) -> dict:
  """Per generation: the nearest reference image per region, its l2, the category, and the cluster
  view (how many distinct reference images lie within the threshold, per region). References are
  compared in chunks of about `memory_mb` of distances.

  Returns:
    {"foreground_nearest", "foreground_l2", "background_nearest", "background_l2": [G],
     "foreground_cluster", "background_cluster": int [G], "category": str [G]}.
  """
  ref = np.asarray(ref)
  ref_fg = np.asarray(ref_fg, bool)
  fg_t, bg_t = float(thresholds[0]), float(thresholds[1])
  n = len(np.asarray(gen))
  pixels = int(np.prod(ref.shape[1:3])) if ref.ndim == 4 else 1
  chunk = max(1, int(memory_mb * 2**20 // (8 * 3 * max(n, 1) * pixels)))
  best = {k: (np.full(n, np.inf), np.zeros(n, np.int64)) for k in ("foreground", "background")}
  cluster = {k: np.zeros(n, np.int64) for k in ("foreground", "background")}
  for start in range(0, len(ref), chunk):
    d = region_distances(gen, gen_fg, ref[start:start + chunk], ref_fg[start:start + chunk])
    for k, t in (("foreground", fg_t), ("background", bg_t)):
      j = np.argmin(d[k], axis=1)
      v = d[k][np.arange(n), j]
      l2, idx = best[k]
      better = v < l2
      l2[better], idx[better] = v[better], j[better] + start
      cluster[k] += np.sum(d[k] <= t, axis=1)
  out = {}
  for k in ("foreground", "background"):
    out[f"{k}_l2"], out[f"{k}_nearest"] = best[k]
    out[f"{k}_cluster"] = cluster[k]
  out["category"] = classify_generations(out["foreground_l2"], out["background_l2"], fg_t, bg_t)
  return out


def category_counts(categories: ArrayLike) -> dict[str, int]:
  c = np.asarray(categories)
  return {k: int(np.sum(c == k)) for k in CATEGORIES}
