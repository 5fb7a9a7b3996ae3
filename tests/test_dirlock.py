"""One writer per directory: the lock file, a live holder refused, stale locks taken over (dirlock.py).

The real train.py / evaluate.py / sweep.py runs against a held directory are in test_preemption.py.
"""

import json
import os
import socket
import subprocess
import sys
import time

import pytest

from solidmark_jax import dirlock


def _dead_pid() -> int:
  proc = subprocess.Popen([sys.executable, "-c", "pass"])
  proc.wait()
  return proc.pid


def test_held_refused_released(tmp_path):
  d = tmp_path / "wd"
  with dirlock.hold(str(d), "training") as lock:
    record = json.loads((d / dirlock.LOCK_FILE).read_text())
    assert record["pid"] == os.getpid() and record["host"] == socket.gethostname() and record["purpose"] == "training"
    with pytest.raises(dirlock.DirectoryInUse) as e:
      dirlock.DirectoryLock(str(d), "evaluation").acquire()
    msg = str(e.value)
    assert msg.startswith(f"{d} is in use: training by pid {os.getpid()} on host {socket.gethostname()}")
    assert str(d / dirlock.LOCK_FILE) in msg and "Wait for that process" in msg
    assert lock.path == str(d / dirlock.LOCK_FILE)
  assert not (d / dirlock.LOCK_FILE).exists()
  with dirlock.hold(str(d), "training"):  # free again
    pass


def test_stale_locks_are_taken_over(tmp_path, caplog):
  d = tmp_path / "wd"
  d.mkdir()
  path = d / dirlock.LOCK_FILE
  # same host, the process is gone: stale at once
  pid = _dead_pid()
  path.write_text(json.dumps({"pid": pid, "host": socket.gethostname(), "command": "train.py", "started": "x"}))
  with caplog.at_level("WARNING"):
    with dirlock.hold(str(d), "training"):
      assert json.loads(path.read_text())["pid"] == os.getpid()
  assert f"taking over the stale lock of pid {pid} on host {socket.gethostname()}" in caplog.text
  assert f"process {pid} is no longer running" in caplog.text
  # same host and this process's pid, but not a lock it holds (a restarted container, pid 1 again)
  path.write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "token": "old"}))
  caplog.clear()
  with caplog.at_level("WARNING"):
    with dirlock.hold(str(d), "training"):
      pass
  assert "a restarted container reuses pids" in caplog.text
  # another host: its pid cannot be checked; live while its heartbeat is recent, stale after STALE_AFTER_S
  path.write_text(json.dumps({"pid": 1, "host": "elsewhere", "purpose": "training"}))
  with pytest.raises(dirlock.DirectoryInUse, match="training by pid 1 on host elsewhere"):
    dirlock.DirectoryLock(str(d), "training").acquire()
  old = time.time() - dirlock.STALE_AFTER_S - 10
  os.utime(path, (old, old))
  caplog.clear()
  with caplog.at_level("WARNING"):
    with dirlock.hold(str(d), "training"):
      pass
  assert "no heartbeat for" in caplog.text and not path.exists()


def test_heartbeat_refreshes_the_lock(tmp_path, monkeypatch):
  monkeypatch.setattr(dirlock, "HEARTBEAT_S", 0.05)
  lock = dirlock.DirectoryLock(str(tmp_path), "training").acquire()
  try:
    path = tmp_path / dirlock.LOCK_FILE
    old = time.time() - 1000
    os.utime(path, (old, old))
    deadline = time.monotonic() + 10
    while os.stat(path).st_mtime < old + 500:
      assert time.monotonic() < deadline, "no heartbeat"
      time.sleep(0.02)
  finally:
    lock.release()


def test_a_run_that_writes_nothing_leaves_no_trace(tmp_path):
  """Folders the lock created go again when left empty; an existing folder keeps its mtime."""
  target = tmp_path / "new" / "wd" / "eval"
  with dirlock.hold(str(target), "evaluation"):
    assert (target / dirlock.LOCK_FILE).exists()
  assert not (tmp_path / "new").exists()
  with dirlock.hold(str(target), "evaluation"):
    (target / "summary.json").write_text("{}")
  assert os.listdir(target) == ["summary.json"]  # kept, with the folders above it
  existing = tmp_path / "existing"
  existing.mkdir()
  (existing / "a").write_text("x")
  old = time.time() - 3600
  os.utime(existing, (old, old))
  before = os.stat(existing).st_mtime_ns
  with dirlock.hold(str(existing), "training"):
    pass
  assert os.stat(existing).st_mtime_ns == before and os.listdir(existing) == ["a"]
  with dirlock.hold(str(existing), "training"):
    (existing / "b").write_text("y")
  assert os.stat(existing).st_mtime_ns != before  # something was written: its mtime says so
