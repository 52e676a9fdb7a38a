"""Masked-autoencoder reconstruction for patch modalities (images, ECG): the mean squared
error of each masked patch's reconstruction, on patches normalised to mean 0 and variance 1
when `norm_pix_loss` is set (as MAE trains), averaged over the masked patches that count.

Which masked patches count is the modality's: `weights(fields)` maps its batch fields to
[B, M] weights (images: every masked patch of a real example; ECG: those of leads the record
has). The model's outputs for the modality hold `predicted_patches` and `target_patches`.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, ClassVar, Mapping

import jax
import jax.numpy as jnp

from biofm_jax.data.module import MASKED_PATCHES
from biofm_jax.objectives.base import ObjectiveDefaults


def normalize_patches(patches: jax.Array, eps: float = 1e-6) -> jax.Array:
  """Each patch to mean 0, variance 1 (MAE's `norm_pix_loss` targets)."""
  mean = patches.mean(axis=-1, keepdims=True)
  var = patches.var(axis=-1, keepdims=True)
  return (patches - mean) / jnp.sqrt(var + eps)


def patch_error_sum(predicted: jax.Array, target: jax.Array, weights: jax.Array, *, norm_pix_loss: bool) -> jax.Array:
  """sum_{b,m} weights[b, m] * mean_p (predicted - target)^2 over [B, M, P] patches."""
  target = normalize_patches(target) if norm_pix_loss else target
  per_patch = jnp.mean((predicted - target) ** 2, axis=-1)  # [B, M]
  return jnp.sum(per_patch * weights)


@dataclasses.dataclass(frozen=True)
class PatchReconstruction(ObjectiveDefaults):
  modality: str
  weights: Callable[[dict], jax.Array]  # the modality's batch fields -> [B, M] float32
  norm_pix_loss: bool = True
  name: str = "mae"
  targets: ClassVar[str] = MASKED_PATCHES

  @classmethod
  def from_config(cls, cfg: Any, modality: str, info: Mapping[str, Any]) -> PatchReconstruction:
    """A modality's own subclass names its `modality` and `weights` as defaults."""
    del info
    return cls(modality=modality, norm_pix_loss=cfg.norm_pix_loss)  # type: ignore[call-arg]

  @property
  def loss_weights(self):
    return {"reconstruction_loss": 1.0}

  def counts(self, batch):
    return {"reconstruction_loss": self.weights(batch[self.modality]).sum()}

  def sums(self, outputs, batch):
    out = outputs[self.modality]
    return {"reconstruction_loss": patch_error_sum(out["predicted_patches"], out["target_patches"],
                                                   self.weights(batch[self.modality]),
                                                   norm_pix_loss=self.norm_pix_loss)}
