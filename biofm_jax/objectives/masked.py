"""Masked code modelling (BEHRT / CEHR-BERT style).

The data pipeline's masking transform hides a fraction of events (code and value bin);
the model predicts the original code and, for events that carried a numeric value, its
quantile bin. Only masked positions enter the loss, so padding never does.

Logits only where the loss reads them: with `prediction_slots` = P > 0, the model computes
the output heads at P gathered positions per row (the row's masked positions in order,
then filler) instead of at all L, as BERT's `max_predictions_per_seq` does. The output
layer over a large vocabulary is a large share of the step (a 6-mer DNA vocabulary: most of
it), and only ~15% of positions are masked. `prediction_slots(L, rate)` sets P six standard
deviations above the expected count, so a row of independently masked tokens overflows
with probability ~1e-8; should one, its masked tokens beyond the first P are left out of
both the loss sum and its count (they stay corrupted inputs), so the loss stays an exact
mean over what was predicted. Packed rows (`data/packing.py`) of many very short windows,
each masking at least one token, overflow more often; the same rule holds for them. The
slot arithmetic (`prediction_slots`, `masked_slots`) is `data/masking.py`'s: the model's
heads gather at the same slots.
"""
from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, Mapping

import jax
import jax.numpy as jnp

from biofm_jax.data import batch as B
from biofm_jax.data.masking import gathers, masked_slots
from biofm_jax.data.module import MASKED
from biofm_jax.objectives.base import ObjectiveDefaults, cross_entropy_sums


@dataclasses.dataclass(frozen=True)
class MaskedCodeModelling(ObjectiveDefaults):
  """Masked token modelling for any token sequence in `batch[modality]`.

  Terms with weight 0 are left out: scGPT-style expression hides only values (the gene
  token stays visible), so predicting the code would be a copy task.
  """
  modality: str = "ehr"
  code_loss_weight: float = 1.0
  value_loss_weight: float = 0.5
  has_values: bool = True
  prediction_slots: int = 0  # P > 0: the model's heads ran at P gathered positions per row
  name: str = "masked"
  targets: ClassVar[str] = MASKED

  @classmethod
  def from_config(cls, cfg: Any, modality: str, info: Mapping[str, Any]) -> MaskedCodeModelling:
    """`cfg`: config.objective (or a multimodal member's section); `info`: the data's model info."""
    return cls(modality=modality, code_loss_weight=cfg.get("code_loss_weight", 1.0),
               value_loss_weight=cfg.get("value_loss_weight", 0.0), has_values=info.get("num_value_bins", 0) > 0,
               prediction_slots=int(info.get("prediction_slots", 0)))

  @property
  def loss_weights(self):
    weights = {"code_loss": self.code_loss_weight}
    if self.has_values:
      weights["value_loss"] = self.value_loss_weight
    return {name: w for name, w in weights.items() if w}

  def _targets(self, seq) -> dict[str, jax.Array]:
    """The targets at the positions the heads ran at: all, or the P slots."""
    names = (B.TARGET_TOKENS, B.TARGET_MASK) + ((B.TARGET_VALUE_BINS,) if self.has_values else ())
    if not gathers(self.prediction_slots, seq[B.TARGET_MASK].shape[-1]):
      return {name: seq[name] for name in names}
    index, valid = masked_slots(seq[B.TARGET_MASK], self.prediction_slots)
    out = {name: jnp.take_along_axis(seq[name], index, axis=-1) for name in names}
    out[B.TARGET_MASK] = valid
    return out

  @staticmethod
  def _with_value(targets):
    return targets[B.TARGET_MASK] & (targets[B.TARGET_VALUE_BINS] != B.NO_VALUE_BIN)

  def counts(self, batch):
    targets = self._targets(batch[self.modality])
    counts = {}
    if self.code_loss_weight:
      selected = targets[B.TARGET_MASK].astype(jnp.float32).sum()
      counts.update(code_loss=selected, code_accuracy=selected)
    if "value_loss" in self.loss_weights:
      with_value = self._with_value(targets).astype(jnp.float32).sum()
      counts.update(value_loss=with_value, value_accuracy=with_value)
    return counts

  def sums(self, outputs, batch):
    targets, out = self._targets(batch[self.modality]), outputs[self.modality]
    sums = {}
    if self.code_loss_weight:
      logits = _matching(out["code_logits"], targets[B.TARGET_TOKENS], self.modality)
      loss, hits = cross_entropy_sums(logits, targets[B.TARGET_TOKENS], targets[B.TARGET_MASK])
      sums.update(code_loss=loss, code_accuracy=hits)
    if "value_loss" in self.loss_weights:
      logits = _matching(out["value_logits"], targets[B.TARGET_VALUE_BINS], self.modality)
      loss, hits = cross_entropy_sums(logits, targets[B.TARGET_VALUE_BINS], self._with_value(targets))
      sums.update(value_loss=loss, value_accuracy=hits)
    return sums


def _matching(logits: jax.Array, targets: jax.Array, modality: str) -> jax.Array:
  if logits.shape[:-1] != targets.shape:
    raise ValueError(f"masked objective ({modality}): the model's logits cover {logits.shape[1]} positions per row "
                     f"and the objective's targets {targets.shape[1]}: build both from the same model_info "
                     f"(its prediction_slots)")
  return logits
