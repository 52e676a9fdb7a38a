"""The model and objectives: padding never leaks, causality holds, dtypes and remat behave."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from scipy.stats import binom

import helpers
from biofm_jax.data import batch as B
from biofm_jax.modalities.registry import build_model
from biofm_jax.modalities.registry import build_objective
from biofm_jax.models import layers
from biofm_jax.objectives import weighted_loss
from biofm_jax.data.masking import prediction_slots

V, K, L, N = 40, 5, 12, 4


def model_config(**model):
  defaults = dict(num_layers=2, embed_dim=32, num_heads=4, head_dim=0, mlp_dim=64, dropout_rate=0.0,
                  position="rope", norm="rmsnorm", dtype="float32", param_dtype="float32", remat="none",
                  scan_layers=True)
  return ml_collections.ConfigDict(dict(model={**defaults, **model},
                                        objective=dict(name="masked", value_loss_weight=0.5)))


def make_batch(seed=0, length=9):
  """`length` real tokens (CLS + events) then padding, with masked-modelling targets."""
  rng = np.random.default_rng(seed)
  ex = {k: np.zeros((N,) + shape, dtype) for k, (shape, dtype) in B.ehr_example_spec(L, True).items()}
  ex["codes"][:] = rng.integers(4, V, (N, L))
  ex["codes"][:, 0] = B.CLS_ID
  ex["mask"][:, :length] = True
  ex["codes"][~ex["mask"]] = B.PAD_ID
  ex["value_bins"][:, 1:length] = rng.integers(0, K + 1, (N, length - 1))
  ex["age_years"][:, 1:length] = rng.uniform(20, 80, (N, length - 1))
  ex["age_known"][:, 1:length] = True
  ex["time_days"][:, 1:length] = -rng.uniform(0, 500, (N, length - 1))
  ex["time_known"][:, 1:length] = True
  ex["target_codes"][:] = ex["codes"]
  ex["target_value_bins"][:] = ex["value_bins"]
  ex["target_mask"][:, 2:length:3] = True
  return {"ehr": ex}


def init(cfg, batch):
  model = helpers.Jitted(build_model(cfg, {"ehr": dict(vocab_size=V, num_value_bins=K, max_len=L)}))
  return model, nn.meta.unbox(model.init(jax.random.key(0), batch, train=False)["params"])


@pytest.mark.parametrize("causal, position", [(False, "rope"), (True, "rope"), (False, "learned")])
def test_padding_content_never_changes_real_positions(causal, position):
  cfg = model_config(position=position)
  cfg.objective.name = "autoregressive" if causal else "masked"
  batch = make_batch()
  model, params = init(cfg, batch)
  noisy = jax.tree.map(np.copy, batch)
  pad = ~noisy["ehr"]["mask"]
  noisy["ehr"]["codes"][pad] = 7
  noisy["ehr"]["value_bins"][pad] = 3
  noisy["ehr"]["time_days"][pad] = -99.0
  a = model.apply({"params": params}, batch)["ehr"]["hidden"]
  b = model.apply({"params": params}, noisy)["ehr"]["hidden"]
  real = batch["ehr"]["mask"]
  np.testing.assert_allclose(np.asarray(a)[real], np.asarray(b)[real], atol=1e-6)


def test_causal_model_does_not_see_the_future():
  cfg = model_config()
  cfg.objective.name = "autoregressive"
  batch = make_batch()
  model, params = init(cfg, batch)
  changed = jax.tree.map(np.copy, batch)
  changed["ehr"]["codes"][:, 6] = 5
  a = np.asarray(model.apply({"params": params}, batch)["ehr"]["hidden"])
  b = np.asarray(model.apply({"params": params}, changed)["ehr"]["hidden"])
  np.testing.assert_allclose(a[:, :6], b[:, :6], atol=1e-6)
  assert np.abs(a[:, 6:9] - b[:, 6:9]).max() > 1e-3  # and it does see the present and past


def test_unknown_age_contributes_nothing():
  batch = make_batch()
  model, params = init(model_config(), batch)
  unknown = jax.tree.map(np.copy, batch)
  unknown["ehr"]["age_known"][:] = False
  other = jax.tree.map(np.copy, unknown)
  other["ehr"]["age_years"][:] = 0.0  # the value under an unknown age is irrelevant
  a = model.apply({"params": params}, unknown)["ehr"]["hidden"]
  b = model.apply({"params": params}, other)["ehr"]["hidden"]
  np.testing.assert_allclose(a, b, atol=1e-6)


@pytest.mark.parametrize("remat", ["full", "dots_saveable", "dots_with_no_batch_dims_saveable"])
def test_remat_policies_give_the_same_loss_and_gradients(remat):
  batch = make_batch()
  objective = build_objective(model_config().objective)

  def loss_and_grads(cfg):
    model, params = init(cfg, batch)
    def loss(p):
      return weighted_loss(objective, objective.sums(model.apply({"params": p}, batch, train=True), batch),
                           objective.counts(batch))
    return jax.jit(jax.value_and_grad(loss))(params)

  base_loss, base_grads = loss_and_grads(model_config())
  loss, grads = loss_and_grads(model_config(remat=remat))
  np.testing.assert_allclose(loss, base_loss, rtol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), grads, base_grads)


def test_unscanned_stack_matches_scanned_with_the_same_weights():
  batch = make_batch()
  scanned_model, scanned = init(model_config(), batch)
  loop_model, looped = init(model_config(scan_layers=False), batch)
  layers = scanned["transformer"].pop("layers")
  for i in range(2):
    scanned["transformer"][f"layer_{i}"] = jax.tree.map(lambda x: x[i], layers)
  assert jax.tree.structure(scanned) == jax.tree.structure(looped)
  np.testing.assert_allclose(loop_model.apply({"params": scanned}, batch)["ehr"]["hidden"],
                             scanned_model.apply({"params": {**scanned, "transformer": {
                                 "layers": layers, "final_norm": scanned["transformer"]["final_norm"]}}},
                                                 batch)["ehr"]["hidden"], atol=1e-5)


@pytest.mark.parametrize("remat", ["none", "full"])
def test_stacked_layers_run_unrolled_or_scanned_with_the_same_loss_and_gradients(remat):
  """`model.layer_loop` changes how the stacked layers run, never their parameters."""
  batch = make_batch()
  objective = build_objective(model_config().objective)

  def loss_and_grads(layer_loop):
    model, params = init(model_config(layer_loop=layer_loop, remat=remat), batch)
    def loss(p):
      return weighted_loss(objective, objective.sums(model.apply({"params": p}, batch, train=True), batch),
                           objective.counts(batch))
    return params, jax.jit(jax.value_and_grad(loss))(params)

  scanned_params, (scanned_loss, scanned_grads) = loss_and_grads("scan")
  unrolled_params, (unrolled_loss, unrolled_grads) = loss_and_grads("unroll")
  jax.tree.map(np.testing.assert_array_equal, unrolled_params, scanned_params)  # one layout, one init
  assert unrolled_params["transformer"]["layers"]["mlp"]["wi"]["kernel"].shape[0] == 2
  np.testing.assert_allclose(unrolled_loss, scanned_loss, rtol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), unrolled_grads, scanned_grads)


@pytest.mark.parametrize("causal, packed, shortest", [(False, False, 1), (True, False, 1), (False, True, 1),
                                                     (False, False, 0)])
def test_heads_first_attention_equals_jax_s_xla_attention(causal, packed, shortest):
  """`model.attention="heads_first"` (the CPU default) is jax's "xla" arithmetic in another
  layout: outputs and gradients agree, with padding keys, causal masks, packed rows and a
  row without any real key."""
  rng = np.random.default_rng(0)
  q, k, v = (jnp.asarray(rng.normal(size=(3, 12, 4, 8)), jnp.float32) for _ in range(3))
  mask = np.arange(12)[None] < np.array([[12], [7], [shortest]])
  key_mask = jnp.asarray(mask[:, None, None, :])
  if packed:  # two segments per row, padding queries (segment 0) see every real key
    segments = np.where(mask, 1 + (np.arange(12)[None] >= 5), 0)
    same = (segments[:, :, None] == segments[:, None, :]) | (segments[:, :, None] == 0)
    key_mask = key_mask & jnp.asarray(same[:, None])

  def run(implementation):
    def attend(q, k, v):
      if implementation == "heads_first":
        return layers.heads_first_attention(q, k, v, key_mask, is_causal=causal)
      return jax.nn.dot_product_attention(q, k, v, mask=key_mask, is_causal=causal, implementation="xla")
    out, pullback = jax.vjp(attend, q, k, v)
    return out, pullback(jnp.asarray(np.linspace(-1, 1, out.size).reshape(out.shape), jnp.float32))

  (ours, ours_grads), (theirs, their_grads) = run("heads_first"), run("xla")
  np.testing.assert_allclose(ours, theirs, atol=1e-6)
  for a, b in zip(ours_grads, their_grads):
    np.testing.assert_allclose(a, b, atol=1e-5)
  assert layers.attention_on("auto", "cpu") == "heads_first" and layers.attention_on("auto", "gpu") is None
  with pytest.raises(ValueError, match="model.attention must be one of"):
    init(model_config(attention="flash"), make_batch())


def test_unrolled_layers_apply_dropout_from_the_step_key():
  batch = make_batch()
  model, params = init(model_config(layer_loop="unroll", dropout_rate=0.5), batch)
  hidden = lambda key: model.apply({"params": params}, batch, train=True, rngs={"dropout": key})["ehr"]["hidden"]
  first, again, other = hidden(jax.random.key(1)), hidden(jax.random.key(1)), hidden(jax.random.key(2))
  np.testing.assert_array_equal(first, again)
  assert not np.allclose(first, other)
  assert not np.allclose(first, model.apply({"params": params}, batch)["ehr"]["hidden"])


def test_an_unknown_layer_loop_is_refused():
  with pytest.raises(ValueError, match="model.layer_loop must be"):
    init(model_config(layer_loop="while"), make_batch())


def test_bfloat16_compute_keeps_float32_params_and_logits():
  batch = make_batch()
  model16, params = init(model_config(dtype="bfloat16"), batch)
  model32, params32 = init(model_config(), batch)
  jax.tree.map(np.testing.assert_array_equal, params, params32)  # same float32 initial weights
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(params))
  out16 = model16.apply({"params": params}, batch)["ehr"]
  out32 = model32.apply({"params": params}, batch)["ehr"]
  assert out16["hidden"].dtype == jnp.bfloat16 and out16["code_logits"].dtype == jnp.float32
  np.testing.assert_allclose(out16["code_logits"], out32["code_logits"], atol=0.1)


def test_masked_objective_counts_only_masked_positions():
  batch = make_batch()
  objective = build_objective(model_config().objective)
  counts = objective.counts(batch)
  ehr = batch["ehr"]
  assert counts["code_loss"] == ehr["target_mask"].sum()
  assert counts["value_loss"] == (ehr["target_mask"] & (ehr["target_value_bins"] != 0)).sum()
  # Perfect logits at the masked positions give zero loss whatever the logits elsewhere.
  logits = np.full((N, L, V), -1e4, np.float32)
  np.put_along_axis(logits, ehr["target_codes"][..., None], 1e4, axis=-1)
  logits[~ehr["target_mask"]] = np.random.default_rng(0).normal(size=(V,))
  value_logits = np.zeros((N, L, K + 1), np.float32)
  sums = objective.sums({"ehr": {"code_logits": logits, "value_logits": value_logits}}, batch)
  assert float(sums["code_loss"]) == pytest.approx(0.0, abs=1e-3)
  assert float(sums["code_accuracy"]) == counts["code_loss"]
  assert float(sums["value_loss"]) == pytest.approx(np.log(K + 1) * counts["value_loss"], rel=1e-5)


def _loss_and_grads(model, objective, params, batch):
  def loss(p):
    outputs = model.apply({"params": p}, batch)
    return weighted_loss(objective, objective.sums(outputs, batch), objective.counts(batch))
  return jax.jit(jax.value_and_grad(loss))(params)


def test_prediction_slots_give_the_loss_and_gradients_of_every_position():
  """Heads run at P gathered positions: the same parameters, loss and gradients as at all L."""
  batch = make_batch()  # 3 masked positions per row, P = 8 of L = 12
  cfg = model_config()
  info = dict(vocab_size=V, num_value_bins=K, max_len=L)
  everywhere, params = init(cfg, batch)
  slotted = helpers.Jitted(build_model(cfg, {"ehr": {**info, "prediction_slots": 8}}))
  slotted_params = slotted.init(jax.random.key(0), batch, train=False)["params"]
  assert jax.tree.map(jnp.shape, nn.meta.unbox(slotted_params)) == jax.tree.map(jnp.shape, params)
  assert slotted.apply({"params": params}, batch)["ehr"]["code_logits"].shape == (N, 8, V)
  loss_all, grads_all = _loss_and_grads(everywhere, build_objective(cfg.objective, "ehr", info), params, batch)
  loss_slots, grads_slots = _loss_and_grads(
      slotted, build_objective(cfg.objective, "ehr", {**info, "prediction_slots": 8}), params, batch)
  assert float(loss_slots) == pytest.approx(float(loss_all), rel=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), grads_slots, grads_all)
  # The output layer runs at P positions instead of L: that many fewer FLOPs.
  head = 3 * 2 * 32 * (V + K + 1)
  assert everywhere.flops_per_example() - slotted.flops_per_example() == pytest.approx((L - 8) * head)


def test_masked_tokens_beyond_the_slots_leave_loss_and_count_together():
  """A row with more masked tokens than P: the first P enter the loss and its count alike."""
  batch = make_batch()
  batch["ehr"]["target_mask"][0, 1:9] = True  # 8 masked in row 0, P = 4
  info = dict(vocab_size=V, num_value_bins=K, max_len=L, prediction_slots=4)
  objective = build_objective(ml_collections.ConfigDict(dict(name="masked", value_loss_weight=0.0)), "ehr", info)
  per_row = np.minimum(batch["ehr"]["target_mask"].sum(axis=1), 4)
  assert float(objective.counts(batch)["code_loss"]) == per_row.sum()
  logits = np.random.default_rng(1).normal(size=(N, 4, V)).astype(np.float32)
  sums = objective.sums({"ehr": {"code_logits": logits}}, batch)
  ehr = batch["ehr"]
  expected = 0.0
  for row in range(N):
    positions = np.flatnonzero(ehr["target_mask"][row])[:4]
    for slot, position in enumerate(positions):
      expected -= jax.nn.log_softmax(logits[row, slot])[ehr["target_codes"][row, position]]
  assert float(sums["code_loss"]) == pytest.approx(float(expected), rel=1e-5)
  with pytest.raises(ValueError, match="prediction_slots"):  # logits at every position: built apart
    objective.sums({"ehr": {"code_logits": np.zeros((N, L, V), np.float32)}}, batch)


@pytest.mark.parametrize("length", [24, 128, 512, 2048])
def test_prediction_slots_hold_every_masked_token_but_once_in_a_hundred_million_rows(length):
  slots = prediction_slots(length, 0.15)
  assert slots <= length and (slots % 8 == 0 or slots == length)
  # Masked tokens per row ~ Binomial(length, 0.15), plus at most one from the at-least-one rule.
  assert binom.sf(slots - 1, length, 0.15) < 1e-7
  assert prediction_slots(512, 0.15) == 128  # a quarter of the positions at BERT's length


def test_next_event_objective_shifts_and_skips_padding():
  cfg = model_config()
  cfg.objective = dict(name="autoregressive")
  objective = build_objective(cfg.objective)
  batch = make_batch(length=9)
  assert objective.counts(batch)["code_loss"] == N * 8  # 9 real tokens -> 8 next events each
  codes = batch["ehr"]["codes"]
  logits = np.zeros((N, L, V), np.float32)
  for t in range(L - 1):  # position t predicts the code at t + 1
    logits[np.arange(N), t, codes[:, t + 1]] = 100.0
  sums = objective.sums({"ehr": {"code_logits": logits}}, batch)
  assert float(sums["code_loss"]) == pytest.approx(0.0, abs=1e-3)
  assert float(sums["code_accuracy"]) == N * 8


def test_flop_count_grows_with_depth_and_length():
  info = {"ehr": dict(vocab_size=V, num_value_bins=K, max_len=L)}
  model, deeper = build_model(model_config(), info), build_model(model_config(num_layers=4), info)
  assert deeper.flops_per_example() > model.flops_per_example()
  # Without attention scores, 6 x matmul parameters per token is the textbook estimate.
  d, m = 32, 64
  matmul_params = 2 * (4 * d * d + 2 * d * m) + d * (V + K + 1)
  attention = 3 * 2 * 2 * 2 * L * d  # scores and values, forward and backward, per layer
  assert model.flops_per_example() == pytest.approx(L * (6 * matmul_params + attention))


def test_bad_model_config_is_named():
  with pytest.raises(ValueError, match="model.dtype"):
    build_model(model_config(dtype="float16"), {"ehr": dict(vocab_size=V, num_value_bins=K, max_len=L)})
  with pytest.raises(ValueError, match="model.position"):
    build_model(model_config(position="alibi"), {"ehr": dict(vocab_size=V, num_value_bins=K, max_len=L)})
  with pytest.raises(ValueError, match="not divisible"):
    build_model(model_config(num_heads=5), {"ehr": dict(vocab_size=V, num_value_bins=K, max_len=L)})


@pytest.mark.parametrize("scan_layers", [True, False])
def test_weight_decay_reaches_matrices_and_embeddings_only(scan_layers):
  from biofm_jax.train.state import decay_mask
  _, params = init(model_config(scan_layers=scan_layers), make_batch())
  decided = {jax.tree_util.keystr(path): flag for path, flag in
             jax.tree_util.tree_leaves_with_path(decay_mask(params))}
  assert all(flag == (("kernel" in path) or ("embedding" in path)) for path, flag in decided.items()), decided
  assert not any(flag for path, flag in decided.items() if "scale" in path or "bias" in path)
  assert sum(decided.values()) >= 8


def test_rotary_sines_and_cosines_are_computed_once_per_stack_not_per_layer():
  """A scanned stack of 3 layers: its loop body computes no sine or cosine; the stack
  computes the rotary tables once, before the loop, for every layer's queries and keys."""
  cfg = model_config(num_layers=3, layer_loop="scan")
  batch = make_batch()
  model, params = init(cfg, batch)
  jaxpr = jax.make_jaxpr(lambda p, b: model.module.apply({"params": p}, b, train=False))(params, batch).jaxpr

  def primitives(jaxpr, inside_loop=False, found=None):
    found = [] if found is None else found
    for eqn in jaxpr.eqns:
      found.append((eqn.primitive.name, inside_loop))
      for sub in jax.core.jaxprs_in_params(eqn.params):
        primitives(sub, inside_loop or eqn.primitive.name == "scan", found)
    return found
  found = primitives(jaxpr)
  assert ("scan", False) in found
  trig = [inside for name, inside in found if name in ("sin", "cos")]
  assert trig and not any(trig)  # (the time features' sines are outside the stack too)
