"""Config compatibility of checkpoints: differing fields are named; fields added to the project after a
checkpoint was written count as equal at their defaults."""

import builtins
import errno
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from solidmark_jax.training import checkpoint as ckpt

from configs import tiny


def _record(config, drop=()):
  fields = ckpt.fingerprint_fields(config)
  for section, key in drop:
    del fields[section][key]
  return fields


def test_diff_names_changed_fields():
  a, b = tiny.get_config(), tiny.get_config()
  b.marks.pad = 3
  diffs = ckpt._diff(_record(a), ckpt.fingerprint_fields(b), defaults=ckpt._default_fields())
  assert diffs == ["marks.pad: checkpoint 2 vs config 3"]


def test_field_added_later_is_equal_at_its_default_only():
  old = _record(tiny.get_config(), drop=[("model", "use_linear_projection")])  # written before the field existed
  c = tiny.get_config()
  assert ckpt._diff(old, ckpt.fingerprint_fields(c), defaults=ckpt._default_fields()) == []
  c.model.use_linear_projection = True  # not what the older code did: a real difference
  assert ckpt._diff(old, ckpt.fingerprint_fields(c), defaults=ckpt._default_fields()) == [
      "model.use_linear_projection: checkpoint None vs config True"]


# Which files of checkpoint 2 the full disk refuses: every file, or only the step's own metadata file, which
# Orbax writes apart from the items (its failure once left a committed step 2 behind).
FULL_DISK_FILES = {"every file": "", "step metadata only": "_CHECKPOINT_METADATA"}


@pytest.mark.parametrize("refused", FULL_DISK_FILES.values(), ids=FULL_DISK_FILES.keys())
def test_failed_checkpoint_write_is_an_error_and_keeps_the_ones_before(tmp_path, monkeypatch, refused):
  """ENOSPC while checkpoint 2 is written: a CheckpointWriteError naming step 2 and the complete step 1,
  which stays restorable; no folder of step 2 is committed; a new Checkpointer resumes from 1 and can
  write 2 again."""
  directory = str(tmp_path / "checkpoints")
  state = {"step": jnp.int32(1), "w": jnp.arange(16, dtype=jnp.float32).reshape(4, 4)}
  c = ckpt.Checkpointer(directory, save_every=1, keep=5)
  c.save(1, state, {"step": 1}, force=True)
  c.wait()
  real_open = builtins.open

  class FullDisk:
    def __init__(self, f):
      self._f = f

    def write(self, data):
      raise OSError(errno.ENOSPC, "No space left on device")

    def __enter__(self):
      return self

    def __exit__(self, *exc):
      self._f.close()

    def __getattr__(self, name):
      return getattr(self._f, name)

  def open_full(file, mode="r", *args, **kwargs):
    f = real_open(file, mode, *args, **kwargs)
    path = str(file)
    full = "w" in mode and f"{os.sep}2.orbax-checkpoint-tmp" in path and path.endswith(refused)
    return FullDisk(f) if full else f

  monkeypatch.setattr(builtins, "open", open_full)
  with pytest.raises(ckpt.CheckpointWriteError) as e:
    c.save(2, {**state, "step": jnp.int32(2)}, {"step": 2}, force=True)
    c.wait()  # saves run in the background: the failure surfaces here at the latest
  monkeypatch.setattr(builtins, "open", real_open)
  c.close()  # stops Orbax's threads; the failure was reported once
  msg = str(e.value)
  assert msg.startswith(f"{directory}: writing checkpoint 2 failed (")
  assert "No space left on device" in msg and "(1) are intact and a re-run resumes from step 1" in msg
  assert c.committed_steps() == [1]

  again = ckpt.Checkpointer(directory, save_every=1, keep=5)
  assert again.latest_step() == 1 and again.read_meta(1) == {"step": 1}
  restored = again.restore_state(1, jax_abstract(state))
  np.testing.assert_array_equal(restored["w"], state["w"])
  again.save(2, {**state, "step": jnp.int32(2)}, {"step": 2}, force=True)
  again.close()
  assert ckpt.Checkpointer(directory, create=False).committed_steps() == [1, 2]


def jax_abstract(tree):
  return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding), tree)
