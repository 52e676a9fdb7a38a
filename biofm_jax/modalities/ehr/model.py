"""The EHR modality in a model: its token encoder, and the heads its objectives read.

Masked and next-event modelling read the shared token heads (`models/description.py`).
Time-to-event pre-training (`objectives/motor.py`) reads `TimeToEventHead`, MOTOR's
low-rank hazard head: the hidden state at a prediction point becomes one r-dimensional
vector per time bin, and the log-hazard of task k in bin j is that vector's dot product
with task k's own r-dimensional embedding, plus a per-(bin, task) bias. K tasks x J bins
cost D*J*r + K*r parameters instead of D*J*K, so thousands of tasks stay affordable.

Every EHR model offers several summaries of a timeline for task heads and probes to read
(`task.embedding`): the mean over its tokens ("ehr/embedding", the default), the CLS token,
the last token (all a causal model has read) and the mean of the last visit.

`model_modality(config, model_info)` is the registry's model entry (`registry.py`).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from biofm_jax.data import batch as B
from biofm_jax.models.layers import TransformerConfig, kernel_init
from biofm_jax.models.description import Encoded, TokenModality, masked_mean, token_summaries
from biofm_jax.modalities.ehr.encoder import EHREncoder
from biofm_jax.objectives.autoregressive import check_gap_edges
from biofm_jax.objectives.motor import check_bin_starts, prediction_positions

# The hazard bias's start: about one occurrence of a code per year (per day: 1/365). Codes
# differ by orders of magnitude; the bias learns each within the first hundred steps.
INITIAL_LOG_HAZARD = -math.log(365.0)


class TimeToEventHead(nn.Module):
  """[B, L, D] hidden states and [B, P] prediction positions -> [B, P, J, K] log-hazards
  (float32)."""
  cfg: TransformerConfig
  num_tasks: int
  num_bins: int
  rank: int

  @nn.compact
  def __call__(self, hidden: jax.Array, positions: jax.Array) -> jax.Array:
    cfg = self.cfg
    x = jnp.take_along_axis(hidden, positions[..., None], axis=1)  # [B, P, D]
    per_bin = nn.Dense(self.num_bins * self.rank, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
                       kernel_init=kernel_init(("embed", None)), use_bias=False, name="time_projection")(x)
    per_bin = per_bin.reshape(x.shape[:2] + (self.num_bins, self.rank)).astype(jnp.float32)
    tasks = self.param("task_embedding", kernel_init(("vocab", None)), (self.num_tasks, self.rank),
                       cfg.param_dtype)
    bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.constant(INITIAL_LOG_HAZARD),
                                                           (None, "vocab")),
                      (self.num_bins, self.num_tasks), jnp.float32)
    return jnp.einsum("bpjr,kr->bpjk", per_bin, tasks.astype(jnp.float32)) + bias


@dataclasses.dataclass(frozen=True)
class TimeToEventSpec:
  tasks: int  # K
  bins: int  # J
  rank: int  # r
  points: int  # prediction points per row


VISIT_DAYS = 1.0  # events within this many days of a timeline's last one make its last visit


def last_visit_embedding(hidden: jax.Array, example) -> jax.Array:
  """[B, D] float32 mean of the hidden states of the last visit: the timed events within
  VISIT_DAYS of each row's last one (a row without timed events: all its tokens)."""
  mask = example[B.EHR_MASK]
  timed = example[B.EHR_TIME_KNOWN] & mask
  times = example[B.EHR_TIME]
  last = jnp.where(timed, times, -jnp.inf).max(axis=1, keepdims=True)
  visit = timed & (times >= last - VISIT_DAYS)
  return masked_mean(hidden, jnp.where(visit.any(axis=1, keepdims=True), visit, mask))


def ehr_summaries(hidden: jax.Array, encoded: Encoded, example) -> dict[str, jax.Array]:
  """The token summaries (`token_summaries`) and the last visit's mean ("last_visit_embedding")."""
  return {**token_summaries(hidden, encoded.mask), "last_visit_embedding": last_visit_embedding(hidden, example)}


@dataclasses.dataclass(frozen=True)
class EHRModality(TokenModality):
  """EHR tokens under masked or next-event modelling: the token heads, and the EHR summaries."""

  def heads(self, cfg: TransformerConfig, hidden: jax.Array, encoded: Encoded, example, *, train: bool,
            prefix: str = "") -> dict[str, jax.Array]:
    return {**super().heads(cfg, hidden, encoded, example, train=train, prefix=prefix),
            **ehr_summaries(hidden, encoded, example)}


@dataclasses.dataclass(frozen=True)
class EHRTimeToEventModality(TokenModality):
  """EHR tokens with the time-to-event head in place of the code heads (pre-training reads
  only the hazards; fine-tuning and embeddings read the hidden states)."""
  time_to_event: TimeToEventSpec | None = None

  def heads(self, cfg: TransformerConfig, hidden: jax.Array, encoded: Encoded, example, *, train: bool,
            prefix: str = "") -> dict[str, jax.Array]:
    del train
    out = {"hidden": hidden, "mask": encoded.mask, **ehr_summaries(hidden, encoded, example)}
    if B.TTE_PREDICT in example:  # targets present: pre-training (not fine-tuning, not embeddings)
      spec = self.time_to_event
      positions, _ = prediction_positions(example[B.TTE_PREDICT], spec.points)
      out["tte_log_hazard"] = TimeToEventHead(cfg, spec.tasks, spec.bins, spec.rank,
                                              name=f"{prefix}tte_head")(hidden, positions)
    return out

  def head_output_dim(self) -> int:
    return 0  # the hazard head runs at the prediction points only (`extra_flops`)

  def extra_flops(self, encoder_dim: int) -> float:
    """Training FLOPs (3x forward) of the hazard head, per example."""
    spec = self.time_to_event
    per_point = 2 * (encoder_dim * spec.bins * spec.rank + spec.bins * spec.rank * spec.tasks)
    return 3.0 * spec.points * per_point


def model_modality(config: ml_collections.ConfigDict, info: Mapping[str, Any]) -> TokenModality:
  """The EHR model description for the data module's `model_info()`."""
  common = dict(vocab_size=info["vocab_size"], num_value_bins=info["num_value_bins"], max_len=info["max_len"],
                encoder=EHREncoder)
  objective = config.objective
  if "tte_tasks" not in info:
    gap_edges = objective.get("gap_edges_days", ())  # a next-event config's gap classes: a time head
    return EHRModality("ehr", **common, time_classes=len(check_gap_edges(gap_edges)) + 1 if gap_edges else 0,
                       prediction_slots=int(info.get("prediction_slots", 0)))
  bins = check_bin_starts(objective.get("time_bins_days", (0.0,)))
  spec = TimeToEventSpec(tasks=int(info["tte_tasks"]), bins=len(bins), rank=int(objective.get("rank", 32)),
                         points=int(info["tte_points"]))
  return EHRTimeToEventModality("ehr", **common, time_to_event=spec)
