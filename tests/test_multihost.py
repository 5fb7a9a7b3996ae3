"""Multi-host runs: 2 processes x 2 CPU devices train and evaluate like 1 process x 4 devices.

A 2-process run stopped by SIGTERM to one of its processes stops on both at the same step with a
checkpoint, and its resumed run ends with the parameters of the uninterrupted one, bit for bit.

The runs go through train.py / evaluate.py as subprocesses (jax.distributed over 127.0.0.1 with gloo
CPU collectives for the 2-process runs), the single- and the multi-process run concurrently; the
tests then read the workdirs: the final Orbax checkpoints (as numpy), the losses TensorBoard logged,
the keymap files, the sample grids and the evaluation results.
"""

import glob
import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from PIL import Image

from configs import tiny
from solidmark_jax.training.preemption import PREEMPTED_EXIT_CODE

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 3
TIMEOUT_S = 600  # each phase took 0.7-4 min on 2 (busy) cores; a hung collective is killed here


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _env(devices: int) -> dict:
  env = dict(os.environ)
  flags = [f for f in env.get("XLA_FLAGS", "").split() if not f.startswith("--xla_force_host_platform_device_count")]
  env["XLA_FLAGS"] = " ".join(flags + [f"--xla_force_host_platform_device_count={devices}"])
  env["JAX_PLATFORMS"] = "cpu"
  env["CUDA_VISIBLE_DEVICES"] = ""
  env["PYTHONPATH"] = os.pathsep.join(p for p in (ROOT, env.get("PYTHONPATH")) if p)
  return env


def _start(script, workdir, data_dir, log_path, devices, *extra, process=None):
  """Starts `script` on tiny.py; process = (coordinator address, index) joins a 2-process run."""
  cmd = [sys.executable, os.path.join(ROOT, script), "--config", os.path.join(ROOT, "configs", "tiny.py"),
         "--workdir", str(workdir), f"--config.data.data_dir={data_dir}", *extra]
  if process is not None:
    cmd += [f"--coordinator_address={process[0]}", "--num_processes=2", f"--process_id={process[1]}"]
  log = open(log_path, "w")
  proc = subprocess.Popen(cmd, cwd=ROOT, env=_env(devices), stdout=log, stderr=subprocess.STDOUT)
  log.close()
  return proc


def _run_both(script, single, multi, data_dir, log_dir, *extra) -> tuple[dict, str]:
  """Runs `script` as 1 process x 4 devices on `single` and 2 x 2 on `multi`, concurrently."""
  procs = {"one process x 4 devices": (_start(script, single, data_dir, log_dir / "single.log", 4, *extra),
                                       log_dir / "single.log")}
  address = f"127.0.0.1:{_free_port()}"
  for i in range(2):
    log = log_dir / f"process_{i}.log"
    procs[f"process {i} of 2"] = (_start(script, multi, data_dir, log, 2, *extra, process=(address, i)), log)
  codes = _wait_all(procs)
  return codes, _logs(procs, codes)


def _wait_all(procs: dict, ok=(0,)) -> dict:
  """Waits for every process (name -> (Popen, log path)); kills the rest at the deadline or when one fails
  (exits with a code not in `ok`)."""
  deadline = time.monotonic() + TIMEOUT_S
  codes = {}
  while len(codes) < len(procs):
    for name, (proc, _) in procs.items():
      if name not in codes and proc.poll() is not None:
        codes[name] = proc.returncode
    failed = any(c not in ok for c in codes.values())
    if failed or time.monotonic() > deadline:  # a peer of a failed process would wait on it forever
      for name, (proc, _) in procs.items():
        if name not in codes:
          proc.kill()
          proc.wait()
          codes[name] = "killed" if failed else "timed out"
      break
    time.sleep(0.5)
  return codes


def _logs(procs: dict, codes: dict, tail: int = 4000) -> str:
  out = []
  for name, (_, path) in procs.items():
    with open(path, errors="replace") as f:
      text = f.read()
    out.append(f"===== {name} (exit {codes.get(name)}) =====\n{text[-tail:]}")
  return "\n".join(out)


def _read_state(workdir, step: int) -> dict:
  """The train state of checkpoint `step` as numpy arrays (no shardings: any device count reads it)."""
  path = os.path.join(workdir, "checkpoints", str(step), "state")
  checkpointer = ocp.PyTreeCheckpointer()
  tree = checkpointer.metadata(path).item_metadata.tree
  args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
  return checkpointer.restore(path, args=ocp.args.PyTreeRestore(restore_args=args))


def _read_meta(workdir, step: int) -> dict:
  with open(os.path.join(workdir, "checkpoints", str(step), "meta", "metadata")) as f:
    return json.load(f)


def _logged_losses(workdir) -> dict:
  """step -> loss from the TensorBoard event file (TFRecord framing: length, crc, Event, crc)."""
  from tensorboardX.proto import event_pb2
  files = glob.glob(os.path.join(workdir, "tensorboard", "events.*"))
  assert len(files) == 1, f"expected one event file in {workdir}/tensorboard, found {files}"
  with open(files[0], "rb") as f:
    data = f.read()
  losses, pos = {}, 0
  while pos < len(data):
    (n,) = struct.unpack("<Q", data[pos:pos + 8])
    event = event_pb2.Event.FromString(data[pos + 12:pos + 12 + n])
    pos += 12 + n + 4
    for v in event.summary.value:
      if v.tag == "loss":
        losses[event.step] = v.simple_value
  return losses


@pytest.fixture(scope="module")
def trained(fashion_dir, tmp_path_factory):
  """Workdirs (single, multi) of the same STEPS-step tiny run, trained by 1 process and by 2."""
  root = tmp_path_factory.mktemp("multihost_train")
  single, multi = root / "one_process", root / "two_processes"
  codes, logs = _run_both("train.py", single, multi, fashion_dir, root, f"--config.train.num_steps={STEPS}",
                          "--config.train.log_every=1", "--config.train.checkpoint_every=1000",
                          f"--config.train.sample_every={STEPS}")
  assert all(c == 0 for c in codes.values()), f"training failed: {codes}\n{logs}"
  return single, multi, logs


def test_two_processes_train_like_one(trained):
  single, multi, logs = trained
  # Both runs used a 4-device mesh, so the global batches, their split and the reductions agree; only
  # the collectives differ (gloo across processes vs in-process). Losses agree to float32 rounding.
  # Parameters after Adam do not quite: Adam divides each gradient by its own running scale, so a
  # near-zero gradient whose last bits depend on the reduction order can move its parameter by up to
  # ~lr either way. Tolerance: atol 0.1 * lr (1e-4 at lr 1e-3), rtol 1e-4 (measured max |diff| ~5e-5).
  lr = tiny.get_config().train.learning_rate
  loss_single, loss_multi = _logged_losses(single), _logged_losses(multi)
  assert sorted(loss_single) == sorted(loss_multi) == list(range(1, STEPS + 1)), (loss_single, loss_multi, logs)
  for step in loss_single:
    np.testing.assert_allclose(loss_multi[step], loss_single[step], rtol=1e-5, err_msg=f"loss at step {step}")

  a, b = _read_state(single, STEPS), _read_state(multi, STEPS)
  assert int(a["step"]) == int(b["step"]) == STEPS
  for tree in ("params", "ema_params"):
    la, lb = jax.tree_util.tree_leaves_with_path(a[tree]), jax.tree_util.tree_leaves_with_path(b[tree])
    assert [p for p, _ in la] == [p for p, _ in lb]
    diff = max(float(np.max(np.abs(x - y))) for (_, x), (_, y) in zip(la, lb))
    print(f"{tree}: max |single - multi| = {diff:.3g}")
    for (path, x), (_, y) in zip(la, lb):
      np.testing.assert_allclose(y, x, rtol=1e-4, atol=0.1 * lr,
                                 err_msg=f"{tree}{jax.tree_util.keystr(path)}")
  # Training moved the parameters (the EMA, started at the initialisation, lags behind them).
  assert any(np.any(x != y) for x, y in zip(jax.tree.leaves(a["params"]), jax.tree.leaves(a["ema_params"])))

  keymaps = []
  for workdir in (single, multi):
    with open(workdir / "keymap.json") as f:
      keymaps.append(json.load(f)["hash"])
    assert _read_meta(workdir, STEPS)["keymap_hash"] == keymaps[-1]
  assert keymaps[0] == keymaps[1]

  # The sample grid: sampled by both processes, written by process 0. The EMA parameters differ by
  # ~4e-5, far below one grey level of the PNG (measured: identical); allow 2 levels.
  grids = [np.asarray(Image.open(w / "samples" / f"step_{STEPS:07d}.png"), np.int16) for w in (single, multi)]
  assert grids[0].shape == grids[1].shape
  assert np.abs(grids[0] - grids[1]).max() <= 2


def _results(workdir) -> dict:
  out = {}
  with open(workdir / "eval" / "results.jsonl") as f:
    for line in f:
      row = json.loads(line)
      if "group" in row:
        out[(row["group"], row["instance_id"])] = (row["key"], row["k_pred"])
  return out


def test_two_processes_evaluate_like_one(trained, fashion_dir, tmp_path):
  """Evaluates the checkpoint of the 2-process run with 2 processes and, on a copy, with 1."""
  _, trained_multi, _ = trained
  single, multi = tmp_path / "one_process", tmp_path / "two_processes"
  for workdir in (single, multi):
    shutil.copytree(trained_multi, workdir, ignore=shutil.ignore_patterns("eval"))
  codes, logs = _run_both("evaluate.py", single, multi, fashion_dir, tmp_path,
                          "--config.eval.num_grid=0")
  assert all(c == 0 for c in codes.values()), f"evaluation failed: {codes}\n{logs}"
  a, b = _results(single), _results(multi)
  cfg = tiny.get_config().eval
  assert len(a) == cfg.num_members + cfg.num_nonmembers, (a, logs)
  assert sorted(a) == sorted(b)
  # Same parameters, same batches on the same 4-device mesh: the outpaintings agree to float rounding.
  for k in a:
    assert a[k][0] == b[k][0], k
    np.testing.assert_allclose(b[k][1], a[k][1], atol=1e-5, err_msg=str(k))
  with open(trained_multi / "keymap.json") as f:
    keymap_hash = json.load(f)["hash"]
  for workdir in (single, multi):
    with open(workdir / "eval" / "summary.json") as f:
      assert json.load(f)["keymap_hash"] == keymap_hash


def test_two_processes_preempted_on_one_stop_together_and_resume_bit_for_bit(trained, fashion_dir, tmp_path):
  """SIGTERM to process 1 only, as training starts: both processes agree on the step, checkpoint it and
  exit 75; the re-run resumes there and ends bit for bit where the uninterrupted 2-process run did."""
  _, reference, _ = trained
  workdir = tmp_path / "wd"
  extra = (f"--config.train.num_steps={STEPS}", "--config.train.log_every=1", "--config.train.checkpoint_every=1000",
           f"--config.train.sample_every={STEPS}")
  address = f"127.0.0.1:{_free_port()}"
  procs = {}
  for i in range(2):
    log = tmp_path / f"preempted_{i}.log"
    procs[f"process {i} of 2"] = (_start("train.py", workdir, fashion_dir, log, 2, *extra, process=(address, i)), log)
  started = f"training steps 1 to {STEPS}"
  deadline = time.monotonic() + TIMEOUT_S
  while not all(started in open(log, errors="replace").read() for _, log in procs.values()):
    assert all(p.poll() is None for p, _ in procs.values()) and time.monotonic() < deadline, _logs(procs, {})
    time.sleep(0.1)
  procs["process 1 of 2"][0].send_signal(signal.SIGTERM)
  codes = _wait_all(procs, ok=(0, PREEMPTED_EXIT_CODE))
  logs = _logs(procs, codes)
  assert all(c == PREEMPTED_EXIT_CODE for c in codes.values()), f"{codes}\n{logs}"
  steps = sorted(int(d) for d in os.listdir(workdir / "checkpoints") if d.isdigit())
  assert len(steps) == 1 and 0 < steps[0] < STEPS, (steps, logs)
  k = steps[0]
  texts = [open(log).read() for _, log in procs.values()]
  assert f"training preempted by a signal to another process after step {k}: checkpoint {k} written" in texts[0]
  assert f"training preempted by SIGTERM after step {k}: checkpoint {k} written" in texts[1]

  address = f"127.0.0.1:{_free_port()}"
  procs = {f"process {i} of 2": (_start("train.py", workdir, fashion_dir, tmp_path / f"resumed_{i}.log", 2, *extra,
                                        process=(address, i)), tmp_path / f"resumed_{i}.log") for i in range(2)}
  codes = _wait_all(procs)
  logs = _logs(procs, codes)
  assert all(c == 0 for c in codes.values()), f"{codes}\n{logs}"
  assert f"resumed from checkpoint {k} " in logs
  a, b = _read_state(reference, STEPS), _read_state(workdir, STEPS)
  for (path, x), (_, y) in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree_util.tree_leaves_with_path(b)):
    np.testing.assert_array_equal(y, x, err_msg=jax.tree_util.keystr(path))
