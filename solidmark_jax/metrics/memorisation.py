"""SolidMark scoring on the host (SPEC section 3): l_SM, eidetic counts, chance level, significance.

Pure numpy (scipy only where noted, optional). Shapes: N images, r repeats, T thresholds.

An image is (l_SM, delta)-eidetically memorised when l_SM = |k_pred - k| <= delta. If k_pred is
independent of k ~ U(0, 1) and uniform, P(l_SM <= delta) = 2 delta - delta^2 ("chance").
"""

from __future__ import annotations

import math
from statistics import NormalDist
from typing import Literal, Sequence

import numpy as np

from solidmark_jax import marks

DEFAULT_THRESHOLDS = (0.1, 0.05, 0.01, 0.005)
Statistic = Literal["best", "mean"]
STATISTICS = ("best", "mean")


def validate_thresholds(thresholds: Sequence[float]) -> tuple[float, ...]:
  """Thresholds as a tuple of floats, each strictly inside (0, 1); a clear ValueError otherwise."""
  if isinstance(thresholds, (int, float)):
    raise ValueError(f"thresholds must be a sequence (SPEC: never a single threshold), got {thresholds!r}")
  out = tuple(float(d) for d in thresholds)
  if not out:
    raise ValueError("thresholds: need at least one delta, e.g. (0.1, 0.05, 0.01, 0.005)")
  bad = [d for d in out if not (0.0 < d < 1.0) or math.isnan(d)]
  if bad:
    raise ValueError(f"thresholds must lie in (0, 1) (l_SM compares keys in [0, 1]); got {bad}")
  if len(set(out)) != len(out):
    raise ValueError(f"thresholds must be distinct, got {out}")
  return out


def snap_to_key_grid(k_pred, key_bits: int = marks.KEY_BITS) -> np.ndarray:
  """k_pred read at the keys' resolution: the centre (m + 1/2) / 2**bits of its grid cell.

  Keys lie on that grid (`marks.keys_for`), so a prediction within half a cell (2**-17 for 16
  bits) of its key snaps onto it exactly: float32 rounding in the sampler (about 3e-8) cannot make
  an oracle's l_SM non-zero, while l_SM moves by at most 2**-(bits + 1), far below any threshold.
  """
  scale = float(2**key_bits)
  k = np.asarray(k_pred, np.float64)
  m = np.clip(np.floor(k * scale), 0, scale - 1)
  return (m + 0.5) / scale


def l_sm(k_pred, keys, key_bits: int | None = marks.KEY_BITS) -> np.ndarray:
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


def eidetic_counts(scores, thresholds: Sequence[float] = DEFAULT_THRESHOLDS) -> np.ndarray:
  """Number of images with score <= delta, per threshold: int64 [T]."""
  thresholds = validate_thresholds(thresholds)
  s = np.asarray(scores, np.float64).reshape(-1)
  return np.array([int(np.sum(s <= d)) for d in thresholds], np.int64)


def chance_probability(delta, repeats: int = 1, statistic: Statistic = "best",
                       num_samples: int = 200_000, seed: int = 0) -> np.ndarray:
  """P(score <= delta) per image when each k_pred is independent and uniform on [0, 1].

  One evaluation: 2 delta - delta^2 (exactly, averaged over k ~ U(0, 1)). Best of r independent
  evaluations: 1 - (1 - p)^r. Mean over r > 1: estimated by Monte Carlo (fixed seed).
  """
  d = np.asarray(delta, np.float64)
  if np.any((d <= 0) | (d >= 1)):
    raise ValueError(f"delta must lie in (0, 1), got {delta}")
  p = 2 * d - d**2
  if statistic not in STATISTICS:
    raise ValueError(f"statistic must be one of {STATISTICS}, got {statistic!r}")
  if repeats == 1:
    return p
  if statistic == "best":
    return 1.0 - (1.0 - p)**repeats
  rng = np.random.default_rng(seed)
  k = rng.random(num_samples)
  mean_l = np.abs(rng.random((num_samples, repeats)) - k[:, None]).mean(axis=1)
  return np.array([np.mean(mean_l <= x) for x in d.reshape(-1)]).reshape(d.shape)


def binomial_ci(count: int, n: int, level: float = 0.95, method: str = "wilson") -> tuple[float, float]:
  """Confidence interval for a binomial rate count / n.

  Args:
    count: successes.
    n: trials (0 gives (0, 1)).
    level: coverage, e.g. 0.95.
    method: "wilson" (score interval, no scipy) or "clopper-pearson" (exact, needs scipy).
  """
  if not 0 <= count <= n:
    raise ValueError(f"binomial_ci: need 0 <= count <= n, got {count}, {n}")
  if n == 0:
    return 0.0, 1.0
  alpha = 1.0 - level
  if method == "wilson":
    z = NormalDist().inv_cdf(1.0 - alpha / 2)
    p = count / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    lo = 0.0 if count == 0 else max(0.0, centre - half)
    hi = 1.0 if count == n else min(1.0, centre + half)
    return lo, hi
  if method == "clopper-pearson":
    from scipy import stats
    lo = 0.0 if count == 0 else float(stats.beta.ppf(alpha / 2, count, n - count + 1))
    hi = 1.0 if count == n else float(stats.beta.ppf(1 - alpha / 2, count + 1, n - count))
    return lo, hi
  raise ValueError(f"binomial_ci: method must be 'wilson' or 'clopper-pearson', got {method!r}")


def _log_hypergeom_pmf(k: np.ndarray, total: int, successes: int, draws: int) -> np.ndarray:
  lc = lambda a, b: math.lgamma(a + 1) - math.lgamma(b + 1) - math.lgamma(a - b + 1)
  return np.array([lc(successes, i) + lc(total - successes, draws - i) - lc(total, draws) for i in k])


def fisher_exact(count_a: int, n_a: int, count_b: int, n_b: int, alternative: str = "greater") -> float:
  """Fisher's exact test on the 2x2 table [[count_a, n_a - count_a], [count_b, n_b - count_b]].

  alternative "greater": group a's rate is higher (members memorised more than non-members);
  "less"; "two-sided" (sums tables no more likely than the observed one). Pure Python.
  """
  total, successes, draws = n_a + n_b, count_a + count_b, n_a
  lo, hi = max(0, draws - (total - successes)), min(successes, draws)
  support = np.arange(lo, hi + 1)
  logp = _log_hypergeom_pmf(support, total, successes, draws)
  pmf = np.exp(logp - logp.max())
  pmf /= pmf.sum()
  observed = count_a - lo
  if alternative == "greater":
    p = pmf[observed:].sum()
  elif alternative == "less":
    p = pmf[:observed + 1].sum()
  elif alternative == "two-sided":
    p = pmf[pmf <= pmf[observed] * (1 + 1e-7)].sum()
  else:
    raise ValueError(f"alternative must be 'greater', 'less' or 'two-sided', got {alternative!r}")
  return float(min(1.0, p))


def mann_whitney(x, y, alternative: str = "less") -> dict[str, float]:
  """Mann-Whitney U test of x against y (normal approximation with tie and continuity correction).

  alternative "less": x tends to be smaller (members' l_SM below non-members'). Returns U of x,
  the p-value and the common-language effect size P(X < Y) + P(X = Y) / 2.
  """
  x = np.asarray(x, np.float64).reshape(-1)
  y = np.asarray(y, np.float64).reshape(-1)
  n1, n2 = len(x), len(y)
  if n1 == 0 or n2 == 0:
    return {"u": float("nan"), "p_value": float("nan"), "effect": float("nan")}
  both = np.concatenate([x, y])
  order = np.argsort(both, kind="mergesort")
  ranks = np.empty(len(both))
  sorted_vals = both[order]
  _, first, counts = np.unique(sorted_vals, return_index=True, return_counts=True)
  avg = first + (counts - 1) / 2.0 + 1.0  # average 1-based rank per distinct value
  ranks[order] = np.repeat(avg, counts)
  u = ranks[:n1].sum() - n1 * (n1 + 1) / 2.0  # U of x: pairs with x > y (+ ties / 2)
  n = n1 + n2
  mu = n1 * n2 / 2.0
  sigma = math.sqrt(n1 * n2 / 12.0 * ((n + 1) - np.sum(counts**3 - counts) / (n * (n - 1))))
  if sigma == 0:
    p = 1.0
  else:
    norm = NormalDist()
    if alternative == "less":
      p = norm.cdf((u - mu + 0.5) / sigma)
    elif alternative == "greater":
      p = 1.0 - norm.cdf((u - mu - 0.5) / sigma)
    elif alternative == "two-sided":
      p = 2.0 * (1.0 - norm.cdf(max(abs(u - mu) - 0.5, 0.0) / sigma))
    else:
      raise ValueError(f"alternative must be 'less', 'greater' or 'two-sided', got {alternative!r}")
  return {"u": float(u), "p_value": float(min(1.0, p)), "effect": float(1.0 - u / (n1 * n2))}


def summarize(l: np.ndarray, thresholds: Sequence[float] = DEFAULT_THRESHOLDS, *, statistic: Statistic = "best",
              level: float = 0.95, ci_method: str = "wilson") -> dict:
  """The scores of one group as a JSON-friendly dict.

  Args:
    l: l_SM [N, r] (or [N]).
    thresholds: deltas.
    statistic: which per-image score is counted, "best" (min over r) or "mean" over r.
    level: confidence level of the intervals.
    ci_method: see `binomial_ci`.

  Returns:
    {n, repeats, statistic, thresholds, counts, rates, ci, chance_probability, chance_expected,
     l_sm: {mean, median} of the scored statistic, l_sm_best/l_sm_mean: {mean, median}}.
  """
  thresholds = validate_thresholds(thresholds)
  if statistic not in STATISTICS:
    raise ValueError(f"statistic must be one of {STATISTICS}, got {statistic!r}")
  l = np.asarray(l, np.float64)
  l = l[:, None] if l.ndim == 1 else l
  n, r = l.shape
  per_image = reduce_repeats(l) if n else {"best": np.zeros(0), "mean": np.zeros(0)}
  scores = per_image[statistic]
  counts = eidetic_counts(scores, thresholds)
  chance = chance_probability(np.array(thresholds), max(r, 1), statistic)
  stats_of = lambda s: {"mean": float(np.mean(s)) if n else None, "median": float(np.median(s)) if n else None}
  return {
      "n": int(n),
      "repeats": int(r),
      "statistic": statistic,
      "thresholds": list(thresholds),
      "counts": [int(c) for c in counts],
      "rates": [float(c / n) if n else None for c in counts],
      "ci_level": level,
      "ci_method": ci_method,
      "ci": [list(binomial_ci(int(c), n, level, ci_method)) for c in counts],
      "chance_probability": [float(p) for p in chance],
      "chance_expected": [float(n * p) for p in chance],
      "l_sm": stats_of(scores),
      "l_sm_best": stats_of(per_image["best"]),
      "l_sm_mean": stats_of(per_image["mean"]),
  }


def compare(l_a: np.ndarray, l_b: np.ndarray, thresholds: Sequence[float] = DEFAULT_THRESHOLDS, *,
            statistic: Statistic = "best") -> dict:
  """Is group a (members) more memorised than group b (non-members, or a random-init model)?

  Returns {"fisher_p": [T] one-sided Fisher exact p-values (a's eidetic rate > b's) per threshold,
  "mann_whitney": one-sided test that a's scores are smaller}.
  """
  thresholds = validate_thresholds(thresholds)
  sa = reduce_repeats(l_a)[statistic]
  sb = reduce_repeats(l_b)[statistic]
  ca, cb = eidetic_counts(sa, thresholds), eidetic_counts(sb, thresholds)
  fisher = [fisher_exact(int(a), len(sa), int(b), len(sb), "greater") for a, b in zip(ca, cb)]
  return {"fisher_p": fisher, "fisher_alternative": "greater", "mann_whitney": mann_whitney(sa, sb, "less"),
          "mann_whitney_alternative": "less"}
