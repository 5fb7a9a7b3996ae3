"""Duplication scoring: any evaluation x any key, the exact chance level, the per-level summary."""

import numpy as np
import pytest

from solidmark_jax.metrics import duplication, memorisation


def _union_by_merging(keys, d):
  """Reference: merge the clipped intervals one by one."""
  iv = sorted((max(0.0, k - d), min(1.0, k + d)) for k in keys)
  total, (lo, hi) = 0.0, iv[0]
  for a, b in iv[1:]:
    if a > hi:
      total, lo, hi = total + hi - lo, a, b
    else:
      hi = max(hi, b)
  return total + hi - lo


def test_union_measure_overlaps_and_edges():
  d = 0.1
  assert duplication.union_measure([0.5], d) == pytest.approx(0.2)
  assert duplication.union_measure([0.03], d) == pytest.approx(0.13)  # clipped at 0
  assert duplication.union_measure([0.95], d) == pytest.approx(0.15)  # clipped at 1
  assert duplication.union_measure([0.3, 0.7], d) == pytest.approx(0.4)  # disjoint
  assert duplication.union_measure([0.3, 0.35], d) == pytest.approx(0.25)  # overlapping: [0.2, 0.45]
  assert duplication.union_measure([0.4, 0.4, 0.4], d) == pytest.approx(0.2)  # identical keys count once
  assert duplication.union_measure([0.02, 0.98], 0.6) == pytest.approx(1.0)  # covers everything
  rows = duplication.union_measure([[0.3, 0.35, np.nan], [0.5, np.nan, np.nan], [np.nan] * 3], d)
  np.testing.assert_allclose(rows, [0.25, 0.2, 0.0])
  rs = np.random.default_rng(0)
  for _ in range(200):
    keys = rs.random(rs.integers(1, 6))
    delta = rs.uniform(0.001, 0.4)
    assert duplication.union_measure(keys, delta) == pytest.approx(_union_by_merging(keys, delta), abs=1e-12)
  with pytest.raises(ValueError, match=r"keys must lie in \[0, 1\]"):
    duplication.union_measure([1.2], d)


def test_any_evaluation_any_key_by_hand():
  # image 0 has two copies (instances 0, 1), image 1 one (instance 2)
  key_image_id = np.array([0, 0, 1])
  keys = np.array([0.2, 0.7, 0.5])
  # image 0 queried twice (as instance 0 and instance 1), r = 2 each; image 1 once
  eval_image_id = np.array([0, 0, 1])
  k_pred = np.array([[0.9, 0.45], [0.68, 0.05], [0.1, 0.95]])
  g = duplication.group_by_image(key_image_id, keys, eval_image_id, k_pred)
  np.testing.assert_array_equal(g["copies"], [2, 1])
  np.testing.assert_array_equal(g["evaluations"], [4, 2])
  l = duplication.best_l_sm(g["keys"], g["k_pred"], key_bits=None)
  # image 0: the third evaluation (0.68) is 0.02 from the SECOND copy's key: it counts
  np.testing.assert_allclose(l, [0.02, 0.4])
  s = duplication.summarize_duplication(key_image_id, keys, eval_image_id, k_pred, (0.05, 0.01))
  assert list(s["levels"]) == ["1x", "2x"]
  assert s["levels"]["2x"]["counts"] == [1, 0] and s["levels"]["1x"]["counts"] == [0, 0]
  # an image whose unevaluated copy holds the matching key still counts (keys come from every copy)
  s = duplication.summarize_duplication(key_image_id, keys, np.array([0]), np.array([[0.71]]), (0.05,))
  assert s["levels"]["2x"]["counts"] == [1] and s["levels"]["2x"]["evaluations"] == [1]
  with pytest.raises(ValueError, match="without keys"):
    duplication.group_by_image(key_image_id, keys, np.array([5]), np.array([0.3]))
  with pytest.raises(ValueError, match="prediction rows"):
    duplication.group_by_image(key_image_id, keys, np.array([0, 1]), np.array([0.3]))


def test_chance_formula_matches_monte_carlo():
  rs = np.random.default_rng(1)
  keys = np.array([[0.05, 0.12, 0.6, np.nan], [0.3, 0.31, 0.95, 0.5]])  # overlapping, edge, padding
  evaluations = np.array([3, 10])
  for d in (0.1, 0.05, 0.01):
    exact = duplication.chance_probability(keys, d, evaluations)
    for i in range(2):
      preds = rs.random((100_000, evaluations[i]))
      l = duplication.best_l_sm(np.tile(keys[i], (100_000, 1)), preds, key_bits=None)
      mc = np.mean(l <= d)
      assert abs(mc - exact[i]) < 4 * np.sqrt(exact[i] * (1 - exact[i]) / 100_000) + 1e-4, (d, i, mc, exact[i])
  # one key, one evaluation, averaged over k ~ U(0, 1): SPEC's 2 delta - delta^2
  k = (np.arange(100_000) + 0.5) / 100_000
  avg = duplication.chance_probability(k[:, None], 0.1, np.ones(100_000)).mean()
  assert avg == pytest.approx(memorisation.chance_probability(0.1), abs=1e-8)


def test_summary_per_level_intervals_fisher_and_markdown():
  rs = np.random.default_rng(2)
  copies = {1: 60, 2: 60, 4: 60}
  key_image_id = np.concatenate([np.repeat(np.arange(i * 100, i * 100 + n), c)
                                 for i, (c, n) in enumerate(copies.items())])
  keys = rs.random(len(key_image_id))
  # every instance evaluated r = 2 times; 4x images reproduce one of their keys, others guess
  eval_image_id = key_image_id
  k_pred = rs.random((len(key_image_id), 2))
  four = key_image_id >= 200
  k_pred[four, 0] = keys[four]
  thresholds = (0.01, 0.005)
  s = duplication.summarize_duplication(key_image_id, keys, eval_image_id, k_pred, thresholds)
  assert list(s["levels"]) == ["1x", "2x", "4x"]
  for name, c in (("1x", 1), ("2x", 2), ("4x", 4)):
    lv = s["levels"][name]
    assert lv["n"] == 60 and lv["copies"] == c and lv["evaluations"] == [2 * c]
    for t, (lo, hi) in enumerate(lv["ci"]):
      assert lo <= lv["rates"][t] <= hi
  assert s["levels"]["4x"]["counts"] == [60, 60]
  # all 60 hit: P(60 or more | chance) is the product of the 60 chance probabilities (about 0.5 each)
  per_image = duplication.chance_probability(keys[four].reshape(60, 4), 0.01, np.full(60, 8))
  assert s["levels"]["4x"]["p_vs_chance"][0] == pytest.approx(np.prod(per_image), rel=1e-9)
  assert s["levels"]["4x"]["p_vs_chance"][0] < 1e-15
  # chance expectation: the sum of the exact per-image probabilities
  one = key_image_id < 100
  np.testing.assert_allclose(s["levels"]["1x"]["chance_expected"][0],
                             duplication.chance_probability(keys[one][:, None], 0.01, np.full(60, 2)).sum())
  # more copies and evaluations: a much higher chance level (2 keys x 4 evaluations vs 1 x 2), which
  # is why a between-level Fisher test must be read beside the chance columns
  assert s["levels"]["2x"]["chance_rate"][0] > 3 * s["levels"]["1x"]["chance_rate"][0]
  assert set(s["fisher"]) == {"2x_vs_1x", "4x_vs_1x", "4x_vs_2x"}
  assert s["fisher"]["4x_vs_1x"][0] < 1e-20 and s["fisher"]["4x_vs_2x"][0] < 1e-10
  assert s["levels"]["1x"]["p_vs_chance"][0] > 0.1  # guesses are at chance
  md = duplication.duplication_markdown(s)
  assert "| (l_SM, 0.01) | " in md and "4x count / n" in md and "60 / 60 (100.0%)" in md


def test_poisson_binomial_tail():
  p = np.array([0.1, 0.5, 0.9, 0.3])
  rs = np.random.default_rng(3)
  x = (rs.random((200_000, 4)) < p).sum(axis=1)
  for k in range(6):
    assert duplication.poisson_binomial_sf(k, p) == pytest.approx(np.mean(x >= k), abs=5e-3)
  assert duplication.poisson_binomial_sf(0, p) == 1.0 and duplication.poisson_binomial_sf(5, p) == 0.0
