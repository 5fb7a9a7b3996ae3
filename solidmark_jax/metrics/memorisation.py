"""SolidMark scoring on the host: l_SM, eidetic counts, calibrated chance, significance, membership inference.

An image is (l_SM, delta)-eidetically memorised when l_SM = |k_pred - k| <= delta (the paper's
section 3). A count of such hits is evidence only beside what chance gives, and chance depends on
the predictions: `summarize` puts every count beside its exact chance given the group's own
predictions (metrics/chance.py: expectation, 95% band, exact one-sided p-value, chance-corrected
memorised fraction), a key-permutation null (the same predictions scored against other images'
keys), and the closed-form reference 2 delta - delta^2 for uniform, independent predictions.
`compare` adds Fisher and Mann-Whitney tests between groups and the membership-inference figures
(AUC, TPR at low FPR).

Host numpy and scipy. Shapes: N images, r repeats, m keys per image, T thresholds.
"""

from __future__ import annotations

import math
from typing import Literal, Sequence

import numpy as np
from numpy.typing import ArrayLike
from scipy import stats

from solidmark_jax import marks
from solidmark_jax.metrics import chance

DEFAULT_THRESHOLDS = (0.1, 0.05, 0.01, 0.005)
Statistic = Literal["best", "mean"]
STATISTICS = ("best", "mean")


def validate_thresholds(thresholds: Sequence[float], field: str = "thresholds", *,
                        unit_interval: bool = True) -> tuple[float, ...]:
  """The one threshold check: several distinct finite floats (a result is never read at one threshold).

  Args:
    thresholds: the sequence to check.
    field: what the error names, e.g. "eval.generations.l2_thresholds".
    unit_interval: l_SM deltas (the default) must lie strictly inside (0, 1); the baselines'
      distance and similarity thresholds (`unit_interval=False`) need only be finite.

  Returns:
    The thresholds as a tuple of floats.

  Raises:
    ValueError: naming `field` and what was expected.
  """
  if isinstance(thresholds, (int, float, str)):
    raise ValueError(f"{field} must be a sequence of thresholds (never a single threshold), got {thresholds!r}")
  out = tuple(float(d) for d in thresholds)
  if not out:
    raise ValueError(f"{field}: need at least one threshold" + (", e.g. (0.1, 0.05, 0.01, 0.005)" if unit_interval
                                                                 else ""))
  if unit_interval:
    bad = [d for d in out if not (0.0 < d < 1.0) or math.isnan(d)]
    if bad:
      raise ValueError(f"{field} must lie in (0, 1) (l_SM compares keys in [0, 1]); got {bad}")
  elif not all(math.isfinite(d) for d in out):
    raise ValueError(f"{field} must be finite, got {out}")
  if len(set(out)) != len(out):
    raise ValueError(f"{field} must be distinct, got {out}")
  return out


def snap_to_key_grid(k_pred: ArrayLike, key_bits: int = marks.KEY_BITS) -> np.ndarray:
  """k_pred read at the keys' resolution: the centre (m + 1/2) / 2**bits of its grid cell.

  Keys lie on that grid (`marks.keys_for`), so a prediction within half a cell (2**-17 for 16
  bits) of its key snaps onto it exactly: float32 rounding in the sampler (about 3e-8) cannot make
  an oracle's l_SM non-zero, while l_SM moves by at most 2**-(bits + 1), far below any threshold.
  """
  scale = float(2**key_bits)
  k = np.asarray(k_pred, np.float64)
  m = np.clip(np.floor(k * scale), 0, scale - 1)
  return (m + 0.5) / scale


def l_sm(k_pred: ArrayLike, keys: ArrayLike, key_bits: int | None = marks.KEY_BITS) -> np.ndarray:
  """l_SM = |k_pred - k| per evaluation (float64); with m keys per image, the largest of the m.

  An evaluation with m keys (`marks.num_keys`) is a hit at delta only when every key is within
  delta, i.e. when max_s |k_pred_s - k_s| <= delta, so that maximum is its l_SM.

  Args:
    k_pred: [N] or [N, r] predicted keys in [0, 1]; [N, r, m] with m keys per image.
    keys: [N] true keys; [N, m] with m keys per image.
    key_bits: read k_pred on the key grid (`snap_to_key_grid`); None compares raw values.

  Returns:
    [N] or [N, r] (the shape of k_pred without its key axis).
  """
  k_pred = np.asarray(k_pred, np.float64)
  keys = np.asarray(keys, np.float64)
  multi = keys.ndim == 2
  if multi and k_pred.ndim != 3:
    raise ValueError(f"l_sm: keys [N, m] = {keys.shape} need k_pred [N, r, m], got {k_pred.shape}")
  if multi and k_pred.shape[2] != keys.shape[1]:
    raise ValueError(f"l_sm: {keys.shape[1]} keys per image but k_pred has {k_pred.shape[2]}")
  if multi:
    keys = keys[:, None, :]
  elif k_pred.ndim == 2:
    keys = keys[:, None]
  if key_bits is not None:
    k_pred = snap_to_key_grid(k_pred, key_bits)
  out = np.abs(k_pred - keys)
  return out.max(axis=-1) if multi else out


def reduce_repeats(l: np.ndarray) -> dict[str, np.ndarray]:
  """Per image best (min over r) and mean over r of l_SM [N, r] -> {"best": [N], "mean": [N]}."""
  l = np.asarray(l, np.float64)
  if l.ndim == 1:
    l = l[:, None]
  if l.shape[1] == 0:
    raise ValueError("l_SM needs at least one repeat per image")
  return {"best": l.min(axis=1), "mean": l.mean(axis=1)}


def eidetic_counts(scores: ArrayLike, thresholds: Sequence[float] = DEFAULT_THRESHOLDS) -> np.ndarray:
  """Number of images with score <= delta, per threshold: int64 [T]."""
  thresholds = validate_thresholds(thresholds)
  s = np.asarray(scores, np.float64).reshape(-1)
  return np.array([int(np.sum(s <= d)) for d in thresholds], np.int64)


def binomial_ci(count: int, n: int, level: float = 0.95, method: str = "wilson") -> tuple[float, float]:
  """Confidence interval for a binomial rate count / n (scipy's `binomtest(...).proportion_ci`).

  Args:
    count: successes.
    n: trials (0 gives (0, 1)).
    level: coverage, e.g. 0.95.
    method: "wilson" (score interval) or "clopper-pearson" (exact).
  """
  if not 0 <= count <= n:
    raise ValueError(f"binomial_ci: need 0 <= count <= n, got {count}, {n}")
  methods = {"wilson": "wilson", "clopper-pearson": "exact"}
  if method not in methods:
    raise ValueError(f"binomial_ci: method must be 'wilson' or 'clopper-pearson', got {method!r}")
  if n == 0:
    return 0.0, 1.0
  ci = stats.binomtest(int(count), int(n)).proportion_ci(confidence_level=level, method=methods[method])
  return float(ci.low), float(ci.high)


def fisher_exact(count_a: int, n_a: int, count_b: int, n_b: int, alternative: str = "greater") -> float:
  """Fisher's exact test on [[count_a, n_a - count_a], [count_b, n_b - count_b]] (scipy).

  alternative "greater": group a's rate is higher (members memorised more than non-members);
  "less"; "two-sided".
  """
  if alternative not in ("greater", "less", "two-sided"):
    raise ValueError(f"alternative must be 'greater', 'less' or 'two-sided', got {alternative!r}")
  table = [[int(count_a), int(n_a - count_a)], [int(count_b), int(n_b - count_b)]]
  return float(stats.fisher_exact(table, alternative=alternative).pvalue)


def mann_whitney(x: ArrayLike, y: ArrayLike, alternative: str = "less") -> dict[str, float]:
  """Mann-Whitney U test of x against y (scipy, normal approximation with tie and continuity correction).

  alternative "less": x tends to be smaller (members' l_SM below non-members'). Returns U of x,
  the p-value and the common-language effect size P(X < Y) + P(X = Y) / 2.
  """
  if alternative not in ("less", "greater", "two-sided"):
    raise ValueError(f"alternative must be 'less', 'greater' or 'two-sided', got {alternative!r}")
  x = np.asarray(x, np.float64).reshape(-1)
  y = np.asarray(y, np.float64).reshape(-1)
  if len(x) == 0 or len(y) == 0:
    return {"u": float("nan"), "p_value": float("nan"), "effect": float("nan")}
  if np.all(np.concatenate([x, y]) == x[0]):  # no ranks to compare
    return {"u": len(x) * len(y) / 2.0, "p_value": 1.0, "effect": 0.5}
  res = stats.mannwhitneyu(x, y, alternative=alternative, method="asymptotic", use_continuity=True)
  return {"u": float(res.statistic), "p_value": float(res.pvalue),
          "effect": float(1.0 - res.statistic / (len(x) * len(y)))}


def per_image_scores(k_pred: ArrayLike, keys: ArrayLike, statistic: Statistic = "best",
                     key_bits: int | None = marks.KEY_BITS) -> np.ndarray:
  """The scored per-image statistic of l_SM over the repeats: [N] (best: min over r, mean: mean over r).

  Missing repeats (NaN) are ignored.
  """
  if statistic not in STATISTICS:
    raise ValueError(f"statistic must be one of {STATISTICS}, got {statistic!r}")
  l = l_sm(k_pred, keys, key_bits)
  l = l[:, None] if l.ndim == 1 else l
  if l.shape[0] == 0:
    return np.zeros(0)
  valid = np.isfinite(l)
  if np.any(valid.sum(axis=1) == 0):
    raise ValueError("l_SM needs at least one repeat per image")
  if statistic == "best":
    return np.where(valid, l, np.inf).min(axis=1)
  return np.where(valid, l, 0.0).sum(axis=1) / valid.sum(axis=1)


def permutation_null(k_pred: ArrayLike, keys: ArrayLike, thresholds: Sequence[float] = DEFAULT_THRESHOLDS, *,
                     statistic: Statistic = "best",
                     key_bits: int | None = marks.KEY_BITS, num_permutations: int = 1000, seed: int = 0,
                     level: float = 0.95, observed: ArrayLike | None = None) -> dict | None:
  """The same predictions scored against other images' keys: the key-permutation null.

  Each image's r predictions stay together and are scored against the key(s) of another image of
  the group (seeded derangements): the queries, conditions and prediction distribution are the
  group's own, only the link between an image and its key is broken. Free: no outpainting.

  Args:
    k_pred: [N, r] or [N, r, m]; keys: [N] or [N, m].
    thresholds, statistic, key_bits: as `summarize`.
    num_permutations: permutations drawn.
    seed: their seed.
    level: coverage of the band.
    observed: [T] the group's own counts, for the permutation p-value (optional).

  Returns:
    {"num_permutations", "mean": [T], "median": [T], "band": [T][lo, hi], "p_value": [T] or None
     ((1 + #{permuted count >= observed}) / (1 + num_permutations))}; None for fewer than 2 images.
  """
  thresholds = validate_thresholds(thresholds)
  keys = np.asarray(keys, np.float64)
  n = len(keys)
  if n < 2 or num_permutations < 1:
    return None
  perms = chance.derangements(n, num_permutations, seed)
  k = np.asarray(k_pred, np.float64)
  k = k[:, None] if k.ndim == 1 else k
  if key_bits is not None:
    k = snap_to_key_grid(k, key_bits)
  k = k if k.ndim == 3 else k[..., None]  # [N, r, m]
  kk = keys if keys.ndim == 2 else keys[:, None]  # [N, m]
  valid = np.all(np.isfinite(k), axis=2)  # [N, r]
  d = np.array(thresholds)
  counts = np.empty((num_permutations, len(d)), np.int64)
  chunk = max(1, 2**22 // max(k.size, 1))
  for start in range(0, num_permutations, chunk):
    p = perms[start:start + chunk]  # [P, N]
    l = np.abs(k[None] - kk[p][:, :, None, :]).max(axis=3)  # [P, N, r]
    if statistic == "best":
      s = np.where(valid, l, np.inf).min(axis=2)
    else:
      s = np.where(valid, l, 0.0).sum(axis=2) / valid.sum(axis=1)
    counts[start:start + len(p)] = (s[:, :, None] <= d).sum(axis=1)
  a = (1.0 - level) / 2
  out = {
      "num_permutations": int(num_permutations),
      "seed": int(seed),
      "mean": [float(v) for v in counts.mean(axis=0)],
      "median": [float(v) for v in np.median(counts, axis=0)],
      "band": [[int(np.quantile(c, a, method="lower")), int(np.quantile(c, 1 - a, method="higher"))]
               for c in counts.T],
      "p_value": None,
  }
  if observed is not None:
    out["p_value"] = [float((1 + np.sum(counts[:, t] >= int(o))) / (1 + num_permutations))
                      for t, o in enumerate(observed)]
  return out


def summarize(k_pred: ArrayLike, keys: ArrayLike, thresholds: Sequence[float] = DEFAULT_THRESHOLDS, *,
              statistic: Statistic = "best",
              level: float = 0.95, ci_method: str = "wilson", key_bits: int | None = marks.KEY_BITS,
              copies: ArrayLike | None = 1, num_permutations: int = 1000, seed: int = 0) -> dict:
  """The scores of one group as a JSON-friendly dict, every count beside its exact chance.

  Args:
    k_pred: [N, r] predictions ([N] for r = 1; [N, r, m] with m keys per image), NaN = missing repeat.
    keys: [N] true keys ([N, m]).
    thresholds: deltas.
    statistic: which per-image score is counted, "best" (min over r) or "mean" over r.
    level: confidence level of the intervals and bands.
    ci_method: see `binomial_ci`.
    key_bits: the key grid (`metrics.l_sm`, `chance.hit_probability`); None for raw values.
    copies: independent key sets per image (`chance.hit_probability`).
    num_permutations: draws of the key-permutation null (0: none).
    seed: its seed.

  Returns:
    {n, repeats, num_keys, statistic, thresholds, counts, rates, ci (of the rate),
     chance: {doc, expected, rate, band, p_value, excess, corrected, corrected_ci} (exact given the
     predictions), permutation (`permutation_null`), reference_chance: {doc, rate, expected} (the
     closed form), l_sm / l_sm_best / l_sm_mean: {mean, median}}.
  """
  thresholds = validate_thresholds(thresholds)
  if statistic not in STATISTICS:
    raise ValueError(f"statistic must be one of {STATISTICS}, got {statistic!r}")
  k = np.asarray(k_pred, np.float64)
  keys = np.asarray(keys, np.float64)
  num_keys = keys.shape[1] if keys.ndim == 2 else 1
  if k.ndim == 1:
    k = k[:, None]
  n = len(keys)
  r = k.shape[1] if n else 0
  scores = per_image_scores(k, keys, statistic, key_bits) if n else np.zeros(0)
  best = per_image_scores(k, keys, "best", key_bits) if n else np.zeros(0)
  mean = per_image_scores(k, keys, "mean", key_bits) if n else np.zeros(0)
  counts = eidetic_counts(scores, thresholds)
  probs = (chance.hit_probabilities(k, thresholds, statistic=statistic, copies=copies, key_bits=key_bits)
           if n else np.zeros((0, len(thresholds))))
  calib = [chance.against_chance(int(c), probs[:, t], level) for t, c in enumerate(counts)]
  reference = chance.reference_probability(np.array(thresholds), max(r, 1) if statistic == "best" else 1, num_keys)
  stats_of = lambda s: {"mean": float(np.mean(s)) if n else None, "median": float(np.median(s)) if n else None}
  return {
      "n": int(n),
      "repeats": int(r),
      "num_keys": int(num_keys),
      "statistic": statistic,
      "thresholds": list(thresholds),
      "counts": [int(c) for c in counts],
      "rates": [float(c / n) if n else None for c in counts],
      "ci_level": level,
      "ci_method": ci_method,
      "ci": [list(binomial_ci(int(c), n, level, ci_method)) for c in counts],
      "chance": {
          "doc": ("exact given the group's predictions: the key uniform and independent of the model; hits "
                  "Poisson-binomial; band: central interval of the null count; p: P(null count >= hits)"),
          "expected": [c["expected"] for c in calib],
          "rate": [c["rate"] for c in calib],
          "band": [c["band"] for c in calib],
          "p_value": [c["p_value"] for c in calib],
          "excess": [c["excess"] for c in calib],
          "corrected": [c["corrected"]["estimate"] for c in calib],
          "corrected_ci": [c["corrected"]["ci"] for c in calib],
      },
      "permutation": permutation_null(k, keys, thresholds, statistic=statistic, key_bits=key_bits,
                                      num_permutations=num_permutations, seed=seed, level=level,
                                      observed=counts) if n >= 2 else None,
      "reference_chance": {
          "doc": ("reference only, not tested against: (2d - d^2)^m per evaluation"
                  + (", best of r: 1 - (1 - p)^r" if statistic == "best" else "")
                  + " (exact only for uniform, independent predictions)"),
          "rate": [float(p) for p in reference],
          "expected": [float(n * p) for p in reference],
      },
      "l_sm": stats_of(scores),
      "l_sm_best": stats_of(best),
      "l_sm_mean": stats_of(mean),
  }


def roc_curve(member_scores: ArrayLike, other_scores: ArrayLike) -> dict[str, np.ndarray]:
  """ROC of "member when l_SM <= t" over every threshold t: {"fpr", "tpr", "threshold"}, from (0, 0) to (1, 1)."""
  a = np.asarray(member_scores, np.float64).reshape(-1)
  b = np.asarray(other_scores, np.float64).reshape(-1)
  t = np.unique(np.concatenate([a, b]))
  tpr = np.searchsorted(np.sort(a), t, side="right") / max(len(a), 1)
  fpr = np.searchsorted(np.sort(b), t, side="right") / max(len(b), 1)
  return {"fpr": np.concatenate([[0.0], fpr]), "tpr": np.concatenate([[0.0], tpr]),
          "threshold": np.concatenate([[-np.inf], t])}


def membership_inference(member_scores: ArrayLike, other_scores: ArrayLike, fpr_levels: Sequence[float] = (0.01,
                         0.001)) -> dict:
  """Membership-inference figures of l_SM (smaller = member): AUC and TPR at low FPR.

  AUC = P(member's l_SM < other's) + P(equal) / 2. TPR at FPR x: the largest TPR of a threshold
  whose FPR is at most x (with n_other non-members, an FPR below 1 / n_other means no false
  positive at all; `fpr_resolution` says so).
  """
  a = np.asarray(member_scores, np.float64).reshape(-1)
  b = np.asarray(other_scores, np.float64).reshape(-1)
  if not len(a) or not len(b):
    return {"auc": None, "tpr_at_fpr": {}, "n_members": len(a), "n_other": len(b)}
  roc = roc_curve(a, b)
  auc = mann_whitney(a, b, "less")["effect"]
  tpr_at = {f"{x:g}": float(roc["tpr"][roc["fpr"] <= x + 1e-12].max()) for x in fpr_levels}
  return {"auc": float(auc), "tpr_at_fpr": tpr_at, "n_members": int(len(a)), "n_other": int(len(b)),
          "fpr_resolution": 1.0 / len(b)}


def compare(members: dict, other: dict, thresholds: Sequence[float] = DEFAULT_THRESHOLDS) -> dict:
  """Is group a (members) more memorised than group b (non-members, or a random-init model)?

  Args:
    members, other: {"scores": [N] per-image scored l_SM, "counts": [T]} of each group.
    thresholds: deltas of the counts.

  Returns:
    {"fisher_p": [T] one-sided Fisher exact p-values (a's eidetic rate > b's), "mann_whitney": one-sided
     test that a's scores are smaller, "membership_inference": `membership_inference`}.
  """
  thresholds = validate_thresholds(thresholds)
  sa, sb = np.asarray(members["scores"]), np.asarray(other["scores"])
  ca, cb = members["counts"], other["counts"]
  fisher = [fisher_exact(int(a), len(sa), int(b), len(sb), "greater") for a, b in zip(ca, cb)]
  return {"fisher_p": fisher, "fisher_alternative": "greater", "mann_whitney": mann_whitney(sa, sb, "less"),
          "mann_whitney_alternative": "less", "membership_inference": membership_inference(sa, sb)}


def paired_effect(k_pred_base: ArrayLike, k_pred_other: ArrayLike, keys: ArrayLike,
                  thresholds: Sequence[float] = DEFAULT_THRESHOLDS, *,
                  statistic: Statistic = "best", key_bits: int | None = marks.KEY_BITS, level: float = 0.95,
                  num_bootstrap: int = 2000, seed: int = 0) -> dict:
  """The effect of a setting (mitigation, augmentation, pattern) on the SAME images, against chance.

  Each setting's excess over chance is hits - expected chance hits (exact given that setting's own
  predictions); the reduction of the excess is (excess_base - excess_other) / excess_base. Images
  are paired: McNemar's exact test on the discordant hits (hit under the baseline only vs under
  the other setting only), and a paired bootstrap over images for the interval of the reduction.

  Args:
    k_pred_base, k_pred_other: [N, r] (or [N, r, m]) predictions of the same N images, in the same order.
    keys: [N] (or [N, m]).
    thresholds, statistic, key_bits: as `summarize`.
    level: coverage of the bootstrap interval.
    num_bootstrap: bootstrap resamples of the images.
    seed: their seed.

  Returns:
    {"excess_base", "excess_other", "reduction" (None where the baseline has no excess),
     "reduction_ci", "discordant": [[base only, other only]], "mcnemar_p" (two-sided exact),
     "mcnemar_p_reduced" (one-sided: fewer hits under the other setting)} per threshold.
  """
  thresholds = validate_thresholds(thresholds)
  keys = np.asarray(keys, np.float64)
  n = len(keys)
  if len(k_pred_base) != n or len(k_pred_other) != n:
    raise ValueError(f"paired_effect: {n} keys but {len(k_pred_base)} and {len(k_pred_other)} prediction rows")
  d = np.array(thresholds)
  hit_b = per_image_scores(k_pred_base, keys, statistic, key_bits)[:, None] <= d  # [N, T]
  hit_o = per_image_scores(k_pred_other, keys, statistic, key_bits)[:, None] <= d
  p_b = chance.hit_probabilities(k_pred_base, thresholds, statistic=statistic, key_bits=key_bits)
  p_o = chance.hit_probabilities(k_pred_other, thresholds, statistic=statistic, key_bits=key_bits)
  ex_b = hit_b.sum(0) - p_b.sum(0)
  ex_o = hit_o.sum(0) - p_o.sum(0)
  rng = np.random.default_rng(seed)
  idx = rng.integers(0, n, (num_bootstrap, n)) if n else np.zeros((0, 0), np.int64)
  a = (1.0 - level) / 2
  out = {"excess_base": [], "excess_other": [], "reduction": [], "reduction_ci": [], "discordant": [],
         "mcnemar_p": [], "mcnemar_p_reduced": []}
  for t in range(len(d)):
    out["excess_base"].append(float(ex_b[t]))
    out["excess_other"].append(float(ex_o[t]))
    out["reduction"].append(float((ex_b[t] - ex_o[t]) / ex_b[t]) if ex_b[t] > 0 else None)
    if n and ex_b[t] > 0:
      bb = hit_b[idx, t].sum(1) - p_b[idx, t].sum(1)
      bo = hit_o[idx, t].sum(1) - p_o[idx, t].sum(1)
      ok = bb > 0
      red = (bb[ok] - bo[ok]) / bb[ok]
      out["reduction_ci"].append([float(np.quantile(red, a)), float(np.quantile(red, 1 - a))] if ok.any() else None)
    else:
      out["reduction_ci"].append(None)
    only_b = int(np.sum(hit_b[:, t] & ~hit_o[:, t]))
    only_o = int(np.sum(hit_o[:, t] & ~hit_b[:, t]))
    out["discordant"].append([only_b, only_o])
    m = only_b + only_o
    out["mcnemar_p"].append(float(stats.binomtest(only_b, m, 0.5).pvalue) if m else 1.0)
    out["mcnemar_p_reduced"].append(float(stats.binomtest(only_b, m, 0.5, alternative="greater").pvalue) if m else 1.0)
  return out
