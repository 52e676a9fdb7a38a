"""What every pre-training objective provides, and the loss arithmetic they share.

An objective reports *terms* as (sum, count) pairs rather than means. The count of each
term depends on the batch only (how many positions were masked, how many next events
exist), so the train step can normalise by the whole batch's count before it splits the
batch into micro-batches: gradient accumulation then gives exactly the full-batch
gradient, and an evaluation over many batches gives exact per-token averages.
"""
from __future__ import annotations

from typing import Mapping, Protocol

import jax
import jax.numpy as jnp
import optax


# Objectives whose targets lie after the position that predicts them: the stack must be causal.
CAUSAL = ("autoregressive", "time_to_event")


class Objective(Protocol):
  name: str
  loss_weights: Mapping[str, float]  # the terms that form the training loss, and their weights

  def counts(self, batch) -> dict[str, jax.Array]:
    """Per term: how many items the term averages over; a function of the batch only."""

  def sums(self, outputs, batch) -> dict[str, jax.Array]:
    """Per term: the sum over items (same keys as `counts`)."""


def cross_entropy_sums(logits: jax.Array, labels: jax.Array, weights: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Sum of weighted token cross-entropy and of weighted top-1 hits."""
  weights = weights.astype(jnp.float32)
  loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
  hits = (jnp.argmax(logits, axis=-1) == labels).astype(jnp.float32)
  return jnp.sum(loss * weights), jnp.sum(hits * weights)


def weighted_loss(objective: Objective, sums: Mapping[str, jax.Array], counts: Mapping[str, jax.Array]) -> jax.Array:
  """sum_k w_k * sums_k / counts_k; a term with no items contributes zero, not NaN, and so
  does a term the batch has no part for (a multimodal batch that leaves its modality out)."""
  return sum((weight * sums[name] / jnp.maximum(counts[name], 1.0)
              for name, weight in objective.loss_weights.items() if name in sums), jnp.zeros((), jnp.float32))


def means(sums: Mapping[str, jax.Array], counts: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
  return {name: sums[name] / jnp.maximum(counts[name], 1.0) for name in sums}
