"""Wen et al.'s noise magnitude beside l_SM: per-image reduction, rank correlation, membership figures,
and the report's column, section and plot (the loop's side: tests/test_outpaint.py)."""

import csv
import json
import os

import numpy as np
import pytest

from solidmark_jax import marks
from solidmark_jax.metrics import magnitude
from solidmark_jax.report import ResultStore, write_report


def test_per_image_is_the_mean_over_the_repeats_an_image_has():
  m = np.array([[1.0, 3.0], [2.0, np.nan]])
  np.testing.assert_allclose(magnitude.per_image(m), [2.0, 2.0])
  with pytest.raises(ValueError, match="1 image"):
    magnitude.per_image(np.array([[1.0], [np.nan]]))


def test_rank_correlation_sign_and_degenerate_inputs():
  l_sm = np.array([0.01, 0.2, 0.05, 0.4, 0.3])
  agree = magnitude.rank_correlation(1.0 / l_sm, l_sm)  # larger magnitude exactly where l_SM is smaller
  assert agree["rho"] == pytest.approx(-1.0) and agree["p_value"] < 0.05
  assert magnitude.rank_correlation(np.ones(5), l_sm)["rho"] is None  # a model that ignores the condition
  assert magnitude.rank_correlation([1.0, 2.0], [0.1, 0.2])["rho"] is None
  with pytest.raises(ValueError, match="3 magnitudes but 2"):
    magnitude.rank_correlation([1.0, 2.0, 3.0], [0.1, 0.2])


def test_summary_separates_members_by_larger_magnitude_and_is_blind_when_equal():
  rs = np.random.default_rng(0)
  members, others = 10.0 + rs.random(50), rs.random(200)  # every member above every non-member
  l_m, l_o = rs.random(50) * 0.01, rs.random(200)
  s = magnitude.summarize_magnitude({"members": members, "non_members": others},
                                    {"members": l_m, "non_members": l_o}, steps=1)
  mi = s["comparisons"]["members_vs_non_members"]
  assert mi["auc"] == 1.0 and mi["tpr_at_fpr"]["0.01"] == 1.0
  assert s["groups"]["members"]["n"] == 50 and s["groups"]["members"]["mean"] == pytest.approx(members.mean())
  pooled = s["pooled_rank_correlation"]  # both detectors agree on which images are memorised
  assert pooled["rho"] < -0.3 and pooled["p_value"] < 1e-6
  same = magnitude.summarize_magnitude({"members": np.zeros(50), "non_members": np.zeros(200)},
                                       {"members": l_m, "non_members": l_o})
  assert same["comparisons"]["members_vs_non_members"]["auc"] == 0.5  # ties: no information
  assert same["groups"]["members"]["rank_correlation"]["rho"] is None


def _store(tmp_path, guided):
  rs = np.random.default_rng(1)
  store = ResultStore(str(tmp_path / "results.jsonl"), meta={"eval": {"magnitude_steps": 2}})
  for group, n, spread in (("members", 16, 0.001), ("non_members", 24, 0.5)):
    ids = np.arange(n)
    keys = marks.keys_for(3, ids)
    k_pred = np.clip(keys[:, None] + spread * rs.standard_normal((n, 2)), 0, 1)
    noise = (5.0 if group == "members" else 1.0) + rs.random((n, 2)) if guided else None
    store.append(group, ids, keys, k_pred, noise)
  return store


def test_report_column_section_and_plot_only_with_guidance(tmp_path):
  for guided in (True, False):
    out = tmp_path / str(guided)
    store = _store(out, guided)
    results = store.results()
    assert (results.noise_magnitude is not None) == guided
    summary = write_report(str(out), results, (0.05,), metadata=store.meta, num_permutations=50)
    with open(out / "per_image.csv") as f:
      rows = list(csv.DictReader(f))
    md = (out / "summary.md").read_text()
    assert ("noise_magnitude" in summary) == guided and ("noise_magnitude" in rows[0]) == guided
    assert ("## Noise magnitude (Wen et al. 2024)" in md) == guided
    assert os.path.exists(out / "noise_magnitude.png") == guided
    if guided:
      section = json.loads((out / "summary.json").read_text())["noise_magnitude"]
      assert section["steps"] == 2 and section["comparisons"]["members_vs_non_members"]["auc"] == 1.0
      stored = [json.loads(line) for line in open(out / "results.jsonl").read().splitlines()[1:]]
      by_id = {(r["group"], r["instance_id"]): np.mean(r["noise_magnitude"]) for r in stored}
      for row in rows:
        assert float(row["noise_magnitude"]) == pytest.approx(by_id[(row["group"], int(row["instance_id"]))])


def test_store_refuses_magnitudes_of_another_shape(tmp_path):
  store = ResultStore(str(tmp_path / "results.jsonl"))
  with pytest.raises(ValueError, match="noise_magnitude .* needs one value per image and repeat"):
    store.append("members", [0, 1], [0.1, 0.2], [[0.1, 0.1], [0.2, 0.2]], [[1.0, 2.0, 3.0], [1.0, 2.0, 3.0]])
