"""Exact chance given the predictions, its null calibration and power, the permutation null, effects.

Synthetic predictions only (no UNet): the true answer is known in every case.
"""

import numpy as np
import pytest

from solidmark_jax import marks, metrics, report
from solidmark_jax.metrics import chance, duplication, memorisation


def _brute(k_pred, delta, statistic, key_bits, keys_axis=1):
  """P(hit) by enumerating every key of a small grid (m = 1 or 2)."""
  size = 2**key_bits
  grid = (np.arange(size) + 0.5) / size
  out = []
  for row in k_pred:
    valid = row[np.all(np.isfinite(row.reshape(len(row), -1)), axis=1)]
    if keys_axis == 1:
      keys = grid
      l = metrics.l_sm(np.broadcast_to(valid, (size, len(valid))), keys, key_bits)
    else:
      g1, g2 = np.meshgrid(grid, grid, indexing="ij")
      keys = np.stack([g1.ravel(), g2.ravel()], axis=1)
      l = metrics.l_sm(np.broadcast_to(valid, (len(keys),) + valid.shape), keys, key_bits)
    s = l.min(axis=1) if statistic == "best" else l.mean(axis=1)
    out.append(np.mean(s <= delta))
  return np.array(out)


@pytest.mark.parametrize("statistic", ["best", "mean"])
def test_hit_probability_equals_enumeration_of_the_key_grid(statistic):
  rs = np.random.default_rng(0)
  k_pred = rs.random((40, 3))
  k_pred[0] = 0.5  # identical repeats
  k_pred[1] = [0.0, 0.01, 1.0]  # at the edges
  k_pred[2, 1] = np.nan  # a missing repeat
  for key_bits in (8, 16):
    for d in (0.1, 0.05, 0.01, 0.005):
      np.testing.assert_array_equal(chance.hit_probability(k_pred[:12], d, statistic=statistic, key_bits=key_bits),
                                    _brute(k_pred[:12], d, statistic, key_bits))


def test_hit_probability_several_keys_equals_enumeration():
  rs = np.random.default_rng(1)
  k_pred = rs.random((10, 3, 2))
  k_pred[0] = k_pred[0, :1]  # identical boxes
  for d in (0.2, 0.1, 0.05):
    np.testing.assert_allclose(chance.hit_probability(k_pred, d, key_bits=6), _brute(k_pred, d, "best", 6, 2),
                               atol=1e-12)
  one = chance.hit_probability(k_pred[:, :1], 0.05, statistic="mean", key_bits=6)  # one repeat: a box
  np.testing.assert_allclose(one, _brute(k_pred[:, :1], 0.05, "best", 6, 2), atol=1e-12)
  with pytest.raises(ValueError, match="mean.*several keys"):
    chance.hit_probability(k_pred, 0.05, statistic="mean")


def test_hit_probability_closed_cases():
  d = 0.1
  mid = chance.hit_probability(np.full((1, 4), 0.5), d, key_bits=None)  # mid-grey: chance 2d, not 2d - d^2
  assert mid[0] == pytest.approx(2 * d)
  edge = chance.hit_probability(np.zeros((1, 1)), d, key_bits=None)
  assert edge[0] == pytest.approx(d)
  spread = chance.hit_probability(np.array([[0.2, 0.6]]), d, key_bits=None)  # two disjoint intervals
  assert spread[0] == pytest.approx(4 * d)
  mean = chance.hit_probability(np.array([[0.4, 0.6]]), d, statistic="mean", key_bits=None)
  assert mean[0] == pytest.approx(0.2)  # mean |k_pred - k| >= 0.1 everywhere, = 0.1 exactly on [0.4, 0.6]
  mean = chance.hit_probability(np.array([[0.4, 0.6]]), 0.15, statistic="mean", key_bits=None)
  assert mean[0] == pytest.approx(0.3)  # F(k) = 0.1 on [0.4, 0.6], slope 1 outside: [0.35, 0.65]
  c = chance.hit_probability(np.full((2, 1), 0.5), d, copies=[1, 3], key_bits=None)
  np.testing.assert_allclose(c, [0.2, 1 - 0.8**3])
  # The closed form is the average over uniform independent predictions (a reference, nothing more).
  rs = np.random.default_rng(2)
  avg = chance.hit_probability(rs.random((200_000, 3)), d, key_bits=None).mean()
  assert avg == pytest.approx(chance.reference_probability(d, 3), abs=2e-3)


def test_poisson_binomial_exact_tail_and_band():
  rs = np.random.default_rng(3)
  p = rs.random(300) * 0.3
  pmf = np.zeros(301)
  pmf[0] = 1
  for q in p:  # the textbook recursion
    pmf[1:] = pmf[1:] * (1 - q) + pmf[:-1] * q
    pmf[0] *= 1 - q
  np.testing.assert_allclose(chance.poisson_binomial_pmf(p), pmf, atol=1e-15)
  assert chance.tail_at_least(0, p) == 1.0 and chance.tail_at_least(301, p) == 0.0
  assert chance.tail_at_least(50, p) == pytest.approx(pmf[50:].sum(), rel=1e-12)
  lo, hi = chance.central_band(p)
  cdf = np.cumsum(pmf)
  assert cdf[lo - 1] <= 0.025 < cdf[lo] and 1 - cdf[hi] <= 0.025 < 1 - cdf[hi - 1]
  big = chance.poisson_binomial_pmf(np.full(10_000, 0.1))  # = the binomial
  from scipy import stats
  np.testing.assert_allclose(big[900:1100], stats.binom.pmf(np.arange(900, 1100), 10_000, 0.1), rtol=1e-9)


def _keys(rs, shape):
  """Keys uniform on the key grid, as `marks.keys_for` draws them."""
  return (rs.integers(0, 2**marks.KEY_BITS, shape) + 0.5) / 2**marks.KEY_BITS


NULL_SCENARIOS = {
    "uniform": lambda rs, n: rs.random((n, 4)),
    "beta_5_5": lambda rs, n: rs.beta(5, 5, (n, 4)),
    "constant_0.5": lambda rs, n: np.full((n, 4), 0.5),
    "correlated_repeats": lambda rs, n: np.clip(rs.beta(2, 2, (n, 1)) + rs.normal(0, 0.003, (n, 4)), 0, 1),
}


@pytest.mark.parametrize("scenario", list(NULL_SCENARIOS))
def test_exact_chance_p_value_is_calibrated_under_the_null(scenario):
  """1000 groups of 2000 images whose predictions ignore the key: P(p <= 0.05) within [0.03, 0.07]."""
  rs = np.random.default_rng(10)
  groups, n, d = 1000, 2000, 0.05
  k_pred = NULL_SCENARIOS[scenario](rs, groups * n)
  keys = _keys(rs, groups * n)
  hits = (metrics.per_image_scores(k_pred, keys) <= d).reshape(groups, n).sum(axis=1)
  probs = chance.hit_probability(k_pred, d).reshape(groups, n)
  p_values = np.array([chance.tail_at_least(h, p) for h, p in zip(hits, probs)])
  fpr = np.mean(p_values <= 0.05)
  assert 0.03 <= fpr <= 0.07, (scenario, fpr)


def test_the_closed_form_is_not_calibrated_for_mid_grey_predictions():
  """What the exact chance fixes: against 2d - d^2, mid-grey predictions reject far too often."""
  rs = np.random.default_rng(11)
  groups, n, d = 300, 5000, 0.1
  k_pred = rs.beta(5, 5, (groups * n, 1))
  hits = (metrics.per_image_scores(k_pred, _keys(rs, groups * n)) <= d).reshape(groups, n).sum(axis=1)
  from scipy import stats
  formula = stats.binom.sf(hits - 1, n, chance.reference_probability(d))
  exact = np.array([chance.tail_at_least(h, p) for h, p in
                    zip(hits, chance.hit_probability(k_pred, d).reshape(groups, n))])
  assert np.mean(formula <= 0.05) > 0.3
  assert np.mean(exact <= 0.05) <= 0.08


def test_two_percent_memorised_is_detected():
  """n = 5000 at d = 0.05, 2% of the images memorised: the exact test finds it in >= 60% of runs."""
  rs = np.random.default_rng(12)
  runs, n, d = 200, 5000, 0.05
  detected = 0
  for _ in range(runs):
    keys = _keys(rs, n)
    k_pred = rs.random((n, 1))
    k_pred[:100, 0] = np.clip(keys[:100] + rs.normal(0, 0.01, 100), 0, 1)  # 2% memorised, l_SM ~ 0.01
    s = metrics.per_image_scores(k_pred, keys)
    detected += chance.tail_at_least(int(np.sum(s <= d)), chance.hit_probability(k_pred, d)) <= 0.05
  assert detected / runs >= 0.6


def test_corrected_fraction_and_its_interval():
  rs = np.random.default_rng(13)
  n, f_true, covered = 400, 0.1, 0
  for _ in range(150):
    keys = _keys(rs, n)
    k_pred = rs.random((n, 2))
    mem = rs.random(n) < f_true
    k_pred[mem] = keys[mem, None]
    p = chance.hit_probability(k_pred, 0.05)
    hits = int(np.sum(metrics.per_image_scores(k_pred, keys) <= 0.05))
    c = chance.corrected_fraction(hits, p)
    covered += c["ci"][0] <= f_true <= c["ci"][1]
  assert covered / 150 >= 0.9
  all_hit = chance.corrected_fraction(16, np.full(16, 0.1))
  assert all_hit["estimate"] == 1.0 and all_hit["ci"][1] == 1.0 and all_hit["ci"][0] > 0.7
  none = chance.corrected_fraction(0, np.full(100, 0.1))
  assert none["estimate"] == pytest.approx(-0.1 / 0.9) and none["ci"] == [0.0, 0.0]


def test_permutation_null_matches_chance_and_rejects_memorisation():
  rs = np.random.default_rng(14)
  n = 300
  keys = _keys(rs, n)
  k_pred = rs.beta(5, 5, (n, 3))
  null = memorisation.permutation_null(k_pred, keys, (0.1, 0.05), num_permutations=400, seed=1,
                                       observed=[int(np.sum(metrics.per_image_scores(k_pred, keys) <= d))
                                                 for d in (0.1, 0.05)])
  expected = [chance.hit_probability(k_pred, d).sum() for d in (0.1, 0.05)]
  assert abs(null["mean"][0] - expected[0]) < 0.1 * expected[0]
  assert min(null["p_value"]) > 0.01
  memorised = np.clip(keys[:, None] + rs.normal(0, 0.002, (n, 3)), 0, 1)
  mem = memorisation.permutation_null(memorised, keys, (0.1, 0.05), num_permutations=400, seed=1, observed=[n, n])
  assert mem["p_value"] == [1 / 401, 1 / 401]
  perms = chance.derangements(7, 50, 0)
  assert np.all(perms != np.arange(7)) and np.all(np.sort(perms, axis=1) == np.arange(7))
  assert memorisation.permutation_null(k_pred[:1], keys[:1]) is None


def test_permutation_null_is_calibrated():
  rs = np.random.default_rng(15)
  p_values = []
  for _ in range(300):
    keys = _keys(rs, 100)
    k_pred = np.clip(rs.beta(2, 2, (100, 1)) + rs.normal(0, 0.01, (100, 2)), 0, 1)
    obs = int(np.sum(metrics.per_image_scores(k_pred, keys) <= 0.1))
    p_values.append(memorisation.permutation_null(k_pred, keys, (0.1,), num_permutations=199, seed=len(p_values),
                                                  observed=[obs])["p_value"][0])
  assert np.mean(np.array(p_values) <= 0.05) <= 0.08


def test_summary_reports_exact_chance_bands_and_nulls():
  rs = np.random.default_rng(16)
  keys = _keys(rs, 64)
  k_pred = np.clip(keys[:, None] + rs.normal(0, 0.001, (64, 4)), 0, 1)  # an oracle-like model
  s = metrics.summarize(k_pred, keys)
  c = s["chance"]
  assert s["counts"] == [64, 64, 64, 64]
  assert all(p < 1e-10 for p in c["p_value"])
  np.testing.assert_allclose(c["expected"], chance.hit_probabilities(k_pred, metrics.DEFAULT_THRESHOLDS).sum(0))
  assert all(lo <= e <= hi for (lo, hi), e in zip(c["band"], c["expected"]))
  assert all(x == pytest.approx(1.0) for x in c["corrected"])
  assert s["permutation"]["p_value"][0] == pytest.approx(1 / 1001)
  # Nearly identical repeats: exact chance far below the independent-repeats reference.
  assert c["rate"][1] < 0.5 * s["reference_chance"]["rate"][1]


def test_membership_inference_figures():
  mi = metrics.membership_inference(np.zeros(50), np.linspace(0.01, 1, 1000))
  assert mi["auc"] == 1.0 and mi["tpr_at_fpr"] == {"0.01": 1.0, "0.001": 1.0}
  rs = np.random.default_rng(17)
  same = metrics.membership_inference(rs.random(2000), rs.random(2000))
  assert abs(same["auc"] - 0.5) < 0.03 and same["tpr_at_fpr"]["0.01"] < 0.03
  # By hand: members 0.1, 0.2, 0.9; others 0.15, 0.5, 0.6, 0.7: pairs won 4 + 3 + 0 of 12.
  hand = metrics.membership_inference([0.1, 0.2, 0.9], [0.15, 0.5, 0.6, 0.7], fpr_levels=(0.0, 0.25))
  assert hand["auc"] == pytest.approx(7 / 12)
  assert hand["tpr_at_fpr"] == {"0": pytest.approx(1 / 3), "0.25": pytest.approx(2 / 3)}


def test_paired_effect_of_a_setting():
  rs = np.random.default_rng(18)
  n = 200
  keys = _keys(rs, n)
  memorised = np.clip(keys[:, None] + rs.normal(0, 0.002, (n, 2)), 0, 1)
  same = metrics.paired_effect(memorised, memorised, keys, (0.05,))
  assert same["reduction"] == [0.0] and same["mcnemar_p"] == [1.0] and same["discordant"] == [[0, 0]]
  removed = metrics.paired_effect(memorised, rs.random((n, 2)), keys, (0.05,))
  assert removed["reduction"][0] == pytest.approx(1.0, abs=0.1)
  assert removed["mcnemar_p"][0] < 1e-20 and removed["mcnemar_p_reduced"][0] < 1e-20
  lo, hi = removed["reduction_ci"][0]
  assert lo <= removed["reduction"][0] <= hi


def _duplication_null(rs, per_level=50, levels=(1, 2, 3, 4), e=10):
  """Images with c copies (own keys each) queried e times by a model that ignores the keys."""
  copies = np.repeat(levels, per_level)
  key_image = np.repeat(np.arange(len(copies)), copies)
  keys = _keys(rs, len(key_image))
  k_pred = np.clip(rs.beta(2, 2, (len(copies), 1)) + rs.normal(0, 0.02, (len(copies), e)), 0, 1)
  return key_image, keys, np.arange(len(copies)), k_pred


def test_duplication_trend_test_is_calibrated():
  rs = np.random.default_rng(19)
  rejections = 0
  for _ in range(1000):
    key_image, keys, ev, k_pred = _duplication_null(rs)
    g = duplication.group_by_image(key_image, keys, ev, k_pred)
    hits = duplication.best_l_sm(g["keys"], g["k_pred"]) <= 0.05
    p = chance.hit_probability(g["k_pred"], 0.05, copies=g["copies"])
    rejections += duplication.trend_test(hits, p, g["copies"])["p_value"] <= 0.05
  assert rejections / 1000 <= 0.07


def test_duplication_levels_against_their_own_chance():
  rs = np.random.default_rng(20)
  key_image, keys, ev, k_pred = _duplication_null(rs)
  s = duplication.summarize_duplication(key_image, keys, ev, k_pred, (0.05,))
  assert [lv["evaluations"] for lv in s["levels"].values()] == [[10]] * 4  # the same e whatever the copies
  rates = [lv["chance"]["rate"][0] for lv in s["levels"].values()]
  assert rates == sorted(rates) and rates[-1] > 1.5 * rates[0]  # chance climbs with copies
  assert all(lv["chance"]["p_value"][0] > 0.001 for lv in s["levels"].values())
  # Memorise the 4x images: their excess appears, and the trend test sees it.
  four = np.flatnonzero(np.array(s["per_image"]["copies"]) == 4)
  first_key = {i: keys[np.flatnonzero(key_image == i)[0]] for i in four}
  k_pred[four] = np.array([first_key[i] for i in four])[:, None]
  s = duplication.summarize_duplication(key_image, keys, ev, k_pred, (0.05,))
  assert s["levels"]["4x"]["counts"][0] == 50 and s["levels"]["4x"]["chance"]["p_value"][0] < 1e-3
  assert s["trend"][0]["p_value"] < 1e-3
  assert "fisher" not in s
  md = report.duplication_markdown(s)
  assert "trend" in md and "4x" in md
