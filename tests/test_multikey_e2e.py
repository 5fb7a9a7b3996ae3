"""Several keys per image end to end: train.py and evaluate.py on configs/tiny.py with
--config.marks.num_keys=4 (one key per border side), and the config checks of marks.num_keys.

train.py and evaluate.py run as real subprocesses (2 fake CPU devices, see e2e_helpers.py).
"""

import csv
import json
import os
import subprocess

import numpy as np
import pytest

from e2e_helpers import TIMEOUT_S, _command, _config, _run, cli_env  # noqa: F401  (cli_env is a fixture)
from solidmark_jax import marks, metrics
from solidmark_jax.evaluation.evaluator import NONMEMBER_KEY_SALT
from solidmark_jax.experiment import build_experiment
from solidmark_jax.report import ResultStore
from solidmark_jax.training import checkpoint as ckpt

M = 4
# One UNet block (no down-sampling): compiles in about half the time of tiny's two.
ONE_BLOCK = {"model.block_out_channels": (32,), "model.down_block_types": ("CrossAttnDownBlock2D",),
             "model.up_block_types": ("CrossAttnUpBlock2D",)}
EVAL = {"eval.num_members": 8, "eval.num_nonmembers": 8, "eval.batch_size": 8, "eval.num_steps": 4,
        "eval.repeats": 2, "eval.num_grid": 4}


def _overrides(fashion_dir, **extra) -> dict:
  out = {**ONE_BLOCK, "data.data_dir": fashion_dir, "marks.num_keys": M, "train.num_steps": 2,
         "train.checkpoint_every": 2, **EVAL}
  out.update(extra)
  return out


@pytest.fixture(scope="module")
def evaluated(fashion_dir, cli_env, tmp_path_factory):
  """train.py (2 steps) then evaluate.py with 4 keys per image: (workdir, evaluate.py's exit status, its log)."""
  workdir = tmp_path_factory.mktemp("multikey") / "wd"
  _run(_command("train.py", workdir, _overrides(fashion_dir)), cli_env, workdir.parent / "train.log")
  log_path = workdir.parent / "eval.log"
  with open(log_path, "w") as f:
    rc = subprocess.run(_command("evaluate.py", workdir, _overrides(fashion_dir)), env=cli_env, stdout=f,
                        stderr=subprocess.STDOUT, timeout=TIMEOUT_S).returncode
  return workdir, rc, log_path.read_text()


def test_train_and_outpaint_with_four_keys(evaluated, fashion_dir):
  workdir, _, log = evaluated
  config = _config(_overrides(fashion_dir))
  keymap = marks.Keymap.load(str(workdir / "keymap.json"))
  assert keymap.num_keys == M and keymap.key_layout == "sides" and keymap.keys.shape == (32, M)
  np.testing.assert_array_equal(keymap.keys, marks.keys_for(config.marks.key_seed, np.arange(32), M))
  checkpointer = ckpt.Checkpointer(str(workdir / "checkpoints"), create=False)
  assert checkpointer.read_meta(2)["keymap_hash"] == keymap.hash
  checkpointer.close()
  assert keymap.hash != marks.Keymap.create(config.marks.key_seed, np.arange(32)).hash

  # results.jsonl: every image with its 4 keys and r = 2 repeats of 4 predicted keys
  path = workdir / "eval" / "results.jsonl"
  assert path.exists(), log[-3000:]
  meta = json.loads(path.read_text().splitlines()[0])["meta"]
  results = ResultStore(str(path), meta).results()
  assert results.num_keys == M and results.k_pred.shape == (16, 2, M), log[-3000:]
  assert np.all((results.k_pred >= 0) & (results.k_pred <= 1))
  members, non = results.select("members"), results.select("non_members")
  assert len(members) == len(non) == 8
  np.testing.assert_array_equal(members.key, keymap.lookup(members.instance_id))
  np.testing.assert_array_equal(non.key, marks.keys_for(config.marks.key_seed + NONMEMBER_KEY_SALT,
                                                        non.instance_id, M))
  # the four sides are outpainted separately: the predictions of one image differ between sides
  assert np.all(np.ptp(results.k_pred, axis=-1) > 0)
  l = metrics.l_sm(members.k_pred, members.key)  # [8, 2]: the largest of the 4 distances
  assert l.shape == (8, 2) and np.all(l >= np.abs(members.k_pred[..., 0] - members.key[:, None, 0]) - 1e-4)


def test_report_with_four_keys(evaluated):
  workdir, rc, log = evaluated
  assert rc == 0, log[-3000:]
  summary = json.loads((workdir / "eval" / "summary.json").read_text())
  for g in ("members", "non_members"):
    s = summary["groups"][g]
    assert s["n"] == 8 and s["repeats"] == 2 and s["num_keys"] == M
    # chance of a hit needs all four keys within d: at most 2 boxes (r = 2) of side 2d on the key grid
    # ((2 floor(d 2^16) + 1) / 2^16 keys per side), far below one key's chance
    d = np.array(s["thresholds"])
    side = (2 * np.floor(d * 2**marks.KEY_BITS) + 1) / 2**marks.KEY_BITS
    assert all(r <= 2 * w**M * (1 + 1e-12) for r, w in zip(s["chance"]["rate"], side))
    assert s["reference_chance"]["rate"][0] == pytest.approx(1 - (1 - (2 * d[0] - d[0]**2)**M)**2)
  with open(workdir / "eval" / "per_image.csv") as f:
    head = next(csv.reader(f))
  assert head[3:3 + M] == [f"key_{s}" for s in range(M)] and f"k_pred_1_{M - 1}" in head
  assert (workdir / "eval" / "outpaintings.png").exists()


@pytest.mark.parametrize("extra,match", [
    ({"marks.num_keys": 3}, r"marks.num_keys=3 with marks.key_layout='sides'"),
    ({"marks.num_keys": 2, "marks.key_layout": "channels"}, r"needs at least 2 image channels .* have 1"),
    ({"marks.num_keys": 2, "marks.pattern": "centre"}, r"needs marks.pattern='border'"),
])
def test_bad_key_counts_are_refused_by_the_config(fashion_dir, extra, match):
  with pytest.raises(ValueError, match=match):
    build_experiment(_config(_overrides(fashion_dir, **extra)))


@pytest.mark.parametrize("extra,match", [
    ({"marks.num_keys": 4, "eval.score": "mean", "eval.repeats": 2}, r"eval.score='mean' with eval.repeats=2"),
    ({"marks.num_keys": 2, "data.duplicates": {2: 1}}, r"data.duplicates with marks.num_keys=2"),
])
def test_settings_without_an_exact_chance_are_refused(fashion_dir, tmp_path, extra, match):
  from solidmark_jax.evaluation import evaluate
  with pytest.raises(ValueError, match=match):
    evaluate(_config(_overrides(fashion_dir, **extra)), str(tmp_path / "untrained"))
