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
  name: str = "autoregressive"

  @property
  def loss_weights(self):
    return {"code_loss": 1.0}

  def counts(self, batch):
    has_next = batch["ehr"][B.EHR_MASK][:, 1:].astype(jnp.float32).sum()
    return {"code_loss": has_next, "code_accuracy": has_next}

  def sums(self, outputs, batch):
    ehr = batch["ehr"]
    logits = outputs["ehr"]["code_logits"][:, :-1]
    loss, hits = cross_entropy_sums(logits, ehr[B.EHR_CODES][:, 1:], ehr[B.EHR_MASK][:, 1:])
    return {"code_loss": loss, "code_accuracy": hits}
