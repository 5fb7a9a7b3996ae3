"""Duplication scoring: any evaluation x any key, the exact chance given the predictions, the per-level summary."""

import numpy as np
import pytest

from solidmark_jax import report
from solidmark_jax.metrics import chance, duplication


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


def test_chance_given_the_predictions_matches_monte_carlo():
  """An image's keys drawn at random many times: the hit rate equals its exact chance 1 - (1 - |U|)^c."""
  rs = np.random.default_rng(1)
  k_pred = np.array([[0.05, 0.12, 0.6, np.nan], [0.3, 0.31, 0.95, 0.5]])  # overlapping, edge, missing
  for d in (0.1, 0.05, 0.01):
    for c in (1, 2, 4):
      exact = chance.hit_probability(k_pred, d, copies=c, key_bits=None)
      for i in range(2):
        keys = rs.random((100_000, c))
        l = duplication.best_l_sm(keys, np.tile(k_pred[i], (100_000, 1)), key_bits=None)
        mc = np.mean(l <= d)
        assert abs(mc - exact[i]) < 4 * np.sqrt(exact[i] * (1 - exact[i]) / 100_000) + 1e-4, (d, c, i, mc, exact[i])


def test_summary_per_level_against_exact_chance_and_markdown():
  rs = np.random.default_rng(2)
  copies = {1: 60, 2: 60, 4: 60}
  key_image_id = np.concatenate([np.repeat(np.arange(i * 100, i * 100 + n), c)
                                 for i, (c, n) in enumerate(copies.items())])
  keys = rs.random(len(key_image_id))
  images = np.unique(key_image_id)
  # every distinct image evaluated e = 4 times; 4x images reproduce one of their keys, others guess
  k_pred = rs.random((len(images), 4))
  first = np.array([np.flatnonzero(key_image_id == i)[0] for i in images])
  four = images >= 200
  k_pred[four, 0] = keys[first[four]]
  thresholds = (0.01, 0.005)
  s = duplication.summarize_duplication(key_image_id, keys, images, k_pred, thresholds)
  assert list(s["levels"]) == ["1x", "2x", "4x"]
  for name, c in (("1x", 1), ("2x", 2), ("4x", 4)):
    lv = s["levels"][name]
    assert lv["n"] == 60 and lv["copies"] == c and lv["evaluations"] == [4]
    for t, (lo, hi) in enumerate(lv["ci"]):
      assert lo <= lv["rates"][t] <= hi
  assert s["levels"]["4x"]["counts"] == [60, 60]
  # all 60 hit: P(60 or more | chance) is the product of the 60 exact chance probabilities
  per_image = chance.hit_probability(k_pred[four], 0.01, copies=4)
  assert s["levels"]["4x"]["chance"]["p_value"][0] == pytest.approx(np.prod(per_image), rel=1e-9)
  np.testing.assert_allclose(s["levels"]["1x"]["chance"]["expected"][0],
                             chance.hit_probability(k_pred[images < 100], 0.01).sum())
  assert s["levels"]["2x"]["chance"]["rate"][0] > 1.5 * s["levels"]["1x"]["chance"]["rate"][0]
  assert s["levels"]["1x"]["chance"]["p_value"][0] > 0.05  # guesses are at chance
  assert s["trend"][0]["p_value"] < 1e-6
  md = report.duplication_markdown(s)
  assert "| (l_SM, 0.01) | 4x | 60 / 60 (100.0%)" in md and "trend of the excess" in md
  with pytest.raises(ValueError, match="one key per instance"):
    duplication.summarize_duplication(key_image_id, np.stack([keys, keys], 1), images, k_pred, thresholds)
