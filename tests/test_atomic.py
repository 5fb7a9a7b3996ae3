"""Atomic file writes (atomic.py): whole or nothing, even when the disk fills up mid-write."""

import errno
import json
import os
import stat

import pytest

from solidmark_jax import atomic


def test_writes_and_replaces(tmp_path):
  path = tmp_path / "sub" / "summary.json"
  atomic.write_json(str(path), {"a": 1}, indent=2)
  assert path.read_text() == '{\n  "a": 1\n}\n'
  atomic.write_text(str(path), "new")
  assert path.read_text() == "new"
  with atomic.replace_path(str(tmp_path / "x.npz"), suffix=".tmp.npz") as tmp:
    assert tmp.endswith(".tmp.npz") and os.path.dirname(tmp) == str(tmp_path)
    open(tmp, "wb").write(b"bytes")
  assert (tmp_path / "x.npz").read_bytes() == b"bytes"
  umask = os.umask(0)
  os.umask(umask)
  assert stat.S_IMODE(os.stat(path).st_mode) == 0o666 & ~umask  # not mkstemp's 0600
  assert sorted(os.listdir(tmp_path)) == ["sub", "x.npz"]  # no temporary file left


def test_write_json_writes_what_json_dump_writes(tmp_path):
  """The model folders' config.json files: the bytes of json.dump, with its options, no newline after."""
  obj = {"b": [1, 2], "a": "\u00e9", "when": object}
  for kwargs in ({"indent": 2, "sort_keys": True, "default": str}, {"ensure_ascii": False, "default": str}):
    path = tmp_path / "config.json"
    atomic.write_json(str(path), obj, trailing_newline=False, **kwargs)
    with open(tmp_path / "ref.json", "w", encoding="utf-8") as f:
      json.dump(obj, f, **kwargs)
    assert path.read_bytes() == (tmp_path / "ref.json").read_bytes()


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EIO])
def test_failed_write_keeps_the_old_file(tmp_path, monkeypatch, code):
  path = tmp_path / "summary.json"
  atomic.write_json(str(path), {"old": True})
  real_fsync = os.fsync

  def failing_fsync(fd):
    raise OSError(code, os.strerror(code))

  monkeypatch.setattr(os, "fsync", failing_fsync)
  with pytest.raises(OSError) as e:
    atomic.write_json(str(path), {"new": True, "big": "x" * 10000})
  assert e.value.errno == code
  monkeypatch.setattr(os, "fsync", real_fsync)
  assert json.loads(path.read_text()) == {"old": True}
  assert os.listdir(tmp_path) == ["summary.json"]
  with pytest.raises(TypeError):  # content that cannot be serialised writes nothing either
    atomic.write_json(str(path), {"bad": object()})
  assert json.loads(path.read_text()) == {"old": True} and os.listdir(tmp_path) == ["summary.json"]
