"""Time-to-event pre-training (MOTOR style): piecewise-exponential hazards of many codes.

From chosen prediction points of a timeline (tokens of a causal stack, so a point sees its
past only), the model predicts for each of K tasks (the K most frequent codes) when the
code next occurs. Time after the point is cut into J bins at `bin_starts` (days; the last
bin is open-ended) and the hazard of task k is constant within bin j: lambda_{jk} =
exp(log_hazard[j, k]) per day. A task observed at time t after the point (its first
occurrence) and a task censored at t (the follow-up ends without it) contribute

  event:     log lambda_{j(t)k} - sum_j lambda_{jk} * exposure_j(t)
  censored:                     - sum_j lambda_{jk} * exposure_j(t)

with exposure_j(t) the days of [0, t) spent in bin j: censored tasks inform the bins they
were seen to survive and nothing after, so censoring does not bias the hazards.

The targets arrive sparse (`batch.TTE_*`, built on the host by
`modalities/ehr/tte_targets.py`): per token a prediction flag and the follow-up of a
point, and a list of (token position, task, days) first occurrences. Dense per point and
task tables are built on the device, only for the at most `points` prediction points of
a row (`prediction_positions`), so memory is [batch, points, bins, tasks] and never
[batch, length, bins, tasks].

The loss is the exact sum over (point, task) pairs divided by their count, which depends
on the batch only, as every objective here (`base.py`).
"""
from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from biofm_jax.data import batch as B
from biofm_jax.data.module import TIME_TO_EVENT
from biofm_jax.objectives.base import ObjectiveDefaults


def check_bin_starts(bin_starts: Sequence[float]) -> tuple[float, ...]:
  """The bins' start days: 0 first, then strictly increasing (the last bin is open)."""
  starts = tuple(float(s) for s in bin_starts)
  if not starts or starts[0] != 0.0 or any(b <= a for a, b in zip(starts, starts[1:])):
    raise ValueError(f"objective.time_bins_days={list(bin_starts)}: expected the bins' start days, 0 first "
                     f"and strictly increasing, e.g. [0, 7, 30, 90, 365]")
  return starts


def prediction_positions(predict: jax.Array, points: int) -> tuple[jax.Array, jax.Array]:
  """The first `points` flagged positions of each row: (int32 [B, points], bool [B, points]
  real). Static shapes under jit; rows with fewer flags are padded with position 0, invalid."""
  index = jax.vmap(lambda row: jnp.nonzero(row, size=points, fill_value=0)[0])(predict)
  valid = jnp.arange(points)[None, :] < jnp.sum(predict, axis=-1, dtype=jnp.int32)[:, None]
  return index.astype(jnp.int32), valid


def dense_targets(seq, points: int, num_tasks: int):
  """(days [B, P, K], event bool [B, P, K], valid points [B, P]) from the sparse targets:
  every task is censored at its point's follow-up unless an event entry gives its first
  occurrence. Event entries of points beyond the first `points` are dropped with them."""
  positions, valid = prediction_positions(seq[B.TTE_PREDICT], points)
  follow = jnp.take_along_axis(seq[B.TTE_FOLLOWUP_DAYS], positions, axis=1)
  match = ((seq[B.TTE_EVENT_POS][:, :, None] == positions[:, None, :]) & valid[:, None, :]
           & seq[B.TTE_EVENT_MASK][:, :, None])  # [B, E, P]
  point = jnp.argmax(match, axis=-1)
  task = jnp.where(match.any(-1), seq[B.TTE_EVENT_TASK], num_tasks)  # out of range: dropped
  rows = jnp.broadcast_to(jnp.arange(point.shape[0])[:, None], point.shape)
  days = jnp.broadcast_to(follow[:, :, None], follow.shape + (num_tasks,))
  days = days.at[rows, point, task].set(seq[B.TTE_EVENT_DAYS], mode="drop")
  event = jnp.zeros(days.shape, jnp.bool_).at[rows, point, task].set(True, mode="drop")
  return days, event, valid


def piecewise_exponential_nll(log_hazard: jax.Array, days: jax.Array, event: jax.Array,
                              bin_starts: Sequence[float]) -> jax.Array:
  """[..., K] negative log-likelihood of (days, event) under hazards `log_hazard` [..., J, K]."""
  log_hazard = log_hazard.astype(jnp.float32)
  starts = np.asarray(bin_starts, np.float32)
  if log_hazard.shape[-2] != len(starts):
    raise ValueError(f"time_to_event: {log_hazard.shape[-2]} hazard bins for {len(starts)} bin starts")
  ends = np.append(starts[1:], np.inf).astype(np.float32)
  t = days[..., None, :]
  start, end = starts[:, None], ends[:, None]
  exposure = jnp.clip(t - start, 0.0, end - start)
  in_bin = event[..., None, :] & (t >= start) & (t < end)
  return jnp.sum(jnp.exp(log_hazard) * exposure - jnp.where(in_bin, log_hazard, 0.0), axis=-2)


@dataclasses.dataclass(frozen=True)
class TimeToEventModelling(ObjectiveDefaults):
  modality: str = "ehr"
  num_tasks: int = 1
  points: int = 1  # prediction points per row
  bin_starts: tuple[float, ...] = (0.0,)
  name: str = "time_to_event"
  causal: ClassVar[bool] = True  # a point predicts the events after it
  targets: ClassVar[str] = TIME_TO_EVENT

  @classmethod
  def from_config(cls, cfg: Any, modality: str, info: Mapping[str, Any]) -> TimeToEventModelling:
    if "tte_tasks" not in info:
      raise ValueError(f"objective.name='time_to_event': the {modality} data has no time-to-event targets")
    return cls(modality=modality, num_tasks=int(info["tte_tasks"]), points=int(info["tte_points"]),
               bin_starts=check_bin_starts(cfg.get("time_bins_days", (0.0,))))

  @property
  def loss_weights(self):
    return {"tte_loss": 1.0}

  def counts(self, batch):
    _, valid = prediction_positions(batch[self.modality][B.TTE_PREDICT], self.points)
    points = valid.astype(jnp.float32).sum()
    return {"tte_loss": points * self.num_tasks, "tte_event_rate": points * self.num_tasks,
            "tte_events_per_point": points}

  def sums(self, outputs, batch):
    days, event, valid = dense_targets(batch[self.modality], self.points, self.num_tasks)
    nll = piecewise_exponential_nll(outputs[self.modality]["tte_log_hazard"], days, event, self.bin_starts)
    weight = valid[:, :, None].astype(jnp.float32)
    events = jnp.sum(event.astype(jnp.float32) * weight)
    return {"tte_loss": jnp.sum(nll * weight), "tte_event_rate": events, "tte_events_per_point": events}
