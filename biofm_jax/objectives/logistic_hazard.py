"""Discrete-time survival (logistic hazard) with right censoring.

Follow-up up to a horizon is cut into J intervals at `edges` (days; J + 1 edges, edges[0]
= 0, edges[J] = the horizon). The head gives one hazard logit per interval: h_k = P(event
in interval k | alive at its start). A subject whose event (or censoring) time falls in
interval j contributes

  event:     log h_j + sum_{k<j} log(1 - h_k)    (survived every earlier interval, died in j)
  censored:            sum_{k<j} log(1 - h_k)    (known only to be alive when j began)

so censored subjects inform the intervals they were seen to survive and nothing after:
heavy censoring shrinks the data but does not bias the hazards (Kvamme's LogisticHazard,
the discrete-time model used by MOTOR-style time-to-event heads). A time at or past the
horizon survived every interval (administrative censoring at the horizon): without it the
last interval would see only events and learn nothing about who survives it.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def interval_index(times: jax.Array, edges) -> jax.Array:
  """int32 index of the interval [edges[k], edges[k+1]) holding each time (times >= 0); the
  last interval is closed, so a time at the horizon (the last training event) is in it, and
  J marks a time past the horizon."""
  edges = jnp.asarray(edges, jnp.float32)
  j = jnp.searchsorted(edges, times, side="right") - 1
  return jnp.where(times == edges[-1], len(edges) - 2, j).astype(jnp.int32)


def negative_log_likelihood(hazard_logits: jax.Array, times: jax.Array, events: jax.Array, edges) -> jax.Array:
  """[B] negative log-likelihood of each subject's (time, event) under the J hazards."""
  hazard_logits = hazard_logits.astype(jnp.float32)
  num_intervals = hazard_logits.shape[-1]
  if len(edges) != num_intervals + 1:
    raise ValueError(f"survival: {num_intervals} hazard logits need {num_intervals + 1} edges, got {len(edges)}")
  j = interval_index(times, edges)  # == J past the horizon
  k = jnp.arange(num_intervals)
  log_survive = jax.nn.log_sigmoid(-hazard_logits)  # log(1 - h_k)
  log_hazard = jax.nn.log_sigmoid(hazard_logits)  # log h_k
  survived = jnp.sum(jnp.where(k[None, :] < j[:, None], log_survive, 0.0), axis=-1)
  died_in_j = jnp.take_along_axis(log_hazard, jnp.minimum(j, num_intervals - 1)[:, None], axis=-1)[:, 0]
  return -(survived + jnp.where(events & (j < num_intervals), died_in_j, 0.0))


def survival_curve(hazard_logits) -> np.ndarray:
  """[B, J] probability of being event-free at the end of each interval."""
  z = np.asarray(hazard_logits, np.float64)
  return np.exp(np.cumsum(-np.logaddexp(0.0, z), axis=-1))


def risk_score(hazard_logits) -> np.ndarray:
  """[B] cumulative hazard over all intervals, -log S(horizon): higher means an earlier
  event. It orders subjects as the probability of an event before the horizon does."""
  z = np.asarray(hazard_logits, np.float64)
  return np.logaddexp(0.0, z).sum(axis=-1)
