"""SolidMark scoring of duplicated training images (the paper's Table 2).

A distinct image duplicated c times is c training instances, each with its own key k_1 .. k_c
(`data.duplicates`, `data.instances.make_instances`). As in the paper, every distinct image is
queried the same number of times e whatever its copies (the same centre and condition; e =
`eval.repeats`, 10 in the paper), giving predictions k_pred_1 .. k_pred_e, and counts as
(l_SM, delta)-memorised when ANY evaluation matches ANY of its keys:

  l_dup = min over (j, i) of |k_pred_j - k_i| <= delta.

Chance, exactly given the image's predictions: its c keys are independent and uniform under the
null, each lands in the union U of [k_pred_j - delta, k_pred_j + delta] with probability |U|
(metrics/chance.py), so the image is a hit with 1 - (1 - |U|)^c. Chance rises with c, so a level's
count means something only beside its own chance: per level the table gives hits, exact chance,
its band and p-value, and the memorised fraction beyond chance; across levels a one-sided score
test of a trend of the excess over chance with the number of copies (no between-level test that
ignores chance).

Shapes: N distinct images, c keys (NaN-padded to the most copies), e evaluations (NaN-padded),
T thresholds. Host numpy.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
from numpy.typing import ArrayLike
from scipy import stats

from solidmark_jax import marks
from solidmark_jax.metrics import chance, memorisation


def group_by_image(key_image_id: ArrayLike, keys: ArrayLike, eval_image_id: ArrayLike,
                   k_pred: ArrayLike) -> dict[str, np.ndarray]:
  """Per-image keys (every training copy) and evaluations (every query of the image).

  Args:
    key_image_id: [M] distinct-image id of every training instance (`Instances.image_id`).
    keys: [M] each instance's key (`Keymap.lookup`).
    eval_image_id: [E] distinct-image id of each evaluated query (for per-instance evaluations:
      `image_id[evaluated instance ids]`; all copies of an image are the same query).
    k_pred: [E] or [E, r] predictions of each query (NaN = no such repeat).

  Returns:
    {"image_id": int64 [N] the evaluated images, sorted; "keys": [N, c] all their keys, NaN-padded;
     "k_pred": [N, e] all their predictions, NaN-padded; "copies": int64 [N] training copies (keys);
     "evaluations": int64 [N] non-NaN predictions}.
  """
  key_image_id = np.asarray(key_image_id, np.int64).reshape(-1)
  keys = np.asarray(keys, np.float64).reshape(-1)
  eval_image_id = np.asarray(eval_image_id, np.int64).reshape(-1)
  k_pred = np.asarray(k_pred, np.float64)
  k_pred = k_pred.reshape(len(k_pred), -1) if k_pred.ndim != 1 else k_pred[:, None]
  if len(key_image_id) != len(keys):
    raise ValueError(f"group_by_image: {len(key_image_id)} key image ids but {len(keys)} keys")
  if len(eval_image_id) != len(k_pred):
    raise ValueError(f"group_by_image: {len(eval_image_id)} evaluated image ids but {len(k_pred)} prediction rows")
  ids = np.unique(eval_image_id)
  missing = np.setdiff1d(ids, key_image_id)
  if missing.size:
    raise ValueError(f"group_by_image: evaluated images without keys: {missing[:10].tolist()}")
  key_rows = [np.flatnonzero(key_image_id == i) for i in ids]
  eval_rows = [np.flatnonzero(eval_image_id == i) for i in ids]
  copies = np.array([len(r) for r in key_rows], np.int64)
  c = int(copies.max()) if len(ids) else 0
  e = max((len(r) for r in eval_rows), default=0) * k_pred.shape[1]
  key_table = np.full((len(ids), c), np.nan)
  pred_table = np.full((len(ids), e), np.nan)
  for row, (kr, er) in enumerate(zip(key_rows, eval_rows)):
    key_table[row, :len(kr)] = keys[kr]
    preds = k_pred[er].reshape(-1)
    pred_table[row, :len(preds)] = preds
  return {"image_id": ids, "keys": key_table, "k_pred": pred_table, "copies": copies,
          "evaluations": np.sum(np.isfinite(pred_table), axis=1).astype(np.int64)}


def best_l_sm(keys: ArrayLike, k_pred: ArrayLike, key_bits: int | None = marks.KEY_BITS) -> np.ndarray:
  """l_dup = min over evaluations x keys of |k_pred - k| per image: [N, c] x [N, e] -> [N].

  `key_bits` reads k_pred on the key grid as `memorisation.l_sm` does. An image without keys or
  without evaluations gets NaN (and never counts).
  """
  keys = np.atleast_2d(np.asarray(keys, np.float64))
  k_pred = np.atleast_2d(np.asarray(k_pred, np.float64))
  if len(keys) != len(k_pred):
    raise ValueError(f"best_l_sm: {len(keys)} key rows but {len(k_pred)} prediction rows")
  if key_bits is not None:
    k_pred = np.where(np.isfinite(k_pred), memorisation.snap_to_key_grid(np.nan_to_num(k_pred), key_bits), np.nan)
  d = np.abs(k_pred[:, :, None] - keys[:, None, :])  # [N, e, c]
  d = np.where(np.isnan(d), np.inf, d).reshape(len(d), -1)
  best = d.min(axis=1) if d.shape[1] else np.full(len(d), np.inf)
  return np.where(np.isfinite(best), best, np.nan)


def trend_test(hits: ArrayLike, probabilities: ArrayLike, copies: ArrayLike | None) -> dict:
  """One-sided score test that the excess over chance rises with the number of copies.

  Under the null, image i hits with its own chance p_i independently, so T = sum_i (x_i - p_i)(c_i - mean c)
  has mean 0 and variance sum_i p_i (1 - p_i) (c_i - mean c)^2 whatever the p_i; z = T / sd is
  compared with the normal (a Cochran-Armitage test with each image's own null probability).

  Args:
    hits: [N] 0/1 per image.
    probabilities: [N] chance per image (`chance.hit_probability`).
    copies: [N] training copies per image.

  Returns:
    {"z", "p_value"} (p_value None when all images have one level or no variance).
  """
  x = np.asarray(hits, np.float64)
  p = np.asarray(probabilities, np.float64)
  c = np.asarray(copies, np.float64)
  w = c - c.mean() if len(c) else c
  var = float(np.sum(p * (1 - p) * w**2))
  if var <= 0:
    return {"z": None, "p_value": None}
  z = float(np.sum((x - p) * w) / math.sqrt(var))
  return {"z": z, "p_value": float(stats.norm.sf(z))}


def summarize_duplication(key_image_id: ArrayLike, keys: ArrayLike, eval_image_id: ArrayLike, k_pred: ArrayLike,
                          thresholds: Sequence[float] = memorisation.DEFAULT_THRESHOLDS, *, level: float = 0.95,
                          ci_method: str = "wilson", key_bits: int | None = marks.KEY_BITS) -> dict:
  """Counts per duplication level (1x, 2x, 3x, 4x, ...) beside their exact chance given the predictions.

  The level of an image is its number of training copies (keys); see `group_by_image` for the
  arguments.

  Args:
    key_image_id: [M] distinct-image id of every training instance.
    keys: [M] its key.
    eval_image_id: [E] distinct-image id of each evaluated query.
    k_pred: [E] or [E, r] predictions.
    thresholds: deltas.
    level: confidence level of the intervals and bands.
    ci_method: "wilson" or "clopper-pearson" (`memorisation.binomial_ci`).
    key_bits: see `best_l_sm`.

  Returns:
    {"thresholds", "levels": {"1x": {copies, n, evaluations (distinct e per image), counts, rates, ci,
     chance: {expected, rate, band, p_value, excess, corrected, corrected_ci}, l_dup {mean, median}}, ...},
     "trend": [T] `trend_test` across levels, "per_image": {image_id, copies, evaluations, l_dup,
     chance}}.
  """
  thresholds = memorisation.validate_thresholds(thresholds)
  if np.asarray(keys).ndim != 1:
    raise ValueError("duplication scoring takes one key per instance (marks.num_keys = 1), got keys of shape "
                     f"{np.asarray(keys).shape}")
  g = group_by_image(key_image_id, keys, eval_image_id, k_pred)
  level_of = g["copies"]
  l_dup = best_l_sm(g["keys"], g["k_pred"], key_bits)
  probs = np.stack([chance.hit_probability(g["k_pred"], d, copies=level_of, key_bits=key_bits)
                    for d in thresholds], axis=1)  # [N, T]
  levels = {}
  for c in sorted(set(level_of.tolist())):
    rows = level_of == c
    n = int(rows.sum())
    l = l_dup[rows]
    counts = [int(np.sum(l <= d)) for d in thresholds]
    finite = l[np.isfinite(l)]
    calib = [chance.against_chance(k, probs[rows, t], level) for t, k in enumerate(counts)]
    levels[f"{c}x"] = {
        "copies": int(c),
        "n": n,
        "evaluations": sorted(set(g["evaluations"][rows].tolist())),
        "counts": counts,
        "rates": [k / n for k in counts],
        "ci_level": level,
        "ci_method": ci_method,
        "ci": [list(memorisation.binomial_ci(k, n, level, ci_method)) for k in counts],
        "chance": {key: [cal[key] for cal in calib] for key in ("expected", "rate", "band", "p_value", "excess")}
        | {"corrected": [cal["corrected"]["estimate"] for cal in calib],
           "corrected_ci": [cal["corrected"]["ci"] for cal in calib]},
        "l_dup": {"mean": float(finite.mean()) if finite.size else None,
                  "median": float(np.median(finite)) if finite.size else None},
    }
  trend = [trend_test(l_dup <= d, probs[:, t], level_of) for t, d in enumerate(thresholds)]
  return {
      "thresholds": list(thresholds),
      "chance_doc": ("exact given each image's predictions: its c keys uniform and independent under the null, "
                     "each within delta of some prediction with p = measure of the union of [k_pred_j - delta, "
                     "k_pred_j + delta] within [0, 1]; the image hits with 1 - (1 - p)^c"),
      "levels": levels,
      "trend": trend,
      "trend_doc": ("one-sided score test that the excess over chance (hit - chance per image) rises with the "
                    "number of copies; each image against its own chance"),
      "per_image": {"image_id": g["image_id"].tolist(), "copies": level_of.tolist(),
                    "evaluations": g["evaluations"].tolist(),
                    "l_dup": [None if math.isnan(v) else float(v) for v in l_dup],
                    "chance": probs.tolist()},
  }
