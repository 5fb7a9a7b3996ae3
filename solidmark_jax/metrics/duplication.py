"""SolidMark scoring of duplicated training images (SPEC section 6, the paper's Table 2).

A distinct image duplicated c times is c training instances, each with its own key k_1 .. k_c
(`data.duplicates`, `data.pipeline.make_instances`). It is queried e times (the same centre and
condition; e = evaluated copies x repeats), giving predictions k_pred_1 .. k_pred_e, and counts as
(l_SM, delta)-memorised when ANY evaluation matches ANY of its keys:

  l_dup = min over (j, i) of |k_pred_j - k_i| <= delta.

Chance level, exactly for the image's own keys: if each k_pred is uniform on [0, 1] and independent
of everything else, one evaluation hits with probability

  p = |union_i [k_i - delta, k_i + delta] ∩ [0, 1]|,

the measure of the union of the c intervals (overlapping intervals and the edges of [0, 1] count
once), and e independent evaluations hit with 1 - (1 - p)^e. For c = 1 averaged over k ~ U(0, 1)
this is SPEC's 2 delta - delta^2 (per evaluation); with more keys and more evaluations chance
rises fast (delta = 0.1, c = 4, e = 10: above 0.99), so counts are always shown beside it.

Shapes: N distinct images, c keys (NaN-padded to the most copies), e evaluations (NaN-padded),
T thresholds. Host numpy.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

from solidmark_jax import marks
from solidmark_jax.metrics import memorisation


def union_measure(keys, delta: float) -> np.ndarray:
  """|union_i [k_i - delta, k_i + delta] ∩ [0, 1]| per row.

  Args:
    keys: [c] or [N, c] keys in [0, 1]; NaN entries are ignored (padding).
    delta: half-width, > 0.

  Returns:
    float64 [] or [N]: for sorted keys k_(1) <= .. <= k_(c): min(k_(1), delta) + min(1 - k_(c), delta)
    + sum_i min(k_(i+1) - k_(i), 2 delta); 0 for a row without keys.
  """
  k = np.asarray(keys, np.float64)
  scalar = k.ndim == 1
  k = np.atleast_2d(k)
  if not delta > 0:
    raise ValueError(f"union_measure: delta must be > 0, got {delta}")
  finite = k[np.isfinite(k)]
  if finite.size and (finite.min() < 0 or finite.max() > 1):
    raise ValueError(f"union_measure: keys must lie in [0, 1], got range [{finite.min()}, {finite.max()}]")
  k = np.sort(k, axis=1)  # NaNs last
  count = np.sum(np.isfinite(k), axis=1)
  rows = np.arange(len(k))
  has = count > 0
  first = np.where(has, k[:, 0], 0.0)
  last = np.where(has, k[rows, np.maximum(count - 1, 0)], 1.0)
  gaps = np.nan_to_num(np.diff(k, axis=1), nan=0.0)  # NaN where either side is padding
  inner = np.minimum(gaps, 2 * delta).sum(axis=1)
  out = np.where(has, np.minimum(first, delta) + np.minimum(1.0 - last, delta) + inner, 0.0)
  return out[0] if scalar else out


def chance_probability(keys, delta: float, evaluations) -> np.ndarray:
  """P(l_dup <= delta) per image when every k_pred is uniform and independent: 1 - (1 - p)^e.

  Args:
    keys: [N, c] keys per image (NaN-padded), or [c] for one image.
    delta: threshold.
    evaluations: e per image, [N] ints (or one int).
  """
  p = union_measure(keys, delta)
  e = np.asarray(evaluations, np.float64)
  if np.any(e < 0):
    raise ValueError(f"chance_probability: evaluations must be >= 0, got {evaluations}")
  return 1.0 - (1.0 - p)**e


def group_by_image(key_image_id, keys, eval_image_id, k_pred) -> dict[str, np.ndarray]:
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


def best_l_sm(keys, k_pred, key_bits: int | None = marks.KEY_BITS) -> np.ndarray:
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


def poisson_binomial_sf(count: int, probabilities) -> float:
  """P(X >= count) for X a sum of independent Bernoulli(p_i) (exact, by convolution)."""
  p = np.asarray(probabilities, np.float64).reshape(-1)
  if count <= 0:
    return 1.0
  if count > len(p):
    return 0.0
  pmf = np.zeros(len(p) + 1)
  pmf[0] = 1.0
  for i, q in enumerate(p):
    pmf[1:i + 2] = pmf[1:i + 2] * (1 - q) + pmf[:i + 1] * q
    pmf[0] *= 1 - q
  return float(min(1.0, pmf[count:].sum()))


def summarize_duplication(key_image_id, keys, eval_image_id, k_pred,
                          thresholds: Sequence[float] = memorisation.DEFAULT_THRESHOLDS, *, level: float = 0.95,
                          ci_method: str = "wilson", key_bits: int | None = marks.KEY_BITS) -> dict:
  """Counts per duplication level (1x, 2x, 3x, 4x, ...) beside their exact chance expectation.

  The level of an image is its number of training copies (keys); see `group_by_image` for the
  arguments.

  Args:
    key_image_id: [M] distinct-image id of every training instance.
    keys: [M] its key.
    eval_image_id: [E] distinct-image id of each evaluated query.
    k_pred: [E] or [E, r] predictions.
    thresholds: deltas.
    level: confidence level of the intervals.
    ci_method: "wilson" or "clopper-pearson" (`memorisation.binomial_ci`).
    key_bits: see `best_l_sm`.

  Returns:
    {"thresholds", "levels": {"1x": {copies, n, evaluations (distinct e per image), counts, rates,
     ci, chance_expected (sum of the images' chance probabilities), chance_rate, p_vs_chance
     (P(count or more | chance), exact Poisson-binomial), l_dup {mean, median}}, ...},
     "fisher": {"4x_vs_1x": [T] one-sided p (the higher level's rate is higher), ...},
     "per_image": {image_id, copies, evaluations, l_dup}}.
  """
  thresholds = memorisation.validate_thresholds(thresholds)
  g = group_by_image(key_image_id, keys, eval_image_id, k_pred)
  level_of = g["copies"]
  l_dup = best_l_sm(g["keys"], g["k_pred"], key_bits)
  chance = np.stack([chance_probability(g["keys"], d, g["evaluations"]) for d in thresholds], axis=1)  # [N, T]
  levels = {}
  for c in sorted(set(level_of.tolist())):
    rows = level_of == c
    n = int(rows.sum())
    l = l_dup[rows]
    counts = [int(np.sum(l <= d)) for d in thresholds]
    finite = l[np.isfinite(l)]
    levels[f"{c}x"] = {
        "copies": int(c),
        "n": n,
        "evaluations": sorted(set(g["evaluations"][rows].tolist())),
        "counts": counts,
        "rates": [k / n for k in counts],
        "ci_level": level,
        "ci_method": ci_method,
        "ci": [list(memorisation.binomial_ci(k, n, level, ci_method)) for k in counts],
        "chance_expected": [float(chance[rows, t].sum()) for t in range(len(thresholds))],
        "chance_rate": [float(chance[rows, t].mean()) for t in range(len(thresholds))],
        "p_vs_chance": [poisson_binomial_sf(k, chance[rows, t]) for t, k in enumerate(counts)],
        "l_dup": {"mean": float(finite.mean()) if finite.size else None,
                  "median": float(np.median(finite)) if finite.size else None},
    }
  names = list(levels)
  fisher = {}
  for i, lo in enumerate(names):
    for hi in names[i + 1:]:
      a, b = levels[hi], levels[lo]
      fisher[f"{hi}_vs_{lo}"] = [memorisation.fisher_exact(a["counts"][t], a["n"], b["counts"][t], b["n"], "greater")
                                 for t in range(len(thresholds))]
  return {
      "thresholds": list(thresholds),
      "chance_doc": ("k_pred uniform on [0, 1], independent: one evaluation hits with p = measure of the union of "
                     "[k_i - delta, k_i + delta] over the image's keys, within [0, 1]; e evaluations: 1 - (1 - p)^e"),
      "levels": levels,
      "fisher": fisher,
      "fisher_doc": ("one-sided Fisher exact test that the higher duplication level has the higher eidetic rate; "
                     "it ignores that chance rises with copies and evaluations: read it beside chance_rate"),
      "per_image": {"image_id": g["image_id"].tolist(), "copies": level_of.tolist(),
                    "evaluations": g["evaluations"].tolist(),
                    "l_dup": [None if math.isnan(v) else float(v) for v in l_dup]},
  }


def _pct(x: float) -> str:
  return f"{100 * x:.1f}%"


def _p(p: float) -> str:
  return f"{p:.2e}" if p < 1e-3 else f"{p:.3f}"


def duplication_markdown(summary: dict) -> str:
  """The duplication summary as a Markdown table: a row per threshold, per level count [CI] and chance."""
  levels = summary["levels"]
  names = list(levels)
  level = int(round(100 * levels[names[0]]["ci_level"])) if names else 95
  head = ["threshold"]
  for name in names:
    head += [f"{name} count / n [{level}% CI]", f"{name} chance expected", f"{name} p vs chance"]
  head += [f"p ({k.replace('_', ' ')}, Fisher)" for k in summary["fisher"]]
  lines = ["# Memorisation by duplication level", "",
           "An image counts when any of its evaluations is within delta of any of its keys.",
           f"- chance: {summary['chance_doc']}", f"- Fisher: {summary['fisher_doc']}", "",
           "| level | images | evaluations per image | mean l_dup |", "|---|---|---|---|"]
  for name in names:
    s = levels[name]
    mean = s["l_dup"]["mean"]
    lines.append(f"| {name} | {s['n']} | {', '.join(map(str, s['evaluations']))} | "
                 f"{'-' if mean is None else f'{mean:.4f}'} |")
  lines += ["", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for t, d in enumerate(summary["thresholds"]):
    row = [f"(l_SM, {d:g})"]
    for name in names:
      s = levels[name]
      lo, hi = s["ci"][t]
      row += [f"{s['counts'][t]} / {s['n']} ({_pct(s['rates'][t])}) [{_pct(lo)}, {_pct(hi)}]",
              f"{s['chance_expected'][t]:.1f} ({_pct(s['chance_rate'][t])})", _p(s["p_vs_chance"][t])]
    row += [_p(p[t]) for p in summary["fisher"].values()]
    lines.append("| " + " | ".join(row) + " |")
  return "\n".join(lines) + "\n"
