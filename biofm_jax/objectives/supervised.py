"""Downstream losses: classification, regression and time-to-event on a task head.

`SupervisedObjective` reads the head's logits (`outputs["task"]["logits"]`, see
`models/task.py`) and the targets under `batch.TASK`, and reports (sum, count) terms like
every pre-training objective, so the same train step, gradient accumulation and exact
evaluation averages serve fine-tuning. Padding examples (VALID False) weigh nothing.

`predictions` turns logits into what reports score: probabilities (binary, multiclass,
multilabel), values in the label's units (regression), a risk score (survival).
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax

from biofm_jax.data import batch as B
from biofm_jax.objectives import logistic_hazard
from biofm_jax.objectives.base import ObjectiveDefaults


@dataclasses.dataclass(frozen=True)
class SupervisedObjective(ObjectiveDefaults):
  task_type: str
  num_outputs: int = 1
  time_bin_edges: tuple[float, ...] = ()
  name: str = "supervised"

  @property
  def loss_weights(self):
    return {"task_loss": 1.0}

  def counts(self, batch):
    valid = batch[B.TASK][B.VALID].astype(jnp.float32).sum()
    counts = {"task_loss": valid}
    if self.task_type in ("binary", "multiclass"):
      counts["accuracy"] = valid
    return counts

  def sums(self, outputs, batch):
    task = batch[B.TASK]
    valid = task[B.VALID].astype(jnp.float32)
    logits = outputs["task"]["logits"].astype(jnp.float32)
    if self.task_type == "binary":
      z, y = logits[:, 0], task[B.TASK_LABEL]
      losses, hits = optax.sigmoid_binary_cross_entropy(z, y), ((z > 0) == (y > 0.5))
    elif self.task_type == "multiclass":
      y = task[B.TASK_LABEL]
      losses = optax.softmax_cross_entropy_with_integer_labels(logits, y)
      hits = jnp.argmax(logits, -1) == y
    elif self.task_type == "multilabel":
      losses, hits = optax.sigmoid_binary_cross_entropy(logits, task[B.TASK_LABEL]).mean(-1), None
    elif self.task_type == "regression":
      losses, hits = 0.5 * jnp.square(logits[:, 0] - task[B.TASK_LABEL]), None
    elif self.task_type == "survival":
      losses = logistic_hazard.negative_log_likelihood(logits, task[B.TASK_TIME], task[B.TASK_EVENT], self.time_bin_edges)
      hits = None
    else:
      raise ValueError(f"task type {self.task_type!r} is not one of {B.TASK_TYPES}")
    sums = {"task_loss": jnp.sum(losses * valid)}
    if hits is not None:
      sums["accuracy"] = jnp.sum(hits.astype(jnp.float32) * valid)
    return sums


def predictions(info, logits) -> np.ndarray:
  """Scores of `logits` [N, num_outputs] for a task described by `info` (a TaskInfo)."""
  z = np.asarray(logits, np.float64)
  if info.type == "binary":
    return 1.0 / (1.0 + np.exp(-z[:, 0]))
  if info.type == "multiclass":
    return np.asarray(jax.nn.softmax(z, axis=-1))
  if info.type == "multilabel":
    return 1.0 / (1.0 + np.exp(-z))
  if info.type == "regression":
    return z[:, 0] * info.label_std + info.label_mean
  return logistic_hazard.risk_score(z)
