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
  value_loss_weight: float = 0.5
  name: str = "masked"

  @property
  def loss_weights(self):
    return {"code_loss": 1.0, "value_loss": self.value_loss_weight}

  def counts(self, batch):
    ehr = batch["ehr"]
    selected = ehr[B.EHR_TARGET_MASK].astype(jnp.float32)
    with_value = selected * (ehr[B.EHR_TARGET_VALUE_BINS] != B.NO_VALUE_BIN)
    return {"code_loss": selected.sum(), "code_accuracy": selected.sum(),
            "value_loss": with_value.sum(), "value_accuracy": with_value.sum()}

  def sums(self, outputs, batch):
    ehr, out = batch["ehr"], outputs["ehr"]
    selected = ehr[B.EHR_TARGET_MASK]
    with_value = selected & (ehr[B.EHR_TARGET_VALUE_BINS] != B.NO_VALUE_BIN)
    code_loss, code_hits = cross_entropy_sums(out["code_logits"], ehr[B.EHR_TARGET_CODES], selected)
    value_loss, value_hits = cross_entropy_sums(out["value_logits"], ehr[B.EHR_TARGET_VALUE_BINS], with_value)
    return {"code_loss": code_loss, "code_accuracy": code_hits,
            "value_loss": value_loss, "value_accuracy": value_hits}
