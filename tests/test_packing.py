"""Packing several examples into one row: the plan, the rows, and that a packed batch
gives every example the loss and gradient it has alone."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import helpers
from biofm_jax.data import batch as B
from biofm_jax.data import packing
from biofm_jax.modalities.ehr import data as ehr
from biofm_jax.modalities.ehr.encoder import EHREncoder
from biofm_jax.models.encoders.tokens import segment_positions
from biofm_jax.models.layers import TransformerConfig
from biofm_jax.models.model import SingleModalityModel
from biofm_jax.models.description import TokenModality
from biofm_jax.objectives.autoregressive import NextEventModelling


# ---------------------------------------------------------------- the plan
def test_plan_puts_every_example_in_one_row_and_wastes_little_on_heavy_tails():
  rng = np.random.default_rng(0)
  lengths = np.minimum(np.round(rng.lognormal(np.log(60), 1.0, size=5000)).astype(np.int64) + 1, 128)
  items, starts = packing.plan_rows(lengths, 128)
  assert sorted(items.tolist()) == list(range(len(lengths)))
  per_row = np.add.reduceat(lengths[items], starts[:-1])
  assert per_row.max() <= 128 and (np.diff(starts) >= 1).all()
  padding = 1 - lengths.sum() / (len(per_row) * 128)
  unpacked_padding = 1 - lengths.sum() / (len(lengths) * 128)
  assert padding < 0.01 < 0.4 < unpacked_padding
  again_items, again_starts = packing.plan_rows(lengths, 128)  # a pure function of the lengths
  assert (again_items == items).all() and (again_starts == starts).all()
  # A full-length example has a row of its own.
  items, starts = packing.plan_rows(np.array([128, 3, 128]), 128)
  assert [items[a:b].tolist() for a, b in zip(starts[:-1], starts[1:])] == [[0], [2], [1]]
  with pytest.raises(ValueError, match=r"example 1 has 129 tokens, expected 1\.\.128"):
    packing.plan_rows(np.array([5, 129]), 128)


def test_pack_examples_concatenates_real_tokens_and_numbers_segments():
  a = {B.TOKEN_MASK: np.array([1, 1, 1, 0, 0, 0, 0, 0], bool), B.TOKENS: np.array([3, 7, 8, 0, 0, 0, 0, 0], np.int32)}
  b = {B.TOKEN_MASK: np.array([1, 1, 0, 0, 0, 0, 0, 0], bool), B.TOKENS: np.array([3, 9, 0, 0, 0, 0, 0, 0], np.int32)}
  row = packing.pack_examples([a, b], 8)
  assert row[B.TOKENS].tolist() == [3, 7, 8, 3, 9, 0, 0, 0]
  assert row[B.TOKEN_MASK].tolist() == [1, 1, 1, 1, 1, 0, 0, 0]
  assert row[B.SEGMENT_IDS].tolist() == [1, 1, 1, 2, 2, 0, 0, 0]
  assert np.asarray(segment_positions(jnp.asarray(row[B.SEGMENT_IDS])[None]))[0].tolist() == [0, 1, 2, 0, 1, 0, 1, 2]
  with pytest.raises(ValueError, match="11 tokens do not fit a row of 8"):
    packing.pack_examples([a, b, a, a], 8)


# ---------------------------------------------------------------- packed == unpacked
VOCAB, BINS, LEN = 40, 5, 24


def random_examples(rng, lengths, masked: bool):
  """EHR examples of the given real lengths, padded to LEN (CLS first)."""
  out = []
  for n in lengths:
    e = {name: np.zeros(shape, dtype) for name, (shape, dtype) in B.ehr_example_spec(LEN, masked).items()}
    e[B.EHR_CODES][0] = B.CLS_ID
    e[B.EHR_CODES][1:n] = rng.integers(B.NUM_SPECIAL, VOCAB, n - 1)
    e[B.EHR_VALUE_BINS][1:n] = rng.integers(0, BINS + 1, n - 1)
    e[B.EHR_AGE][1:n] = np.sort(rng.uniform(20, 80, n - 1))
    e[B.EHR_AGE_KNOWN][1:n] = True
    e[B.EHR_TIME][1:n] = np.sort(rng.uniform(0, 900, n - 1))
    e[B.EHR_TIME_KNOWN][1:n] = True
    e[B.EHR_MASK][:n] = True
    if masked:
      e[B.EHR_TARGET_CODES][:n] = e[B.EHR_CODES][:n]
      e[B.EHR_TARGET_VALUE_BINS][:n] = e[B.EHR_VALUE_BINS][:n]
      e[B.EHR_TARGET_MASK][1:n] = rng.random(n - 1) < 0.4
      e[B.EHR_TARGET_MASK][n - 1] = True  # every example has a target
      e[B.EHR_CODES][1:n] = np.where(e[B.EHR_TARGET_MASK][1:n], B.MASK_ID, e[B.EHR_CODES][1:n])
    out.append(e)
  return out


def stacked(examples):
  return {"ehr": {k: jnp.asarray(np.stack([e[k] for e in examples])) for k in examples[0]}}


def per_token_losses(model, params, batch, causal: bool):
  """float [B, L] code cross-entropy at each position's target (0 where none)."""
  logits = model.apply({"params": params}, batch)["ehr"]["code_logits"]
  seq = batch["ehr"]
  if causal:
    weights = NextEventModelling()._has_next(seq)
    loss = optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], seq[B.TOKENS][:, 1:])
    return jnp.pad(loss * weights, ((0, 0), (1, 0)))  # the loss of predicting the token at t
  loss = optax.softmax_cross_entropy_with_integer_labels(logits, seq[B.TARGET_TOKENS])
  return loss * seq[B.TARGET_MASK]


@pytest.mark.parametrize("causal, position", [(False, "rope"), (False, "learned"), (True, "rope")])
def test_a_packed_batch_gives_each_example_its_own_loss_and_gradient(causal, position):
  rng = np.random.default_rng(1)
  lengths = [9, 5, 14, 3, 7, 10, 24, 2]
  examples = random_examples(rng, lengths, masked=not causal)
  cfg = TransformerConfig(num_layers=2, embed_dim=32, num_heads=4, mlp_dim=64, max_len=LEN, causal=causal,
                          position=position)
  model = helpers.Jitted(SingleModalityModel(cfg, TokenModality("ehr", VOCAB, BINS, LEN, position=position,
                                                                encoder=EHREncoder)))
  unpacked = [packing.OneSegment().map(e) for e in examples]  # one segment per row
  items, starts = packing.plan_rows(np.array(lengths), LEN)
  rows = [packing.pack_examples([examples[i] for i in items[a:b]], LEN) for a, b in zip(starts[:-1], starts[1:])]
  assert len(rows) < len(examples)
  params = model.init(jax.random.key(0), stacked(unpacked[:1]))["params"]

  # Per example: the sum of its token losses, alone vs. inside a packed row. Jitted: one
  # program per shape compiles faster than the op-by-op dispatch of every primitive.
  losses = jax.jit(lambda p, batch: per_token_losses(model, p, batch, causal))
  alone = np.asarray(losses(params, stacked(unpacked))).sum(axis=1)
  packed_tokens = np.asarray(losses(params, stacked(rows)))
  packed = np.zeros(len(examples))
  for r, (a, b) in enumerate(zip(starts[:-1], starts[1:])):
    segments = rows[r][B.SEGMENT_IDS]
    for s, i in enumerate(items[a:b], start=1):
      packed[i] = packed_tokens[r][segments == s].sum()
  assert alone.min() > 0
  np.testing.assert_allclose(packed, alone, rtol=1e-5, atol=1e-5)

  # The gradient of the summed loss: the same parameters move the same way.
  grad = jax.jit(jax.grad(lambda p, batch: losses(p, batch).sum()))
  for g_packed, g_alone in zip(jax.tree.leaves(grad(params, stacked(rows))),
                               jax.tree.leaves(grad(params, stacked(unpacked)))):
    # Summed in another order over other row layouts: float32 rounding scales with the leaf's
    # largest entries (up to ~50 here), so the tolerance does too.
    g_alone = np.asarray(g_alone)
    np.testing.assert_allclose(np.asarray(g_packed), g_alone, rtol=1e-5, atol=1e-6 * max(1.0, np.abs(g_alone).max()))


# ---------------------------------------------------------------- the EHR stream
def test_packed_ehr_training_stream_holds_every_window_once_per_epoch(tmp_path):
  import ml_collections
  from biofm_jax.data import pipeline
  cfg = ml_collections.ConfigDict(dict(
      path="", synthetic_subjects=120, synthetic_seed=0, max_len=64, window="recent", train_windows="cover",
      window_overlap=0.25, min_code_count=2, num_value_bins=4, mask_rate=0.15, pack=True))
  data = ehr.EHRData.from_config(cfg, targets="masked", artifacts_dir=tmp_path)
  packed = data.packed_training_source()
  windows = data.training_source()
  summary = data.summary()
  assert summary["train_packed_rows"] == len(packed) < len(windows)
  assert summary["train_packed_padding"] < 0.05
  assert data.example_spec()["ehr"][B.SEGMENT_IDS] == ((64,), np.int32)
  # One epoch (batches of one row, so none is left over) holds every training window once.
  iterator = pipeline.make_iterator(data.make_train_dataset(global_batch_size=1, seed=3))
  epoch = [next(iterator)["ehr"] for _ in range(len(packed))]
  segments = np.concatenate([b[B.SEGMENT_IDS] for b in epoch])
  assert sum(len(np.unique(row[row > 0])) for row in segments) == len(windows)
  real = np.concatenate([b[B.EHR_MASK] for b in epoch])
  assert (real == (segments > 0)).all() and 1 - real.mean() < 0.05
  # Every segment starts with its own CLS, and masking never hides one.
  first = np.concatenate([np.ones((len(segments), 1), bool), segments[:, 1:] != segments[:, :-1]], axis=1)
  codes = np.concatenate([b[B.EHR_CODES] for b in epoch])
  assert (codes[first & (segments > 0)] == B.CLS_ID).all()
  # Evaluation reads one example per row, as one segment.
  eval_example = data.transforms(train=False)[1].map(data.transforms(train=False)[0].map(data.source("tuning")[0]))
  assert (eval_example[B.SEGMENT_IDS] == eval_example[B.EHR_MASK]).all()

