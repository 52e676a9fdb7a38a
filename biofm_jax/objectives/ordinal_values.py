"""Masked value modelling that knows the bins are ordered (ranked probability score).

Expression bins (scGPT-style `tokenization="binned"`) and EHR lab-value bins are quantiles:
bin 7 is closer to bin 8 than to bin 2. Cross-entropy (`masked.py`'s value loss) scores
every wrong bin alike; the ranked probability score scores the predicted distribution's
cumulative curve against the true one,

    RPS = mean_k (P(bin <= k) - [target <= k])^2,   k = 0 .. K,

so a prediction one bin off costs less than one five bins off. It is a proper scoring rule
(its expectation is minimised by the true distribution) and its gradient reaches every bin,
not only the target's. The data's masking and the model's value head are those of masked
modelling (targets `MASKED`); only the loss differs, so the objective is this file and one
registry line.
"""
from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, Mapping

import jax
import jax.numpy as jnp

from biofm_jax.data import batch as B
from biofm_jax.data.masking import gathers, masked_slots
from biofm_jax.data.module import MASKED
from biofm_jax.objectives.base import ObjectiveDefaults


def ranked_probability_sums(logits: jax.Array, targets: jax.Array, weights: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(sum of weighted RPS, sum of weighted top-1 hits) of [..., K+1] logits against int
  targets in [0, K]."""
  weights = weights.astype(jnp.float32)
  cdf = jnp.cumsum(jax.nn.softmax(logits.astype(jnp.float32), axis=-1), axis=-1)
  classes = jnp.arange(logits.shape[-1])
  truth = (classes >= targets[..., None]).astype(jnp.float32)  # [target <= k]
  rps = jnp.mean((cdf - truth) ** 2, axis=-1)
  hits = (jnp.argmax(logits, axis=-1) == targets).astype(jnp.float32)
  return jnp.sum(rps * weights), jnp.sum(hits * weights)


@dataclasses.dataclass(frozen=True)
class OrdinalValueModelling(ObjectiveDefaults):
  """Predicts the masked positions' value bins, scored by the ranked probability score."""
  modality: str = "omics"
  prediction_slots: int = 0  # P > 0: the model's heads ran at P gathered positions per row
  name: str = "masked_ordinal"
  targets: ClassVar[str] = MASKED

  @classmethod
  def from_config(cls, cfg: Any, modality: str, info: Mapping[str, Any]) -> OrdinalValueModelling:
    del cfg  # nothing to set: one term
    if not info.get("num_value_bins", 0):
      raise ValueError(f"objective.name='masked_ordinal': the {modality} data has no value bins to order "
                       f"(expression: data.omics.tokenization='binned')")
    return cls(modality=modality, prediction_slots=int(info.get("prediction_slots", 0)))

  @property
  def loss_weights(self) -> dict[str, float]:
    return {"value_rps": 1.0}

  def _targets(self, seq: Mapping[str, jax.Array]) -> tuple[jax.Array, jax.Array]:
    """(value bins, bool: masked with a value) at the positions the heads ran at."""
    bins, selected = seq[B.TARGET_VALUE_BINS], seq[B.TARGET_MASK]
    if gathers(self.prediction_slots, selected.shape[-1]):
      index, selected = masked_slots(selected, self.prediction_slots)
      bins = jnp.take_along_axis(bins, index, axis=-1)
    return bins, selected & (bins != B.NO_VALUE_BIN)

  def counts(self, batch: Any) -> dict[str, jax.Array]:
    _, with_value = self._targets(batch[self.modality])
    n = with_value.astype(jnp.float32).sum()
    return {"value_rps": n, "value_accuracy": n}

  def sums(self, outputs: Any, batch: Any) -> dict[str, jax.Array]:
    bins, with_value = self._targets(batch[self.modality])
    rps, hits = ranked_probability_sums(outputs[self.modality]["value_logits"], bins, with_value)
    return {"value_rps": rps, "value_accuracy": hits}
