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

  def _has_next(self, seq):
    """bool [B, L-1]: position t + 1 holds a real token of t's own segment (packed rows:
    the last event of one subject never predicts the next subject's CLS)."""
    has_next = seq[B.TOKEN_MASK][:, 1:]
    if B.SEGMENT_IDS in seq:
      has_next = has_next & (seq[B.SEGMENT_IDS][:, 1:] == seq[B.SEGMENT_IDS][:, :-1])
    return has_next

  def counts(self, batch):
    has_next = self._has_next(batch[self.modality]).astype(jnp.float32).sum()
    return {"code_loss": has_next, "code_accuracy": has_next}

  def sums(self, outputs, batch):
    seq = batch[self.modality]
    logits = outputs[self.modality]["code_logits"][:, :-1]
    loss, hits = cross_entropy_sums(logits, seq[B.TOKENS][:, 1:], self._has_next(seq))
    return {"code_loss": loss, "code_accuracy": hits}
