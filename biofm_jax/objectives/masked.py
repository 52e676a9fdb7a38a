"""Masked code modelling (BEHRT / CEHR-BERT style).

The data pipeline's masking transform hides a fraction of events (code and value bin);
the model predicts the original code and, for events that carried a numeric value, its
quantile bin. Only masked positions enter the loss, so padding never does.
"""
from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from biofm_jax.data import batch as B
from biofm_jax.objectives.base import cross_entropy_sums


@dataclasses.dataclass(frozen=True)
class MaskedCodeModelling:
  """Masked token modelling for any token sequence in `batch[modality]`.

  Terms with weight 0 are left out: scGPT-style expression hides only values (the gene
  token stays visible), so predicting the code would be a copy task.
  """
  modality: str = "ehr"
  code_loss_weight: float = 1.0
  value_loss_weight: float = 0.5
  has_values: bool = True
  name: str = "masked"

  @property
  def loss_weights(self):
    weights = {"code_loss": self.code_loss_weight}
    if self.has_values:
      weights["value_loss"] = self.value_loss_weight
    return {name: w for name, w in weights.items() if w}

  def _with_value(self, seq):
    return seq[B.TARGET_MASK] & (seq[B.TARGET_VALUE_BINS] != B.NO_VALUE_BIN)

  def counts(self, batch):
    seq = batch[self.modality]
    counts = {}
    if self.code_loss_weight:
      selected = seq[B.TARGET_MASK].astype(jnp.float32).sum()
      counts.update(code_loss=selected, code_accuracy=selected)
    if "value_loss" in self.loss_weights:
      with_value = self._with_value(seq).astype(jnp.float32).sum()
      counts.update(value_loss=with_value, value_accuracy=with_value)
    return counts

  def sums(self, outputs, batch):
    seq, out = batch[self.modality], outputs[self.modality]
    sums = {}
    if self.code_loss_weight:
      loss, hits = cross_entropy_sums(out["code_logits"], seq[B.TARGET_TOKENS], seq[B.TARGET_MASK])
      sums.update(code_loss=loss, code_accuracy=hits)
    if "value_loss" in self.loss_weights:
      loss, hits = cross_entropy_sums(out["value_logits"], seq[B.TARGET_VALUE_BINS], self._with_value(seq))
      sums.update(value_loss=loss, value_accuracy=hits)
    return sums
