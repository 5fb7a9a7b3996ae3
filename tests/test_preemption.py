"""What pods do to jobs: SIGTERM mid-run, a second writer on a directory in use, stale locks.

Real train.py / evaluate.py / sweep.py subprocesses on 2 CPU devices (see test_train_e2e.py): a run
stopped by SIGTERM exits with PREEMPTED_EXIT_CODE after writing the checkpoint of the step it was
on, and its resumed run ends with the parameters of an uninterrupted run, bit for bit. While it
runs (held by SIGSTOP), a second train.py on its workdir stops at once naming the directory and
the first process, and writes nothing; an evaluate.py or sweep.py on an eval directory that
another process holds does the same. The 2-process version of the preemption test is in
test_multihost.py.
"""

import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from e2e_helpers import ROOT, _command, _run, _snapshot, cli_env  # noqa: F401  (cli_env is a fixture)
from solidmark_jax import dirlock
from solidmark_jax.training.preemption import PREEMPTED_EXIT_CODE

TIMEOUT_S = 600
ONE_BLOCK = {"model.block_out_channels": (32,), "model.down_block_types": ("CrossAttnDownBlock2D",),
             "model.up_block_types": ("CrossAttnUpBlock2D",)}
STEPS = 6


def _overrides(fashion_dir) -> dict:
  return {**ONE_BLOCK, "data.data_dir": fashion_dir, "train.num_steps": STEPS, "train.checkpoint_every": 3,
          "train.log_every": 1, "train.sample_every": 0, "train.keep_checkpoints": 100}


def _steps(workdir) -> list[int]:
  d = os.path.join(workdir, "checkpoints")
  return sorted(int(s) for s in os.listdir(d) if s.isdigit()) if os.path.isdir(d) else []


def _read_state(workdir, step: int) -> dict:
  path = os.path.join(workdir, "checkpoints", str(step), "state")
  checkpointer = ocp.PyTreeCheckpointer()
  tree = checkpointer.metadata(path).item_metadata.tree
  args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
  return checkpointer.restore(path, args=ocp.args.PyTreeRestore(restore_args=args))


def assert_same_state(a: dict, b: dict) -> None:
  """Bit for bit: every leaf of params, ema_params, opt_state and the step."""
  la, lb = jax.tree_util.tree_leaves_with_path(a), jax.tree_util.tree_leaves_with_path(b)
  assert [p for p, _ in la] == [p for p, _ in lb]
  for (path, x), (_, y) in zip(la, lb):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=jax.tree_util.keystr(path))


def _wait_for(path, text: str, proc, deadline_s: float = TIMEOUT_S) -> None:
  deadline = time.monotonic() + deadline_s
  while text not in open(path, errors="replace").read():
    assert proc.poll() is None, f"ended (exit {proc.returncode}) before logging {text!r}:\n" + open(path).read()[-4000:]
    assert time.monotonic() < deadline, f"no {text!r} in time"
    time.sleep(0.1)


@pytest.fixture(scope="module")
def uninterrupted(fashion_dir, cli_env, tmp_path_factory):
  workdir = tmp_path_factory.mktemp("uninterrupted") / "wd"
  _run(_command("train.py", workdir, _overrides(fashion_dir)), cli_env, workdir.parent / "train.log")
  return workdir


def test_sigterm_checkpoints_exits_75_and_resumes_bit_for_bit(uninterrupted, fashion_dir, cli_env, tmp_path):
  workdir = tmp_path / "wd"
  cmd = _command("train.py", workdir, _overrides(fashion_dir))
  first_log = tmp_path / "first.log"
  with open(first_log, "w") as f:
    first = subprocess.Popen(cmd, env=cli_env, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT)
  try:
    _wait_for(first_log, f"training steps 1 to {STEPS}", first)
    first.send_signal(signal.SIGSTOP)  # holds its lock, alive, writing nothing while the second one tries
    before = _snapshot(workdir)
    lock = json.loads((workdir / dirlock.LOCK_FILE).read_text())
    assert lock["pid"] == first.pid

    # 2. A second train.py on the same workdir stops at once, naming the directory and the first process.
    second_log = tmp_path / "second.log"
    with open(second_log, "w") as f:
      t0 = time.monotonic()
      rc = subprocess.run(cmd, env=cli_env, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, timeout=TIMEOUT_S).returncode
      took = time.monotonic() - t0
    text = second_log.read_text()
    assert rc == 1, text[-3000:]
    assert f"error: {workdir} is in use: training by pid {first.pid} on host {lock['host']}" in text, text[-3000:]
    assert "Traceback" not in text
    assert _snapshot(workdir) == before  # nothing written, nothing of the first touched
    print(f"second train.py refused in {took:.1f} s")

    # 3. SIGTERM (delivered when the first one continues): it finishes its step, checkpoints, exits 75.
    first.send_signal(signal.SIGTERM)
    first.send_signal(signal.SIGCONT)
    first.wait(TIMEOUT_S)
  finally:
    if first.poll() is None:
      first.kill()
      first.wait()
  log = first_log.read_text()
  assert first.returncode == PREEMPTED_EXIT_CODE, log[-4000:]
  steps = _steps(workdir)
  assert steps and 0 < steps[-1] < STEPS, (steps, log[-3000:])
  stopped = steps[-1]
  assert f"training preempted by SIGTERM after step {stopped}: checkpoint {stopped} written" in log
  assert not (workdir / dirlock.LOCK_FILE).exists()  # released on the way out

  # 4. The re-run resumes there and ends where the uninterrupted run ended, bit for bit.
  log = _run(cmd, cli_env, tmp_path / "resumed.log")
  assert f"resumed from checkpoint {stopped} " in log
  assert _steps(workdir)[-1] == STEPS
  assert_same_state(_read_state(workdir, STEPS), _read_state(uninterrupted, STEPS))


HOLDER = """
import sys, time
from solidmark_jax import dirlock
locks = [dirlock.DirectoryLock(d, "a test holder").acquire() for d in sys.argv[1:]]
print("held", flush=True)
time.sleep(600)
"""


def test_evaluate_and_sweep_refuse_an_eval_directory_in_use(uninterrupted, fashion_dir, cli_env, tmp_path):
  workdir = uninterrupted
  eval_dir, sweeps_dir = workdir / "eval", workdir / "sweeps"
  holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(eval_dir), str(sweeps_dir)], env=cli_env, cwd=ROOT,
                            stdout=subprocess.PIPE, text=True)
  try:
    assert holder.stdout.readline().strip() == "held"
    unlocked = lambda: {k: v for k, v in _snapshot(workdir).items() if dirlock.LOCK_FILE not in k}  # heartbeats
    before = unlocked()
    for script, directory in (("evaluate.py", eval_dir), ("sweep.py", sweeps_dir)):
      done = subprocess.run(_command(script, workdir, _overrides(fashion_dir)), env=cli_env, cwd=ROOT,
                            capture_output=True, text=True, timeout=TIMEOUT_S)
      out = done.stdout + done.stderr
      assert done.returncode == 1, out[-3000:]
      assert f"error: {directory} is in use: a test holder by pid {holder.pid}" in out, out[-3000:]
    assert unlocked() == before
  finally:
    holder.kill()
    holder.wait()
  # The holder died without releasing: its lock is stale and the next evaluation takes it over.
  stale = json.loads((eval_dir / dirlock.LOCK_FILE).read_text())
  assert stale["pid"] == holder.pid
  log = _run(_command("evaluate.py", workdir, _overrides(fashion_dir), "--config.eval.num_grid=0"), cli_env,
             tmp_path / "evaluate.log")
  assert f"taking over the stale lock of pid {holder.pid}" in log and f"process {holder.pid} is no longer running" in log
  assert (eval_dir / "summary.json").exists() and not (eval_dir / dirlock.LOCK_FILE).exists()
