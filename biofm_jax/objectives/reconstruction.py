"""The masked-autoencoder loss arithmetic patch modalities share (images, ECG): the mean
squared error of each reconstructed patch, summed over the patches that count."""
from __future__ import annotations

import jax
import jax.numpy as jnp

from biofm_jax.models.patches import normalize_patches


def patch_error_sum(predicted: jax.Array, target: jax.Array, weights: jax.Array, *, norm_pix_loss: bool) -> jax.Array:
  """sum_{b,m} weights[b, m] * mean_p (predicted - target)^2 over [B, M, P] patches; targets
  normalised per patch first with `norm_pix_loss` (as MAE trains)."""
  target = normalize_patches(target) if norm_pix_loss else target
  per_patch = jnp.mean((predicted - target) ** 2, axis=-1)  # [B, M]
  return jnp.sum(per_patch * weights)
