"""Next-event autoregressive modelling (CLMBR / ETHOS style).

With a causal stack, the hidden state at position t predicts the code at t + 1. Position
0 is the CLS token, so the first event is predicted from nothing but the start token.
A pair enters the loss only when position t + 1 holds a real event, so padding never
does. Perplexity is exp(code_loss).
"""
from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from biofm_jax.data import batch as B
from biofm_jax.objectives.base import cross_entropy_sums


@dataclasses.dataclass(frozen=True)
class NextEventModelling:
  modality: str = "ehr"
  name: str = "autoregressive"

  @property
  def loss_weights(self):
    return {"code_loss": 1.0}

  def counts(self, batch):
    has_next = batch[self.modality][B.TOKEN_MASK][:, 1:].astype(jnp.float32).sum()
    return {"code_loss": has_next, "code_accuracy": has_next}

  def sums(self, outputs, batch):
    seq = batch[self.modality]
    logits = outputs[self.modality]["code_logits"][:, :-1]
    loss, hits = cross_entropy_sums(logits, seq[B.TOKENS][:, 1:], seq[B.TOKEN_MASK][:, 1:])
    return {"code_loss": loss, "code_accuracy": hits}
