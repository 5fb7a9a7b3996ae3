"""Metrics: l_SM, eidetic counts, chance level, intervals, significance, baseline distances."""

import math

import numpy as np
import pytest
from scipy import stats

from solidmark_jax import marks, metrics


def test_l_sm_best_and_mean_by_hand():
  keys = np.array([0.25, 0.5])
  k_pred = np.array([[0.25, 0.35, 0.05], [0.9, 0.5, 0.7]])
  l = metrics.l_sm(k_pred, keys, key_bits=None)
  np.testing.assert_allclose(l, [[0.0, 0.1, 0.2], [0.4, 0.0, 0.2]], atol=1e-15)
  red = metrics.reduce_repeats(l)
  np.testing.assert_allclose(red["best"], [0.0, 0.0], atol=1e-15)
  np.testing.assert_allclose(red["mean"], [0.1, 0.2])
  np.testing.assert_array_equal(metrics.eidetic_counts(red["mean"], (0.15, 0.1, 0.05)), [1, 1, 0])
  np.testing.assert_array_equal(metrics.eidetic_counts([0.1, 0.2, 0.05, 0.5], (0.1, 0.05)), [2, 1])  # <= delta


def test_key_grid_snapping():
  keys = marks.keys_for(0, np.arange(1000))
  np.testing.assert_array_equal(metrics.snap_to_key_grid(keys), keys)
  noisy = keys.astype(np.float32) + np.float32(3e-8) * np.sign(np.random.default_rng(0).standard_normal(1000))
  np.testing.assert_array_equal(metrics.l_sm(noisy, keys), np.zeros(1000))
  assert metrics.l_sm(np.array([0.0]), np.array([0.5 / 2**16]))[0] == 0.0  # clipped to the first cell
  assert metrics.l_sm(np.array([1.0]), np.array([1 - 0.5 / 2**16]))[0] == 0.0
  l = metrics.l_sm(np.array([0.3]), np.array([0.6]))[0]
  assert abs(l - 0.3) <= 2.0**-17


def test_threshold_validation():
  assert metrics.validate_thresholds([0.1, 0.05]) == (0.1, 0.05)
  for bad in ([0.0, 0.1], [1.0], [-0.1], [1.5], [], [float("nan")]):
    with pytest.raises(ValueError, match="threshold|delta"):
      metrics.validate_thresholds(bad)
  with pytest.raises(ValueError, match="sequence"):
    metrics.validate_thresholds(0.1)
  with pytest.raises(ValueError, match="distinct"):
    metrics.validate_thresholds([0.1, 0.1])
  with pytest.raises(ValueError, match=r"\(0, 1\)"):
    metrics.eidetic_counts([0.1], (0.1, 2.0))
  # the baselines' distance / similarity thresholds: the same check, finite instead of inside (0, 1)
  assert metrics.validate_thresholds([2.5, 0.5], "eval.generations.l2_thresholds", unit_interval=False) == (2.5, 0.5)
  for bad, what in ((0.5, "sequence"), ("0.5", "sequence"), ([], "at least one"), ([float("inf")], "finite"),
                    ([1.0, 1.0], "distinct")):
    with pytest.raises(ValueError, match=f"eval.generations.l2_thresholds.*{what}"):
      metrics.validate_thresholds(bad, "eval.generations.l2_thresholds", unit_interval=False)


def test_l_sm_several_keys_is_the_largest_distance():
  keys = np.array([[0.2, 0.8], [0.5, 0.5]])
  k_pred = np.array([[[0.25, 0.8], [0.2, 0.6]], [[0.5, 0.5], [0.9, 0.5]]])  # [N, r, m]
  np.testing.assert_allclose(metrics.l_sm(k_pred, keys, key_bits=None), [[0.05, 0.2], [0.0, 0.4]], atol=1e-15)
  with pytest.raises(ValueError, match=r"k_pred \[N, r, m\]"):
    metrics.l_sm(k_pred[:, 0], keys)


@pytest.mark.parametrize("count,n", [(0, 10), (3, 10), (10, 10), (37, 5000), (1, 1)])
def test_binomial_ci(count, n):
  lo, hi = metrics.binomial_ci(count, n)
  assert 0.0 <= lo <= count / n <= hi <= 1.0
  w = stats.binomtest(count, n).proportion_ci(0.95, method="wilson")
  np.testing.assert_allclose([lo, hi], [w.low, w.high], atol=1e-9)
  lo, hi = metrics.binomial_ci(count, n, method="clopper-pearson")
  cp = stats.binomtest(count, n).proportion_ci(0.95, method="exact")
  np.testing.assert_allclose([lo, hi], [cp.low, cp.high], atol=1e-9)
  assert lo <= count / n <= hi
  with pytest.raises(ValueError):
    metrics.binomial_ci(n + 1, n)


def test_fisher_exact_matches_scipy():
  for a, na, b, nb in [(12, 50, 3, 50), (0, 20, 0, 20), (5, 5, 0, 7), (2, 100, 9, 120), (30, 1000, 25, 1000)]:
    for alt in ("greater", "less", "two-sided"):
      ref = stats.fisher_exact([[a, na - a], [b, nb - b]], alternative=alt).pvalue
      assert math.isclose(metrics.fisher_exact(a, na, b, nb, alt), ref, rel_tol=1e-6, abs_tol=1e-12), (a, b, alt)


def test_mann_whitney_matches_scipy():
  rs = np.random.default_rng(1)
  x, y = rs.random(60) * 0.8, rs.random(80)
  x[:5] = y[:5]  # ties
  for alt in ("less", "greater", "two-sided"):
    ours = metrics.mann_whitney(x, y, alt)
    ref = stats.mannwhitneyu(x, y, alternative=alt, method="asymptotic", use_continuity=True)
    assert math.isclose(ours["u"], ref.statistic)
    assert math.isclose(ours["p_value"], ref.pvalue, rel_tol=1e-6), alt
  assert math.isnan(metrics.mann_whitney([], y)["p_value"])


def test_summarize_and_compare():
  rs = np.random.default_rng(2)
  keys = rs.random(300)
  members = np.clip(keys[:, None] + rs.normal(0, 0.01, (300, 2)), 0, 1)  # memorised
  others = rs.random((300, 2))  # chance
  s = metrics.summarize(members, keys, statistic="best", num_permutations=50)
  assert s["repeats"] == 2 and s["statistic"] == "best" and s["num_keys"] == 1
  for c, (lo, hi), rate in zip(s["counts"], s["ci"], s["rates"]):
    assert lo <= rate <= hi and rate == c / 300
  d = np.array(metrics.DEFAULT_THRESHOLDS)
  np.testing.assert_allclose(s["reference_chance"]["rate"], 1 - (1 - (2 * d - d**2))**2)
  np.testing.assert_allclose(s["chance"]["expected"],
                             metrics.hit_probabilities(members, d).sum(axis=0))
  score = lambda k, kk=keys: {"scores": metrics.per_image_scores(k, kk),
                              "counts": metrics.eidetic_counts(metrics.per_image_scores(k, kk))}
  comp = metrics.compare(score(members), score(others))
  assert all(p < 1e-10 for p in comp["fisher_p"][:2])
  assert comp["mann_whitney"]["p_value"] < 1e-20
  assert comp["membership_inference"]["auc"] > 0.95
  null = metrics.compare(score(others[:150], keys[:150]), score(others[150:], keys[150:]))
  assert min(null["fisher_p"]) > 1e-3
  with pytest.raises(ValueError, match="statistic"):
    metrics.summarize(members, keys, statistic="median")


def test_baseline_distances():
  rs = np.random.default_rng(3)
  train = rs.random((120, 8, 8, 3))
  a, b = train[0], train[1]
  np.testing.assert_allclose(metrics.normalized_l2(a, b), np.sqrt(np.mean((a - b)**2)))
  d = metrics.pairwise_l2(train[:4], train, batch_size=50)
  ref = np.sqrt(((train[:4, None] - train[None])**2).mean(axis=(2, 3, 4)))
  np.testing.assert_allclose(d, ref, atol=1e-7)
  dp = metrics.pairwise_l2(train[:2], train[:10], grid=(4, 4))
  patch = lambda x: x.reshape(4, 2, 4, 2, 3).transpose(0, 2, 1, 3, 4).reshape(16, -1)
  ref_p = [[np.sqrt(((patch(g) - patch(m))**2).mean(axis=1)).max() for m in train[:10]] for g in train[:2]]
  np.testing.assert_allclose(dp, ref_p, atol=1e-7)
  gen = np.concatenate([train[5:6] + 0.001, rs.random((1, 8, 8, 3))])
  out = metrics.carlini_l2(gen, train, n_neighbors=50, alpha=0.5, batch_size=32)
  assert out["nearest"][0] == 5
  assert out["score"][0] < 0.05 < out["score"][1]
  near = np.sort(np.sqrt(((gen[1] - train)**2).mean(axis=(1, 2, 3))))[:50]
  np.testing.assert_allclose(out["score"][1], near[0] / (0.5 * near.mean()))
  assert metrics.percentile_score(np.arange(101.0), 95) == 95.0
