"""evaluate.py end to end: the report, --step, repeats and the random-init group, kill -9 and
resume, and bad input that must leave DIR/eval as it was.

One train.py run (a real subprocess) makes the workdir every test copies. evaluate.py runs as a
real subprocess where a process is the point (the report a user gets; kill and resume); the
other checks call `evaluate()` in-process (8 fake CPU devices, see conftest.py). Subprocesses use
2 fake CPU devices and share a persistent XLA compilation cache (one per pytest session).
"""

import csv
import json
import os
import shutil
import signal
import subprocess
import time

import numpy as np
import pytest
from PIL import Image

from e2e_helpers import _command, _config, _run, _snapshot, cli_env  # noqa: F401  (cli_env is a fixture)
from solidmark_jax import marks, metrics
from solidmark_jax.evaluation.evaluator import NONMEMBER_KEY_SALT, evaluate
from solidmark_jax.metrics import memorisation
from solidmark_jax.training import checkpoint as ckpt

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMEOUT_S = 600
THRESHOLDS = [0.1, 0.05, 0.01, 0.005]

# One UNet block (no down-sampling): compiles in about half the time of tiny's two; the UNet's
# shapes and validation are unit-tested elsewhere.
ONE_BLOCK = {"model.block_out_channels": (32,), "model.down_block_types": ("CrossAttnDownBlock2D",),
             "model.up_block_types": ("CrossAttnUpBlock2D",)}

# ---------------------------------------------------------------------------------------------
# Helpers (test_train_e2e.py has the same few).


def _overrides(fashion_dir, **extra) -> dict:
  """configs/tiny.py with 64 training instances (so 64 members can be evaluated), 2 checkpoints."""
  out = {**ONE_BLOCK, "data.data_dir": fashion_dir, "data.train_split": "train[:64]", "data.subset_size": 64,
         "train.num_steps": 4, "train.checkpoint_every": 2, "train.sample_every": 0}
  out.update({k.replace("__", "."): v for k, v in extra.items()})
  return out




def _copy(src, dst):
  shutil.copytree(src, dst)  # copy2: mtimes kept
  return dst


def _read_csv(path) -> list[dict]:
  with open(path, newline="") as f:
    return list(csv.DictReader(f))


def _result_rows(path) -> list[str]:
  """The whole result lines of a results.jsonl (a torn last line, if any, left out), metadata line excluded."""
  data = open(path, "rb").read()
  return data[:data.rfind(b"\n") + 1].decode().splitlines()[1:]


def _exact_chance(rows: list[dict], group: str) -> np.ndarray:
  """Expected chance hits per threshold, recomputed from the per-image predictions in per_image.csv."""
  mine = [r for r in rows if r["group"] == group]
  k_pred = np.array([[float(r[c]) for c in r if c.startswith("k_pred_")] for r in mine])
  return metrics.hit_probabilities(k_pred, THRESHOLDS).sum(axis=0)


# ---------------------------------------------------------------------------------------------
# Fixtures: one trained workdir; one uninterrupted evaluate.py run on a copy of it.

EVAL = dict(eval__num_members=64, eval__num_nonmembers=64, eval__batch_size=8, eval__num_steps=10, eval__num_grid=8)


@pytest.fixture(scope="module")
def trained(fashion_dir, cli_env, tmp_path_factory):
  """A workdir trained 4 steps by train.py, checkpoints at steps 2 and 4."""
  workdir = tmp_path_factory.mktemp("trained") / "wd"
  _run(_command("train.py", workdir, _overrides(fashion_dir)), cli_env, workdir.parent / "train.log")
  assert sorted(os.listdir(workdir / "checkpoints")) == ["2", "4"]
  return workdir


@pytest.fixture(scope="module")
def reference(fashion_dir, cli_env, trained, tmp_path_factory):
  """evaluate.py run to completion on a copy of `trained`: (workdir, stdout+log)."""
  workdir = _copy(trained, tmp_path_factory.mktemp("reference") / "wd")
  log = _run(_command("evaluate.py", workdir, _overrides(fashion_dir, **EVAL)), cli_env, workdir.parent / "eval.log")
  return workdir, log


# ---------------------------------------------------------------------------------------------
# 5. The report.


def test_evaluate_end_to_end(reference, fashion_dir):
  workdir, log = reference
  out = workdir / "eval"
  config = _config(_overrides(fashion_dir, **EVAL))
  keymap = marks.Keymap.load(str(workdir / "keymap.json"))
  checkpointer = ckpt.Checkpointer(str(workdir / "checkpoints"), create=False)
  assert checkpointer.read_meta(4)["keymap_hash"] == keymap.hash
  checkpointer.close()

  summary = json.loads((out / "summary.json").read_text())
  assert summary["thresholds"] == THRESHOLDS
  assert summary["checkpoint_step"] == 4  # the latest by default
  assert summary["keymap_hash"] == keymap.hash
  assert summary["metadata"]["config_fingerprint"] == ckpt.config_fingerprint(config)
  assert summary["statistic"] == "best"
  assert list(summary["groups"]) == ["members", "non_members"]
  for g in summary["groups"].values():
    assert g["n"] == 64 and g["repeats"] == 1
    assert len(g["counts"]) == len(g["ci"]) == len(THRESHOLDS)
    assert all(0 <= c <= 64 for c in g["counts"])
    assert g["counts"] == sorted(g["counts"], reverse=True)  # a smaller delta never counts more
  assert set(summary["comparisons"]) == {"members_vs_non_members"}

  rows = _read_csv(out / "per_image.csv")
  assert list(rows[0]) == ["instance_id", "group", "member", "key", "k_pred_0", "l_sm_best", "l_sm_mean",
                           *[f"chance_{d:g}" for d in THRESHOLDS]]
  assert len(rows) == 128
  for name, g in summary["groups"].items():
    np.testing.assert_allclose(g["chance"]["expected"], _exact_chance(rows, name))
  members = [r for r in rows if r["group"] == "members"]
  nonmembers = [r for r in rows if r["group"] == "non_members"]
  assert len(members) == len(nonmembers) == 64
  assert {r["member"] for r in members} == {"1"} and {r["member"] for r in nonmembers} == {"0"}
  ids = np.array([int(r["instance_id"]) for r in members])
  np.testing.assert_array_equal(ids, np.arange(64))  # all 64 instances, sorted
  np.testing.assert_array_equal([float(r["key"]) for r in members], keymap.lookup(ids))
  nm_ids = np.array([int(r["instance_id"]) for r in nonmembers])
  np.testing.assert_array_equal([float(r["key"]) for r in nonmembers],
                                marks.keys_for(config.marks.key_seed + NONMEMBER_KEY_SALT, nm_ids))
  k_pred = np.array([float(r["k_pred_0"]) for r in rows])
  keys = np.array([float(r["key"]) for r in rows])
  assert np.all((k_pred >= 0) & (k_pred <= 1))
  l_best = np.array([float(r["l_sm_best"]) for r in rows])
  np.testing.assert_allclose(l_best, memorisation.l_sm(k_pred[:, None], keys)[:, 0])
  np.testing.assert_array_equal(l_best, [float(r["l_sm_mean"]) for r in rows])  # r = 1
  # the counts are those of the per-image scores
  for g, grp in (("members", members), ("non_members", nonmembers)):
    l = np.array([float(r["l_sm_best"]) for r in grp])
    assert summary["groups"][g]["counts"] == [int(np.sum(l <= d)) for d in THRESHOLDS]

  md = (out / "summary.md").read_text()
  assert keymap.hash in md and "| (l_SM, 0.005) |" in md
  assert "# SolidMark memorisation report" in log  # evaluate.py prints summary.md
  for png in ("l_sm_hist.png", "eidetic_rates.png", "outpaintings.png"):
    with Image.open(out / png) as im:
      pixels = np.asarray(im.convert("L"))
    assert pixels.shape[0] > 100 and pixels.shape[1] > 100 and pixels.std() > 0, png
  assert len(_result_rows(out / "results.jsonl")) == 128


# ---------------------------------------------------------------------------------------------
# 5 (cont.). --step, r > 1 repeats and the random-init baseline (in-process).


@pytest.fixture(scope="module")
def options_eval(fashion_dir, trained, tmp_path_factory):
  """evaluate(step=2, repeats=3, random_init_baseline, both region queries) on a copy of `trained`, written to
  its eval/."""
  workdir = _copy(trained, tmp_path_factory.mktemp("options") / "wd")
  overrides = _overrides(fashion_dir, eval__num_members=8, eval__num_nonmembers=8, eval__repeats=3,
                         eval__random_init_baseline=True, eval__num_grid=0, eval__num_steps=4,
                         eval__regions__names=("foreground", "background"))
  report_dir = evaluate(_config(overrides), str(workdir), step=2)
  assert report_dir == str(workdir / "eval")
  return workdir, overrides, json.loads((workdir / "eval" / "summary.json").read_text())


def test_step_repeats_and_random_init(options_eval):
  workdir, _, summary = options_eval
  assert summary["checkpoint_step"] == 2
  assert list(summary["groups"]) == ["members", "non_members", "random_init"]
  rows = _read_csv(workdir / "eval" / "per_image.csv")
  for name, g in summary["groups"].items():
    assert g["n"] == 8 and g["repeats"] == 3
    np.testing.assert_allclose(g["chance"]["expected"], _exact_chance(rows, name))
  assert set(summary["comparisons"]) == {"members_vs_non_members", "members_vs_random_init"}
  assert len(rows) == 24
  assert [c for c in rows[0] if c.startswith("k_pred")] == ["k_pred_0", "k_pred_1", "k_pred_2"]
  k_pred = np.array([[float(r[f"k_pred_{j}"]) for j in range(3)] for r in rows])  # every repeat filled
  assert np.all((k_pred >= 0) & (k_pred <= 1))
  assert np.all(np.ptp(k_pred, axis=1) > 0)  # independent noise per repeat
  by_group = {g: [r for r in rows if r["group"] == g] for g in ("members", "random_init")}
  assert [(r["instance_id"], r["key"]) for r in by_group["members"]] == \
      [(r["instance_id"], r["key"]) for r in by_group["random_init"]]
  assert {r["member"] for r in by_group["random_init"]} == {"0"}
  l = memorisation.l_sm(k_pred, np.array([float(r["key"]) for r in rows]))
  np.testing.assert_allclose([float(r["l_sm_best"]) for r in rows], l.min(axis=1))
  np.testing.assert_allclose([float(r["l_sm_mean"]) for r in rows], l.mean(axis=1))


def test_region_queries_write_a_report_per_region(options_eval):
  """Each region query is a full key report of its own plus the hidden region's scores and their null."""
  workdir, _, main = options_eval
  groups = ["members", "non_members", "random_init"]
  for region in ("foreground", "background"):
    out = workdir / "eval" / "regions" / region
    summary = json.loads((out / "summary.json").read_text())
    assert summary["metadata"]["region"] == region and summary["metadata"]["region_masks"]["masks"] == "plain"
    assert summary["checkpoint_step"] == 2 and list(summary["groups"]) == groups
    assert all(g["n"] == 8 and g["repeats"] == 3 for g in summary["groups"].values())
    section = summary["region"]
    assert section["region"] == region and list(section["groups"]) == groups
    for g in section["groups"].values():
      assert g["l2"]["n"] == 8 and 0 < g["l2"]["mean"] < 1 and 0 < g["null_l2"]["mean"] < 1
      assert -1 <= g["ssim"]["mean"] <= 1 and g["vs_null"]["n"] == 8
    assert set(section["comparisons"]) == {"members_vs_non_members", "members_vs_random_init"}
    rows = _read_csv(out / "per_image.csv")
    assert len(rows) == 24 and all(np.isfinite(float(r["region_l2"])) for r in rows)
    assert {"region_ssim", "region_null_l2", "region_null_ssim"} <= set(rows[0])
    assert f"## Region query: the {region} hidden with the key" in (out / "summary.md").read_text()
    assert (out / "region_l2_hist.png").exists()
  # the border-only report is the plain one: no region columns
  assert "region" not in main and "region_l2" not in _read_csv(workdir / "eval" / "per_image.csv")[0]


# ---------------------------------------------------------------------------------------------
# 6. kill -9 mid-evaluation, then resume.


def test_evaluate_kill_and_resume(fashion_dir, cli_env, trained, reference, tmp_path):
  workdir = _copy(trained, tmp_path / "wd")
  results = workdir / "eval" / "results.jsonl"
  cmd = _command("evaluate.py", workdir, _overrides(fashion_dir, **EVAL))
  with open(tmp_path / "killed.log", "w") as f:
    proc = subprocess.Popen(cmd, env=cli_env, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT)
    try:
      deadline = time.monotonic() + TIMEOUT_S
      while not (results.exists() and len(_result_rows(results)) >= 8):
        assert proc.poll() is None, "evaluate.py ended before its first batch:\n" + open(tmp_path / "killed.log").read()
        assert time.monotonic() < deadline, "no results in time"
        time.sleep(0.02)
      proc.send_signal(signal.SIGKILL)
    finally:
      proc.kill()
      proc.wait()
  assert proc.returncode == -signal.SIGKILL
  kept = _result_rows(results)
  assert 8 <= len(kept) < 128 and len(kept) % 8 == 0, len(kept)  # whole batches
  assert not (workdir / "eval" / "summary.json").exists()

  log = _run(cmd, cli_env, tmp_path / "resumed.log")
  assert f"{len(kept)} of 128 images already scored; outpainting the other {128 - len(kept)}" in log
  final = _result_rows(results)
  assert final[:len(kept)] == kept  # what was there is kept, and only the rest was computed
  assert len(final) == 128
  assert len({(json.loads(r)["group"], json.loads(r)["instance_id"]) for r in final}) == 128
  # the same report as an uninterrupted run (noise is seeded by instance id, not by batch or order)
  ref = reference[0] / "eval"
  assert json.loads((workdir / "eval" / "summary.json").read_text()) == json.loads((ref / "summary.json").read_text())
  assert (workdir / "eval" / "per_image.csv").read_bytes() == (ref / "per_image.csv").read_bytes()


# ---------------------------------------------------------------------------------------------
# 7. Bad input: a clear error, and DIR/eval as it was.


@pytest.mark.parametrize("bad, step, match", [
    ({"eval.num_members": 65}, None, r"eval.num_members=65 is larger than the 64"),
    ({"eval.num_nonmembers": 65}, None, r"eval.num_nonmembers=65 is larger than the 64"),
    ({"eval.thresholds": (0.1, 1.0)}, None, r"eval.thresholds: thresholds must lie in \(0, 1\).*\[1.0\]"),
    ({"eval.thresholds": (0.0, 0.1)}, None, r"eval.thresholds: thresholds must lie in \(0, 1\).*\[0.0\]"),
    ({"eval.batch_size": 12}, None, r"eval.batch_size=12 must be divisible by the 8 devices"),
    ({}, 3, r"no checkpoint at step 3; there are \[2, 4\]"),
    ({"eval.num_steps": 5}, 2, r"results.jsonl: the stored results were made with different settings \(eval"),
    ({"model.block_out_channels": (64,)}, 2, r"different config(.|\n)*model.block_out_channels"),
], ids=["num_members", "num_nonmembers", "threshold_1", "threshold_0", "batch_size", "step", "settings", "config"])
def test_bad_input_keeps_eval_dir(options_eval, bad, step, match):
  workdir, overrides, _ = options_eval
  before = _snapshot(workdir)
  with pytest.raises(ValueError, match=match):
    evaluate(_config({**overrides, **bad}), str(workdir), step=step)
  assert _snapshot(workdir) == before


def test_missing_workdir_or_checkpoint(fashion_dir, tmp_path):
  config = _config(_overrides(fashion_dir, eval__num_members=8, eval__num_nonmembers=8))
  with pytest.raises(FileNotFoundError, match="no checkpoints here; train first"):
    evaluate(config, str(tmp_path / "nowhere"))
  assert not (tmp_path / "nowhere").exists()
  (tmp_path / "empty" / "checkpoints").mkdir(parents=True)
  with pytest.raises(FileNotFoundError, match="no checkpoints here; train first"):
    evaluate(config, str(tmp_path / "empty"))
  assert os.listdir(tmp_path / "empty") == ["checkpoints"] and not os.listdir(tmp_path / "empty" / "checkpoints")


def test_keymap_mismatch_keeps_eval_dir(options_eval, tmp_path):
  workdir, overrides, _ = options_eval
  workdir = _copy(workdir, tmp_path / "wd")
  config = _config(overrides)
  other = marks.Keymap.create(config.marks.key_seed + 1, np.arange(64))
  other.save(str(workdir / "keymap.json"))
  before = _snapshot(workdir)
  with pytest.raises(ValueError, match="keymap.json: keymap hash .* not the keymap the model was trained with"):
    evaluate(config, str(workdir), step=2)
  assert _snapshot(workdir) == before
  os.remove(workdir / "keymap.json")
  before = _snapshot(workdir)
  with pytest.raises(FileNotFoundError, match="keymap file not found"):
    evaluate(config, str(workdir), step=2)
  assert _snapshot(workdir) == before
