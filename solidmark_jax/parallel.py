"""One device mesh with named axes, the shardings that go with it, and multi-host helpers.

Axes: "data" (pure data parallelism: parameters replicated) and "fsdp" (data parallel too, but
parameters and optimizer state are sharded over it, ZeRO-3 style). The batch is split over both.

The device grid comes from `jax.experimental.mesh_utils`: `create_device_mesh` lays the axes over
the chips' physical topology on TPU (ICI neighbours on the fsdp axis, whose all-gathers are the
heaviest traffic), and `create_hybrid_device_mesh` spans several TPU slices with the data axis over
the data-centre network (DCN, `mesh.dcn_data` slices): only gradient all-reduces cross slices.
"""

from __future__ import annotations

from typing import Any

import ml_collections
import numpy as np
import jax
from jax.experimental import mesh_utils, multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from numpy.typing import ArrayLike

DATA_AXES = ("data", "fsdp")


def mesh_shape(n: int, data: int = -1, fsdp: int = 1) -> tuple[int, int]:
  """(data, fsdp) for n devices; -1 takes what the other axis leaves. A clear error if it does not fit."""
  if data == -1 and fsdp == -1:
    raise ValueError("mesh: at most one of mesh.data and mesh.fsdp may be -1")
  if data == -1:
    data = n // fsdp if fsdp > 0 and n % fsdp == 0 else 0
  if fsdp == -1:
    fsdp = n // data if data > 0 and n % data == 0 else 0
  if data * fsdp != n:
    raise ValueError(f"mesh: mesh.data x mesh.fsdp must equal the {n} devices, got {data} x {fsdp}")
  return data, fsdp


def device_grid(devices: Any, data: int, fsdp: int, dcn_data: int = 1) -> np.ndarray:
  """The [data, fsdp] array of devices for a mesh (see the module docstring).

  Args:
    devices: every (global) device, e.g. `jax.devices()`.
    data: data-axis size over all slices.
    fsdp: fsdp-axis size (within one slice).
    dcn_data: slices the data axis spans (multi-slice TPU); each slice then holds data / dcn_data
      rows of the grid. Devices are grouped by `slice_index` (TPU), else by process.

  Raises:
    ValueError: sizes that do not fit the devices or slices, naming the config fields.
  """
  devices = list(devices)
  if dcn_data < 1 or data % dcn_data:
    raise ValueError(f"mesh.dcn_data={dcn_data} must be >= 1 and divide the data axis ({data})")
  if dcn_data == 1:
    return mesh_utils.create_device_mesh((data, fsdp), devices)
  by_process = not hasattr(devices[0], "slice_index")
  try:
    return mesh_utils.create_hybrid_device_mesh((data // dcn_data, fsdp), (dcn_data, 1), devices,
                                                process_is_granule=by_process)
  except ValueError as e:
    unit = "processes" if by_process else "slices"
    raise ValueError(f"mesh.dcn_data={dcn_data}: the devices do not form {dcn_data} {unit} of "
                     f"{data // dcn_data} x {fsdp} devices each ({e})") from e


def make_mesh(data: int = -1, fsdp: int = 1, devices: Any = None, dcn_data: int = 1) -> Mesh:
  """A ("data", "fsdp") mesh over all (global) devices; -1 takes what the other axis leaves.

  On CPU (and GPU, by device id) the grid keeps `jax.devices()` order, so each process owns a
  contiguous block of the batch; on TPU it follows the physical topology; `dcn_data` > 1 spans
  that many slices with the data axis.
  """
  devices = list(jax.devices() if devices is None else devices)
  data, fsdp = mesh_shape(len(devices), data, fsdp)
  return Mesh(device_grid(devices, data, fsdp, dcn_data), ("data", "fsdp"))


def mesh_for_config(mesh_cfg: ml_collections.ConfigDict, devices: Any = None) -> Mesh:
  """`make_mesh` from the config's `mesh` section (data, fsdp, dcn_data)."""
  return make_mesh(mesh_cfg.data, mesh_cfg.fsdp, devices, int(mesh_cfg.get("dcn_data", 1)))


def per_device_bytes(tree: Any, shardings: Any) -> int:
  """Bytes one device holds of a pytree of arrays or ShapeDtypeStructs placed with `shardings`.

  The largest over devices (an uneven split cannot occur here: FSDP shards only divisible axes).
  Computed from shapes alone: nothing is allocated.
  """
  total = 0
  for x, s in zip(jax.tree.leaves(tree), jax.tree.leaves(shardings)):
    total += int(np.prod(s.shard_shape(x.shape), dtype=np.int64)) * np.dtype(x.dtype).itemsize
  return total


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) axis split over every device."""
  return NamedSharding(mesh, P(DATA_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def fsdp_spec(shape: tuple[int, ...], fsdp_size: int, min_size: int = 2**12) -> P:
  """Shards the largest axis divisible by the fsdp size; small or indivisible arrays replicate."""
  if fsdp_size <= 1 or int(np.prod(shape, dtype=np.int64)) < min_size:
    return P()
  for axis in np.argsort(shape)[::-1]:
    if shape[axis] % fsdp_size == 0:
      spec = [None] * len(shape)
      spec[axis] = "fsdp"
      return P(*spec)
  return P()


def state_shardings(mesh: Mesh, abstract_tree: Any) -> Any:
  """NamedShardings for a pytree of arrays (or ShapeDtypeStructs): FSDP over "fsdp", else replicated."""
  size = mesh.shape["fsdp"]

  def one(x):
    shape = getattr(x, "shape", ())
    return NamedSharding(mesh, fsdp_spec(shape, size) if len(shape) else P())

  return jax.tree.map(one, abstract_tree)


def check_batch_size(global_batch: int, mesh: Mesh, what: str = "train.batch_size") -> None:
  """The one check of a global batch size: divisible by the mesh's devices and by the processes.

  Args:
    global_batch: the batch size over all processes.
    mesh: the mesh the batch is split over.
    what: the config field it comes from, named in the error (e.g. "eval.batch_size").

  Raises:
    ValueError: naming `what`, the size and the device or process count it must divide by.
  """
  n = mesh.size
  if global_batch % n:
    raise ValueError(f"{what}={global_batch} must be divisible by the {n} devices of the mesh")
  if global_batch % jax.process_count():
    raise ValueError(f"{what}={global_batch} must be divisible by the {jax.process_count()} processes")


def process_slice(global_batch: int) -> slice:
  """Rows of a global batch that this process loads (contiguous, in process order)."""
  per = global_batch // jax.process_count()
  i = jax.process_index()
  return slice(i * per, (i + 1) * per)


def global_batch(mesh: Mesh, local_tree: Any) -> Any:
  """Assembles process-local batch rows into global arrays sharded over the batch axes."""
  sharding = batch_sharding(mesh)
  return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)),
                      local_tree)


def to_host(tree: Any) -> Any:
  """The one gather to host: a (possibly sharded, multi-host) array, or a pytree of them, as numpy on every host.

  A fully addressable array (one process) is copied to host; a multi-host one is all-gathered, so
  every process must call this at the same point.
  """
  def one(x) -> np.ndarray:
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
      return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)

  return jax.tree.map(one, tree)


def broadcast_from_main(x: ArrayLike) -> np.ndarray:
  """The one broadcast: process 0's host value (array or scalar) as numpy on every process.

  Every process must call it at the same point with a value of the same shape and dtype (what the
  others pass is ignored): process 0 decides (a lock taken, a file checked, what is left to do) and
  the others follow. With one process: `np.asarray(x)`.
  """
  if jax.process_count() == 1:
    return np.asarray(x)
  return np.asarray(multihost_utils.broadcast_one_to_all(np.asarray(x)))


def broadcast_ids(ids: ArrayLike) -> np.ndarray:
  """Process 0's int64 id array [n] on every process (the others pass None, or anything).

  Every process must call it at the same point: process 0 decides (e.g. which ids are left to do
  after a resume, read from its store) and the others follow. With one process: `ids` as int64.
  The ids travel as pairs of int32 words: without `jax_enable_x64`, JAX would cast int64 to int32
  and silently wrap ids >= 2**31.
  """
  if jax.process_count() == 1:
    if ids is None:
      raise ValueError("broadcast_ids: process 0 must pass the ids, got None")
    return np.asarray(ids, np.int64).reshape(-1)
  is_main = jax.process_index() == 0
  if is_main and ids is None:
    raise ValueError("broadcast_ids: process 0 must pass the ids, got None")
  mine = np.ascontiguousarray(np.asarray(ids, np.int64).reshape(-1)) if is_main else None
  n = int(broadcast_from_main(np.int32(len(mine) if is_main else 0)))
  words = (mine if is_main else np.zeros(n, np.int64)).view(np.int32)  # [2n], the same shape everywhere
  words = np.ascontiguousarray(broadcast_from_main(words), np.int32)
  return words.view(np.int64).copy()  # [n]


def initialize_distributed(coordinator_address: str | None, num_processes: int | None,
                           process_id: int | None) -> None:
  """Starts `jax.distributed` when a coordinator is given (CPU processes use gloo collectives).

  On TPU pods and SLURM/GPU clusters `jax.distributed.initialize()` finds its peers by itself:
  pass coordinator_address="auto".
  """
  if not coordinator_address:
    return
  if coordinator_address == "auto":
    jax.distributed.initialize()
    return
  if jax.config.jax_platforms in (None, "", "cpu") or str(jax.config.jax_platforms).startswith("cpu"):
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                             process_id=process_id)


def pad_rows(arrays: Any, size: int) -> Any:
  """Pads each array's rows to `size` by repeating its last row (a tuple in, a tuple out; one array, one array).

  Every batch of an evaluation, the ragged last one included, then has one shape: one compilation.
  """
  one = not isinstance(arrays, (tuple, list))
  arrays = (arrays,) if one else tuple(arrays)
  out = tuple(np.concatenate([a, np.repeat(a[-1:], size - len(a), axis=0)]) if size > len(a) else a for a in arrays)
  return out[0] if one else out
