"""The jitted train step: gradient accumulation is exact; a run leaves its metrics behind."""
import logging

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

import helpers
from biofm_jax import parallel
from biofm_jax.modalities.registry import build_model
from biofm_jax.modalities.registry import build_objective
from biofm_jax.train import state as state_lib
from biofm_jax.train import step as step_lib
from biofm_jax.train.metric_writer import MetricMeans, MetricWriter, read_metrics, tensorboard_tag
from test_models import L, V, K, make_batch, model_config


def run_steps(accum_steps, mesh_shape, batches):
  cfg = model_config()
  cfg.train = helpers.config_for("configs/ehr_bert.py:tiny").train
  mesh_cfg = ml_collections.ConfigDict(dict(data=mesh_shape[0], fsdp=mesh_shape[1], tensor=mesh_shape[2],
                                            rules=parallel.DEFAULT_RULES))
  mesh, rules = parallel.make_mesh(mesh_cfg), parallel.logical_rules(mesh_cfg)
  model = build_model(cfg, {"ehr": dict(vocab_size=V, num_value_bins=K, max_len=L)})
  objective, tx = build_objective(cfg.objective), state_lib.make_optimizer(cfg.train)
  example = jax.tree.map(lambda x: x[:4], batches[0])
  _, shardings = state_lib.abstract_state(model, tx, example, mesh, rules)
  state = state_lib.create_sharded_state(model, tx, example, mesh, rules, seed=0)
  step = step_lib.jit_train_step(model, tx, objective, state_lib.learning_rate_schedule(cfg.train), shardings,
                                 mesh, rules, accum_steps)
  losses = []
  for batch in batches:
    state, metrics = step(state, parallel.make_global_batch(batch, mesh))
    losses.append(float(metrics["loss"]))
  return np.array(losses), jax.tree.map(np.asarray, state.params)


@pytest.mark.devices(8)  # a mesh of up to 8 devices (tests/conftest.py)
def test_gradient_accumulation_equals_the_full_batch_update():
  # 16 examples per batch with uneven numbers of masked positions per example, so a
  # per-micro-batch mean would differ from the full-batch mean.
  batches = []
  for seed in range(3):
    parts = [make_batch(seed * 10 + i, length=4 + 2 * i) for i in range(4)]
    batches.append(jax.tree.map(lambda *xs: np.concatenate(xs), *parts))
  reference_losses, reference_params = run_steps(1, (8, 1, 1), batches)
  for accum, mesh in [(2, (4, 2, 1)), (4, (2, 2, 2))]:
    losses, params = run_steps(accum, mesh, batches)
    np.testing.assert_allclose(losses, reference_losses, atol=1e-6)
    helpers.assert_trees_close(params, reference_params, atol=1e-6)
  assert reference_losses[-1] < reference_losses[0]


def test_a_run_writes_metrics_tensorboard_and_artifacts(synthetic_meds, tmp_path):
  config = helpers.config_for("configs/ehr_bert.py:tiny", data__ehr__path=str(synthetic_meds),
                              train__num_steps=10, train__log_every=5, train__eval_every=10)
  summary = helpers.train(config, tmp_path)
  records = read_metrics(tmp_path)
  train = [r for r in records if "train/loss" in r]
  assert [r["step"] for r in train] == [5, 10]
  for key in ("train/learning_rate", "train/grad_norm", "perf/examples_per_s", "perf/tokens_per_s", "perf/mfu"):
    assert np.isfinite(train[-1][key]), key
  assert train[-1]["perf/tokens_per_s"] == pytest.approx(train[-1]["perf/examples_per_s"] * 32, rel=1e-9)  # max_len each
  evals = [r for r in records if "eval/loss" in r]
  assert [r["step"] for r in evals] == [10] and summary["eval/loss"] == evals[0]["eval/loss"]
  assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
  assert (tmp_path / "artifacts" / "ehr_vocab.json").exists()
  assert summary["reference/unigram_code_loss"] > 0


def test_eval_every_zero_trains_without_any_evaluation(synthetic_meds, tmp_path):
  config = helpers.config_for("configs/ehr_bert.py:tiny", data__ehr__path=str(synthetic_meds),
                              train__num_steps=4, train__log_every=2, train__eval_every=0)
  summary = helpers.train(config, tmp_path)
  records = read_metrics(tmp_path)
  assert [r["step"] for r in records if "train/loss" in r] == [2, 4]
  assert not [key for r in records for key in r if key.startswith(("eval/", "retrieval/"))]
  assert summary["steps"] == 4 and not [k for k in summary if k.startswith(("eval/", "reference/"))]
  # Each line holds the means of the steps since the previous one (the learning rate: its own step's).
  config.train.log_every = 1
  helpers.train(config, tmp_path / "every_step")
  every_step = [r for r in read_metrics(tmp_path / "every_step") if "train/loss" in r]
  for line, steps in zip([r for r in records if "train/loss" in r], (every_step[:2], every_step[2:])):
    for key in ("train/loss", "train/grad_norm"):
      assert line[key] == pytest.approx(np.mean([r[key] for r in steps]), rel=1e-6), key
    assert line["train/learning_rate"] == pytest.approx(steps[-1]["train/learning_rate"], rel=1e-6)
  assert every_step[0]["train/loss"] != pytest.approx(every_step[1]["train/loss"], rel=1e-3)  # not a constant


def test_metric_means_average_each_metric_over_the_steps_that_reported_it():
  means = MetricMeans()
  means.add({"loss": jnp.float32(2.0), "ehr/loss": jnp.float32(4.0), "learning_rate": jnp.float32(0.1)})
  means.add({"loss": jnp.float32(1.0), "imaging/loss": jnp.float32(0.5), "learning_rate": jnp.float32(0.2)})
  means.add({"loss": jnp.float32(3.0), "ehr/loss": jnp.float32(1.0), "learning_rate": jnp.float32(0.3)})
  assert means.pop() == pytest.approx({"loss": 2.0, "ehr/loss": 2.5, "imaging/loss": 0.5, "learning_rate": 0.3})
  means.add({"loss": jnp.float32(7.0)})
  assert means.pop() == {"loss": 7.0}  # a new window after each pop


def test_a_held_learning_rate_leaves_num_steps_out_of_the_program():
  """final_lr_fraction=1: warm-up then the peak, the same values as the cosine form, and a
  program that is the same for every run length (so a short run is an exact prefix)."""
  def schedule(num_steps, fraction):
    return state_lib.learning_rate_schedule(ml_collections.ConfigDict(dict(
        learning_rate=3e-3, warmup_steps=5, num_steps=num_steps, final_lr_fraction=fraction)))

  steps = jnp.arange(40)
  cosine = optax.warmup_cosine_decay_schedule(0.0, 3e-3, 5, 30, 3e-3)
  np.testing.assert_array_equal(jax.vmap(schedule(30, 1.0))(steps), jax.vmap(cosine)(steps))
  program = lambda n, fraction: jax.jit(schedule(n, fraction)).lower(jnp.int32(0)).as_text()
  assert program(8, 1.0) == program(300, 1.0)
  assert program(8, 0.1) != program(300, 0.1)


def test_metric_names_become_tensorboard_tags_without_rewrites(tmp_path, caplog):
  assert tensorboard_tag("retrieval/ehr->imaging/recall@10") == "retrieval/ehr_to_imaging/recall_at_10"
  assert tensorboard_tag("train/contrastive/ehr_imaging_top1") == "train/contrastive/ehr_imaging_top1"
  writer = MetricWriter(tmp_path)
  with caplog.at_level(logging.INFO):
    writer.write(3, {"retrieval/ehr->imaging/recall@10": 0.5, "eval/loss": 1.25})
  writer.close()
  assert not [r for r in caplog.records if "illegal" in r.getMessage()]
  # metrics.jsonl keeps the names as the run wrote them.
  assert read_metrics(tmp_path) == [{"step": 3, "retrieval/ehr->imaging/recall@10": 0.5, "eval/loss": 1.25}]


# Accumulation in whole runs of the other objectives (masked EHR is checked step by step above):
# mean-per-patch reconstruction and next-event terms must sum over micro-batches as over the batch.
@pytest.mark.devices(8)  # a mesh of up to 8 devices (tests/conftest.py)
@pytest.mark.parametrize("spec, extra", [("configs/imaging_mae.py:tiny", {}),
                                         ("configs/ehr_gpt.py:tiny", {"data__ehr__path": None})],
                         ids=["imaging-mae", "ehr-next-event"])
def test_gradient_accumulation_trains_as_the_full_batch_in_whole_runs(spec, extra, synthetic_meds, tmp_path):
  extra = {k: (str(synthetic_meds) if v is None else v) for k, v in extra.items()}
  runs = {}
  for accum in (1, 2):
    config = helpers.config_for(spec, **helpers.constant_lr_overrides(4), train__grad_accum_steps=accum,
                                mesh__data=2, mesh__fsdp=4, **extra)
    helpers.train(config, tmp_path / f"accum{accum}")
    runs[accum] = config
  helpers.assert_curves_close(helpers.train_losses(tmp_path / "accum2"), helpers.train_losses(tmp_path / "accum1"),
                              atol=1e-5)
  helpers.assert_trees_close(helpers.final_params(tmp_path / "accum2", runs[2]),
                             helpers.final_params(tmp_path / "accum1", runs[1]), atol=1e-5)
