"""Choosing a run's best step on the tuning split, and stopping when it stops improving.

`checkpoint.best_metric` names an evaluation figure (fine-tuning: "eval/loss", the task's
loss on the tuning split); `checkpoint.best_mode` says whether lower or higher is better;
`checkpoint.best_patience` is how many evaluations without a better figure end training
(0: train every step). The loop saves a step at every evaluation with its figure beside it
(`Checkpointer.save(metrics=)`), the best of them is kept beside the newest, and what
reads the finished run reads the best (`Checkpointer.chosen_step`): early stopping's model
selection, as `load_best_model_at_end` does in Hugging Face's Trainer.

A resumed run re-reads the best so far from the figures saved in its checkpoints (on every
process alike), and counts the evaluations since from `train.eval_every`.
"""
from __future__ import annotations

import dataclasses
import logging

import ml_collections

from biofm_jax.train.checkpoint import Checkpointer

log = logging.getLogger("biofm_jax")
BEST_MODES = ("min", "max")


@dataclasses.dataclass
class BestStep:
  """The best evaluation so far of one figure, and the evaluations since it."""
  metric: str = ""
  mode: str = "min"
  patience: int = 0
  best_step: int | None = None
  best_value: float = float("nan")
  evals_since: int = 0

  @classmethod
  def from_config(cls, config: ml_collections.ConfigDict, evaluates: bool) -> "BestStep":
    section = config.checkpoint
    metric, mode = section.get("best_metric", ""), section.get("best_mode", "min")
    patience = int(section.get("best_patience", 0))
    if mode not in BEST_MODES:
      raise ValueError(f"config.checkpoint.best_mode is {mode!r}; expected one of {BEST_MODES}")
    if patience < 0:
      raise ValueError(f"config.checkpoint.best_patience is {patience}; expected 0 (never stop early) or more")
    if patience and not metric:
      raise ValueError("config.checkpoint.best_patience needs config.checkpoint.best_metric (e.g. 'eval/loss')")
    if metric and config.train.eval_every <= 0:
      raise ValueError(f"config.checkpoint.best_metric={metric!r} needs evaluations: train.eval_every > 0")
    if metric and not evaluates:  # the data's doing, not the config's: a preset keeps working
      log.warning("checkpoint.best_metric=%r: no tuning split to evaluate on, so the newest step stands for the run",
                  metric)
      return cls(mode=mode)
    return cls(metric=metric, mode=mode, patience=patience)

  def better(self, value: float) -> bool:
    if self.best_step is None:
      return True
    return value < self.best_value if self.mode == "min" else value > self.best_value

  def record(self, step: int, evaluation: dict[str, float]) -> bool:
    """Takes the evaluation at `step`; whether patience has run out."""
    if not self.metric:
      return False
    if self.metric not in evaluation:
      raise ValueError(f"config.checkpoint.best_metric={self.metric!r} is not among this run's evaluation figures: "
                       f"{sorted(evaluation)}")
    value = float(evaluation[self.metric])
    if self.better(value):
      self.best_step, self.best_value, self.evals_since = step, value, 0
    else:
      self.evals_since += 1
    return self.patience_out()

  def patience_out(self) -> bool:
    return bool(self.patience) and self.evals_since >= self.patience

  def resume(self, checkpointer: Checkpointer, start_step: int, eval_every: int) -> None:
    """The best so far of a run resumed at `start_step`, from its checkpoints' figures."""
    if not self.metric or not start_step:
      return
    best = checkpointer.best_recorded(self.metric, self.mode)  # steps on disk: none after start_step
    if best is not None:  # evaluations run at multiples of eval_every (and the last step)
      self.best_step, self.best_value = best
      self.evals_since = start_step // eval_every - self.best_step // eval_every
