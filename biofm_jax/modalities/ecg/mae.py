"""Masked-autoencoder reconstruction of ECG patches (`objectives/reconstruction.py`).

The masked patches that count are those present: their lead is in the record and they hold
real samples. Absent leads, zero padding and padding examples (valid False) weigh nothing.
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp

from biofm_jax.modalities.ecg import data as ecg_data
from biofm_jax.objectives.reconstruction import PatchReconstruction


def present_patch_weights(ecg) -> jnp.ndarray:
  """[B, M]: 1.0 for the masked tokens that enter the loss."""
  present = jnp.take_along_axis(ecg[ecg_data.TOKEN_PRESENT], ecg[ecg_data.MASKED], axis=1)
  return (present & ecg[ecg_data.VALID][:, None]).astype(jnp.float32)


@dataclasses.dataclass(frozen=True)
class ECGReconstruction(PatchReconstruction):
  modality: str = ecg_data.NAME
  weights: Callable[[dict], jax.Array] = present_patch_weights
