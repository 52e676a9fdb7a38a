"""Task heads, downstream losses (survival with censoring) and LoRA adapters."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from lifelines.utils import concordance_index

import helpers
from biofm_jax.config import apply_model_size, base_config
from biofm_jax.data import batch as B
from biofm_jax.data.labels import TaskInfo
from biofm_jax.modalities.registry import build_model
from biofm_jax.models.task import BACKBONE_LABEL, INPUT_MEAN, INPUT_SCALE, LoRAModel, TaskModel, trainable
from biofm_jax.objectives import logistic_hazard
from biofm_jax.objectives.supervised import SupervisedObjective, predictions
from biofm_jax.train import state as state_lib

EDGES = (0.0, 10.0, 20.0, 40.0, 80.0)


def test_discrete_time_likelihood_matches_a_by_hand_computation():
  rng = np.random.default_rng(0)
  z = rng.normal(size=(5, 4))
  times = np.array([5.0, 15.0, 25.0, 100.0, 10.0])
  events = np.array([True, False, True, False, True])
  got = np.asarray(logistic_hazard.negative_log_likelihood(jnp.asarray(z), jnp.asarray(times), jnp.asarray(events), EDGES))
  h = 1 / (1 + np.exp(-z))
  expected = []
  for i, (t, e) in enumerate(zip(times, events)):
    j = np.searchsorted(EDGES, t, side="right") - 1  # 4 = past the horizon: survived all 4 intervals
    ll = np.log(1 - h[i, :j]).sum() + (np.log(h[i, j]) if e and j < 4 else 0.0)
    expected.append(-ll)
  np.testing.assert_allclose(got, expected, rtol=1e-5)
  # A subject censored in the first interval carries no information: zero loss, zero gradient.
  grad = jax.grad(lambda z: logistic_hazard.negative_log_likelihood(z, jnp.array([5.0]), jnp.array([False]), EDGES).sum())(
      jnp.asarray(z[:1]))
  assert float(jnp.abs(grad).sum()) == 0.0
  # The last interval is closed: an event at the horizon (the last training event) is an event in it.
  at_horizon = logistic_hazard.negative_log_likelihood(jnp.asarray(z[:1]), jnp.array([80.0]), jnp.array([True]), EDGES)
  np.testing.assert_allclose(at_horizon, [-(np.log(1 - h[0, :3]).sum() + np.log(h[0, 3]))], rtol=1e-5)
  past = logistic_hazard.negative_log_likelihood(jnp.asarray(z[:1]), jnp.array([81.0]), jnp.array([True]), EDGES)
  np.testing.assert_allclose(past, [-np.log(1 - h[0]).sum()], rtol=1e-5)  # past it: survived all four
  curve = logistic_hazard.survival_curve(z)
  assert (np.diff(curve, axis=1) <= 0).all() and np.allclose(curve[:, -1], np.exp(-logistic_hazard.risk_score(z)))


@pytest.mark.parametrize("censor_fraction", [0.0, 0.85])
def test_a_survival_head_recovers_a_planted_hazard_under_heavy_censoring(censor_fraction):
  rng = np.random.default_rng(1)
  n, d = 3000, 6
  x = rng.normal(size=(n, d)).astype(np.float32)
  risk = x @ np.array([1.5, -1.2, 0.8, 0, 0, 0])
  event_time = rng.exponential(100 * np.exp(-risk))
  follow_up = rng.uniform(20, 400, n)
  follow_up = np.where(rng.random(n) < censor_fraction, follow_up * rng.uniform(0.005, 0.05, n), follow_up)
  time, event = np.maximum(np.minimum(event_time, follow_up), 0.5).astype(np.float32), event_time <= follow_up
  edges = tuple(np.concatenate([[0.0], np.quantile(time[event], [0.2, 0.4, 0.6, 0.8, 1.0])]).tolist())
  objective = SupervisedObjective("survival", len(edges) - 1, edges)
  train, test = slice(0, 2000), slice(2000, None)
  batch = {B.TASK: {B.VALID: np.ones(2000, bool), B.TASK_TIME: time[train], B.TASK_EVENT: event[train]}}
  params = {"w": jnp.zeros((d, len(edges) - 1)), "b": jnp.zeros(len(edges) - 1)}

  def loss(p):
    outputs = {"task": {"logits": x[train] @ p["w"] + p["b"]}}
    return objective.sums(outputs, batch)["task_loss"] / objective.counts(batch)["task_loss"]
  tx = optax.adam(0.05)

  @jax.jit
  def step(p, opt):
    updates, opt = tx.update(jax.grad(loss)(p), opt)
    return optax.apply_updates(p, updates), opt
  opt = tx.init(params)
  for _ in range(300):
    params, opt = step(params, opt)
  scores = logistic_hazard.risk_score(np.asarray(x[test] @ params["w"] + params["b"]))
  c_index = concordance_index(time[test], -scores, event[test])
  oracle = concordance_index(time[test], -risk[test], event[test])  # the true hazard's ordering
  assert event.mean() < (0.3 if censor_fraction else 1.0)  # heavy: over 70% censored
  assert c_index > 0.75 and c_index > oracle - 0.02, (censor_fraction, c_index, oracle, event.mean())


def test_supervised_terms_ignore_padding_and_match_optax():
  logits = jnp.array([[2.0], [-1.0], [0.5], [3.0]])
  batch = {B.TASK: {B.VALID: np.array([True, True, True, False]),
                    B.TASK_LABEL: np.array([1.0, 0.0, 0.0, 1.0], np.float32)}}
  objective = SupervisedObjective("binary")
  sums, counts = objective.sums({"task": {"logits": logits}}, batch), objective.counts(batch)
  expected = optax.sigmoid_binary_cross_entropy(logits[:3, 0], batch[B.TASK][B.TASK_LABEL][:3]).sum()
  np.testing.assert_allclose(sums["task_loss"], expected, rtol=1e-6)
  assert float(counts["task_loss"]) == 3 and float(sums["accuracy"]) == 2


def _ehr_backbone():
  config = base_config()
  apply_model_size(config, "tiny")
  config.objective = ml_collections.ConfigDict(dict(name="masked"))
  return build_model(config, {"ehr": {"vocab_size": 40, "num_value_bins": 4, "max_len": 16}})


def _batch(n=4, seed=0):
  rng = np.random.default_rng(seed)
  ehr = {name: np.zeros((n,) + shape, dtype) for name, (shape, dtype) in B.ehr_example_spec(16, False).items()}
  ehr[B.EHR_CODES][:] = rng.integers(4, 40, (n, 16))
  ehr[B.EHR_MASK][:] = True
  return {"ehr": ehr, B.TASK: {B.VALID: np.ones(n, bool), B.TASK_LABEL: rng.integers(0, 2, n).astype(np.float32)}}


def test_lora_starts_as_the_task_model_and_trains_only_adapters_and_head():
  task = helpers.Jitted(TaskModel(_ehr_backbone(), ("ehr", "embedding"), 1))
  lora = helpers.Jitted(LoRAModel(task.module, rank=2, alpha=4.0))
  batch = _batch()
  variables = lora.init({"params": jax.random.key(0)}, batch)
  boxed = variables["params"]
  a = boxed["lora"]["transformer"]
  assert all(isinstance(x, nn.LogicallyPartitioned) for x in jax.tree.leaves(
      boxed["lora"], is_leaf=lambda x: isinstance(x, nn.meta.AxisMetadata)))
  params = nn.meta.unbox(boxed)
  plain = {k: v for k, v in params.items() if k != "lora"}
  np.testing.assert_allclose(lora.apply({"params": params}, batch)["task"]["logits"],
                             task.apply({"params": plain}, batch)["task"]["logits"], atol=1e-6)
  assert a  # adapters exist for the scanned attention/MLP kernels

  tx = state_lib.make_optimizer(ml_collections.ConfigDict(dict(
      learning_rate=1e-2, warmup_steps=1, num_steps=10, final_lr_fraction=1.0, adam_b1=0.9, adam_b2=0.99,
      weight_decay=0.1, grad_clip_norm=1.0)), trainable=trainable("lora"))
  opt = tx.init(params)
  objective = SupervisedObjective("binary")

  def loss(p):
    return objective.sums(lora.apply({"params": p}, batch), batch)["task_loss"]
  grad = jax.jit(jax.grad(loss))
  for _ in range(3):  # the zero-initialised head needs one step before adapters get a gradient
    updates, opt = tx.update(grad(params), opt, params)
    params = optax.apply_updates(params, updates)
  for path, before in jax.tree_util.tree_leaves_with_path(plain["backbone"]):
    after = params["backbone"]
    for key in path:
      after = after[key.key]
    np.testing.assert_array_equal(after, before, err_msg=jax.tree_util.keystr(path))
  lora_b = [x for path, x in jax.tree_util.tree_leaves_with_path(params["lora"]) if path[-1].key == "lora_b"]
  assert lora_b and all(float(jnp.abs(x).sum()) > 0 for x in lora_b)  # every adapter left zero
  moved = lora.apply({"params": params}, batch)["task"]["logits"]
  assert not np.allclose(moved, task.apply({"params": plain}, batch)["task"]["logits"])


def test_frozen_mode_cuts_the_backbone_gradient_and_full_mode_does_not():
  batch = _batch()
  objective = SupervisedObjective("binary")
  for frozen in (True, False):
    model = helpers.Jitted(TaskModel(_ehr_backbone(), ("ehr", "embedding"), 1, frozen_backbone=frozen))
    params = nn.meta.unbox(model.init({"params": jax.random.key(0)}, batch)["params"])
    params["head"]["kernel"] = jnp.full_like(params["head"]["kernel"], 0.1)  # as after a step (it starts at 0)
    grads = jax.jit(jax.grad(lambda p: objective.sums(model.apply({"params": p}, batch), batch)["task_loss"]))(params)
    backbone_norm = float(optax.global_norm(grads["backbone"]))
    assert (backbone_norm == 0.0) == frozen, backbone_norm
    assert float(optax.global_norm(grads["head"])) > 0


def test_multiclass_and_multilabel_terms_match_optax_and_probabilities_are_normalised():
  rng = np.random.default_rng(0)
  logits = jnp.asarray(rng.normal(size=(5, 3)), jnp.float32)
  valid = np.array([True] * 4 + [False])
  classes = np.array([0, 2, 1, 2, 0], np.int32)
  sums = SupervisedObjective("multiclass", 3).sums({"task": {"logits": logits}},
                                                   {B.TASK: {B.VALID: valid, B.TASK_LABEL: classes}})
  expected = optax.softmax_cross_entropy_with_integer_labels(logits[:4], classes[:4]).sum()
  np.testing.assert_allclose(sums["task_loss"], expected, rtol=1e-6)
  assert float(sums["accuracy"]) == float((np.argmax(logits[:4], -1) == classes[:4]).sum())
  multi = rng.integers(0, 2, (5, 3)).astype(np.float32)
  sums = SupervisedObjective("multilabel", 3).sums({"task": {"logits": logits}},
                                                   {B.TASK: {B.VALID: valid, B.TASK_LABEL: multi}})
  np.testing.assert_allclose(sums["task_loss"], optax.sigmoid_binary_cross_entropy(logits[:4], multi[:4]).mean(-1).sum(),
                             rtol=1e-6)
  probs = predictions(TaskInfo("multiclass", 3), logits)
  np.testing.assert_allclose(probs.sum(-1), 1.0, atol=1e-6)
  assert predictions(TaskInfo("multilabel", 3), logits).shape == (5, 3)
  np.testing.assert_allclose(predictions(TaskInfo("regression", 1, label_mean=5.0, label_std=2.0), logits[:, :1]),
                             np.asarray(logits[:, 0]) * 2.0 + 5.0, rtol=1e-6)


def test_a_backbone_label_trains_at_its_multiple_of_the_learning_rate():
  """Full fine-tuning with `backbone_lr_scale`: the backbone's first AdamW step is that
  multiple of the head's, for the same gradient."""
  params = {"backbone": {"w": jnp.ones((3,))}, "head": {"kernel": jnp.ones((3,))},
            INPUT_MEAN: jnp.zeros((3,)), INPUT_SCALE: jnp.ones((3,))}
  cfg = ml_collections.ConfigDict(dict(learning_rate=1e-2, warmup_steps=0, num_steps=10, final_lr_fraction=1.0,
                                       adam_b1=0.9, adam_b2=0.99, weight_decay=0.0, grad_clip_norm=100.0))
  tx = state_lib.make_optimizer(cfg, trainable=trainable("full", BACKBONE_LABEL), lr_scales={BACKBONE_LABEL: 0.1})
  grads = jax.tree.map(lambda x: jnp.full_like(x, 0.5), params)

  def second_update(tx):  # (the schedule's first rate is 0)
    _, opt = tx.update(grads, tx.init(params), params)
    return tx.update(grads, opt, params)[0]
  updates = second_update(tx)
  np.testing.assert_allclose(updates["backbone"]["w"], 0.1 * updates["head"]["kernel"], rtol=1e-5)
  assert np.abs(updates["head"]["kernel"]).min() > 1e-4 and not np.asarray(updates[INPUT_MEAN]).any()
  updates = second_update(state_lib.make_optimizer(cfg, trainable=trainable("full")))
  np.testing.assert_allclose(updates["backbone"]["w"], updates["head"]["kernel"], rtol=1e-6)


def test_an_attention_pooled_head_reads_real_tokens_only_and_trains_its_queries_over_a_frozen_backbone():
  from biofm_jax.models.task import AttentionPool
  pool = AttentionPool()
  hidden = jax.random.normal(jax.random.key(1), (2, 6, 8))
  mask = jnp.asarray([[True] * 4 + [False] * 2, [True] * 6])
  params = pool.init(jax.random.key(0), hidden, mask)["params"]
  out = pool.apply({"params": params}, hidden, mask)
  moved = pool.apply({"params": params}, hidden.at[0, 4:].add(100.0), mask)  # row 0's padding changes
  np.testing.assert_allclose(moved[0], out[0], atol=1e-6)
  assert np.abs(np.asarray(moved[1] - out[1])).max() == 0
  # A query along one token's key puts (almost) all of the weight on it.
  keys = nn.DenseGeneral((4, 2)).apply({"params": params["key"]}, nn.LayerNorm().apply(
      {"params": params["norm"]}, hidden))
  aimed = {**params, "query": 1e4 * keys[1, 3]}
  values = nn.DenseGeneral((4, 2)).apply({"params": params["value"]}, nn.LayerNorm().apply(
      {"params": params["norm"]}, hidden))
  np.testing.assert_allclose(pool.apply({"params": aimed}, hidden, mask)[1], values[1, 3].reshape(-1), atol=1e-4)

  task = helpers.Jitted(TaskModel(_ehr_backbone(), ("ehr", "embedding"), 1, frozen_backbone=True, pooling="attention"))
  batch = _batch()
  params = nn.meta.unbox(task.init({"params": jax.random.key(0)}, batch)["params"])
  params["head"]["kernel"] = jnp.ones_like(params["head"]["kernel"])  # a head that passes a gradient back
  objective = SupervisedObjective("binary")
  grads = jax.grad(lambda p: objective.sums(task.apply({"params": p}, batch), batch)["task_loss"])(params)
  assert all(not np.asarray(g).any() for g in jax.tree.leaves(grads["backbone"]))
  assert np.abs(np.asarray(grads["pool"]["query"])).max() > 0
  with pytest.raises(ValueError, match="reads 'tabular'"):
    TaskModel(_ehr_backbone(), ("tabular", "embedding"), 1, pooling="attention").init(
        {"params": jax.random.key(0)}, batch)
