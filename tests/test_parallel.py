"""Sharded training on 8 fake CPU devices: same numbers on every mesh, real shards."""
import jax
import ml_collections
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import helpers
from biofm_jax import parallel

pytestmark = pytest.mark.devices(8)  # meshes of up to 8 devices (tests/conftest.py)

MESHES = [(8, 1, 1), (2, 4, 1), (2, 2, 2)]
STEPS = 10
SPEC = "configs/ehr_bert.py:tiny"


def overrides(meds_path, num_steps=STEPS):
  # Dropout on, so the agreement covers how random bits are drawn under sharding too.
  return dict(data__ehr__path=str(meds_path), model__dropout_rate=0.1, **helpers.constant_lr_overrides(num_steps))


@pytest.fixture(scope="module")
def runs(synthetic_meds, tmp_path_factory):
  return helpers.train_on_meshes(SPEC, MESHES, tmp_path_factory.mktemp, **overrides(synthetic_meds))


def test_losses_and_parameters_agree_across_meshes(runs):
  helpers.assert_runs_agree(runs, atol=1e-5)
  losses = helpers.train_losses(runs[MESHES[0]][0])
  assert len(losses) == STEPS and losses[STEPS] < losses[1]


def test_parameters_are_sharded_as_the_rules_say(synthetic_meds, tmp_path):
  from biofm_jax.modalities import registry
  from biofm_jax.train.build import build_training

  config = helpers.config_for(SPEC, **overrides(synthetic_meds), **helpers.mesh_overrides((2, 2, 2)))
  data = registry.open_data_module("ehr", config.data.ehr, objective="masked", artifacts_dir=tmp_path)
  state = build_training(config, data).init_state(seed=0)
  params = state.params

  def shard_shape(x):
    return x.addressable_shards[0].data.shape

  # MLP in: ("layers", "embed", "mlp") -> (None, fsdp, tensor)
  wi = params["transformer"]["layers"]["mlp"]["wi"]["kernel"]
  assert wi.sharding.spec == P(None, "fsdp", "tensor")
  assert shard_shape(wi) == (wi.shape[0], wi.shape[1] // 2, wi.shape[2] // 2)
  # Attention query: ("layers", "embed", "heads", "kv") -> (None, fsdp, tensor, None)
  q = params["transformer"]["layers"]["attention"]["query"]["kernel"]
  assert q.sharding.spec == P(None, "fsdp", "tensor", None)
  assert shard_shape(q) == (q.shape[0], q.shape[1] // 2, q.shape[2] // 2, q.shape[3])
  # Code embedding: ("vocab", "embed") -> (tensor, fsdp)
  emb = params["ehr_encoder"]["code_embedding"]["embedding"]
  # A vocabulary that does not split evenly over the tensor axis is replicated along it.
  vocab_axis = "tensor" if emb.shape[0] % 2 == 0 else None
  assert emb.sharding.spec == P(vocab_axis, "fsdp")
  assert shard_shape(emb) == (emb.shape[0] // (2 if vocab_axis else 1), emb.shape[1] // 2)
  # Optimiser moments shard like their parameters.
  mu = state.opt_state[1][0].mu["transformer"]["layers"]["mlp"]["wi"]["kernel"]
  assert mu.sharding.spec == wi.sharding.spec
  # Norm scales are ("layers", "embed"): split over fsdp only.
  scale = params["transformer"]["layers"]["mlp_norm"]["scale"]
  assert shard_shape(scale) == (scale.shape[0], scale.shape[1] // 2)


def test_checkpoint_from_one_mesh_resumes_on_another(runs, synthetic_meds, tmp_path):
  """Steps 1-10 on (8,1,1), then 11-20 on (2,4,1) == 20 steps on (8,1,1)."""
  import shutil
  moved = tmp_path / "moved"
  shutil.copytree(runs[(8, 1, 1)][0], moved)
  helpers.train(helpers.config_for(SPEC, **overrides(synthetic_meds, 2 * STEPS), **helpers.mesh_overrides((2, 4, 1))),
                moved)
  reference_dir = tmp_path / "reference"
  helpers.train(helpers.config_for(SPEC, **overrides(synthetic_meds, 2 * STEPS), **helpers.mesh_overrides((8, 1, 1))),
                reference_dir)
  resumed_curve = {s: l for s, l in helpers.train_losses(moved).items() if s > STEPS}
  reference_curve = {s: l for s, l in helpers.train_losses(reference_dir).items() if s > STEPS}
  assert len(reference_curve) == STEPS
  helpers.assert_curves_close(resumed_curve, reference_curve, atol=1e-5)


def test_mesh_shape_errors_name_the_problem():
  import ml_collections
  cfg = ml_collections.ConfigDict(dict(data=3, fsdp=1, tensor=1))
  with pytest.raises(ValueError, match="needs 3 devices, but 8"):
    parallel.mesh_shape(cfg, 8)
  cfg = ml_collections.ConfigDict(dict(data=-1, fsdp=-1, tensor=1))
  with pytest.raises(ValueError, match="at most one"):
    parallel.mesh_shape(cfg, 8)
  assert parallel.mesh_shape(ml_collections.ConfigDict(dict(data=-1, fsdp=2, tensor=2)), 8) == (2, 2, 2)


def test_dimensions_that_do_not_divide_the_mesh_are_replicated():
  import flax.linen as nn
  import ml_collections
  mesh_cfg = ml_collections.ConfigDict(dict(data=2, fsdp=2, tensor=2, rules=parallel.DEFAULT_RULES))
  mesh, rules = parallel.make_mesh(mesh_cfg), parallel.logical_rules(mesh_cfg)
  boxed = {"odd": nn.LogicallyPartitioned(jax.ShapeDtypeStruct((9, 8), np.float32), ("vocab", "embed")),
           "even": nn.LogicallyPartitioned(jax.ShapeDtypeStruct((10, 8), np.float32), ("vocab", "embed"))}
  shardings = parallel.logical_shardings(boxed, mesh, rules)
  assert shardings["odd"].spec == P(None, "fsdp") and shardings["even"].spec == P("tensor", "fsdp")


@pytest.mark.parametrize("rows_by_process, expected", [
    ({0: (0, 1), 1: (2, 3)}, {0: (0, 2), 1: (1, 2)}),  # batch axes span the processes
    ({0: (0, 1), 1: (0, 1)}, {0: (0, 1), 1: (0, 1)}),  # tensor spans them: both read the same
    ({0: (0,), 1: (1,), 2: (0,), 3: (1,)}, {0: (0, 2), 1: (1, 2), 2: (0, 2), 3: (1, 2)}),
])
def test_processes_holding_the_same_batch_rows_read_the_same_examples(rows_by_process, expected):
  assert parallel.shard_layout(rows_by_process) == expected


@pytest.mark.parametrize("rows_by_process", [{0: (0, 1), 1: (1, 2)}, {0: (0,), 1: (1, 2)}, {0: (0, 2), 1: (1, 3)}])
def test_overlapping_unequal_or_scattered_batch_rows_are_refused(rows_by_process):
  with pytest.raises(ValueError, match="overlapping, unequal or scattered"):
    parallel.shard_layout(rows_by_process)


def test_one_process_reads_the_whole_batch_on_any_mesh():
  for shape in ((8, 1, 1), (2, 2, 2), (1, 1, 8)):
    mesh = parallel.make_mesh(ml_collections.ConfigDict(dict(zip(parallel.MESH_AXES, shape))))
    assert parallel.data_shard(mesh) == (0, 1)


# The other objectives on the meshes that split their parameters most differently: MAE over
# ECG patches, next-event with the gap head, and MOTOR's time-to-event head over packed rows.
@pytest.mark.parametrize("spec, overrides_of", [
    ("configs/ecg_mae.py:tiny", lambda meds: {}),
    ("configs/ehr_gpt.py:tiny", lambda meds: dict(data__ehr__path=str(meds))),
    ("configs/ehr_motor.py:tiny", lambda meds: dict(data__ehr__path=str(meds), data__ehr__pack=True))],
    ids=["ecg-mae", "ehr-next-event", "ehr-time-to-event-packed"])
def test_every_objective_agrees_across_meshes(spec, overrides_of, synthetic_meds, tmp_path_factory):
  runs = helpers.train_on_meshes(spec, [(8, 1, 1), (2, 2, 2)], tmp_path_factory.mktemp,
                                 **helpers.constant_lr_overrides(6), **overrides_of(synthetic_meds))
  helpers.assert_runs_agree(runs, atol=1e-5)
