"""Chance levels of SolidMark hits, exact given each image's own predictions.

Under the null hypothesis the true key k is uniform and independent of everything the model saw
(the query, the condition, the noise), so the probability that an image is a hit at threshold
delta is a function of its predictions alone: the measure of the set of keys its predictions would
match. Keys lie on the grid (i + 1/2) / 2**bits (`marks.keys_for`) and predictions are read on that
grid (`memorisation.l_sm`), so the measure is a count of grid points divided by 2**bits; with
`key_bits=None` it is the Lebesgue measure on [0, 1].

- best of r: the union of [k_pred_j - delta, k_pred_j + delta] over the r predictions, within [0, 1];
- mean over r: {k : mean_j |k_pred_j - k| <= delta}, one interval (the sublevel set of a convex
  function), which is [k_pred - delta, k_pred + delta] when the r predictions coincide;
- m keys per image (`marks.num_keys`): a hit needs every key within delta, so best of r is the volume
  of a union of r boxes (inclusion-exclusion), about (2 delta)^m;
- c independent key sets (duplicated images): 1 - (1 - p)^c.

Hits of different images are independent given the predictions, so the number of hits in a group
is Poisson-binomial: its expectation, central band and exact tail follow (`poisson_binomial_pmf`).
`reference_probability` is the old closed form 2 delta - delta^2 (best of r: 1 - (1 - p)^r), exact
only for uniform, independent predictions; it is reported as a labelled reference, never tested
against.

Shapes: N images, r repeats (NaN where an image has fewer), m keys, T thresholds.
"""

from __future__ import annotations

import itertools
from typing import Sequence

import numpy as np
from numpy.typing import ArrayLike
from scipy import optimize

from solidmark_jax import marks

MAX_BOX_REPEATS = 12  # inclusion-exclusion over 2**r - 1 subsets for m > 1 keys


def _as_predictions(k_pred) -> np.ndarray:
  """k_pred as float64 [N, r, m]."""
  k = np.asarray(k_pred, np.float64)
  if k.ndim == 1:
    k = k[:, None]
  if k.ndim == 2:
    k = k[:, :, None]
  if k.ndim != 3:
    raise ValueError(f"k_pred must be [N], [N, r] or [N, r, m], got shape {k.shape}")
  return k


def _grid_intervals(k: np.ndarray, delta: float, key_bits: int | None) -> tuple[np.ndarray, np.ndarray, float]:
  """Per prediction, the keys it matches as [lo, hi) in grid units (or [0, 1] units without a grid).

  Returns lo, hi (same shape as k, NaN for missing predictions) and the size of the key space.
  """
  if key_bits is None:
    return np.clip(k - delta, 0.0, 1.0), np.clip(k + delta, 0.0, 1.0), 1.0
  size = float(2**key_bits)
  a = np.clip(np.floor(k * size), 0, size - 1)  # the grid cell a prediction snaps to
  w = np.floor(delta * size)  # |a - i| / size <= delta  <=>  |a - i| <= floor(delta * size), exactly
  return np.clip(a - w, 0, size), np.clip(a + w + 1, 0, size), size


def _union_length(lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
  """Length of the union of the intervals [lo_j, hi_j) per row; NaN entries are ignored. [N, r] -> [N]."""
  valid = np.isfinite(lo)
  lo = np.where(valid, lo, np.inf)
  order = np.argsort(lo, axis=1)
  lo = np.take_along_axis(lo, order, axis=1)
  hi = np.take_along_axis(np.where(valid, hi, -np.inf), order, axis=1)
  reach = np.maximum.accumulate(hi, axis=1)  # right end of the union of the first j intervals
  before = np.concatenate([np.full((len(lo), 1), -np.inf), reach[:, :-1]], axis=1)
  new = np.where(np.isfinite(lo), np.maximum(0.0, hi - np.maximum(lo, before)), 0.0)
  return new.sum(axis=1)


def _box_union_volume(lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
  """Volume of the union of r boxes per row by inclusion-exclusion: [N, r, m] -> [N] (NaN boxes ignored)."""
  n, r, _ = lo.shape
  if r > MAX_BOX_REPEATS:
    raise ValueError(f"exact chance with several keys per image supports at most {MAX_BOX_REPEATS} repeats "
                     f"(2**r box intersections), got r = {r}")
  valid = np.all(np.isfinite(lo), axis=2)  # [N, r]
  lo = np.where(valid[..., None], lo, 0.0)
  hi = np.where(valid[..., None], hi, 0.0)  # a missing box is empty
  total = np.zeros(n)
  for size in range(1, r + 1):
    sign = 1.0 if size % 2 else -1.0
    for subset in itertools.combinations(range(r), size):
      s = list(subset)
      side = np.maximum(0.0, hi[:, s].min(axis=1) - lo[:, s].max(axis=1))  # [N, m]
      total += sign * np.prod(side, axis=1)
  return total


def _mean_interval_length(k: np.ndarray, delta: float, key_bits: int | None) -> np.ndarray:
  """Measure of {key : mean_j |k_pred_j - key| <= delta} per row, for one key axis. [N, r] -> [N].

  F(x) = mean_j |a_j - x| is convex and piecewise linear with breakpoints at the predictions, so
  its sublevel set is one interval whose ends are found on the segments where F crosses delta.
  """
  if key_bits is None:
    size, a, w = 1.0, k, delta
  else:
    size = float(2**key_bits)
    a, w = np.clip(np.floor(k * size), 0, size - 1), delta * size
  out = np.zeros(len(a))
  for row in range(len(a)):  # rows differ in their valid repeats; r is small
    b = np.sort(a[row][np.isfinite(a[row])])
    if not len(b):
      continue
    f = np.abs(b[:, None] - b[None, :]).mean(axis=1)  # F at the breakpoints
    inside = np.flatnonzero(f <= w)
    if not len(inside):
      continue
    i, j = inside[0], inside[-1]
    lo = b[0] - (w - f[0]) if i == 0 else b[i - 1] + (f[i - 1] - w) / (f[i - 1] - f[i]) * (b[i] - b[i - 1])
    hi = b[-1] + (w - f[-1]) if j == len(b) - 1 else b[j] + (w - f[j]) / (f[j + 1] - f[j]) * (b[j + 1] - b[j])
    if key_bits is None:
      out[row] = max(0.0, min(hi, 1.0) - max(lo, 0.0))
    else:  # grid points i with F(i) <= w: the integers in [lo, hi] within [0, size - 1]
      tol = 1e-9 * size
      out[row] = max(0.0, np.floor(min(hi + tol, size - 1)) - np.ceil(max(lo - tol, 0.0)) + 1)
  return out


def hit_probability(k_pred: ArrayLike, delta: float, *, statistic: str = "best", copies: ArrayLike | None = 1,
                    key_bits: int | None = marks.KEY_BITS) -> np.ndarray:
  """P(image is a hit at `delta` | its predictions) under the null, per image.

  Args:
    k_pred: [N], [N, r] or [N, r, m] predictions in [0, 1] (NaN where a repeat is missing).
    delta: threshold in (0, 1).
    statistic: "best" (min over r of l_SM) or "mean" (mean over r), as the report scores.
    copies: independent key sets per image (training copies of a duplicated image), int or [N].
    key_bits: the key grid (`marks.KEY_BITS`); None for keys uniform on [0, 1].

  Returns:
    float64 [N] in [0, 1].
  """
  if not 0.0 < float(delta) < 1.0:
    raise ValueError(f"delta must lie in (0, 1), got {delta}")
  k = _as_predictions(k_pred)
  n, r, m = k.shape
  if statistic == "best":
    lo, hi, size = _grid_intervals(k, float(delta), key_bits)
    p = (_union_length(lo[:, :, 0], hi[:, :, 0]) / size if m == 1
         else _box_union_volume(lo, hi) / size**m)
  elif statistic == "mean":
    valid = np.sum(np.all(np.isfinite(k), axis=2), axis=1)
    if m > 1 and np.any(valid > 1):
      raise ValueError("statistic 'mean' over several repeats with several keys per image has no exact chance "
                       "here; score 'best' (eval.score) or use one repeat")
    if m > 1:  # one valid repeat: a single box
      lo, hi, size = _grid_intervals(k, float(delta), key_bits)
      p = _box_union_volume(lo, hi) / size**m
    else:
      p = _mean_interval_length(k[:, :, 0], float(delta), key_bits) / (1.0 if key_bits is None else 2.0**key_bits)
  else:
    raise ValueError(f"statistic must be 'best' or 'mean', got {statistic!r}")
  c = np.broadcast_to(np.asarray(copies, np.float64), (n,))
  if np.any(c < 0):
    raise ValueError(f"copies must be >= 0, got {copies}")
  p = np.clip(p, 0.0, 1.0)
  return np.where(c == 1, p, 1.0 - (1.0 - p)**c)


def hit_probabilities(k_pred: ArrayLike, thresholds: Sequence[float], **kwargs) -> np.ndarray:
  """`hit_probability` at every threshold: [N, T]."""
  return np.stack([hit_probability(k_pred, d, **kwargs) for d in thresholds], axis=-1).reshape(-1, len(thresholds))


def reference_probability(delta: float, repeats: int = 1, num_keys: int = 1) -> np.ndarray:
  """The closed form for uniform, independent predictions: p = (2 delta - delta^2)^m, best of r 1 - (1 - p)^r.

  A reference line only: real predictions are neither uniform nor independent across repeats.
  """
  d = np.asarray(delta, np.float64)
  p = (2 * d - d**2)**num_keys
  return 1.0 - (1.0 - p)**repeats


def poisson_binomial_pmf(probabilities: ArrayLike) -> np.ndarray:
  """P(X = x), x = 0..N, for X the number of successes of independent Bernoulli(p_i). Exact.

  Blocks of about sqrt(N / 6) images are folded by the recursion (all blocks at once), then the
  block distributions are convolved pairwise (exact sums of products, no FFT), so N = 10,000 images
  take milliseconds and tails far below 1e-16 stay exact.
  """
  p = np.clip(np.asarray(probabilities, np.float64).reshape(-1), 0.0, 1.0)
  if p.size == 0:
    return np.ones(1)
  block = max(1, min(len(p), int(np.sqrt(len(p) / 6)) + 1))
  pad = (-len(p)) % block
  q = np.concatenate([p, np.zeros(pad)]).reshape(-1, block)  # zeros add no successes
  pmf = np.zeros((len(q), block + 1))
  pmf[:, 0] = 1.0
  for i in range(block):
    pmf[:, 1:i + 2] = pmf[:, 1:i + 2] * (1 - q[:, i:i + 1]) + pmf[:, :i + 1] * q[:, i:i + 1]
    pmf[:, 0] *= 1 - q[:, i]
  parts = list(pmf)
  while len(parts) > 1:
    parts = [np.convolve(parts[j], parts[j + 1]) if j + 1 < len(parts) else parts[j]
             for j in range(0, len(parts), 2)]
  out = np.clip(parts[0][:len(p) + 1], 0.0, None)
  return out / out.sum()


def _cdf(pmf: np.ndarray) -> np.ndarray:
  return np.minimum(np.cumsum(pmf), 1.0)


def tail_at_least(count: int, probabilities: ArrayLike) -> float:
  """Exact P(X >= count) for X Poisson-binomial(probabilities): the one-sided p-value of `count` hits."""
  pmf = poisson_binomial_pmf(probabilities)
  count = int(count)
  if count <= 0:
    return 1.0
  if count >= len(pmf):
    return 0.0
  return float(min(1.0, pmf[count:].sum()))


def central_band(probabilities: ArrayLike, level: float = 0.95) -> tuple[int, int]:
  """The central `level` band [lo, hi] of the null count: P(X < lo) <= a/2 and P(X > hi) <= a/2."""
  pmf = poisson_binomial_pmf(probabilities)
  cdf = _cdf(pmf)
  a = (1.0 - level) / 2
  lo = int(np.searchsorted(cdf, a, side="right"))  # first x with P(X <= x) > a
  sf = 1.0 - np.concatenate([[0.0], cdf[:-1]])  # P(X >= x)
  hi = int(np.flatnonzero(sf > a)[-1])
  return lo, hi


def corrected_fraction(count: int, probabilities: ArrayLike, level: float = 0.95) -> dict:
  """The memorised fraction beyond chance, f = (rate - chance) / (1 - chance), with an exact interval.

  Model: a fraction f of the images is memorised (always hits), the others hit by chance, so image
  i hits with q_i = p_i + f (1 - p_i). The interval inverts the two one-sided exact Poisson-binomial
  tests in f in [0, 1] (as Clopper-Pearson does for a binomial rate). f below 0 (fewer hits than
  chance) is reported as is, its interval then starts at 0.

  Returns:
    {"estimate", "ci": [lo, hi], "ci_level"}.
  """
  p = np.clip(np.asarray(probabilities, np.float64).reshape(-1), 0.0, 1.0)
  n = len(p)
  if n == 0:
    return {"estimate": None, "ci": [0.0, 1.0], "ci_level": level}
  expected = p.sum()
  est = (count - expected) / (n - expected) if n - expected > 0 else 0.0
  a = (1.0 - level) / 2
  q = lambda f: p + f * (1.0 - p)
  upper_tail = lambda f: tail_at_least(count, q(f)) - a  # rises with f
  lower_tail = lambda f: 1.0 - tail_at_least(count + 1, q(f)) - a  # P(X <= count) - a, falls with f
  lo = 0.0 if upper_tail(0.0) >= 0 else (1.0 if upper_tail(1.0) < 0 else optimize.brentq(upper_tail, 0.0, 1.0,
                                                                                        xtol=1e-5))
  hi = 1.0 if lower_tail(1.0) >= 0 else (0.0 if lower_tail(0.0) < 0 else optimize.brentq(lower_tail, 0.0, 1.0,
                                                                                        xtol=1e-5))
  return {"estimate": float(est), "ci": [float(lo), float(max(lo, hi))], "ci_level": level}


def against_chance(count: int, probabilities: ArrayLike, level: float = 0.95) -> dict:
  """One group's hits at one threshold beside their exact chance.

  Returns:
    {"expected": sum p_i, "rate": mean p_i, "band": central `level` band of the null count,
     "p_value": P(X >= count) (one-sided, exact), "excess": count - expected,
     "corrected": `corrected_fraction`}.
  """
  p = np.asarray(probabilities, np.float64).reshape(-1)
  band = central_band(p, level) if len(p) else (0, 0)
  return {
      "expected": float(p.sum()),
      "rate": float(p.mean()) if len(p) else None,
      "band": [int(band[0]), int(band[1])],
      "p_value": tail_at_least(count, p) if len(p) else None,
      "excess": float(count - p.sum()),
      "corrected": corrected_fraction(count, p, level),
  }


def derangements(n: int, num: int, seed: int) -> np.ndarray:
  """`num` seeded permutations of range(n) without fixed points: int64 [num, n] (n >= 2).

  Each is a random order shifted cyclically by a random step in 1..n-1, so no image is ever scored
  against its own key.
  """
  if n < 2:
    raise ValueError(f"a permutation null needs at least 2 images, got {n}")
  rng = np.random.default_rng(seed)
  out = np.empty((num, n), np.int64)
  for i in range(num):
    order = rng.permutation(n)
    shift = int(rng.integers(1, n))
    out[i, order] = order[(np.arange(n) + shift) % n]
  return out
