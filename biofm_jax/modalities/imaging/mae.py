"""Masked-autoencoder reconstruction of images (MAE, as in RETFound and the ViT-MAE recipe).

The data pipeline hides a fixed share of patches per image; the model reconstructs them
(`objectives/reconstruction.py`). Every masked patch of a real example counts; padding
examples (valid False) weigh nothing.
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp

from biofm_jax.data import batch as B
from biofm_jax.objectives.reconstruction import PatchReconstruction


def masked_patch_weights(imaging) -> jnp.ndarray:
  """[B, M]: 1.0 for every masked patch of a real example."""
  valid = imaging[B.VALID].astype(jnp.float32)[:, None]
  return jnp.broadcast_to(valid, imaging[B.IMAGE_MASKED].shape)


@dataclasses.dataclass(frozen=True)
class MaskedAutoencoding(PatchReconstruction):
  modality: str = "imaging"
  weights: Callable[[dict], jax.Array] = masked_patch_weights
