"""train.py end to end: a real run, kill -9 and resume, workdirs of other configs, bad configs.

Runs of train.py are real subprocesses on 2 fake CPU devices that share a persistent XLA
compilation cache (one per pytest session), so only the first run pays for compiling. The checks
that need no process of their own call `train()` in-process (8 fake devices, see conftest.py).
"""

import gc
import json
import logging
import os
import shutil
import signal
import struct
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

from e2e_helpers import _command, _config, _run, _snapshot, cli_env  # noqa: F401  (cli_env is a fixture)
from solidmark_jax import marks
from solidmark_jax.training import checkpoint as ckpt
from solidmark_jax.training.loop import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CKPT_TIMEOUT_S = 600


# One UNet block (no down-sampling): compiles in about half the time of tiny's two; the UNet's
# shapes and validation are unit-tested elsewhere.
ONE_BLOCK = {"model.block_out_channels": (32,), "model.down_block_types": ("CrossAttnDownBlock2D",),
             "model.up_block_types": ("CrossAttnUpBlock2D",)}

# ---------------------------------------------------------------------------------------------
# Helpers (test_evaluate_e2e.py has the same few).


def _overrides(fashion_dir, **extra) -> dict:
  """Config overrides on top of configs/tiny.py shared by every run of this module."""
  out = {**ONE_BLOCK, "data.data_dir": fashion_dir, "data.train_split": "train[:64]", "train.keep_checkpoints": 100}
  out.update({k.replace("__", "."): v for k, v in extra.items()})
  return out


def _steps(ckpt_dir) -> list[int]:
  """Committed Orbax checkpoint steps (Orbax renames a step's temporary folder when it commits)."""
  if not os.path.isdir(ckpt_dir):
    return []
  return sorted(int(d) for d in os.listdir(ckpt_dir) if d.isdigit())


def _tensorboard_steps(logdir) -> list[dict[str, list[int]]]:
  """Per event file under `logdir` (oldest first): tag -> steps of its scalars (TFRecord framing, Event protos)."""
  from tensorboardX.proto.event_pb2 import Event
  files = []
  for name in sorted(os.listdir(logdir), key=lambda n: os.path.getmtime(os.path.join(logdir, n))):
    data = open(os.path.join(logdir, name), "rb").read()
    out, pos = {}, 0
    while pos + 12 <= len(data):
      (n,) = struct.unpack("<Q", data[pos:pos + 8])
      if pos + 12 + n + 4 > len(data):  # a record torn by kill -9
        break
      event = Event.FromString(data[pos + 12:pos + 12 + n])
      pos += 12 + n + 4
      for v in event.summary.value:
        out.setdefault(v.tag, []).append(int(event.step))
    files.append(out)
  return files


# ---------------------------------------------------------------------------------------------
# 1. A fresh run.

FRESH = dict(train__num_steps=6, train__checkpoint_every=3, train__log_every=2, train__sample_every=3)


@pytest.fixture(scope="module")
def fresh(fashion_dir, cli_env, tmp_path_factory):
  """A workdir trained by one uninterrupted train.py run: (workdir, overrides, log)."""
  workdir = tmp_path_factory.mktemp("fresh") / "wd"
  overrides = _overrides(fashion_dir, **FRESH)
  log = _run(_command("train.py", workdir, overrides), cli_env, workdir.parent / "train.log")
  return workdir, overrides, log


def test_train_end_to_end(fresh):
  workdir, overrides, log = fresh
  assert "resumed" not in log
  # checkpoints at every checkpoint_every and the last step, each tied to the config and the keymap
  assert _steps(workdir / "checkpoints") == [3, 6]
  keymap = marks.Keymap.load(str(workdir / "keymap.json"))
  config = _config(overrides)
  assert len(keymap) == config.data.subset_size
  np.testing.assert_array_equal(keymap.instance_ids, np.arange(config.data.subset_size))
  checkpointer = ckpt.Checkpointer(str(workdir / "checkpoints"), create=False)
  for step in (3, 6):
    meta = checkpointer.read_meta(step)
    assert meta["step"] == step
    assert meta["keymap_hash"] == keymap.hash
    assert meta["config_fingerprint"] == ckpt.config_fingerprint(config)
  checkpointer.close()
  # TensorBoard scalars every log_every steps
  (scalars,) = _tensorboard_steps(workdir / "tensorboard")
  assert scalars["loss"] == [2, 4, 6]
  assert {"loss", "learning_rate", "images_per_s"} <= set(scalars)
  # sample grids every sample_every steps
  assert sorted(os.listdir(workdir / "samples")) == ["step_0000003.png", "step_0000006.png"]
  with Image.open(workdir / "samples" / "step_0000006.png") as im:
    pixels = np.asarray(im.convert("L"))
  assert pixels.shape[0] > 64 and pixels.shape[1] > 64 and pixels.std() > 0


# ---------------------------------------------------------------------------------------------
# 2. kill -9 mid-training, then resume.

RESUME = dict(train__num_steps=30, train__checkpoint_every=5, train__log_every=5, train__sample_every=0)


def test_kill_and_resume(fashion_dir, cli_env, tmp_path, fresh, caplog):
  del fresh  # runs first: its compilations are in the cache, so this run reaches its checkpoints fast
  workdir = tmp_path / "wd"
  overrides = _overrides(fashion_dir, **RESUME)
  cmd = _command("train.py", workdir, overrides)
  with open(tmp_path / "killed.log", "w") as f:
    proc = subprocess.Popen(cmd, env=cli_env, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT)
    try:
      deadline = time.monotonic() + CKPT_TIMEOUT_S
      while not _steps(workdir / "checkpoints"):
        assert proc.poll() is None, "train.py ended before its first checkpoint:\n" + open(tmp_path / "killed.log").read()
        assert time.monotonic() < deadline, "no checkpoint in time"
        time.sleep(0.05)
      proc.send_signal(signal.SIGKILL)
    finally:
      proc.kill()
      proc.wait()
  assert proc.returncode == -signal.SIGKILL
  before = _steps(workdir / "checkpoints")
  last = before[-1]
  assert 0 < last < 30, before
  keymap_bytes = (workdir / "keymap.json").read_bytes()
  keymap_mtime = os.stat(workdir / "keymap.json").st_mtime_ns

  log = _run(cmd, cli_env, tmp_path / "resumed.log")
  assert f"resumed from checkpoint {last} " in log
  after = _steps(workdir / "checkpoints")
  assert after == sorted(set(before) | set(range(last + 5, 31, 5))), (before, after)
  assert (workdir / "keymap.json").read_bytes() == keymap_bytes
  assert os.stat(workdir / "keymap.json").st_mtime_ns == keymap_mtime
  km_hash = marks.Keymap.load(str(workdir / "keymap.json")).hash
  checkpointer = ckpt.Checkpointer(str(workdir / "checkpoints"), create=False)
  assert checkpointer.read_meta(30)["step"] == 30
  assert {checkpointer.read_meta(s)["keymap_hash"] for s in after} == {km_hash}
  checkpointer.close()
  # the resumed run logs the steps after its checkpoint, not from 0
  events = _tensorboard_steps(workdir / "tensorboard")
  assert len(events) == 2 and events[-1]["loss"] == list(range(last + 5, 31, 5))

  # a re-run of a finished workdir trains nothing and writes no checkpoint (in-process: no new process needed)
  with caplog.at_level(logging.INFO, logger="solidmark_jax"):
    assert train(_config(overrides), str(workdir)) == {}
  assert "resumed from checkpoint 30 " in caplog.text and "nothing to do" in caplog.text
  assert _steps(workdir / "checkpoints") == after


# ---------------------------------------------------------------------------------------------
# 3. A workdir that belongs to another config, another keymap, or holds a damaged checkpoint.


@pytest.mark.parametrize("field, value", [("model.block_out_channels", (64,)), ("marks.pad", 6),
                                          ("data.subset_size", 16)])
def test_workdir_of_another_config_is_refused(fresh, field, value):
  workdir, overrides, _ = fresh
  before = _snapshot(workdir)
  with pytest.raises(ValueError, match=rf"checkpoint 6 was written by a different config(.|\n)*{field}: "):
    train(_config({**overrides, field: value}), str(workdir))
  assert _snapshot(workdir) == before


def _copy(workdir, tmp_path):
  dst = tmp_path / "copy"
  shutil.copytree(workdir, dst)  # copy2: mtimes kept
  return dst


def test_workdir_with_another_keymap_is_refused(fresh, tmp_path):
  workdir, overrides, _ = fresh
  workdir = _copy(workdir, tmp_path)
  config = _config(overrides)
  other = marks.Keymap.create(config.marks.key_seed + 1, np.arange(config.data.subset_size))
  other.save(str(workdir / "keymap.json"))
  before = _snapshot(workdir)
  with pytest.raises(ValueError, match=r"keymap.json: the workdir's keymap .* differs from the one this config draws"):
    train(config, str(workdir))
  assert _snapshot(workdir) == before
  # a keymap edited by hand (its recorded hash no longer matches)
  payload = json.loads((workdir / "keymap.json").read_text())
  payload["keys"]["0"] = 0.5 if payload["keys"]["0"] != 0.5 else 0.25
  (workdir / "keymap.json").write_text(json.dumps(payload))
  before = _snapshot(workdir)
  with pytest.raises(ValueError, match="edited or damaged"):
    train(config, str(workdir))
  assert _snapshot(workdir) == before


def _settle_unraisable(quiet_s: float = 0.5, limit_s: float = 10.0) -> None:
  """Waits until no "unraisable" exception has arrived for `quiet_s` (Orbax's reads that were still in
  flight when a restore failed report to an event loop it has closed), so they land in this test."""
  seen = []
  previous = sys.unraisablehook
  sys.unraisablehook = lambda u: (seen.append(1), previous(u))
  try:
    deadline, last, count = time.monotonic() + limit_s, time.monotonic(), -1
    while time.monotonic() < deadline and time.monotonic() - last < quiet_s:
      gc.collect()
      if len(seen) != count:
        count, last = len(seen), time.monotonic()
      time.sleep(0.05)
  finally:
    sys.unraisablehook = previous


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_damaged_checkpoint_is_an_error_not_a_fresh_start(fresh, tmp_path):
  workdir, overrides, _ = fresh
  workdir = _copy(workdir, tmp_path)
  state_dir = workdir / "checkpoints" / "6" / "state"
  damaged = 0
  for root, _, files in os.walk(state_dir):
    for name in files:
      if os.path.basename(root) == "d":  # OCDBT data files: the arrays
        p = os.path.join(root, name)
        with open(p, "r+b") as f:
          f.write(b"\0" * os.path.getsize(p))
        damaged += 1
  assert damaged
  before = _snapshot(workdir)
  with pytest.raises(RuntimeError, match="restoring checkpoint 6 failed"):
    train(_config(overrides), str(workdir))
  _settle_unraisable()
  assert _snapshot(workdir) == before


# ---------------------------------------------------------------------------------------------
# 4. Configs the model or the mesh cannot take: an error before anything is written.

THREE_BLOCKS = {"model.block_out_channels": (32, 32, 32), "model.down_block_types": ("DownBlock2D",) * 3,
                "model.up_block_types": ("UpBlock2D",) * 3}


@pytest.mark.parametrize("bad, match", [
    ({**THREE_BLOCKS, "marks.pad": 3}, r"image size 18 .* not divisible by 4 .* sizes that work include 16 and 20"),
    ({"model.block_out_channels": (48,)}, r"multiple of 32 .* not: \[48\]"),
    ({"model.down_block_types": ("CrossAttnDownBlock",)}, r"model.down_block_types=.* unknown block types"),
    ({"train.batch_size": 12}, r"train.batch_size=12 must be divisible by the 8 devices"),
    ({"mesh.data": 3}, r"mesh.data x mesh.fsdp must equal the 8 devices"),
    ({"data.name": "no_such_dataset"}, r"unknown dataset data.name='no_such_dataset'"),
], ids=["image_size", "block_width", "block_type", "batch_size", "mesh", "dataset"])
def test_bad_config_is_refused_up_front(fashion_dir, tmp_path, bad, match):
  workdir = tmp_path / "wd"
  with pytest.raises(ValueError, match=match):
    train(_config({**_overrides(fashion_dir), **bad}), str(workdir))
  assert not workdir.exists()
