"""Generating timelines: the cached step equals the full forward pass, sampling is seeded,
and timelines stop at the horizon and at stop codes."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import helpers
from biofm_jax.data import batch as B
from biofm_jax.generate import GenerationSettings, contains, generate, right_align
from biofm_jax.modalities.ehr.encoder import EHREncoder
from biofm_jax.models.layers import TransformerConfig
from biofm_jax.models.model import SingleModalityModel
from biofm_jax.models.modalities import TokenModality

VOCAB, BINS, LEN = 30, 4, 16
EDGES = (0.0, 1 / 24, 1.0, 7.0, 30.0, 90.0, 365.0)


def _model(causal=True, scan=True, layer_loop="auto"):
  cfg = TransformerConfig(num_layers=2, embed_dim=32, num_heads=4, mlp_dim=64, max_len=LEN, causal=causal,
                          scan_layers=scan, layer_loop=layer_loop)
  return helpers.Jitted(SingleModalityModel(cfg, TokenModality("ehr", VOCAB, BINS, LEN, encoder=EHREncoder,
                                                               time_classes=len(EDGES) + 1)))


def _batch(lengths, seed=0):
  rng = np.random.default_rng(seed)
  out = {name: np.zeros((len(lengths), LEN), dtype) for name, (_, dtype) in B.ehr_example_spec(LEN, False).items()}
  for row, n in enumerate(lengths):
    out[B.EHR_CODES][row, 0] = B.CLS_ID
    out[B.EHR_CODES][row, 1:n] = rng.integers(B.NUM_SPECIAL, VOCAB, n - 1)
    out[B.EHR_VALUE_BINS][row, 1:n] = rng.integers(0, BINS + 1, n - 1)
    out[B.EHR_TIME][row, 1:n] = np.sort(rng.uniform(0, 300, n - 1))
    out[B.EHR_TIME_KNOWN][row, 1:n] = True
    out[B.EHR_AGE][row, 1:n] = 50 + out[B.EHR_TIME][row, 1:n] / 365.25
    out[B.EHR_AGE_KNOWN][row, 1:n] = True
    out[B.EHR_MASK][row, :n] = True
  return out


@pytest.mark.parametrize("scan, layer_loop", [(True, "scan"), (True, "unroll"), (False, "auto")])
def test_the_cached_step_equals_the_uncached_forward_pass(scan, layer_loop):
  model = _model(scan=scan, layer_loop=layer_loop)
  full = _batch([LEN, LEN, LEN])
  params = model.init(jax.random.key(0), {"ehr": {k: jnp.asarray(v) for k, v in full.items()}})["params"]
  reference = model.apply({"params": params}, {"ehr": {k: jnp.asarray(v) for k, v in full.items()}})["ehr"]
  cfg = model.cfg
  shape = (cfg.num_layers, 3, LEN, cfg.num_heads, cfg.kv_dim)
  cache = (jnp.zeros(shape), jnp.zeros(shape))
  mask = np.zeros((3, LEN), bool)
  prefill = 6
  mask[:, :prefill] = True
  first = {k: jnp.asarray(v[:, :prefill]) for k, v in full.items()}
  positions = jnp.broadcast_to(jnp.arange(prefill), (3, prefill))
  out, cache = model.apply({"params": params}, {"ehr": first}, cache=cache, slot=0, cache_mask=jnp.asarray(mask),
                           positions=positions)
  for name in ("code_logits", "time_logits"):
    np.testing.assert_allclose(out["ehr"][name], reference[name][:, :prefill], atol=1e-5, rtol=1e-5)
  for slot in range(prefill, LEN):  # then one token at a time
    mask[:, slot] = True
    token = {k: jnp.asarray(v[:, slot:slot + 1]) for k, v in full.items()}
    out, cache = model.apply({"params": params}, {"ehr": token}, cache=cache, slot=slot,
                             cache_mask=jnp.asarray(mask), positions=jnp.full((3, 1), slot))
    for name in ("code_logits", "time_logits"):
      np.testing.assert_allclose(out["ehr"][name][:, 0], reference[name][:, slot], atol=1e-5, rtol=1e-5)


def test_right_aligned_prompts_of_any_length_see_what_the_full_pass_sees():
  model = _model()
  batch = _batch([5, 16, 9])
  params = model.init(jax.random.key(0), {"ehr": {k: jnp.asarray(v) for k, v in batch.items()}})["params"]
  reference = np.asarray(model.apply({"params": params}, {"ehr": {k: jnp.asarray(v) for k, v in batch.items()}})
                         ["ehr"]["code_logits"])
  aligned = right_align(batch, LEN)
  assert aligned[B.EHR_MASK].sum(1).tolist() == [5, 16, 9] and aligned[B.EHR_MASK][:, -1].all()
  cfg = model.cfg
  shape = (cfg.num_layers, 3, LEN, cfg.num_heads, cfg.kv_dim)
  first = LEN - aligned[B.EHR_MASK].sum(1)
  positions = np.maximum(np.arange(LEN)[None] - first[:, None], 0)
  out, _ = model.apply({"params": params}, {"ehr": {k: jnp.asarray(v) for k, v in aligned.items()}},
                       cache=(jnp.zeros(shape), jnp.zeros(shape)), slot=0,
                       cache_mask=jnp.asarray(aligned[B.EHR_MASK]), positions=jnp.asarray(positions))
  np.testing.assert_allclose(np.asarray(out["ehr"]["code_logits"])[:, -1], reference[[0, 1, 2], [4, 15, 8]],
                             atol=1e-5, rtol=1e-5)
  # A prompt longer than its slots keeps CLS and its most recent events.
  short = right_align(batch, 6)
  assert short[B.EHR_CODES][1].tolist() == [B.CLS_ID] + batch[B.EHR_CODES][1, 11:16].tolist()


def test_generation_is_seeded_and_stops_at_the_horizon_and_at_stop_codes():
  model = _model()
  batch = _batch([5, 12, 9, 3])
  params = model.init(jax.random.key(0), {"ehr": {k: jnp.asarray(v) for k, v in batch.items()}})["params"]
  settings = GenerationSettings(max_new=6, horizon_days=60.0, temperature=1.0, top_k=10)
  a = generate(model, params, batch, jax.random.key(1), settings, gap_edges=EDGES)
  b = generate(model, params, batch, jax.random.key(1), settings, gap_edges=EDGES)
  c = generate(model, params, batch, jax.random.key(2), settings, gap_edges=EDGES)
  for name in a:
    np.testing.assert_array_equal(a[name], b[name])
  assert not np.array_equal(a["codes"], c["codes"])
  assert a["codes"].shape == (4, 6) and (a["codes"] >= B.NUM_SPECIAL).all()
  assert (np.diff(a["days"], axis=1) >= 0).all()  # time moves forward
  assert (a["days"][a["generated"]] <= 60.0).all()
  # Once a timeline stops it stays stopped.
  assert (np.diff(a["generated"].astype(int), axis=1) <= 0).all()
  # A stop code ends a timeline after it is generated.
  stop = int(a["codes"][0, 0])
  stopped = generate(model, params, batch, jax.random.key(1), GenerationSettings(
      max_new=6, horizon_days=1e6, top_k=10, stop_ids=(stop,)), gap_edges=EDGES)
  np.testing.assert_array_equal(stopped["codes"][0], a["codes"][0])  # same draws: same key
  assert stopped["generated"][0].tolist() == [True] + [False] * 5
  assert contains(stopped, [stop], 1e6)[0]


def test_only_causal_models_with_a_gap_head_generate():
  batch = _batch([5])
  settings = GenerationSettings(max_new=2, horizon_days=30.0)
  bidirectional = _model(causal=False)
  params = bidirectional.init(jax.random.key(0), {"ehr": {k: jnp.asarray(v) for k, v in batch.items()}})["params"]
  with pytest.raises(ValueError, match="only next-event models generate"):
    generate(bidirectional, params, batch, jax.random.key(0), settings, gap_edges=EDGES)
  with pytest.raises(ValueError, match="horizon must be more than 0 days"):
    GenerationSettings(max_new=2, horizon_days=0.0)
