"""The checkpoint's state handler: small replicated arrays are written whole (no per-replica
slicing programs), large ones still split, and steps written by Orbax's standard handler
(as earlier versions of this library wrote them) restore exactly."""
import logging

import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from biofm_jax.train import checkpoint

pytestmark = pytest.mark.devices(8)  # meshes of up to 8 devices (tests/conftest.py)


def make_state():
  mesh = jax.make_mesh((8,), ("data",))
  replicated, split = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
  big = checkpoint.MIN_REPLICA_SLICE_BYTES * 8 // 4 + 8 * 3  # float32 elements: slices just over the bound
  return {"small": jax.device_put(jnp.arange(64 * 5, dtype=jnp.float32).reshape(64, 5), replicated),
          "sharded": jax.device_put(jnp.arange(16.0), split),
          "big": jax.device_put(jnp.arange(big, dtype=jnp.float32), replicated),
          "step": jax.device_put(jnp.int32(7), replicated)}


def abstract(state):
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)


def data_iterator():
  return iter(grain.MapDataset.range(10).to_iter_dataset())


def assert_restored(restored, state):
  for key, value in state.items():
    np.testing.assert_array_equal(np.asarray(restored[key]), np.asarray(value), err_msg=key)
    assert restored[key].sharding == value.sharding, key


def test_small_replicated_arrays_are_saved_without_compiling_slices(tmp_path, caplog):
  state = make_state()
  small_only = {k: state[k] for k in ("small", "sharded", "step")}
  writer = checkpoint.Checkpointer(tmp_path / "small", keep=2, async_save=False)
  with jax.log_compiles(True), caplog.at_level(logging.WARNING):
    writer.save(1, small_only, data_iterator(), ml_collections.ConfigDict({"seed": 0}), force=True)
  writer.close()
  compiled = [r.getMessage() for r in caplog.records if "Compiling" in r.getMessage()]
  assert not compiled, compiled
  # The large replicated array is still split among its replicas, and everything restores.
  writer = checkpoint.Checkpointer(tmp_path / "all", keep=2, async_save=False)
  writer.save(3, state, data_iterator(), ml_collections.ConfigDict({"seed": 0}), force=True)
  writer.close()
  reader = checkpoint.Checkpointer(tmp_path / "all", keep=2)
  step, restored = reader.restore_latest(abstract(state), data_iterator())
  reader.close()
  assert step == 3
  assert_restored(restored, state)


def test_a_step_written_by_orbaxs_standard_handler_restores_exactly(tmp_path):
  state = make_state()
  manager = ocp.CheckpointManager(tmp_path, options=ocp.CheckpointManagerOptions(create=True))
  iterator = data_iterator()
  next(iterator), next(iterator)
  manager.save(5, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                          data=grain.checkpoint.CheckpointSave(iterator),
                                          config=ocp.args.JsonSave({"seed": 0})))
  manager.close()
  reader = checkpoint.Checkpointer(tmp_path, keep=2)
  resumed = data_iterator()
  step, restored = reader.restore_latest(abstract(state), resumed)
  reader.close()
  assert step == 5 and next(resumed) == 2
  assert_restored(restored, state)
