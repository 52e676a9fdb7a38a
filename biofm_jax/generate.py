"""Simulated futures from a next-event model: sampling with a key/value cache (ETHOS style).

A causal EHR model trained with the next-event objective and its gap head
(`objectives/autoregressive.py`, `configs/ehr_gpt.py`) gives, after each event, a
distribution over the next code and over the gap to it. `generate` continues each prompt
(a tokenised history, `batch.ehr_example_spec` fields) by sampling both, `max_new` events
at most, and stops a timeline at the horizon (days after the prediction time) or at a stop
code (e.g. MEDS_DEATH). Everything is one jitted program with static shapes:

  - a prompt is what training's tokeniser (`TokenizeEHR`, recent window) makes of the
    history in `prompt_len` slots: CLS, the static rows (sex, race), the most recent timed
    events that fit, times re-based to the first of them (`right_align` cuts a longer
    tokenised prompt to exactly that); prompts are right-aligned (padding on the left is
    never attended to), so every row's next token goes to the same cache slot and one
    `lax.scan` step serves the whole batch;
  - the prediction time may come after the prompt's last event (`quiet_days`): the record
    shows no event in between, so the first event is sampled from the gap head's
    distribution conditioned on coming after the prediction time (each gap class weighted
    by its share of mass past it, the point drawn within what is left of the class). This
    is the model's own future given the quiet time, not a rejection of early events, so
    the window (prediction time, + horizon] is simulated in full;
  - the cache holds keys and values of every layer, one buffer pair per layer of
    prompt_len + max_new slots (so the loop updates each in place), laid out heads first
    for attention's matmuls (`models/layers.cache_shapes`); a step feeds one token per row
    and attends over the slots so far (`models/layers.Attention`), which equals the full
    forward pass (tested to 1e-5);
  - the stacked (scanned) layers' parameters are sliced into one tree per layer once per
    call, outside the decoding loop (`_per_layer_model`), so no step copies weights;
  - a sampled gap class becomes days: 0 for the same time, log-uniform within its edges
    (uniform below the first positive edge), up to twice the last edge for the last class.
    Generated events carry no numeric value (value bin 0) and advance time and age.

Sampling is seeded: the same key, prompts and settings give the same timelines. Rows are
independent, so repeating a prompt N times gives N samples of its future; `sources` gives
the same N samples from one prefill of the prompt (how zero-shot simulates a label row).
"""
from __future__ import annotations

import dataclasses
import functools
import logging
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from biofm_jax.data import batch as B
from biofm_jax.models.transformer import empty_layer_caches, empty_stacked_cache

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class GenerationSettings:
  max_new: int  # events sampled per timeline at most
  horizon_days: float  # a timeline stops at its first event past this many days after the prediction time
  temperature: float = 1.0
  top_k: int = 0  # 0: sample from every code
  stop_ids: tuple[int, ...] = ()  # token ids that end a timeline once generated (e.g. MEDS_DEATH's)

  def __post_init__(self):
    if self.max_new < 1:
      raise ValueError(f"generation: max_new={self.max_new} must be at least 1")
    if not self.horizon_days > 0:
      raise ValueError(f"generation: the horizon must be more than 0 days, got {self.horizon_days}")
    if not self.temperature > 0:
      raise ValueError(f"generation: temperature must be more than 0, got {self.temperature}")


def _window_tokens(time_known: np.ndarray, n: int, prompt_len: int) -> np.ndarray:
  """Token indices a prompt of `n` tokens keeps in `prompt_len` slots, as training's
  tokeniser windows a record (`TokenizeEHR`, recent window): CLS, the static rows (no time)
  always, then the most recent timed events that fit."""
  events = np.arange(1, n)
  timed_mask = np.asarray(time_known[1:n], bool)
  static, timed = events[~timed_mask][: prompt_len - 1], events[timed_mask]
  room = prompt_len - 1 - len(static)
  return np.concatenate([[0], static, timed[max(len(timed) - room, 0):]]).astype(np.int64)


def right_align(prompts: Mapping[str, np.ndarray], prompt_len: int) -> dict[str, np.ndarray]:
  """Tokenised examples ([B, L] fields, real tokens first) -> [B, prompt_len], real tokens
  last, each the window training's tokeniser would make in `prompt_len` slots: CLS, the
  static rows, the most recent timed events that fit, with times re-based so the first kept
  timed event is at 0 (ages are absolute and stay)."""
  mask = np.asarray(prompts[B.EHR_MASK], bool)
  time_known = np.asarray(prompts[B.EHR_TIME_KNOWN], bool)
  out = {name: np.zeros((len(mask), prompt_len), np.asarray(v).dtype) for name, v in prompts.items()
         if name in B.EHR_INPUT_FIELDS + B.EHR_OPTIONAL_INPUTS}
  for row, n in enumerate(mask.sum(1)):
    if n < 1:
      raise ValueError(f"generation: prompt {row} has no tokens")
    keep = _window_tokens(time_known[row], n, prompt_len)
    for name in out:
      out[name][row, prompt_len - len(keep):] = np.asarray(prompts[name])[row, keep]
    kept_timed = time_known[row, keep]
    if kept_timed.any():  # from the window's first event, as TokenizeEHR does
      times = out[B.EHR_TIME][row, prompt_len - len(keep):]
      times[kept_timed] -= times[kept_timed].min()
      if B.EHR_GAP in out:  # the first kept timed event has no earlier one in the window
        first = prompt_len - len(keep) + int(np.argmax(kept_timed))
        out[B.EHR_GAP][row, first], out[B.EHR_GAP_KNOWN][row, first] = 0.0, False
  return out


def _sample_code(key, logits: jax.Array, settings: GenerationSettings) -> jax.Array:
  logits = logits / settings.temperature
  special = jnp.arange(logits.shape[-1]) < B.NUM_SPECIAL  # [PAD], [UNK], [MASK], [CLS] are never events
  logits = jnp.where(special, -jnp.inf, logits)
  if settings.top_k:
    kth = jax.lax.top_k(logits, settings.top_k)[0][:, -1:]
    logits = jnp.where(logits < kth, -jnp.inf, logits)
  return jax.random.categorical(key, logits).astype(jnp.int32)


def _gap_class_bounds(edges: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(lo, hi) [C] of each gap class in days: class 0 is the point 0, class c > 0 spans
  (lo[c], hi[c]], the last up to twice the last edge."""
  hi = jnp.append(edges, 2 * edges[-1])
  return jnp.concatenate([jnp.zeros(1, hi.dtype), hi[:-1]]), hi


def _share_after(after: jax.Array, lo: jax.Array, hi: jax.Array) -> jax.Array:
  """[B, C] share of each gap class's mass (as `_sample_gap` places points in it) beyond
  `after` [B] days; `after` < 0 keeps all of it, the point 0 included."""
  t = after[:, None]
  start = jnp.maximum(lo, t)
  tiny = 1e-6
  uniform = (hi - start) / jnp.maximum(hi - lo, tiny)
  log_uniform = (jnp.log(hi) - jnp.log(jnp.maximum(start, tiny))) / (jnp.log(hi) - jnp.log(jnp.maximum(lo, tiny)))
  share = jnp.where(lo > 0, log_uniform, uniform)
  share = jnp.where(jnp.arange(lo.shape[0]) == 0, (t < 0).astype(share.dtype), share)
  return jnp.clip(share, 0.0, 1.0)


def _sample_gap(key, logits: jax.Array, edges: jax.Array, settings: GenerationSettings,
                after: jax.Array) -> jax.Array:
  """Days to the next event: a gap class, then a point within it, conditioned on the gap
  exceeding `after` [B] days (< 0: unconditioned). A row whose `after` is past every class
  (the head has no gap that long) gets `after` plus an unconditioned gap above 0."""
  class_key, within_key = jax.random.split(key)
  lo, hi = _gap_class_bounds(edges)
  beyond = ~(_share_after(after, lo, hi) > 0).any(axis=1)
  floor = jnp.where(beyond, 0.0, after)
  share = _share_after(floor, lo, hi)
  # P(class c | gap > floor) is proportional to P(c) times c's share of mass past floor.
  weighted = logits / settings.temperature + jnp.where(share > 0, jnp.log(jnp.maximum(share, 1e-30)), -jnp.inf)
  c = jax.random.categorical(class_key, weighted)
  lo_c, hi_c = lo[c], hi[c]
  start = jnp.maximum(lo_c, floor)
  u = jax.random.uniform(within_key, c.shape)
  log_start = jnp.log(jnp.maximum(start, 1e-6))
  log_uniform = jnp.exp(log_start + u * (jnp.log(hi_c) - log_start))
  gap = jnp.where(c == 0, 0.0, jnp.where(lo_c > 0, log_uniform, start + u * (hi_c - start)))
  return jnp.where(beyond, after, 0.0) + gap


def _step_example(code, days, age, age_known, gap, inputs: tuple[str, ...]) -> dict[str, jax.Array]:
  """One generated token per row, as [B, 1] EHR input fields, with the optional `inputs` the
  prompt has (a generated event has no value: no bin, no quantile)."""
  col = lambda x: x[:, None]  # noqa: E731
  example = {B.EHR_CODES: col(code), B.EHR_VALUE_BINS: col(jnp.zeros_like(code)),
             B.EHR_AGE: col(jnp.where(age_known, age, 0.0)), B.EHR_AGE_KNOWN: col(age_known),
             B.EHR_TIME: col(days), B.EHR_TIME_KNOWN: col(jnp.ones_like(age_known)),
             B.EHR_MASK: col(jnp.ones_like(age_known))}
  optional = {B.EHR_VALUE_QUANTILE: col(jnp.zeros_like(days)), B.EHR_GAP: col(gap),
              B.EHR_GAP_KNOWN: col(jnp.ones_like(age_known))}
  return {**example, **{name: optional[name] for name in inputs}}


def _per_layer_model(model, params):
  """(model, params) that decode with each layer's parameters in arrays of their own: a
  stack of scanned layers is sliced once per call, outside the decoding loop, where XLA
  would otherwise copy every layer's slice of the stacked weights at every step (the
  parameters' tree is the unscanned stack's, `layer_{i}`, which the model then builds)."""
  cfg = model.cfg
  if not cfg.scan_layers:
    return model, params
  stack = dict(params["transformer"])
  stacked = nn.meta.unbox(stack.pop("layers"))
  for i in range(cfg.num_layers):
    stack[f"layer_{i}"] = jax.tree.map(lambda p, i=i: p[i], stacked)
  return model.clone(cfg=dataclasses.replace(cfg, scan_layers=False)), {**params, "transformer": stack}


@functools.partial(jax.jit, static_argnames=("model", "settings", "modality", "stacked_cache"))
def _generate(model, params, prompt, key, edges, quiet, sources=None, *, settings: GenerationSettings,
              modality: str, stacked_cache: bool = False):
  """`sources` (int32 [B], optional): future b continues prompt row sources[b]; each prompt
  row is then prefilled once and its cache copied to its futures (a label row's samples)."""
  if not stacked_cache:  # (the stacked cache is the scanned stack's form: it keeps the scan's parameters)
    model, params = _per_layer_model(model, params)
  cfg = model.cfg
  prompts, prompt_len = prompt[B.EHR_MASK].shape
  slots = prompt_len + settings.max_new
  # One (keys, values) buffer pair per layer, carried through the decoding loop and updated
  # in place (models/transformer.py: LayerCaches). `stacked_cache`: the [layers, ...] form,
  # copied whole at every step (kept to test that both give the same futures).
  cache = (empty_stacked_cache if stacked_cache else empty_layer_caches)(cfg, prompts, slots)
  real = prompt[B.EHR_MASK]
  cache_mask = jnp.pad(real, ((0, 0), (0, settings.max_new)))
  first = prompt_len - real.sum(1)  # the first real slot of each row
  positions = jnp.maximum(jnp.arange(prompt_len)[None, :] - first[:, None], 0).astype(jnp.int32)
  outputs, cache = model.apply({"params": params}, {modality: prompt}, cache=cache, slot=0, cache_mask=cache_mask,
                               positions=positions)
  last = lambda x: x[:, -1]  # noqa: E731  (right-aligned: the last slot is every row's latest token)
  state = dict(cache=cache, cache_mask=cache_mask, code_logits=last(outputs[modality]["code_logits"]),
               time_logits=last(outputs[modality]["time_logits"]), days=last(prompt[B.EHR_TIME]),
               age=last(prompt[B.EHR_AGE]), age_known=last(prompt[B.EHR_AGE_KNOWN]), position=last(positions))
  if sources is not None:  # each future from its prompt's prefill (the stacked cache's batch axis is 1)
    rows = lambda x, axis=0: jnp.take(x, sources, axis=axis)  # noqa: E731
    cache = state.pop("cache")
    state = {name: rows(value) for name, value in state.items()}
    state["cache"] = jax.tree.map(lambda c: rows(c, 1), cache) if stacked_cache else jax.tree.map(rows, cache)
  batch = state["position"].shape[0]
  state.update(elapsed=jnp.zeros(batch, jnp.float32), alive=jnp.ones(batch, bool), key=key)
  stop_ids = jnp.asarray(settings.stop_ids or (-1,), jnp.int32)
  inputs = tuple(name for name in B.EHR_OPTIONAL_INPUTS if name in prompt)
  origin = jnp.maximum(quiet, 0.0)  # the prediction time, in days after the last event

  def step(state, i):
    key, code_key, gap_key = jax.random.split(state["key"], 3)
    code = _sample_code(code_key, state["code_logits"], settings)
    # Only the first gap knows the quiet time: nothing happened before the prediction time.
    gap = _sample_gap(gap_key, state["time_logits"], edges, settings, jnp.where(i == 0, quiet, -1.0))
    elapsed = state["elapsed"] + gap
    alive = state["alive"] & (elapsed - origin <= settings.horizon_days)
    days, age = state["days"] + gap, state["age"] + gap / B.DAYS_PER_YEAR
    cache_mask = state["cache_mask"].at[:, prompt_len + i].set(True)
    position = state["position"] + 1
    outputs, cache = model.apply({"params": params}, {modality: _step_example(code, days, age, state["age_known"], gap, inputs)},
                                 cache=state["cache"], slot=prompt_len + i, cache_mask=cache_mask,
                                 positions=position[:, None])
    new = dict(cache=cache, cache_mask=cache_mask, code_logits=outputs[modality]["code_logits"][:, 0],
               time_logits=outputs[modality]["time_logits"][:, 0], days=days, age=age,
               age_known=state["age_known"], position=position, elapsed=elapsed,
               alive=alive & ~jnp.isin(code, stop_ids), key=key)
    return new, (code, elapsed - origin, alive)

  _, (codes, days, alive) = jax.lax.scan(step, state, jnp.arange(settings.max_new))
  return {"codes": codes.T, "days": days.T, "generated": alive.T}


# The key/value cache of one batch of simulated futures holds at most this many bytes
# (`rows_per_batch`): 64 rows of `ehr_gpt:base` in float32 need 2.4 GB.
CACHE_BUDGET_BYTES = 4 * 1024 ** 3


def rows_per_batch(cfg, slots: int, *, most: int = 64, budget_bytes: int = CACHE_BUDGET_BYTES) -> int:
  """Futures to simulate at once: `most`, or fewer where their key/value cache (keys and
  values of every layer, `slots` each) would pass `budget_bytes`. Decoding reads every
  weight once per step whatever the rows, so more rows per step cost little more time."""
  per_row = 2 * cfg.num_layers * slots * cfg.num_heads * cfg.kv_dim * jnp.dtype(cfg.dtype).itemsize
  return int(max(1, min(most, budget_bytes // per_row)))


def prompt_slots(model, settings: GenerationSettings, prompt_len: int | None = None) -> int:
  """Token slots a prompt gets: `prompt_len`, by default the model's max_len minus
  `max_new`, so no position exceeds what it trained on."""
  max_len = model.cfg.max_len
  prompt_len = prompt_len or max_len - settings.max_new
  if prompt_len < 2:
    raise ValueError(f"generation: max_new={settings.max_new} leaves {prompt_len} prompt slots of the model's "
                     f"{max_len}; generate fewer events")
  return prompt_len


def _check_quiet_days(quiet_days, rows: int, gap_edges) -> np.ndarray:
  """float32 [rows]: the quiet days given, checked; -1 (unconditioned) when None."""
  if quiet_days is None:
    return np.full(rows, -1.0, np.float32)
  quiet = np.asarray(quiet_days, np.float64)
  if quiet.shape != (rows,):
    raise ValueError(f"generation: quiet_days has shape {quiet.shape}, expected ({rows},): one per prompt")
  bad = np.flatnonzero(~(np.isfinite(quiet) & (quiet >= 0)))
  if len(bad):
    raise ValueError(f"generation: quiet_days[{bad[0]}] is {quiet[bad[0]]}, expected finite days >= 0 from the "
                     f"prompt's last event to its prediction time")
  longest = 2 * float(gap_edges[-1])
  if (quiet >= longest).any():
    log.warning("generation: %d of %d prompts have their last event %g days or more before the prediction time, "
                "past the gap head's longest gap; their first event is drawn as a gap after the prediction time",
                int((quiet >= longest).sum()), rows, longest)
  return quiet.astype(np.float32)


def generate(model, params, prompts: Mapping[str, np.ndarray], key: jax.Array, settings: GenerationSettings, *,
             gap_edges, prompt_len: int | None = None, modality: str = "ehr",
             quiet_days: np.ndarray | None = None, sources: np.ndarray | None = None) -> dict[str, np.ndarray]:
  """Samples each prompt's future: {"codes": int32 [B, max_new] token ids, "days": float32
  [B, max_new] days after the prediction time, "generated": bool [B, max_new] the event
  happened (within the horizon, and not after a stop code)}.

  `model` is a causal single-modality model with a gap head and rotary positions;
  `prompts` are tokenised examples ([B, L] fields, real tokens first), cut to `prompt_slots`
  as training's tokeniser would cut them. `quiet_days` [B]: days from each prompt's last
  event to its prediction time, in which its record shows no event; the first event is
  drawn after the prediction time (conditioned on it), and `days` and the horizon count
  from it, so the window is (prediction time, prediction time + horizon]. 0 is a prediction
  time at the last event with its instant complete; None continues from the last event
  unconditioned (an event at its very instant allowed).

  `sources` (int [B]): future b continues prompt row sources[b], so several futures of one
  history (a label row's samples) share one prefill; `quiet_days` and the outputs are then
  per future. The draws are those of `prompts` repeated into B rows."""
  cfg = model.cfg
  if not cfg.causal:
    raise ValueError("only next-event models generate: this model is bidirectional (a masked-code model); "
                     "pre-train with configs/ehr_gpt.py")
  if cfg.position != "rope":
    raise ValueError(f"generation needs rotary positions (model.position='rope'), not {cfg.position!r}")
  if not getattr(model.modality, "time_classes", 0):
    raise ValueError("this next-event model has no gap head, so its events would have no time; pre-train with "
                     "objective.gap_edges_days set (configs/ehr_gpt.py sets it)")
  prompt_len = prompt_slots(model, settings, prompt_len)
  num_prompts = len(prompts[B.EHR_MASK])
  if sources is not None:
    sources = np.asarray(sources)
    if sources.ndim != 1 or not len(sources) or sources.min() < 0 or sources.max() >= num_prompts:
      raise ValueError(f"generation: sources must be prompt rows in [0, {num_prompts}), one per future")
  quiet = _check_quiet_days(quiet_days, num_prompts if sources is None else len(sources), gap_edges)
  aligned = {k: jnp.asarray(v) for k, v in right_align(prompts, prompt_len).items()}
  out = _generate(model, params, aligned, key, jnp.asarray(gap_edges, jnp.float32), jnp.asarray(quiet),
                  None if sources is None else jnp.asarray(sources, jnp.int32), settings=settings, modality=modality)
  return {k: np.asarray(v) for k, v in out.items()}


def contains(generated: Mapping[str, np.ndarray], code_ids: Any, horizon_days: float) -> np.ndarray:
  """bool [B]: each simulated timeline holds one of `code_ids` within `horizon_days` after
  its prediction time."""
  hit = np.isin(generated["codes"], np.asarray(code_ids)) & generated["generated"]
  return (hit & (generated["days"] <= horizon_days)).any(axis=1)
