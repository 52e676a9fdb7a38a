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
from biofm_jax.models.transformer import LayerCaches, empty_layer_caches, empty_stacked_cache
from biofm_jax.models.description import TokenModality

VOCAB, BINS, LEN = 30, 4, 16
EDGES = (0.0, 1 / 24, 1.0, 7.0, 30.0, 90.0, 365.0)


def _model(causal=True, scan=True, layer_loop="auto"):
  cfg = TransformerConfig(num_layers=2, embed_dim=32, num_heads=4, mlp_dim=64, max_len=LEN, causal=causal,
                          scan_layers=scan, layer_loop=layer_loop)
  return helpers.Jitted(SingleModalityModel(cfg, TokenModality("ehr", VOCAB, BINS, LEN, encoder=EHREncoder,
                                                               time_classes=len(EDGES) + 1)))


def _batch(lengths, seed=0, inputs=()):
  rng = np.random.default_rng(seed)
  out = {name: np.zeros((len(lengths), LEN), dtype)
         for name, (_, dtype) in B.ehr_example_spec(LEN, False, inputs).items()}
  for row, n in enumerate(lengths):
    out[B.EHR_CODES][row, 0] = B.CLS_ID
    out[B.EHR_CODES][row, 1:n] = rng.integers(B.NUM_SPECIAL, VOCAB, n - 1)
    out[B.EHR_VALUE_BINS][row, 1:n] = rng.integers(0, BINS + 1, n - 1)
    times = np.sort(rng.uniform(0, 300, n - 1))
    out[B.EHR_TIME][row, 1:n] = times - times[0]  # from the first event, as TokenizeEHR gives them
    out[B.EHR_TIME_KNOWN][row, 1:n] = True
    out[B.EHR_AGE][row, 1:n] = 50 + out[B.EHR_TIME][row, 1:n] / 365.25
    out[B.EHR_AGE_KNOWN][row, 1:n] = True
    out[B.EHR_MASK][row, :n] = True
    if B.EHR_VALUE_QUANTILE in out:
      out[B.EHR_VALUE_QUANTILE][row, 1:n] = np.where(out[B.EHR_VALUE_BINS][row, 1:n] > 0, rng.uniform(0, 1, n - 1), 0)
    if B.EHR_GAP in out:
      out[B.EHR_GAP][row, 2:n] = np.diff(times)
      out[B.EHR_GAP_KNOWN][row, 2:n] = True
  return out


@pytest.mark.parametrize("scan, layer_loop, per_layer", [(True, "scan", False), (True, "unroll", False),
                                                        (False, "auto", False), (True, "scan", True),
                                                        (False, "auto", True)])
def test_the_cached_step_equals_the_uncached_forward_pass(scan, layer_loop, per_layer):
  """Either cache form: stacked on a layers axis, or one buffer pair per layer (what
  generate carries; stacked parameters then run unrolled even where layers scan)."""
  model = _model(scan=scan, layer_loop=layer_loop)
  full = _batch([LEN, LEN, LEN])
  params = model.init(jax.random.key(0), {"ehr": {k: jnp.asarray(v) for k, v in full.items()}})["params"]
  reference = model.apply({"params": params}, {"ehr": {k: jnp.asarray(v) for k, v in full.items()}})["ehr"]
  cfg = model.cfg
  cache = (empty_layer_caches if per_layer else empty_stacked_cache)(cfg, 3, LEN)
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
  assert isinstance(cache, LayerCaches) == per_layer  # returned in the form it was given


def test_right_aligned_prompts_of_any_length_see_what_the_full_pass_sees():
  model = _model()
  batch = _batch([5, 16, 9])
  params = model.init(jax.random.key(0), {"ehr": {k: jnp.asarray(v) for k, v in batch.items()}})["params"]
  reference = np.asarray(model.apply({"params": params}, {"ehr": {k: jnp.asarray(v) for k, v in batch.items()}})
                         ["ehr"]["code_logits"])
  aligned = right_align(batch, LEN)
  assert aligned[B.EHR_MASK].sum(1).tolist() == [5, 16, 9] and aligned[B.EHR_MASK][:, -1].all()
  first = LEN - aligned[B.EHR_MASK].sum(1)
  positions = np.maximum(np.arange(LEN)[None] - first[:, None], 0)
  out, _ = model.apply({"params": params}, {"ehr": {k: jnp.asarray(v) for k, v in aligned.items()}},
                       cache=empty_stacked_cache(model.cfg, 3, LEN), slot=0,
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


def test_futures_are_the_same_with_the_cache_per_layer_or_stacked():
  """The per-layer cache (updated in place) gives the futures the stacked one gave, draw for
  draw, on a scanned and on an unrolled stack."""
  from biofm_jax.generate import _generate
  batch = _batch([5, 12, 9, 3])
  aligned = {k: jnp.asarray(v) for k, v in right_align(batch, LEN - 6).items()}
  settings = GenerationSettings(max_new=6, horizon_days=1e6, temperature=1.0)
  for layer_loop in ("scan", "unroll"):
    model = _model(layer_loop=layer_loop)
    params = model.init(jax.random.key(0), {"ehr": {k: jnp.asarray(v) for k, v in batch.items()}})["params"]
    args = (model.module, params, aligned, jax.random.key(4), jnp.asarray(EDGES, jnp.float32), jnp.full(4, -1.0))
    per_layer = _generate(*args, settings=settings, modality="ehr")
    stacked = _generate(*args, settings=settings, modality="ehr", stacked_cache=True)
    np.testing.assert_array_equal(per_layer["codes"], stacked["codes"])
    np.testing.assert_allclose(per_layer["days"], stacked["days"], rtol=1e-6)
    assert len(set(np.asarray(per_layer["codes"]).ravel().tolist())) > 3  # sampled, not a constant


def test_futures_sharing_one_prefill_per_history_are_those_of_the_repeated_prompts():
  """A label row's samples prefill its history once (`sources`): the futures are the ones
  its history repeated once per future gives, draw for draw, with either cache form."""
  from biofm_jax.generate import _generate
  model = _model()
  batch = _batch([5, 12, 9])
  params = model.init(jax.random.key(0), {"ehr": {k: jnp.asarray(v) for k, v in batch.items()}})["params"]
  settings = GenerationSettings(max_new=6, horizon_days=1e6, temperature=1.0)
  sources = np.array([0, 0, 0, 1, 1, 2, 2, 2])
  quiet = np.array([0.0, 0.0, 0.0, 3.0, 3.0, -1.0, -1.0, -1.0], np.float32)
  repeated = {k: v[sources] for k, v in batch.items()}
  whole = generate(model, params, repeated, jax.random.key(5), settings, gap_edges=EDGES,
                   quiet_days=np.maximum(quiet, 0))
  shared = generate(model, params, batch, jax.random.key(5), settings, gap_edges=EDGES,
                    quiet_days=np.maximum(quiet, 0), sources=sources)
  for name in whole:
    np.testing.assert_allclose(shared[name], whole[name], rtol=1e-6, err_msg=name)
  assert len({tuple(row) for row in whole["codes"][:3].tolist()}) > 1  # one history's samples differ
  aligned = {k: jnp.asarray(v) for k, v in right_align(batch, LEN - 6).items()}
  args = (model.module, params, aligned, jax.random.key(5), jnp.asarray(EDGES, jnp.float32), jnp.asarray(quiet),
          jnp.asarray(sources))
  per_layer = _generate(*args, settings=settings, modality="ehr")
  stacked = _generate(*args, settings=settings, modality="ehr", stacked_cache=True)
  np.testing.assert_array_equal(per_layer["codes"], stacked["codes"])
  with pytest.raises(ValueError, match=r"sources must be prompt rows in \[0, 3\)"):
    generate(model, params, batch, jax.random.key(5), settings, gap_edges=EDGES, sources=np.array([0, 3]))


def test_only_causal_models_with_a_gap_head_generate():
  batch = _batch([5])
  settings = GenerationSettings(max_new=2, horizon_days=30.0)
  bidirectional = _model(causal=False)
  params = bidirectional.init(jax.random.key(0), {"ehr": {k: jnp.asarray(v) for k, v in batch.items()}})["params"]
  with pytest.raises(ValueError, match="only next-event models generate"):
    generate(bidirectional, params, batch, jax.random.key(0), settings, gap_edges=EDGES)
  with pytest.raises(ValueError, match="horizon must be more than 0 days"):
    GenerationSettings(max_new=2, horizon_days=0.0)


def _record_with_static_rows(events: int) -> dict:
  """Two static rows (no time) and `events` timed ones a day apart, starting 2020-01-01."""
  codes = ["GENDER//F", "RACE//A"] + [f"C{i % 5}" for i in range(events)]
  start = np.datetime64("2020-01-01T08:00", "us")
  times = np.r_[[np.datetime64("NaT", "us")] * 2, start + np.arange(events) * np.timedelta64(86_400_000_000, "us")]
  return {"subject_id": 1, "codes": np.asarray(codes, dtype=object), "times": times.astype("datetime64[us]"),
          "numeric_values": np.full(len(codes), np.nan, np.float32)}


def test_a_prompt_is_the_window_training_s_tokeniser_makes_in_the_prompt_slots():
  """Static rows kept and times re-based, exactly as TokenizeEHR presents a window."""
  from biofm_jax.modalities.ehr.data import EHRVocab, TokenizeEHR
  record = _record_with_static_rows(30)
  vocab = EHRVocab.from_counts({c: 3 for c in set(record["codes"])}, {}, min_count=1, num_value_bins=2)
  long = {k: v[None] for k, v in TokenizeEHR(vocab, 40).map(record).items()}
  slots = 10
  window = TokenizeEHR(vocab, slots).map(record)  # CLS, 2 static rows, the last 7 events
  aligned = right_align(long, slots)
  for name in B.EHR_INPUT_FIELDS:
    np.testing.assert_allclose(aligned[name][0], window[name], atol=1e-4, err_msg=name)
  # The gaps too: the window's first timed event has no earlier one.
  gapped = right_align({k: v[None] for k, v in TokenizeEHR(vocab, 40, inputs=B.EHR_OPTIONAL_INPUTS).map(record).items()},
                       slots)
  window = TokenizeEHR(vocab, slots, inputs=B.EHR_OPTIONAL_INPUTS).map(record)
  assert window[B.EHR_GAP_KNOWN].tolist() == [False] * 4 + [True] * 6
  for name in B.EHR_INPUT_FIELDS + B.EHR_OPTIONAL_INPUTS:
    np.testing.assert_allclose(gapped[name][0], window[name], atol=1e-4, err_msg=name)
  for name in B.EHR_INPUT_FIELDS:
    np.testing.assert_allclose(aligned[name][0], window[name], atol=1e-4, err_msg=name)
  static = vocab.code_ids(np.asarray(["GENDER//F", "RACE//A"], dtype=object))
  assert aligned[B.EHR_CODES][0, 1:3].tolist() == static.tolist()
  assert aligned[B.EHR_TIME][0, 3] == 0.0 and aligned[B.EHR_TIME][0, -1] == 6.0
  # A prompt that fits is only moved right.
  short = TokenizeEHR(vocab, 40).map(_record_with_static_rows(3))
  shifted = right_align({k: v[None] for k, v in short.items()}, slots)
  assert shifted[B.EHR_CODES][0, -6:].tolist() == short[B.EHR_CODES][:6].tolist()
  assert not shifted[B.EHR_MASK][0, :-6].any()


def _gap_reference(model, params, prompt) -> np.ndarray:
  """The gap head's class probabilities after the prompt's last token (full forward pass)."""
  out = model.apply({"params": params}, {"ehr": {k: jnp.asarray(v) for k, v in prompt.items()}})["ehr"]
  last = int(prompt[B.EHR_MASK][0].sum()) - 1
  return np.asarray(jax.nn.softmax(out["time_logits"][0, last]))


def test_the_first_event_comes_after_the_prediction_time_drawn_from_the_model_given_the_quiet_time(caplog):
  """A planted gap of 20 days between the last event and the prediction time: every future
  starts after it, the classes follow the gap head conditioned on gap > 20 days, and days
  and the horizon count from the prediction time."""
  model = _model()
  prompt = _batch([7])
  params = model.init(jax.random.key(0), {"ehr": {k: jnp.asarray(v) for k, v in prompt.items()}})["params"]
  rows = 4096
  batch = {k: np.repeat(v, rows, axis=0) for k, v in prompt.items()}
  head = lambda n: {k: v[:n] for k, v in batch.items()}  # noqa: E731
  one = GenerationSettings(max_new=1, horizon_days=1e6)
  quiet = np.full(rows, 20.0)
  after = generate(model, params, batch, jax.random.key(3), one, gap_edges=EDGES, quiet_days=quiet)
  assert (after["days"][:, 0] > 0).all() and after["generated"].all()
  # P(class | gap > 20): the head's probabilities times each class's share of mass past 20 days
  # (class (7, 30] is log-uniform: log(30/20) / log(30/7) of it; the later classes whole).
  share = np.zeros(len(EDGES) + 1)
  share[4], share[5:] = np.log(30 / 20) / np.log(30 / 7), 1.0
  expected = _gap_reference(model, params, prompt) * share
  expected /= expected.sum()
  classes = np.searchsorted(np.asarray(EDGES), after["days"][:, 0] + 20.0, side="left")
  seen = np.bincount(classes, minlength=len(EDGES) + 1) / rows
  np.testing.assert_allclose(seen, expected, atol=4 * np.sqrt(0.25 / rows))
  # The horizon counts from the prediction time: (prediction time, + 30 days].
  settings = GenerationSettings(max_new=6, horizon_days=30.0)
  gapped = generate(model, params, head(64), jax.random.key(4), settings, gap_edges=EDGES,
                    quiet_days=np.full(64, 200.0))
  days = gapped["days"][gapped["generated"]]
  assert len(days) and (days > 0).all() and (days <= 30.0).all()
  # A quiet time past the head's longest gap (730 days): the future starts after it, counted.
  with caplog.at_level("WARNING"):
    far = generate(model, params, head(8), jax.random.key(5), one, gap_edges=EDGES, quiet_days=np.full(8, 1000.0))
  assert (far["days"][:, 0] > 0).all() and "8 of 8 prompts have their last event 730 days" in caplog.text
  with pytest.raises(ValueError, match=r"quiet_days\[1\] is -1.0, expected finite days >= 0"):
    generate(model, params, head(2), jax.random.key(5), one, gap_edges=EDGES, quiet_days=np.array([0.0, -1.0]))


@pytest.mark.parametrize("inputs", [(), B.EHR_OPTIONAL_INPUTS])
def test_greedy_generation_follows_the_full_forward_pass_over_what_it_generated(inputs):
  """The sampling loop (cache, positions, the time and age it feeds each new event) against
  the plain model: with top_k=1, each generated code is the full pass's most likely next code
  at the token before it, over the prompt followed by the generated events as inputs. With
  the optional inputs, a generated event has no value quantile and its gap is the one drawn."""
  model = _model()
  prompt_len, max_new = 8, 6
  batch = _batch([6, 8, 3], inputs=inputs)
  params = model.init(jax.random.key(0), {"ehr": {k: jnp.asarray(v) for k, v in batch.items()}})["params"]
  out = generate(model, params, batch, jax.random.key(3), GenerationSettings(max_new=max_new, horizon_days=1e6,
                                                                            top_k=1),
                 gap_edges=EDGES, prompt_len=prompt_len)
  assert out["generated"].all()
  lengths = batch[B.EHR_MASK].sum(1)
  full = {k: np.array(v) for k, v in batch.items()}
  for row, n in enumerate(lengths):
    last_time, last_age = batch[B.EHR_TIME][row, n - 1], batch[B.EHR_AGE][row, n - 1]
    at = slice(n, n + max_new)
    full[B.EHR_CODES][row, at] = out["codes"][row]
    full[B.EHR_VALUE_BINS][row, at] = 0
    full[B.EHR_TIME][row, at] = last_time + out["days"][row]
    full[B.EHR_TIME_KNOWN][row, at] = True
    full[B.EHR_AGE][row, at] = last_age + out["days"][row] / B.DAYS_PER_YEAR
    full[B.EHR_AGE_KNOWN][row, at] = True
    full[B.EHR_MASK][row, at] = True
    if inputs:
      full[B.EHR_VALUE_QUANTILE][row, at] = 0.0
      full[B.EHR_GAP][row, at] = np.diff(np.r_[0.0, out["days"][row]])
      full[B.EHR_GAP_KNOWN][row, at] = True
  logits = np.array(model.apply({"params": params}, {"ehr": {k: jnp.asarray(v) for k, v in full.items()}})
                     ["ehr"]["code_logits"])
  logits[..., :B.NUM_SPECIAL] = -np.inf  # special tokens are never events
  for row, n in enumerate(lengths):
    predicted = logits[row, n - 1:n - 1 + max_new].argmax(-1)
    assert predicted.tolist() == out["codes"][row].tolist(), row


def test_futures_per_batch_are_capped_by_the_memory_their_cache_needs():
  from biofm_jax.generate import CACHE_BUDGET_BYTES, rows_per_batch
  cfg = TransformerConfig(num_layers=12, embed_dim=768, num_heads=12, mlp_dim=3072, max_len=512)
  per_row = 2 * 12 * 512 * 768 * 4  # keys and values of every layer and slot, float32
  assert rows_per_batch(cfg, 512) == min(64, CACHE_BUDGET_BYTES // per_row)
  assert rows_per_batch(cfg, 512, budget_bytes=10 * per_row + 1) == 10
  assert rows_per_batch(cfg, 512, budget_bytes=1) == 1  # one row always runs
  assert rows_per_batch(_model().cfg, LEN) == 64
