"""Atomic file writes: a file is replaced whole, or left as it was.

The content goes to a temporary file in the same directory (`.<name>.tmp-<random>`), is flushed
and fsync'ed, then renamed over the target (`os.replace`, atomic on POSIX file systems), and the
directory is fsync'ed so that the rename survives a crash. A failed write (ENOSPC, EIO, an
exception while producing the content) removes the temporary file and re-raises: the old file, if
any, is untouched and no half-written file is ever visible under the target's name.

  with atomic.replace("summary.md") as f:   # text; mode="wb" for bytes
    f.write(text)
  atomic.write_json("summary.json", summary, indent=2)  # every JSON file the project writes
  with atomic.replace_path("grid.png") as tmp:  # for writers that want a path (PIL, np.savez)
    image.save(tmp, format="PNG")
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from typing import IO, Any, Callable, Iterator

_UMASK = os.umask(0)
os.umask(_UMASK)  # read once: the replaced files get the usual permissions, not mkstemp's 0600


def _fsync_dir(directory: str) -> None:
  try:
    fd = os.open(directory, os.O_RDONLY)
  except OSError:  # e.g. a platform without directory fds
    return
  try:
    os.fsync(fd)
  except OSError:
    pass  # some file systems refuse fsync on directories; the rename itself is still atomic
  finally:
    os.close(fd)


@contextlib.contextmanager
def replace_path(path: str, suffix: str = "") -> Iterator[str]:
  """Yields a temporary path beside `path`; on success it is fsync'ed and renamed to `path`.

  Args:
    path: the target file.
    suffix: the temporary file's ending (some writers pick the format from it, e.g. ".npz").
  """
  path = os.path.abspath(path)
  directory = os.path.dirname(path)
  os.makedirs(directory, exist_ok=True)
  fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.tmp-", suffix=suffix, dir=directory)
  os.close(fd)
  try:
    os.chmod(tmp, 0o666 & ~_UMASK)
    yield tmp
    fd = os.open(tmp, os.O_RDONLY)
    try:
      os.fsync(fd)
    finally:
      os.close(fd)
    os.replace(tmp, path)
  except BaseException:
    with contextlib.suppress(OSError):
      os.remove(tmp)
    raise
  _fsync_dir(directory)


@contextlib.contextmanager
def replace(path: str, mode: str = "w", encoding: str | None = "utf-8", newline: str | None = None) -> Iterator[IO]:
  """Yields a file object (mode "w" or "wb") whose content replaces `path` atomically on success."""
  if mode not in ("w", "wb"):
    raise ValueError(f"atomic.replace: mode must be 'w' or 'wb', got {mode!r}")
  with replace_path(path) as tmp:
    kwargs = {} if mode == "wb" else {"encoding": encoding, "newline": newline}
    with open(tmp, mode, **kwargs) as f:
      yield f
      f.flush()
      os.fsync(f.fileno())


def write_text(path: str, text: str) -> None:
  """Replaces `path` with `text` (UTF-8) atomically."""
  with replace(path) as f:
    f.write(text)


def write_json(path: str, obj: Any, *, indent: int | None = None, sort_keys: bool = False,
               trailing_newline: bool = True, default: Callable[[Any], Any] | None = None,
               ensure_ascii: bool = True) -> None:
  """Replaces `path` with `obj` as JSON atomically (a newline after it, as the report files have).

  `indent`, `sort_keys`, `default` and `ensure_ascii` are `json.dumps`'; `trailing_newline=False`
  writes exactly what `json.dump` would (the model folders' config.json files).
  """
  text = json.dumps(obj, indent=indent, sort_keys=sort_keys, default=default,
                    ensure_ascii=ensure_ascii)  # serialised first: a bad object writes nothing
  write_text(path, text + ("\n" if trailing_newline else ""))
