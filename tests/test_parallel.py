"""Meshes that fit pods: device grids (ICI / DCN), FSDP of SD 2.1's state, restoring onto another mesh."""

import dataclasses

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from solidmark_jax import models, parallel
from solidmark_jax.training import checkpoint as ckpt
from solidmark_jax.training.state import init_state, make_optimizer
from configs import sd21_pretrain, tiny


@dataclasses.dataclass(frozen=True)
class FakeTpu:
  """Enough of a device for mesh_utils' layout (no arrays are placed on it)."""
  id: int
  slice_index: int
  process_index: int = 0
  platform: str = "cpu"  # mesh_utils then keeps the given order within a slice
  device_kind: str = "fake"


def test_mesh_from_config_keeps_device_order_on_cpu():
  mesh = parallel.mesh_for_config(ml_collections.ConfigDict({"data": -1, "fsdp": 4, "dcn_data": 1}))
  assert dict(mesh.shape) == {"data": 2, "fsdp": 4}
  assert [d.id for d in mesh.devices.ravel()] == [d.id for d in jax.devices()]


def test_hybrid_grid_puts_each_slice_on_its_own_data_rows():
  devices = [FakeTpu(i, slice_index=i // 4) for i in range(8)]  # two slices of four chips
  grid = parallel.device_grid(devices, data=4, fsdp=2, dcn_data=2)
  assert grid.shape == (4, 2)
  assert {d.slice_index for d in grid[:2].ravel()} == {0} and {d.slice_index for d in grid[2:].ravel()} == {1}
  # fsdp (all-gathers of parameters) never crosses the slow network: each row lies in one slice
  assert all(len({d.slice_index for d in row}) == 1 for row in grid)


def test_bad_dcn_sizes_are_clear_errors():
  with pytest.raises(ValueError, match=r"mesh.dcn_data=3 must be >= 1 and divide the data axis \(8\)"):
    parallel.make_mesh(8, 1, dcn_data=3)
  with pytest.raises(ValueError, match=r"mesh.dcn_data=2: the devices do not form 2 processes"):
    parallel.make_mesh(8, 1, dcn_data=2)  # one process here: one granule
  with pytest.raises(ValueError, match="mesh.data x mesh.fsdp must equal the 8 devices, got 3 x 1"):
    parallel.make_mesh(3, 1)


def test_fsdp_shards_sd21_state_evenly_over_8_devices():
  """SD 2.1's 866M-parameter UNet, AdamW state and EMA: each of 8 devices holds ~1/8 (shapes only)."""
  cfg = sd21_pretrain.get_config()
  model = models.build(cfg.model, 32, 4, 0)  # 256 px images -> 32 x 32 latents
  tx = make_optimizer(cfg.train)
  state = jax.eval_shape(lambda p: init_state(p, tx), models.abstract_params(model, 32, 4))
  n_params = sum(a.size for a in jax.tree.leaves(state["params"]))
  assert 865e6 < n_params < 867e6
  mesh = parallel.make_mesh(1, 8)
  shardings = parallel.state_shardings(mesh, state)
  total = sum(a.size * a.dtype.itemsize for a in jax.tree.leaves(state))
  per_device = parallel.per_device_bytes(state, shardings)
  assert per_device <= total / 8 * 1.05, (per_device / total)
  assert per_device >= total / 8  # nothing is lost
  # parameters + optimizer state (the check), separately
  for part in ("params", "opt_state"):
    t = sum(a.size * a.dtype.itemsize for a in jax.tree.leaves(state[part]))
    assert parallel.per_device_bytes(state[part], shardings[part]) <= t / 8 * 1.05


def test_checkpoint_restores_onto_a_mesh_of_another_size(tmp_path):
  cfg = tiny.get_config()
  model = models.build(cfg.model, 16, 1, 10)
  tx = make_optimizer(cfg.train)
  params = models.init_params(model, jax.random.key(0), 16, 1)
  state = init_state(params, tx)
  big = parallel.make_mesh(2, 4)  # 8 devices, fsdp = 4
  state = jax.device_put(state, parallel.state_shardings(big, jax.eval_shape(lambda: state)))
  assert any("fsdp" in tuple(x.sharding.spec) for x in jax.tree.leaves(state["params"]))
  saver = ckpt.Checkpointer(str(tmp_path / "ckpt"), save_every=1)
  saver.save(3, state, {"step": 3}, force=True)
  saver.close()

  small = parallel.make_mesh(1, 2, jax.devices()[:2])  # resume on 2 devices
  abstract = jax.eval_shape(lambda: init_state(params, tx))
  shardings = parallel.state_shardings(small, abstract)
  target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
  loader = ckpt.Checkpointer(str(tmp_path / "ckpt"), create=False)
  restored = loader.restore_state(3, target)
  loader.close()
  for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(state)):
    assert set(a.sharding.device_set) <= set(jax.devices()[:2])
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert any("fsdp" in tuple(x.sharding.spec) for x in jax.tree.leaves(restored["params"]))


def test_to_host_gathers_a_tree_and_broadcast_is_identity_with_one_process():
  mesh = parallel.make_mesh()
  x = np.arange(16 * 3, dtype=np.float32).reshape(16, 3)
  tree = {"a": parallel.global_batch(mesh, x), "b": [jnp.ones(2, jnp.bfloat16), 5]}
  host = parallel.to_host(tree)
  assert isinstance(host["a"], np.ndarray) and np.array_equal(host["a"], x)
  assert host["b"][0].dtype == jnp.bfloat16 and host["b"][1] == 5
  assert parallel.to_host(jnp.arange(3)).tolist() == [0, 1, 2]
  got = parallel.broadcast_from_main(np.int32(7))
  assert isinstance(got, np.ndarray) and int(got) == 7


def test_check_batch_size_names_the_field():
  mesh = parallel.make_mesh()
  parallel.check_batch_size(16, mesh, what="eval.batch_size")
  with pytest.raises(ValueError, match=r"eval.generations.batch_size=6 must be divisible by the 8 devices of the mesh"):
    parallel.check_batch_size(6, mesh, what="eval.generations.batch_size")
