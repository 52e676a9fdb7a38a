"""Next-event autoregressive modelling (CLMBR / ETHOS style).

With a causal stack, the hidden state at position t predicts the code at t + 1. Position
0 is the CLS token, so the first event is predicted from nothing but the start token.
A pair enters the loss only when position t + 1 holds a real event, so padding never
does. Perplexity is exp(code_loss).

With `gap_edges` (days), the same state also predicts when the next event comes: the gap
from event t to event t + 1 as a class, 0 for the same time, then (edges[i-1], edges[i]],
the last class past the last edge (`time_loss`, pairs whose two times are known). So a
generated event has a time (`generate.py`), as ETHOS's time tokens give it one.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, ClassVar, Mapping

import jax
import jax.numpy as jnp

from biofm_jax.data import batch as B
from biofm_jax.data.module import NEXT
from biofm_jax.objectives.base import ObjectiveDefaults, cross_entropy_sums


def check_gap_edges(edges) -> tuple[float, ...]:
  """Gap class edges in days: 0 first (class 0 is the same time), strictly increasing."""
  edges = tuple(float(e) for e in edges)
  if edges and (edges[0] != 0.0 or any(b <= a for a, b in zip(edges, edges[1:]))):
    raise ValueError(f"objective.gap_edges_days={list(edges)}: expected 0 first, then strictly increasing days, "
                     f"e.g. [0, 0.0417, 1, 7, 30, 90, 365]")
  return edges


def gap_classes(gaps: jax.Array, edges) -> jax.Array:
  """int32 class of each gap in days: 0 for <= 0 (the same time), i for (edges[i-1], edges[i]]."""
  return jnp.searchsorted(jnp.asarray(edges, jnp.float32), gaps, side="left").astype(jnp.int32)


@dataclasses.dataclass(frozen=True)
class NextEventModelling(ObjectiveDefaults):
  modality: str = "ehr"
  gap_edges: tuple[float, ...] = ()  # days; () predicts no time
  time_loss_weight: float = 1.0
  name: str = "autoregressive"
  causal: ClassVar[bool] = True  # position t predicts t + 1
  targets: ClassVar[str] = NEXT

  @classmethod
  def from_config(cls, cfg: Any, modality: str, info: Mapping[str, Any]) -> NextEventModelling:
    del info
    return cls(modality=modality, gap_edges=check_gap_edges(cfg.get("gap_edges_days", ())),
               time_loss_weight=cfg.get("time_loss_weight", 1.0))

  def derived_metrics(self, means: Mapping[str, float]) -> dict[str, float]:
    """Perplexity: exp of the held-out code loss (capped so a diverged run stays finite)."""
    return {"perplexity": math.exp(min(means["code_loss"], 50.0))} if "code_loss" in means else {}

  @property
  def loss_weights(self):
    weights = {"code_loss": 1.0}
    if self.gap_edges and self.time_loss_weight:
      weights["time_loss"] = self.time_loss_weight
    return weights

  def _has_timed_next(self, seq):
    """bool [B, L-1]: a next event whose gap from t is known (both times known)."""
    return self._has_next(seq) & seq[B.EHR_TIME_KNOWN][:, 1:] & seq[B.EHR_TIME_KNOWN][:, :-1]

  def _has_next(self, seq):
    """bool [B, L-1]: position t + 1 holds a real token of t's own segment (packed rows:
    the last event of one subject never predicts the next subject's CLS)."""
    has_next = seq[B.TOKEN_MASK][:, 1:]
    if B.SEGMENT_IDS in seq:
      has_next = has_next & (seq[B.SEGMENT_IDS][:, 1:] == seq[B.SEGMENT_IDS][:, :-1])
    return has_next

  def counts(self, batch):
    seq = batch[self.modality]
    has_next = self._has_next(seq).astype(jnp.float32).sum()
    counts = {"code_loss": has_next, "code_accuracy": has_next}
    if "time_loss" in self.loss_weights:
      timed = self._has_timed_next(seq).astype(jnp.float32).sum()
      counts.update(time_loss=timed, time_accuracy=timed)
    return counts

  def sums(self, outputs, batch):
    seq = batch[self.modality]
    logits = outputs[self.modality]["code_logits"][:, :-1]
    loss, hits = cross_entropy_sums(logits, seq[B.TOKENS][:, 1:], self._has_next(seq))
    sums = {"code_loss": loss, "code_accuracy": hits}
    if "time_loss" in self.loss_weights:
      gaps = seq[B.EHR_TIME][:, 1:] - seq[B.EHR_TIME][:, :-1]
      loss, hits = cross_entropy_sums(outputs[self.modality]["time_logits"][:, :-1],
                                      gap_classes(gaps, self.gap_edges), self._has_timed_next(seq))
      sums.update(time_loss=loss, time_accuracy=hits)
    return sums
