"""Masked-feature modelling for tables (as in self-supervised FT-Transformer / SAINT).

The data pipeline hides a share of each row's present values; the model reconstructs
hidden numeric values (squared error on standardised values) and hidden categories
(cross-entropy). Missing values are never targets, and padding rows weigh nothing.
"""
from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, Mapping

import jax.numpy as jnp

from biofm_jax.data import batch as B
from biofm_jax.data.module import MASKED_FEATURES
from biofm_jax.objectives.base import ObjectiveDefaults, cross_entropy_sums


@dataclasses.dataclass(frozen=True)
class MaskedFeatureModelling(ObjectiveDefaults):
  category_loss_weight: float = 1.0
  name: str = "masked_features"
  targets: ClassVar[str] = MASKED_FEATURES

  @classmethod
  def from_config(cls, cfg: Any, modality: str, info: Mapping[str, Any]) -> MaskedFeatureModelling:
    del modality, info  # the tabular modality's own objective
    return cls(category_loss_weight=cfg.category_loss_weight)

  @property
  def loss_weights(self):
    return {"value_loss": 1.0, "category_loss": self.category_loss_weight}

  def _selected(self, batch):
    tab = batch["tabular"]
    valid = tab[B.VALID][:, None]
    return tab[B.TABULAR_VALUE_MASK] & valid, tab[B.TABULAR_CATEGORY_MASK] & valid

  def counts(self, batch):
    values, categories = self._selected(batch)
    n_values, n_categories = values.astype(jnp.float32).sum(), categories.astype(jnp.float32).sum()
    return {"value_loss": n_values, "category_loss": n_categories, "category_accuracy": n_categories}

  def sums(self, outputs, batch):
    tab, out = batch["tabular"], outputs["tabular"]
    values, categories = self._selected(batch)
    squared = (out["value_predictions"] - tab[B.TABULAR_TARGET_VALUES]) ** 2
    value_loss = jnp.sum(squared * values)
    if categories.shape[1]:
      category_loss, hits = cross_entropy_sums(out["category_logits"], tab[B.TABULAR_TARGET_CATEGORIES], categories)
    else:
      category_loss = hits = jnp.zeros((), jnp.float32)
    return {"value_loss": value_loss, "category_loss": category_loss, "category_accuracy": hits}
