"""Blocked attention with an online softmax (`model.attention="blocked"`): the numbers of the
attention it replaces, forward and backward, with padding, packing, causal masks and blocks
that do not divide the row; memory that grows with the row, not its square; and training
that agrees with the default attention on a split mesh."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import helpers
from biofm_jax.models import layers
from biofm_jax.models.blocked_attention import blocked_attention


def _inputs(length, shortest, packed, dtype=jnp.float32, seed=0):
  rng = np.random.default_rng(seed)
  q, k, v = (jnp.asarray(rng.normal(size=(3, length, 4, 8)), dtype) for _ in range(3))
  mask = np.arange(length)[None] < np.array([[length], [length * 2 // 3], [shortest]])
  segments = np.where(mask, 1 + (np.arange(length)[None] >= length // 3), 0) if packed else None
  return q, k, v, mask, segments


def _reference_mask(mask, segments):
  """The [B, 1, T, S] mask `layers.Attention` builds for the other implementations."""
  key_mask = mask[:, None, None, :]
  if segments is not None:
    same = (segments[:, :, None] == segments[:, None, :]) | (segments[:, :, None] == 0)
    key_mask = key_mask & same[:, None]
  return jnp.asarray(key_mask)


def _with_grads(attend, q, k, v):
  out, pullback = jax.vjp(attend, q, k, v)
  cotangent = jnp.asarray(np.linspace(-1, 1, out.size).reshape(out.shape), out.dtype)
  return out, pullback(cotangent)


@pytest.mark.parametrize("causal, packed, shortest, blocks", [
    (False, False, 1, (5, 5)), (True, False, 1, (5, 5)), (True, False, 1, (8, 3)), (True, False, 1, (3, 8)),
    (False, True, 1, (4, 4)), (True, True, 1, (7, 5)), (False, False, 0, (5, 5)), (True, False, 1, (64, 64))])
def test_blocked_attention_equals_the_default_attention_forward_and_backward(causal, packed, shortest, blocks):
  """Rows 21 long in tiles of (queries, keys) that do not divide them (the last block part
  padding), taller or wider than square (the causal bounds), or one tile of all; a row whose
  only real key is its first, a row with no real key (uniform, as in jax's "xla"
  attention), two packed segments per row."""
  q, k, v, mask, segments = _inputs(21, shortest, packed)
  reference = _with_grads(lambda q, k, v: layers.heads_first_attention(
      q, k, v, _reference_mask(mask, segments), is_causal=causal), q, k, v)
  blocked = _with_grads(lambda q, k, v: blocked_attention(
      q, k, v, jnp.asarray(mask), None if segments is None else jnp.asarray(segments), causal, blocks), q, k, v)
  np.testing.assert_allclose(blocked[0], reference[0], atol=1e-6)
  for ours, theirs in zip(blocked[1], reference[1]):
    np.testing.assert_allclose(ours, theirs, atol=1e-5)


def test_blocked_attention_in_bfloat16_stays_within_bfloat16_s_rounding():
  q, k, v, mask, segments = _inputs(40, 1, True, dtype=jnp.bfloat16)
  reference = _with_grads(lambda q, k, v: layers.heads_first_attention(
      q, k, v, _reference_mask(mask, segments), is_causal=True), q, k, v)
  blocked = _with_grads(lambda q, k, v: blocked_attention(
      q, k, v, jnp.asarray(mask), jnp.asarray(segments), True, (16, 8)), q, k, v)
  assert blocked[0].dtype == jnp.bfloat16 and all(g.dtype == jnp.bfloat16 for g in blocked[1])
  np.testing.assert_allclose(np.asarray(blocked[0], np.float32), np.asarray(reference[0], np.float32), atol=2e-2)
  for ours, theirs in zip(blocked[1], reference[1]):
    np.testing.assert_allclose(np.asarray(ours, np.float32), np.asarray(theirs, np.float32), atol=5e-2)


def test_blocked_attention_holds_no_row_by_row_matrix():
  """The compiled forward and backward of one head at 2,048 slots: the default attention's
  scratch memory holds [T, T] logits and probabilities (16 MiB each in float32); the blocked
  one's holds tiles of 512 queries by 256 keys."""
  length = 2048
  q = k = v = jnp.zeros((1, length, 1, 64), jnp.float32)
  mask = jnp.ones((1, length), bool)

  def scratch(attend):
    loss = jax.jit(jax.grad(lambda q, k, v: attend(q, k, v).sum(), argnums=(0, 1, 2)))
    return loss.lower(q, k, v).compile().memory_analysis().temp_size_in_bytes
  full = scratch(lambda q, k, v: layers.heads_first_attention(q, k, v, mask[:, None, None, :], is_causal=True))
  blocked = scratch(lambda q, k, v: blocked_attention(q, k, v, mask, None, True, (512, 256)))
  square = length * length * 4
  print(f"scratch bytes at {length} slots: default {full:,}, blocked {blocked:,} ([T, T] float32: {square:,})")
  assert full >= square and blocked < square / 4  # seen: 67,117,056 and 2,863,424 bytes


def test_blocked_attention_refuses_what_it_cannot_do():
  q, k, v, mask, _ = _inputs(8, 1, False)
  with pytest.raises(ValueError, match="two positive sizes"):
    blocked_attention(q, k, v, jnp.asarray(mask), blocks=(4, 0))
  with pytest.raises(ValueError, match="self-attention"):
    blocked_attention(q, k[:, :6], v[:, :6], jnp.asarray(mask[:, :6]), is_causal=True)


@pytest.mark.devices(8)
def test_a_packed_causal_model_trains_with_blocked_attention_as_with_the_default_on_a_split_mesh(
    synthetic_meds, tmp_path_factory):
  """Next-event EHR over packed rows (causal mask and segments), 6 steps: the default attention
  on 8 data-parallel devices against blocked attention (tiles of 12 queries by 8 keys, the rows
  32 long: the last query block part padding)
  on a mesh that splits batch, parameters and heads."""
  common = dict(data__ehr__path=str(synthetic_meds), data__ehr__pack=True, **helpers.constant_lr_overrides(6))
  runs = {}
  for attention, mesh in (("heads_first", (8, 1, 1)), ("blocked", (2, 2, 2))):
    workdir = tmp_path_factory.mktemp(attention)
    config = helpers.config_for("configs/ehr_gpt.py:tiny", model__attention=attention, model__attention_blocks=(12, 8),
                                **common, **helpers.mesh_overrides(mesh))
    assert config.data.ehr.max_len == 32
    helpers.train(config, workdir)
    runs[attention] = (workdir, config)
  helpers.assert_runs_agree(runs, atol=1e-5)


def test_auto_attention_runs_long_rows_blocked_on_cpu_only():
  assert layers.attention_on("auto", "cpu", 512) == "heads_first"
  assert layers.attention_on("auto", "cpu", layers.BLOCKED_ON_CPU_FROM) == "blocked"
  assert layers.attention_on("auto", "gpu", 4096) is None and layers.attention_on("xla", "cpu", 4096) == "xla"
  config = layers.TransformerConfig(num_layers=1, embed_dim=8, num_heads=2, mlp_dim=16, max_len=4096)
  assert config.attention_implementation == "blocked" and config.attention_blocks == (512, 256)
  with pytest.raises(ValueError, match="two positive sizes"):
    layers.TransformerConfig(num_layers=1, embed_dim=8, num_heads=2, mlp_dim=16, attention_blocks=(0, 4))


@pytest.mark.devices(8)
def test_blocked_attention_split_over_batch_and_heads_needs_no_communication():
  """Forward and backward on a mesh splitting rows over "data" and heads over "tensor" (as
  the rules shard activations): the compiled program holds no collective, so no device
  gathers another's keys. Split along the row instead, it would (all-to-all)."""
  from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
  mesh = Mesh(np.array(jax.devices()).reshape(4, 2), ("data", "tensor"))

  def collectives(spec):
    qkv, rows = NamedSharding(mesh, spec), NamedSharding(mesh, P("data", None))
    step = jax.jit(jax.grad(lambda q, k, v, m, s: blocked_attention(q, k, v, m, s, True, (16, 8)).sum(),
                            argnums=(0, 1, 2)), in_shardings=(qkv, qkv, qkv, rows, rows))
    x = jnp.zeros((8, 40, 4, 8))
    text = step.lower(x, x, x, jnp.ones((8, 40), bool), jnp.ones((8, 40), jnp.int32)).compile().as_text()
    return [op for op in ("all-gather", "all-reduce", "all-to-all", "collective-permute", "reduce-scatter")
            if op in text]
  assert collectives(P("data", None, "tensor", None)) == []
  assert collectives(P(None, "data", "tensor", None))  # the check sees communication where there is some
