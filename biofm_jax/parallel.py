"""Device mesh, logical-to-mesh axis rules, shardings and multi-process set-up.

The mesh and the rules are data from the config (`config.mesh`), not code paths:
mesh axes are `data`, `fsdp` and `tensor`; the batch is split over `data` x `fsdp`,
parameters over `fsdp` (and `tensor` for the heads/MLP/vocab dimensions) by the rules.
The same code runs on one CPU (a 1x1x1 mesh), 8 fake CPU devices, a GPU node or a pod.
"""
from __future__ import annotations

import functools
import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import ml_collections
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

# The default rules table: logical axis name -> mesh axis (or axes, or None = replicated).
DEFAULT_RULES = (
    ("batch", ("data", "fsdp")),
    ("length", None),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv", None),
    ("vocab", "tensor"),
    ("layers", None),
    ("patch", None),  # pixels of one image patch
    ("decoder_embed", None),  # width of the MAE decoder, small enough to replicate
    ("features", None),  # columns of a table
)


def mesh_shape(mesh_cfg: ml_collections.ConfigDict, num_devices: int) -> tuple[int, ...]:
  """Resolves the config's axis sizes; one axis may be -1 to take the remaining devices."""
  sizes = [int(mesh_cfg[axis]) for axis in MESH_AXES]
  if sizes.count(-1) > 1:
    raise ValueError(f"at most one of mesh.{MESH_AXES} may be -1, got {dict(zip(MESH_AXES, sizes))}")
  if -1 in sizes:
    known = math.prod(s for s in sizes if s != -1)
    if num_devices % known:
      raise ValueError(f"mesh {dict(zip(MESH_AXES, sizes))} does not divide {num_devices} devices")
    sizes[sizes.index(-1)] = num_devices // known
  if math.prod(sizes) != num_devices:
    raise ValueError(f"mesh {dict(zip(MESH_AXES, sizes))} needs {math.prod(sizes)} devices, "
                     f"but {num_devices} are available")
  return tuple(sizes)


def make_mesh(mesh_cfg: ml_collections.ConfigDict, devices: Sequence[Any] | None = None) -> Mesh:
  devices = list(devices if devices is not None else jax.devices())
  shape = mesh_shape(mesh_cfg, len(devices))
  # Auto axes: logical constraints act as hints. With Explicit axes they become assertions.
  return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES), devices=devices)


def logical_rules(mesh_cfg: ml_collections.ConfigDict) -> tuple[tuple[str, Any], ...]:
  rules = tuple((name, tuple(axes) if isinstance(axes, list) else axes) for name, axes in mesh_cfg.rules)
  for name, axes in rules:
    for axis in (axes if isinstance(axes, tuple) else (axes,)):
      if axis is not None and axis not in MESH_AXES:
        raise ValueError(f"mesh.rules maps {name!r} to unknown mesh axis {axis!r}; mesh axes: {MESH_AXES}")
  return rules


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) axis split over data x fsdp; other axes replicated."""
  return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def logical_shardings(boxed_tree: Any, mesh: Mesh, rules) -> Any:
  """Shardings for a tree whose leaves may be `nn.LogicallyPartitioned` boxes (e.g. from
  `jax.eval_shape(init)`); unannotated leaves are replicated. The result has the
  structure of the unboxed tree.

  A dimension the rules would split over mesh axes it does not divide evenly (a
  vocabulary of 9,999 codes over 2 tensor shards) is replicated instead: sizes come from
  the data, and a run must not fail because of them.
  """
  # Leaf by leaf over the boxed tree. In a partly frozen optimiser state a box may hold
  # optax's leafless MaskedNode instead of an array: it stays as it is (the unboxed tree has it too).
  def sharding(x):
    if isinstance(x, nn.LogicallyPartitioned) and not hasattr(x.value, "shape"):
      return x.value
    if isinstance(x, nn.LogicallyPartitioned):
      return _divisible(NamedSharding(mesh, nn.logical_to_mesh_axes(x.names, rules)), x.value.shape, mesh)
    return NamedSharding(mesh, P())
  return jax.tree.map(sharding, boxed_tree, is_leaf=lambda x: isinstance(x, nn.meta.AxisMetadata))


def _divisible(sharding: NamedSharding, shape: tuple[int, ...], mesh: Mesh) -> NamedSharding:
  spec = tuple(sharding.spec) + (None,) * (len(shape) - len(sharding.spec))
  def fits(size, axes):
    names = axes if isinstance(axes, tuple) else (axes,)
    return axes is None or size % math.prod(mesh.shape[a] for a in names) == 0
  return NamedSharding(mesh, P(*(axes if fits(size, axes) else None for size, axes in zip(shape, spec))))


def check_batch_divides_mesh(global_batch_size: int, mesh: Mesh, accum_steps: int) -> None:
  shards = math.prod(mesh.shape[a] for a in BATCH_AXES)
  if global_batch_size % (shards * accum_steps):
    raise ValueError(f"data.batch_size={global_batch_size} must be a multiple of the batch shards "
                     f"(mesh data x fsdp = {shards}) times train.grad_accum_steps={accum_steps}")


def make_global_batch(host_batch: Any, mesh: Mesh) -> Any:
  """Per-process numpy batch -> global `jax.Array`s sharded over the batch axes. Each
  process passes its data shard's rows (`data_shard`): processes sharing a shard pass the
  same rows."""
  sharding = batch_sharding(mesh)
  _, count = data_shard(mesh)
  def to_global(x):
    x = np.asarray(x)
    return jax.make_array_from_process_local_data(sharding, x, (x.shape[0] * count,) + x.shape[1:])
  return jax.tree.map(to_global, host_batch)


@functools.cache
def data_shard(mesh: Mesh) -> tuple[int, int]:
  """(index, count): which slice of every global batch this process reads, of how many.

  With the batch axes spanning every process this is (process index, process count). When
  another axis spans processes (tensor parallelism across hosts), processes whose devices
  hold the same batch rows form one shard and must read the same examples."""
  return shard_layout(batch_rows_by_process(mesh))[jax.process_index()]


def batch_rows_by_process(mesh: Mesh) -> dict[int, tuple[int, ...]]:
  """process index -> the batch-shard rows (0 .. data x fsdp - 1) its devices hold."""
  shards = math.prod(mesh.shape[a] for a in BATCH_AXES)
  rows: dict[int, set[int]] = {}
  for device, index in batch_sharding(mesh).devices_indices_map((shards,)).items():
    rows.setdefault(device.process_index, set()).update(range(*index[0].indices(shards)))
  return {process: tuple(sorted(r)) for process, r in rows.items()}


def shard_layout(rows_by_process: dict[int, tuple[int, ...]]) -> dict[int, tuple[int, int]]:
  """process -> (data shard index, shard count): processes holding the same rows share a
  shard; shards must be disjoint, equal and contiguous (each process feeds one block)."""
  distinct = sorted(set(rows_by_process.values()))
  flat = [row for rows in distinct for row in rows]
  contiguous = all(rows == tuple(range(rows[0], rows[0] + len(rows))) for rows in distinct)
  if len(flat) != len(set(flat)) or len({len(rows) for rows in distinct}) != 1 or not contiguous:
    raise ValueError(f"mesh: processes hold overlapping, unequal or scattered parts of the batch "
                     f"(process -> batch rows: {rows_by_process}); order the mesh's devices so that "
                     f"each process holds one contiguous block of the data x fsdp axes")
  return {process: (distinct.index(rows), len(distinct)) for process, rows in rows_by_process.items()}


def initialize_distributed(coordinator_address: str | None, num_processes: int | None,
                           process_id: int | None) -> None:
  """Joins a multi-process run. No-op for a single process (no coordinator given)."""
  if coordinator_address:
    jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                               process_id=process_id)
