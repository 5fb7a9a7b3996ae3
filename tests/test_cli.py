"""The entry points' terminal output: train.py --evaluate prints the report; library noise stays out.

One train.py run (a real subprocess, 2 training steps of configs/tiny.py with one UNet block) trains
and evaluates; its stdout and stderr are checked apart. The export runs on the same workdir.
"""

import os
import re
import subprocess
import sys

import pytest

from e2e_helpers import ROOT, _command, cli_env  # noqa: F401  (cli_env is a fixture)

TIMEOUT_S = 600

ONE_BLOCK = {"model.block_out_channels": (32,), "model.down_block_types": ("CrossAttnDownBlock2D",),
             "model.up_block_types": ("CrossAttnUpBlock2D",)}

# What the libraries underneath print when left alone: deprecation banners (diffusers' and
# transformers' Flax classes), TensorFlow's C++ start-up lines, TFDS's warnings through absl.
NOISE = re.compile(r"deprecat|oneDNN|absl::InitializeLog|TensorFlow binary|cuda|OpenCV|tensorflow/", re.IGNORECASE)


def _overrides(fashion_dir) -> dict:
  return {**ONE_BLOCK, "data.data_dir": fashion_dir, "train.num_steps": 2, "train.checkpoint_every": 2,
          "train.sample_every": 0, "eval.num_members": 8, "eval.num_nonmembers": 8, "eval.num_steps": 2}


def _run_apart(cmd, env) -> subprocess.CompletedProcess:
  done = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=TIMEOUT_S)
  assert done.returncode == 0, f"{' '.join(cmd)} exited {done.returncode}:\n{done.stdout[-3000:]}\n{done.stderr[-5000:]}"
  return done


def _noise(stderr: str) -> list[str]:
  return [line for line in stderr.splitlines() if NOISE.search(line)]


@pytest.fixture(scope="module")
def trained(fashion_dir, cli_env, tmp_path_factory):
  """train.py --evaluate on a fresh workdir: (workdir, the finished process)."""
  workdir = tmp_path_factory.mktemp("cli") / "run"
  return workdir, _run_apart(_command("train.py", workdir, _overrides(fashion_dir), "--evaluate"), cli_env)


def test_train_evaluate_prints_the_summary_and_no_library_noise(trained):
  workdir, done = trained
  summary = (workdir / "eval" / "summary.md").read_text()
  assert summary.startswith("# SolidMark memorisation report")
  assert summary.strip() in done.stdout
  assert "| (l_SM, 0.05) |" in done.stdout
  assert "checkpoint step: `2`" in done.stdout
  assert _noise(done.stderr) == []
  assert "train: 100%" in done.stderr and "outpaint: 100%" in done.stderr  # progress bars stay


def test_export_has_no_library_noise(trained, fashion_dir, cli_env, tmp_path):
  workdir, _ = trained
  cmd = [sys.executable, os.path.join(ROOT, "export.py"), "--config", os.path.join(ROOT, "configs", "tiny.py"),
         "--workdir", str(workdir), "--out", str(tmp_path / "export")]
  cmd += [f"--config.{k}={repr(v) if isinstance(v, tuple) else v}" for k, v in _overrides(fashion_dir).items()]
  done = _run_apart(cmd, cli_env)
  assert (tmp_path / "export" / "unet" / "config.json").is_file()
  assert _noise(done.stderr) == []


def test_verbosity_lets_library_logs_through(trained, fashion_dir, cli_env):
  workdir, quiet = trained
  # the same workdir again: nothing left to train, but the data and the checkpoint are opened
  done = _run_apart(_command("train.py", workdir, _overrides(fashion_dir), "--verbosity=0"), cli_env)
  assert "nothing to do" in done.stderr
  assert "Load dataset info" in done.stderr  # TFDS's info through absl
  assert "Load dataset info" not in quiet.stderr
