"""Helpers shared by the end-to-end tests: run train.py / evaluate.py as real subprocesses."""

import os
import subprocess
import sys

import pytest

from configs import tiny

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMEOUT_S = 600


def _config(overrides: dict):
  c = tiny.get_config()
  c.update_from_flattened_dict(overrides)
  return c


def _flag(v) -> str:
  # a tuple as a Python literal: ml_collections reads `(A,)` (unquoted) as the 1-tuple ("(A,)",)
  return repr(v) if isinstance(v, tuple) else str(v)


def _command(script: str, workdir, overrides: dict, *extra: str) -> list[str]:
  return ([sys.executable, os.path.join(ROOT, script), "--config", os.path.join(ROOT, "configs", "tiny.py"),
           "--workdir", str(workdir)] + [f"--config.{k}={_flag(v)}" for k, v in overrides.items()] + list(extra))


@pytest.fixture(scope="module")
def cli_env(tmp_path_factory):
  """Environment of train.py/evaluate.py subprocesses: 2 CPU devices, one compilation cache per session."""
  env = dict(os.environ)
  env.update({
      "XLA_FLAGS": "--xla_force_host_platform_device_count=2",
      "JAX_PLATFORMS": "cpu",
      "CUDA_VISIBLE_DEVICES": "",
      "JAX_COMPILATION_CACHE_DIR": str(tmp_path_factory.getbasetemp() / "jax_cache"),
      "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
      "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0",
      "PYTHONUNBUFFERED": "1",
  })
  return env


def _run(cmd, env, log_path, timeout=TIMEOUT_S) -> str:
  """Runs cmd to completion; fails the test with its log if it exits non-zero. Returns the log."""
  with open(log_path, "w") as f:
    rc = subprocess.run(cmd, env=env, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, timeout=timeout).returncode
  log = open(log_path).read()
  assert rc == 0, f"{' '.join(cmd)} exited {rc}:\n{log[-5000:]}"
  return log


def _snapshot(path) -> dict:
  """Every file and folder under `path`: relative path -> (size, mtime_ns, content digest)."""
  out = {}
  for root, dirs, files in os.walk(path):
    for name in dirs + files:
      p = os.path.join(root, name)
      st = os.stat(p)
      content = open(p, "rb").read() if name in files else b""
      out[os.path.relpath(p, path)] = (st.st_size, st.st_mtime_ns, hash(content))
  return out
