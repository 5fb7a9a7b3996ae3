"""training/state.py: restore_ema reads the EMA parameters alone (an Orbax partial restore) onto the
training shardings, checked against config and keymap; load_frozen returns a new experiment and leaves
the given one as it was."""

import dataclasses
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import tiny
from solidmark_jax import marks, parallel
from solidmark_jax.experiment import build_experiment, sync_keymap
from solidmark_jax.training import checkpoint as ckpt
from solidmark_jax.training.state import abstract_state, load_frozen, make_optimizer, restore_ema


def _config(fashion_dir):
  c = tiny.get_config()
  c.data.data_dir = fashion_dir
  return c


@pytest.fixture(scope="module")
def saved(fashion_dir, tmp_path_factory):
  """A workdir with a keymap and a checkpoint at step 3 whose params, EMA params and optimiser state differ."""
  config = _config(fashion_dir)
  exp = build_experiment(config)
  mesh = parallel.make_mesh()
  target, shardings = abstract_state(exp, mesh, make_optimizer(config.train))
  rs = np.random.default_rng(0)
  state = jax.tree.map(lambda a, s: jax.device_put(rs.standard_normal(a.shape).astype(a.dtype), s), target, shardings)
  state["step"] = jax.device_put(jnp.int32(3), shardings["step"])
  workdir = tmp_path_factory.mktemp("state")
  sync_keymap(exp, str(workdir), write=True)
  checkpointer = ckpt.Checkpointer(os.path.join(workdir, "checkpoints"), save_every=1)
  checkpointer.save(3, state, ckpt.make_meta(config, 3, exp.keymap.hash), force=True)
  checkpointer.close()
  return config, exp, mesh, str(workdir), jax.device_get(state), shardings


def test_restore_ema_is_the_ema_on_the_training_shardings(saved):
  config, exp, mesh, workdir, state, shardings = saved
  ema, step, meta = restore_ema(exp, workdir, mesh)
  assert step == 3 and meta["keymap_hash"] == exp.keymap.hash
  got, want = jax.tree.leaves(jax.device_get(ema)), jax.tree.leaves(state["ema_params"])
  assert len(got) == len(want) and all(np.array_equal(a, b) for a, b in zip(got, want))
  other = jax.tree.leaves(state["params"])
  assert not all(np.array_equal(a, b) for a, b in zip(got, other))  # the EMA, not the live params
  for a, s in zip(jax.tree.leaves(ema), jax.tree.leaves(shardings["ema_params"])):
    assert a.sharding.is_equivalent_to(s, a.ndim)


def test_the_partial_restore_reads_nothing_but_the_ema(saved):
  config, exp, mesh, workdir, _, _ = saved
  target, _ = abstract_state(exp, mesh, make_optimizer(config.train))
  checkpointer = ckpt.Checkpointer(os.path.join(workdir, "checkpoints"), create=False)
  try:
    out = checkpointer.restore_subtree(3, {"ema_params": target["ema_params"]})
  finally:
    checkpointer.close()
  assert set(out) == {"ema_params"}


def test_restore_ema_errors_name_the_problem(saved, tmp_path):
  config, exp, mesh, workdir, _, _ = saved
  with pytest.raises(ValueError, match="no checkpoint at step 7; there are \\[3\\]"):
    restore_ema(exp, workdir, mesh, step=7)
  with pytest.raises(FileNotFoundError, match="no checkpoints here; train first"):
    restore_ema(exp, str(tmp_path), mesh)
  copy = tmp_path / "copy"
  shutil.copytree(workdir, copy)
  ids = np.arange(len(exp.keymap), dtype=np.int64)
  marks.Keymap.create(exp.config.marks.key_seed + 1, ids).save(str(copy / "keymap.json"))  # keys swapped
  with pytest.raises(ValueError, match="keymap"):
    restore_ema(exp, str(copy), mesh)


def test_load_frozen_returns_a_new_experiment_and_keeps_the_given_one(saved):
  _, exp, mesh, workdir, _, _ = saved
  same, frozen = load_frozen(exp, workdir, train=False, mesh=mesh)
  assert frozen == {} and same is exp  # a pixel model with ids: nothing frozen, nothing new
  with pytest.raises(dataclasses.FrozenInstanceError):
    exp.vae = None  # the experiment is built once and never changed
