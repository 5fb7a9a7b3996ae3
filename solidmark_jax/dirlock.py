"""One writer per directory: a lock file naming the process that writes there.

train.py takes `<workdir>/.solidmark.lock`, evaluate.py `<workdir>/eval/.solidmark.lock` (or its
generations/ folder), sweep.py `<workdir>/sweeps/.solidmark.lock`; evaluating a workdir while it
trains is fine, two trainings of one workdir are not. A second process that finds the directory
held stops at once with `DirectoryInUse`, naming the directory, the lock file and the holder (pid,
host, command, start time); it writes nothing there.

The lock file is JSON ({"pid", "host", "command", "started", "token"}), written atomically. Its
holder refreshes the file's modification time every `HEARTBEAT_S` seconds. A lock is stale, and
is taken over with a warning in the log, when its process is gone: on the same host, when that pid
no longer runs (or it is this process's own pid without being one of its locks: a restarted
container reuses pids); from another host (which cannot see the pid), when the heartbeat is older
than `STALE_AFTER_S`. Taking a lock is serialised by an `flock` on the directory itself, so two
processes starting at once cannot both win. The lock file is removed when its holder finishes.

Multi-host: only process 0 takes the lock (the others write nothing there, or write what process 0
tells them to); its outcome is broadcast, so a refused lock stops every process of the run.
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import json
import logging
import os
import socket
import sys
import threading
import time
import uuid
from typing import Iterator

import jax
import numpy as np

from solidmark_jax import atomic, parallel

log = logging.getLogger(__name__)

LOCK_FILE = ".solidmark.lock"
HEARTBEAT_S = 30.0
STALE_AFTER_S = 300.0  # a lock of another host whose heartbeat is older than this is stale


_held_tokens: set[str] = set()  # tokens of the locks this process holds


class DirectoryInUse(RuntimeError):
  """Another live process holds the directory's lock."""


def _pid_running(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # it exists, owned by someone else
    return True
  return True


def _describe(record: dict) -> str:
  return (f"pid {record.get('pid')} on host {record.get('host')} (command: {record.get('command')!r}, "
          f"since {record.get('started')})")


def _read(path: str) -> dict | None:
  """The lock record at `path`, {} if unreadable (a torn or foreign file), None if there is none."""
  try:
    with open(path, encoding="utf-8") as f:
      record = json.load(f)
  except FileNotFoundError:
    return None
  except (OSError, ValueError):
    return {}
  return record if isinstance(record, dict) else {}


def _stale_reason(path: str, record: dict, host: str) -> str | None:
  """Why the lock in `record` is stale, or None while its holder may be alive."""
  try:
    age = time.time() - os.stat(path).st_mtime
  except FileNotFoundError:
    return "its file is gone"
  pid = record.get("pid")
  if record.get("host") == host and isinstance(pid, int):
    if pid == os.getpid() and record.get("token") not in _held_tokens:
      return f"it names this process's pid {pid} but not one of its locks (a restarted container reuses pids)"
    return None if _pid_running(pid) else f"process {pid} is no longer running"
  if age > STALE_AFTER_S:
    return f"no heartbeat for {age:.0f} s (more than {STALE_AFTER_S:.0f} s)"
  return None


class DirectoryLock:
  """The lock of one directory, held by this process; see the module docstring.

  Args:
    directory: the directory to lock (created if missing).
    purpose: what this process does there ("training", "evaluation", ...), for the messages.
  """

  def __init__(self, directory: str, purpose: str):
    self.directory = os.path.abspath(directory)
    self.path = os.path.join(self.directory, LOCK_FILE)
    self.purpose = purpose
    self.record = {"pid": os.getpid(), "host": socket.gethostname(), "command": " ".join(sys.argv),
                   "purpose": purpose, "started": datetime.datetime.now(datetime.timezone.utc).isoformat(
                       timespec="seconds"), "token": uuid.uuid4().hex}
    self._stop = threading.Event()
    self._thread: threading.Thread | None = None
    self._created: list[str] = []  # folders this lock created (deepest first), removed again if left empty
    self._dir_times: tuple[int, int] | None = None  # the folder's (atime, mtime) ns before the lock file
    self._dir_mtime_locked: int | None = None  # its mtime right after the lock file was written

  @contextlib.contextmanager
  def _mutex(self) -> Iterator[None]:
    fd = os.open(self.directory, os.O_RDONLY)
    try:
      fcntl.flock(fd, fcntl.LOCK_EX)
      yield
    finally:
      os.close(fd)  # releases the flock

  def acquire(self) -> "DirectoryLock":
    """Takes the lock; raises DirectoryInUse when a live process holds it."""
    path = self.directory
    while not os.path.isdir(path) and path != os.path.dirname(path):
      self._created.append(path)
      path = os.path.dirname(path)
    os.makedirs(self.directory, exist_ok=True)
    with self._mutex():
      held = _read(self.path)
      if held is not None:
        reason = _stale_reason(self.path, held, self.record["host"])
        if reason is None:
          raise DirectoryInUse(
              f"{self.directory} is in use: {held.get('purpose', 'another run')} by {_describe(held)} holds its "
              f"lock {self.path}. Wait for that process to finish (or stop it), or use another directory (a lock "
              f"whose process is gone is taken over automatically; from another host after {STALE_AFTER_S:.0f} s "
              "without heartbeat).")
        log.warning("%s: taking over the stale lock of %s: %s", self.directory, _describe(held), reason)
      if not self._created and held is None:
        st = os.stat(self.directory)
        self._dir_times = (st.st_atime_ns, st.st_mtime_ns)
      atomic.write_json(self.path, self.record)
      _held_tokens.add(self.record["token"])
      self._dir_mtime_locked = os.stat(self.directory).st_mtime_ns
    self._thread = threading.Thread(target=self._heartbeat, name=f"lock {self.path}", daemon=True)
    self._thread.start()
    return self

  def _heartbeat(self) -> None:
    while not self._stop.wait(HEARTBEAT_S):
      try:
        os.utime(self.path)
      except OSError as e:  # the file system went away: say so, keep going
        log.warning("%s: cannot refresh the lock's heartbeat: %s", self.path, e)

  def release(self) -> None:
    """Removes the lock file if it is still this process's.

    A run that wrote nothing leaves the directory as it found it: folders the lock created are
    removed again when empty, and an existing folder whose only change was the lock file gets its
    modification time back.
    """
    self._stop.set()
    if self._thread is not None:
      self._thread.join()
    _held_tokens.discard(self.record["token"])
    with self._mutex():
      held = _read(self.path)
      if held is not None and held.get("token") == self.record["token"]:
        untouched = os.stat(self.directory).st_mtime_ns == self._dir_mtime_locked
        os.remove(self.path)
        if untouched and self._dir_times is not None:
          os.utime(self.directory, ns=self._dir_times)
      elif held is not None:
        log.warning("%s: the lock was taken over by %s while this process held it", self.path, _describe(held))
    for folder in self._created:  # deepest first; stops at the first one something was written to
      try:
        os.rmdir(folder)
      except OSError:
        break


@contextlib.contextmanager
def hold(directory: str, purpose: str) -> Iterator[DirectoryLock | None]:
  """Holds `directory`'s lock for the `with` block: process 0 takes it, every process learns the outcome.

  Raises:
    DirectoryInUse: a live process holds the lock (on every process of a multi-host run).
  """
  lock, error = None, None
  if jax.process_index() == 0:
    try:
      lock = DirectoryLock(directory, purpose).acquire()
    except DirectoryInUse as e:
      error = e
  if jax.process_count() > 1:
    ok = int(parallel.broadcast_from_main(np.int32(error is None)))
    if not ok and error is None:
      error = DirectoryInUse(f"{os.path.abspath(directory)} is in use by another run: process 0 could not take its "
                             f"lock {os.path.join(os.path.abspath(directory), LOCK_FILE)} (its log names the holder)")
  if error is not None:
    raise error
  try:
    yield lock
  finally:
    if lock is not None:
      lock.release()
