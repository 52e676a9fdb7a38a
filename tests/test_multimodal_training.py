"""Multimodal pre-training end to end: sharding, resume with mixing, retrieval, bad configs."""
import functools
import json

import jax
import numpy as np
import pytest

import helpers
from biofm_jax import parallel
from biofm_jax.data import join_examples, multimodal
from biofm_jax.modalities import registry
from biofm_jax.train.build import build_training
from biofm_jax.train.loop import step_cost
from biofm_jax.objectives.retrieval import recall_at_k

SPEC = "configs/multimodal_fusion.py:tiny"
CONTRASTIVE_TERMS = ("ehr_imaging", "ehr_omics", "ehr_tabular", "imaging_tabular")


def metric_curve(workdir, name: str) -> dict[int, float]:
  rows = [json.loads(line) for line in open(workdir / "metrics.jsonl")]
  return {row["step"]: row[name] for row in rows if name in row}


@pytest.mark.devices(8)  # a mesh of up to 8 devices (tests/conftest.py)
def test_contrastive_loss_is_the_same_on_every_mesh(tmp_path):
  """Negatives come from the whole global batch on every mesh (test_fusion.py covers the
  other fusions' arithmetic; this is the sharded end-to-end run)."""
  # (2, 2, 2) shards the batch over data and fsdp and the towers over tensor at once.
  runs = helpers.train_on_meshes(SPEC, [(8, 1, 1), (2, 2, 2)], lambda name: tmp_path / name,
                                 **helpers.constant_lr_overrides(4))
  (reference_dir, _), *others = runs.values()
  for term in CONTRASTIVE_TERMS:
    reference = metric_curve(reference_dir, f"train/contrastive/{term}_contrastive")
    assert len(reference) == 4
    for workdir, _ in others:
      helpers.assert_curves_close(metric_curve(workdir, f"train/contrastive/{term}_contrastive"), reference,
                                  atol=1e-5)
  helpers.assert_runs_agree(runs, atol=1e-5, param_atol=1e-4)


@pytest.mark.parametrize("stream", [
    {"data__multimodal__mix_weights": "ehr=2,imaging=1,omics=1,tabular=1", "objective__contrastive__weight": 0.0},
    {"data__multimodal__sampling": "balanced", "data__multimodal__modality_dropout": 0.3},
    # Two modalities (three availability patterns, so at most three step programs to compile)
    # carry what this case checks: batches by pattern, and the images' device augmentation.
    {"data__multimodal__batching": "by_pattern", "data__imaging__augment": "device",
     "data__imaging__canvas_size": (40, 40), "data__multimodal__modalities": ("ehr", "imaging"),
     "objective__contrastive__pairs": "ehr-imaging"},
], ids=["mixed", "balanced_join_with_dropout", "by_pattern_with_device_augmentation"])
def test_resume_reproduces_the_uninterrupted_run(stream, tmp_path):
  helpers.assert_resume_reproduces(SPEC, tmp_path / "resumed", stop_at=3, num_steps=6, **stream)


def test_a_batch_by_pattern_trains_as_the_same_subjects_in_a_batch_of_every_modality(tmp_path):
  """Batching by pattern leaves absent modalities out of the batch: the train step's loss,
  metrics and update equal those of the same subjects with those modalities padded in."""
  config = helpers.config_for(SPEC, data__multimodal__batching="by_pattern", train__warmup_steps=0)
  data = registry.open_multimodal_data(config.data, objectives=config.objective, artifacts_dir=tmp_path)
  stream = iter(data.make_train_dataset(global_batch_size=config.data.batch_size, seed=0, process_index=0,
                                        process_count=1))
  by_pattern = next(b for b in stream if 1 < len(b) < len(data.modalities))
  padded = {m: by_pattern[m] if m in by_pattern else jax.tree.map(
      lambda x: np.stack([x] * config.data.batch_size), join_examples.absent_example(data.modules[m].example_spec()[m]))
      for m in data.modalities}
  setup = build_training(config, data)
  results = [setup.train_step(setup.init_state(config.seed), parallel.make_global_batch(b, setup.mesh))
             for b in (by_pattern, padded)]
  (state_a, metrics_a), (state_b, metrics_b) = jax.device_get(results)
  left_out = sorted(set(data.modalities) - set(by_pattern))
  assert metrics_a.keys() < metrics_b.keys() and metrics_a["loss"] > 0
  # Terms of left-out modalities (and their contrastive pairs) are not reported as a false 0.
  assert not [k for k in metrics_a if any(m in k for m in left_out)]
  for name, value in metrics_a.items():
    np.testing.assert_allclose(value, metrics_b[name], rtol=1e-5, atol=1e-6, err_msg=name)
  for path, a in jax.tree_util.tree_leaves_with_path(state_a.params):
    b = functools.reduce(lambda tree, key: tree[key.key], path, state_b.params)
    np.testing.assert_allclose(a, b, atol=1e-6, err_msg=jax.tree_util.keystr(path))
  flops = step_cost(setup.model, 16)
  assert flops(by_pattern)[1] < flops(padded)[1] == 16 * setup.model.flops_per_example()
  assert flops(by_pattern)[0] == 16 * sum(setup.model.modalities[i].num_tokens() for i, m in enumerate(
      sorted(data.modalities)) if m not in left_out)


def test_the_join_hands_image_augmentation_to_the_step(tmp_path):
  """With `augment="device"` the join's training batches carry canvas-size images and
  seeds (absent subjects padded to the same shapes), and its device transform makes them
  the model's images inside the step."""
  config = helpers.config_for(SPEC, data__imaging__augment="device", data__imaging__canvas_size=(40, 40))
  data = registry.open_multimodal_data(config.data, objectives=config.objective, artifacts_dir=tmp_path)
  first = next(iter(data.make_train_dataset(global_batch_size=16, seed=0, process_index=0, process_count=1)))
  images, present = first["imaging"]["image"], first["imaging"]["present"]
  assert images.shape == (16, 40, 40, 1) and first["imaging"]["augment_seed"].dtype == np.uint32
  assert 0 < present.sum() < 16 and not images[~present].any()  # both kinds of rows in this batch
  augmented = jax.jit(data.device_transform())(first)
  for m, spec in data.example_spec().items():
    for name, (shape, dtype) in spec.items():
      assert augmented[m][name].shape == (16,) + shape and augmented[m][name].dtype == dtype, (m, name)
  assert {m: set(x) for m, x in first.items() if m != "imaging"} == {m: set(x) for m, x in augmented.items()
                                                                    if m != "imaging"}
  setup = build_training(config, data)
  _, metrics = setup.train_step(setup.init_state(config.seed), parallel.make_global_batch(first, setup.mesh))
  assert np.isfinite(float(metrics["loss"])) and float(metrics["imaging/reconstruction_loss"]) > 0


def test_mixed_batches_hold_one_modality_per_example(tmp_path):
  config = helpers.config_for(SPEC, data__multimodal__mix_weights="ehr=1,imaging=1,omics=1,tabular=1",
                              objective__contrastive__weight=0.0)
  data = registry.open_multimodal_data(config.data, objectives=config.objective, artifacts_dir=tmp_path)
  batch = next(iter(data.make_train_dataset(global_batch_size=16, seed=0, process_index=0, process_count=1)))
  present = np.stack([batch[m]["present"] for m in data.modalities], axis=1)
  np.testing.assert_array_equal(present.sum(axis=1), 1)
  assert (present.sum(axis=0) > 0).all()


@pytest.mark.parametrize("overrides, message", [
    ({"data__ehr__path": "/somewhere/meds"}, r"data\.\{imaging,omics,tabular\}\.path is empty"),
    ({"data__multimodal__modalities": ("ehr", "proteomics")}, "data.multimodal.modalities"),
    ({"data__multimodal__mix_weights": "ehr=1,imaging=x"}, "data.multimodal.mix_weights"),
    ({"data__multimodal__mix_weights": "ehr=1"}, "data.multimodal.mix_weights"),
    ({"data__multimodal__mix_weights": "ehr=1,imaging=1,omics=1,tabular=1"}, "no example holds a pair"),
    ({"data__multimodal__modalities": ("ehr", "imaging")}, r"objective.contrastive.pairs names"),
])
def test_bad_multimodal_configs_are_clear_errors(overrides, message, tmp_path):
  config = helpers.config_for(SPEC, **overrides)
  with pytest.raises(ValueError, match=message):
    registry.open_multimodal_data(config.data, objectives=config.objective, artifacts_dir=tmp_path)


def test_contrastive_pairs_must_name_configured_modalities(tmp_path):
  config = helpers.config_for(SPEC, objective__contrastive__pairs="ehr-imaging,ehr-proteomics",
                              train__num_steps=1)
  with pytest.raises(ValueError, match="objective.contrastive"):
    helpers.train(config, tmp_path)


def test_recall_counts_ties_against_the_match():
  rng = np.random.default_rng(0)
  queries = rng.normal(size=(20, 8))
  assert recall_at_k(queries, queries, ks=(1,)) == {1: 1.0}
  collapsed = np.ones((20, 8))
  assert recall_at_k(collapsed, collapsed, ks=(1, 10)) == {1: 0.0, 10: 0.0}
  shuffled = recall_at_k(queries, queries[rng.permutation(20)], ks=(1, 5))
  assert shuffled[1] < 0.2 and shuffled[5] < 0.6
