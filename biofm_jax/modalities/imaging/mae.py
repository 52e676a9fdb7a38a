"""Masked-autoencoder reconstruction (MAE, as in RETFound and the ViT-MAE recipe).

The data pipeline hides a fixed share of patches per image; the model reconstructs
them. The loss is the mean squared error over the pixels of masked patches only, on
pixels normalised per patch (mean 0, variance 1) when `norm_pix_loss` is set, which
sharpens the representation. Padding examples (valid False) weigh nothing.
"""
from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from biofm_jax.data import batch as B
from biofm_jax.objectives.reconstruction import patch_error_sum


@dataclasses.dataclass(frozen=True)
class MaskedAutoencoding:
  norm_pix_loss: bool = True
  name: str = "mae"

  @property
  def loss_weights(self):
    return {"reconstruction_loss": 1.0}

  def counts(self, batch):
    imaging = batch["imaging"]
    masked_per_example = imaging[B.IMAGE_MASKED].shape[1]
    return {"reconstruction_loss": imaging[B.VALID].astype(jnp.float32).sum() * masked_per_example}

  def sums(self, outputs, batch):
    out = outputs["imaging"]
    valid = batch["imaging"][B.VALID].astype(jnp.float32)[:, None]
    return {"reconstruction_loss": patch_error_sum(out["predicted_patches"], out["target_patches"], valid,
                                                   norm_pix_loss=self.norm_pix_loss)}
