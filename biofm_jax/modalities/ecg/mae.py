"""Masked-autoencoder reconstruction of ECG patches.

The loss is the mean squared error over the samples of the masked patches that are
present (their lead is in the record and they hold real samples), on patches normalised
to mean 0 and variance 1 when `norm_pix_loss` is set. Absent leads, zero padding,
unreadable records and padding examples (valid False) weigh nothing.
"""
from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from biofm_jax.modalities.ecg import data as ecg_data
from biofm_jax.objectives.reconstruction import patch_error_sum


def _weights(ecg) -> jnp.ndarray:
  """[B, M] 1.0 for the masked tokens that enter the loss."""
  present = jnp.take_along_axis(ecg[ecg_data.TOKEN_PRESENT], ecg[ecg_data.MASKED], axis=1)
  return (present & ecg[ecg_data.VALID][:, None]).astype(jnp.float32)


@dataclasses.dataclass(frozen=True)
class ECGReconstruction:
  norm_pix_loss: bool = True
  name: str = "mae"

  @property
  def loss_weights(self):
    return {"reconstruction_loss": 1.0}

  def counts(self, batch):
    return {"reconstruction_loss": _weights(batch[ecg_data.NAME]).sum()}

  def sums(self, outputs, batch):
    out = outputs[ecg_data.NAME]
    return {"reconstruction_loss": patch_error_sum(out["predicted_patches"], out["target_patches"],
                                                   _weights(batch[ecg_data.NAME]), norm_pix_loss=self.norm_pix_loss)}
