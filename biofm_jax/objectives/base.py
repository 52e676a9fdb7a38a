"""What every pre-training objective provides, and the loss arithmetic they share.

An objective reports *terms* as (sum, count) pairs rather than means. The count of each
term depends on the batch only (how many positions were masked, how many next events
exist), so the train step can normalise by the whole batch's count before it splits the
batch into micro-batches: gradient accumulation then gives exactly the full-batch
gradient, and an evaluation over many batches gives exact per-token averages.

An objective also brings what the loop and the summary would otherwise have to ask about
by name (`ObjectiveDefaults` gives each its usual form):
  causal              its targets lie after the position that predicts them, so the
                      model's stack must be causal (a class attribute: known before any
                      data is read)
  derived_metrics     evaluation figures computed from the term means (perplexity)
  final_evaluations   `Evaluation`s run once after training on the tuning split, from the
                      model's outputs (cross-modal retrieval for contrastive alignment)
  summary_lines       the readable lines of a finished run's summary
"""
from __future__ import annotations

from typing import Any, Callable, ClassVar, Mapping, Protocol, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

# (output path per name, e.g. {"ehr": ("contrastive", "ehr")}) -> {name: [subjects, D]} over
# the evaluated split: how an `Evaluation` reads a trained model without knowing how it runs.
EmbedOutputs = Callable[[Mapping[str, tuple[str, ...]]], Mapping[str, np.ndarray]]


class Evaluation(Protocol):
  """A check run once after training (`final_evaluations`); its figures are logged and
  summarised as `<name>/<key>`."""

  @property
  def name(self) -> str:
    ...

  def __call__(self, embed: EmbedOutputs, data_module: Any, split: str) -> dict[str, float]:
    """Figures for `split` of `data_module`, keyed without the `<name>/` prefix the loop adds."""
    ...

  def summary_lines(self, summary: Mapping[str, Any]) -> list[str]:
    """Readable lines about its figures in a run's summary."""
    ...


class Objective(Protocol):
  @property
  def name(self) -> str:
    ...

  @property
  def causal(self) -> bool:
    ...

  @property
  def loss_weights(self) -> Mapping[str, float]:
    """The terms that form the training loss, and their weights."""
    ...

  def counts(self, batch: Any) -> dict[str, jax.Array]:
    """Per term: how many items the term averages over; a function of the batch only."""
    ...

  def sums(self, outputs: Any, batch: Any) -> dict[str, jax.Array]:
    """Per term: the sum over items (same keys as `counts`)."""
    ...

  def derived_metrics(self, means: Mapping[str, float]) -> dict[str, float]:
    """Figures computed from the evaluation's term means (`{term: mean}`)."""
    ...

  def final_evaluations(self) -> Sequence[Evaluation]:
    ...

  def summary_lines(self, summary: Mapping[str, Any]) -> list[str]:
    ...


class ObjectiveDefaults:
  """The usual form of an objective's behaviour, for an objective to inherit and override."""
  causal: ClassVar[bool] = False

  def derived_metrics(self, means: Mapping[str, float]) -> dict[str, float]:
    del means
    return {}

  def final_evaluations(self) -> Sequence[Evaluation]:
    return ()

  def summary_lines(self: Objective, summary: Mapping[str, Any]) -> list[str]:
    """Each reference loss beside the held-out term it bounds, then each final
    evaluation's lines."""
    return reference_lines(summary) + [line for evaluation in self.final_evaluations()
                                       for line in evaluation.summary_lines(summary)]


REFERENCE_PREFIX = "reference/"  # a loss a model must beat; "baseline" names classical comparison models


def reference_lines(summary: Mapping[str, Any]) -> list[str]:
  """"held-out code_loss 4.012 vs 5.204 for the unigram reference (23% lower)": each reference
  loss `reference/<name>_<term>` (what a modality's row says a model must beat) beside the
  run's `eval/<term>`."""
  terms = [key[len("eval/"):] for key in summary if key.startswith("eval/")]
  lines = []
  for key, reference in summary.items():
    bounded = [t for t in terms if key.startswith(REFERENCE_PREFIX) and key.endswith(f"_{t}")]
    if not bounded or not isinstance(reference, float) or reference <= 0:
      continue
    term = max(bounded, key=len)  # "tte_loss" before "loss"
    model, name = summary[f"eval/{term}"], key[len(REFERENCE_PREFIX):-len(term) - 1].replace("_", " ")
    lines.append(f"held-out {term} {model:.3f} vs {reference:.3f} for the {name} reference "
                 f"({100 * (1 - model / reference):.0f}% lower)")
  return lines


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
