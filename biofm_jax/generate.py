"""Simulated futures from a next-event model: sampling with a key/value cache (ETHOS style).

A causal EHR model trained with the next-event objective and its gap head
(`objectives/autoregressive.py`, `configs/ehr_gpt.py`) gives, after each event, a
distribution over the next code and over the gap to it. `generate` continues each prompt
(a tokenised history, `batch.ehr_example_spec` fields) by sampling both, `max_new` events
at most, and stops a timeline at the horizon (days after the prompt's last event) or at a
stop code (e.g. MEDS_DEATH). Everything is one jitted program with static shapes:

  - prompts are right-aligned in `prompt_len` slots (CLS and the most recent events that
    fit; padding on the left is never attended to), so every row's next token goes to the
    same cache slot and one `lax.scan` step serves the whole batch;
  - the cache holds keys and values of every layer, [layers, B, prompt_len + max_new,
    heads, kv]; a step feeds one token per row and attends over the slots so far
    (`models/layers.Attention`), which equals the full forward pass (tested to 1e-5);
  - a sampled gap class becomes days: 0 for the same time, log-uniform within its edges
    (uniform below the first positive edge), up to twice the last edge for the last class.
    Generated events carry no numeric value (value bin 0) and advance time and age.

Sampling is seeded: the same key, prompts and settings give the same timelines. Rows are
independent, so repeating a prompt N times gives N samples of its future.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from biofm_jax.data import batch as B


@dataclasses.dataclass(frozen=True)
class GenerationSettings:
  max_new: int  # events sampled per timeline at most
  horizon_days: float  # a timeline stops at its first event past this many days after the prompt
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


def right_align(prompts: Mapping[str, np.ndarray], prompt_len: int) -> dict[str, np.ndarray]:
  """Examples with real tokens first ([B, L] fields) -> [B, prompt_len], real tokens last:
  the first token (CLS) and the most recent tokens that fit."""
  mask = np.asarray(prompts[B.EHR_MASK], bool)
  out = {name: np.zeros((len(mask), prompt_len), np.asarray(v).dtype) for name, v in prompts.items()
         if name in B.EHR_INPUT_FIELDS}
  for row, n in enumerate(mask.sum(1)):
    if n < 1:
      raise ValueError(f"generation: prompt {row} has no tokens")
    keep = np.r_[0, np.arange(max(1, n - prompt_len + 1), n)] if n > prompt_len else np.arange(n)
    for name in out:
      out[name][row, prompt_len - len(keep):] = np.asarray(prompts[name])[row, keep]
  return out


def _sample_code(key, logits: jax.Array, settings: GenerationSettings) -> jax.Array:
  logits = logits / settings.temperature
  special = jnp.arange(logits.shape[-1]) < B.NUM_SPECIAL  # [PAD], [UNK], [MASK], [CLS] are never events
  logits = jnp.where(special, -jnp.inf, logits)
  if settings.top_k:
    kth = jax.lax.top_k(logits, settings.top_k)[0][:, -1:]
    logits = jnp.where(logits < kth, -jnp.inf, logits)
  return jax.random.categorical(key, logits).astype(jnp.int32)


def _sample_gap(key, logits: jax.Array, edges: jax.Array, settings: GenerationSettings) -> jax.Array:
  """Days to the next event: a gap class, then a point within it."""
  class_key, within_key = jax.random.split(key)
  c = jax.random.categorical(class_key, logits / settings.temperature)
  upper = jnp.append(edges, 2 * edges[-1])  # class c spans (edges[c-1], upper[c]]
  lo, hi = jnp.where(c > 0, upper[jnp.maximum(c - 1, 0)], 0.0), upper[jnp.minimum(c, len(edges))]
  u = jax.random.uniform(within_key, c.shape)
  log_uniform = jnp.exp(jnp.log(jnp.maximum(lo, 1e-6)) + u * (jnp.log(hi) - jnp.log(jnp.maximum(lo, 1e-6))))
  return jnp.where(c == 0, 0.0, jnp.where(lo > 0, log_uniform, u * hi))


def _step_example(code, days, age, age_known) -> dict[str, jax.Array]:
  """One generated token per row, as [B, 1] EHR input fields."""
  col = lambda x: x[:, None]  # noqa: E731
  return {B.EHR_CODES: col(code), B.EHR_VALUE_BINS: col(jnp.zeros_like(code)),
          B.EHR_AGE: col(jnp.where(age_known, age, 0.0)), B.EHR_AGE_KNOWN: col(age_known),
          B.EHR_TIME: col(days), B.EHR_TIME_KNOWN: col(jnp.ones_like(age_known)),
          B.EHR_MASK: col(jnp.ones_like(age_known))}


@functools.partial(jax.jit, static_argnames=("model", "settings", "modality"))
def _generate(model, params, prompt, key, edges, *, settings: GenerationSettings, modality: str):
  cfg = model.cfg
  batch, prompt_len = prompt[B.EHR_MASK].shape
  slots = prompt_len + settings.max_new
  cache_shape = (cfg.num_layers, batch, slots, cfg.num_heads, cfg.kv_dim)
  cache = (jnp.zeros(cache_shape, cfg.dtype), jnp.zeros(cache_shape, cfg.dtype))
  real = prompt[B.EHR_MASK]
  cache_mask = jnp.pad(real, ((0, 0), (0, settings.max_new)))
  first = prompt_len - real.sum(1)  # the first real slot of each row
  positions = jnp.maximum(jnp.arange(prompt_len)[None, :] - first[:, None], 0).astype(jnp.int32)
  outputs, cache = model.apply({"params": params}, {modality: prompt}, cache=cache, slot=0, cache_mask=cache_mask,
                               positions=positions)
  last = lambda x: x[:, -1]  # noqa: E731  (right-aligned: the last slot is every row's latest token)
  state = dict(cache=cache, cache_mask=cache_mask, code_logits=last(outputs[modality]["code_logits"]),
               time_logits=last(outputs[modality]["time_logits"]), days=last(prompt[B.EHR_TIME]),
               age=last(prompt[B.EHR_AGE]), age_known=last(prompt[B.EHR_AGE_KNOWN]),
               position=last(positions), elapsed=jnp.zeros(batch, jnp.float32), alive=jnp.ones(batch, bool),
               key=key)
  stop_ids = jnp.asarray(settings.stop_ids or (-1,), jnp.int32)

  def step(state, i):
    key, code_key, gap_key = jax.random.split(state["key"], 3)
    code = _sample_code(code_key, state["code_logits"], settings)
    gap = _sample_gap(gap_key, state["time_logits"], edges, settings)
    elapsed = state["elapsed"] + gap
    alive = state["alive"] & (elapsed <= settings.horizon_days)
    days, age = state["days"] + gap, state["age"] + gap / B.DAYS_PER_YEAR
    cache_mask = state["cache_mask"].at[:, prompt_len + i].set(True)
    position = state["position"] + 1
    outputs, cache = model.apply({"params": params}, {modality: _step_example(code, days, age, state["age_known"])},
                                 cache=state["cache"], slot=prompt_len + i, cache_mask=cache_mask,
                                 positions=position[:, None])
    new = dict(cache=cache, cache_mask=cache_mask, code_logits=outputs[modality]["code_logits"][:, 0],
               time_logits=outputs[modality]["time_logits"][:, 0], days=days, age=age,
               age_known=state["age_known"], position=position, elapsed=elapsed,
               alive=alive & ~jnp.isin(code, stop_ids), key=key)
    return new, (code, elapsed, alive)

  _, (codes, elapsed, alive) = jax.lax.scan(step, state, jnp.arange(settings.max_new))
  return {"codes": codes.T, "days": elapsed.T, "generated": alive.T}


def generate(model, params, prompts: Mapping[str, np.ndarray], key: jax.Array, settings: GenerationSettings, *,
             gap_edges, prompt_len: int | None = None, modality: str = "ehr") -> dict[str, np.ndarray]:
  """Samples each prompt's future: {"codes": int32 [B, max_new] token ids, "days": float32
  [B, max_new] days after the prompt's last event, "generated": bool [B, max_new] the event
  happened (before the horizon, and not after a stop code)}.

  `model` is a causal single-modality model with a gap head and rotary positions;
  `prompts` are tokenised examples ([B, L] fields, real tokens first); `prompt_len`
  defaults to the model's max_len minus `max_new`, so no position exceeds what it trained on."""
  cfg = model.cfg
  if not cfg.causal:
    raise ValueError("only next-event models generate: this model is bidirectional (a masked-code model); "
                     "pre-train with configs/ehr_gpt.py")
  if cfg.position != "rope":
    raise ValueError(f"generation needs rotary positions (model.position='rope'), not {cfg.position!r}")
  if not getattr(model.modality, "time_classes", 0):
    raise ValueError("this next-event model has no gap head, so its events would have no time; pre-train with "
                     "objective.gap_edges_days set (configs/ehr_gpt.py sets it)")
  prompt_len = prompt_len or cfg.max_len - settings.max_new
  if prompt_len < 2:
    raise ValueError(f"generation: max_new={settings.max_new} leaves {prompt_len} prompt slots of the model's "
                     f"{cfg.max_len}; generate fewer events")
  aligned = {k: jnp.asarray(v) for k, v in right_align(prompts, prompt_len).items()}
  out = _generate(model, params, aligned, key, jnp.asarray(gap_edges, jnp.float32), settings=settings,
                  modality=modality)
  return {k: np.asarray(v) for k, v in out.items()}


def contains(generated: Mapping[str, np.ndarray], code_ids: Any, horizon_days: float) -> np.ndarray:
  """bool [B]: each simulated timeline holds one of `code_ids` within `horizon_days`."""
  hit = np.isin(generated["codes"], np.asarray(code_ids)) & generated["generated"]
  return (hit & (generated["days"] <= horizon_days)).any(axis=1)
