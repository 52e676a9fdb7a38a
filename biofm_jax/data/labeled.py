"""Labelled EHR examples for fine-tuning and evaluation, with the prediction-time cut enforced.

`LabeledEHRData` joins a labels file (`labels.py`) to a MEDS dataset: one example per label
row, made of the subject's static rows and the events strictly before the row's
`prediction_time`, tokenised exactly as in pre-training, plus the row's targets under
`batch.TASK`. The cut happens in the source (`MEDSSource.record_before`), before any
transform sees the record, so no later event can reach the model whatever the config.

Label rows take their subject's MEDS split. Rows naming subjects the dataset does not
have, rows without a prediction time, and prediction times at or before a subject's
first event (no history to predict from) are errors naming the file, row and subject.
"""
from __future__ import annotations

import copy
import dataclasses
from typing import Any, Mapping

import grain
import numpy as np

from biofm_jax.data import batch
from biofm_jax.data.ehr import EHRData, TokenizeEHR, _birth_time
from biofm_jax.data.labels import Labels

AGE_BANDS = ((0, 40, "<40"), (40, 60, "40-59"), (60, 80, "60-79"), (80, 200, "80+"))
_US_PER_YEAR = 86_400 * 1_000_000 * 365.25


@dataclasses.dataclass(frozen=True)
class TaskInfo:
  """What the task head and the loss need to know about the labels (from training rows)."""
  type: str
  num_outputs: int  # logits: 1 (binary, regression), classes, labels, or survival time bins
  classes: tuple[str, ...] = ()
  label_mean: float = 0.0  # regression targets are standardised with training statistics
  label_std: float = 1.0
  time_bin_edges: tuple[float, ...] = ()  # survival: J + 1 interval edges in days, 0 to the horizon
  # The training labels' logits under no information (log-odds of the prevalence, log class
  # frequencies, each interval's empirical hazard): the head's bias starts there.
  prior_logits: tuple[float, ...] = ()


def _logit(p: np.ndarray) -> tuple[float, ...]:
  p = np.clip(np.asarray(p, np.float64), 1e-3, 1 - 1e-3)
  return tuple(float(v) for v in np.log(p / (1 - p)))


def task_info(labels: Labels, train_rows: np.ndarray, num_time_bins: int = 8) -> TaskInfo:
  kind = labels.task_type
  if kind == "regression":
    y = labels.targets[batch.TASK_LABEL][train_rows].astype(np.float64)
    return TaskInfo(kind, 1, label_mean=float(y.mean()), label_std=float(y.std() or 1.0), prior_logits=(0.0,))
  if kind == "survival":
    times = labels.targets[batch.TASK_TIME][train_rows]
    events = labels.targets[batch.TASK_EVENT][train_rows]
    # Bins hold equal numbers of training events, the usual choice for discrete-time hazards.
    # The horizon is the last training event: later times count as surviving every interval.
    event_times = times[events] if events.any() else times
    cuts = np.unique(np.quantile(event_times, np.linspace(0, 1, num_time_bins + 1)[1:]))
    edges = np.concatenate([[0.0], cuts[cuts > 0]])
    at_risk = np.array([(times >= start).sum() for start in edges[:-1]])
    interval = np.searchsorted(edges, times[events], side="right") - 1
    interval[times[events] == edges[-1]] = len(edges) - 2  # the last interval is closed (objectives/survival.py)
    died = np.bincount(interval[interval < len(edges) - 1], minlength=len(edges) - 1)
    return TaskInfo(kind, len(edges) - 1, time_bin_edges=tuple(float(e) for e in edges),
                    prior_logits=_logit((died + 0.5) / (at_risk + 1.0)))
  y = labels.targets[batch.TASK_LABEL][train_rows]
  if kind == "multiclass":
    frequencies = (np.bincount(y, minlength=labels.num_outputs) + 0.5) / (len(y) + 0.5 * labels.num_outputs)
    return TaskInfo(kind, labels.num_outputs, classes=labels.classes,
                    prior_logits=tuple(float(v) for v in np.log(frequencies)))
  prevalence = y.mean(axis=0) if len(y) else np.full(labels.num_outputs, 0.5)
  return TaskInfo(kind, labels.num_outputs, classes=labels.classes, prior_logits=_logit(np.atleast_1d(prevalence)))


class LabeledSource:
  """The label rows of one split; record i = that row's history (cut) and its targets."""

  def __init__(self, meds_source: Any, positions: np.ndarray, labels: Labels):
    self._meds, self._positions, self.labels = meds_source, positions, labels

  def __len__(self) -> int:
    return len(self.labels)

  def __getitem__(self, index: int) -> dict:
    i = int(index)
    record = self._meds.record_before(int(self._positions[i]), self.labels.prediction_times[i])
    record["targets"] = {k: v[i] for k, v in self.labels.targets.items()}
    return record

  def __repr__(self) -> str:
    return f"LabeledSource(rows={len(self)})"


class TokenizeLabeled(grain.transforms.Map):
  """Cut record -> {"ehr": the tokenised history, "task": its targets}."""

  def __init__(self, tokenize: TokenizeEHR, info: TaskInfo):
    self.tokenize, self.info = tokenize, info

  def map(self, record: Mapping[str, Any]) -> dict:
    task = {batch.TASK_VALID: np.bool_(True)}
    for name, value in record["targets"].items():
      task[name] = np.asarray(value, batch.task_example_spec(self.info.type, self.info.num_outputs)[name][1])
    if self.info.type == "regression":
      task[batch.TASK_LABEL] = np.float32((task[batch.TASK_LABEL] - self.info.label_mean) / self.info.label_std)
    return {"ehr": self.tokenize.map(record), batch.TASK: task}


class LabeledEHRData:
  """A labelled EHR task as the pipeline, the training loop and the evaluation see it."""
  name = "labeled_ehr"
  modality = "ehr"
  examples_keyed_by_modality = True

  def __init__(self, ehr: EHRData, labels: Labels, *, num_time_bins: int = 8):
    self.ehr, self.labels, self.num_time_bins = ehr, labels, num_time_bins
    dataset = ehr.dataset
    split_of = {int(s): name for name, ids in dataset.splits.items() for s in ids}
    splits = np.array([split_of.get(int(s), "") for s in labels.subject_ids], dtype=object)
    _check_known_subjects(labels, splits, dataset.root)
    if np.isnat(labels.prediction_times).any():
      row = int(np.flatnonzero(np.isnat(labels.prediction_times))[0])
      raise ValueError(f"labels {labels.path}: EHR labels need a prediction_time; row {row} "
                       f"(subject_id {labels.subject_ids[row]}) has none")
    self._rows = {name: np.flatnonzero(splits == name) for name in dataset.splits}
    self._sources: dict[str, LabeledSource] = {}
    for name, rows in self._rows.items():
      meds = dataset.source(name)
      positions = np.searchsorted(meds.subject_ids, labels.subject_ids[rows])
      _check_history_before(labels, rows, meds.first_event_times()[positions])
      self._sources[name] = LabeledSource(meds, positions, labels.rows(rows))
    train = self._rows.get("train", np.zeros(0, np.int64))
    if not len(train):
      raise ValueError(f"labels {labels.path}: no label rows for subjects of the training split")
    _check_classes_in_training(labels, train)
    self.info = task_info(labels, train, num_time_bins)

  def with_train_rows(self, rows: np.ndarray) -> LabeledEHRData:
    """A copy whose training split keeps only `rows` (indices into it): few-shot training."""
    train = self.source("train")
    out = copy.copy(self)
    out._sources = {**self._sources, "train": LabeledSource(train._meds, train._positions[rows], train.labels.rows(rows))}
    out._rows = {**self._rows, "train": self._rows["train"][rows]}
    out.info = task_info(train.labels, rows, self.num_time_bins)
    return out

  def source(self, split: str) -> LabeledSource:
    if split not in self._sources:
      raise ValueError(f"labels {self.labels.path}: unknown split {split!r}; splits: {list(self._sources)}")
    return self._sources[split]

  def split_labels(self, split: str) -> Labels:
    return self.source(split).labels

  def transforms(self, train: bool, mask: bool = False) -> list:
    del train, mask  # fine-tuning never masks: the whole history is the input
    return [TokenizeLabeled(TokenizeEHR(self.ehr.vocab, self.ehr.max_len, self.ehr.window), self.info)]

  def example_spec(self) -> dict:
    return {"ehr": self.ehr.embedding_spec(), batch.TASK: batch.task_example_spec(self.info.type, self.info.num_outputs)}

  embedding_spec = example_spec

  def model_info(self) -> dict[str, dict]:
    return {"ehr": self.ehr.model_info()}

  def summary(self) -> dict[str, Any]:
    out: dict[str, Any] = {f"labels_{name}": len(rows) for name, rows in self._rows.items()}
    out["task"] = self.info.type
    out["outputs"] = self.info.num_outputs
    return out

  def records(self, split: str):
    """The cut records of `split`, in row order (for count-of-codes baselines)."""
    source = self.source(split)
    return [source[i] for i in range(len(source))]

  def covariates(self, split: str) -> dict[str, np.ndarray]:
    """Subgroup columns of `split`'s rows: the labels file's own extra columns, plus the
    age at the prediction time and its band ("unknown" without a birth event)."""
    source = self.source(split)
    ages = np.full(len(source), np.nan)
    for i in range(len(source)):
      record = source[i]
      codes = np.asarray(record["codes"], dtype=object)
      birth = _birth_time(codes, record["times"])
      if birth is not None:
        ages[i] = (source.labels.prediction_times[i] - birth).astype(np.int64) / _US_PER_YEAR
    bands = np.array(["unknown"] * len(ages), dtype=object)
    for low, high, name in AGE_BANDS:
      bands[(ages >= low) & (ages < high)] = name
    return {**source.labels.covariates, "age_years": ages, "age_band": bands}


def _check_classes_in_training(labels: Labels, train_rows: np.ndarray) -> None:
  """A class no training row has would get a head output that never trains."""
  if labels.task_type != "multiclass":
    return
  seen = set(np.unique(labels.targets[batch.TASK_LABEL][train_rows]).tolist())
  unseen = [name for i, name in enumerate(labels.classes) if i not in seen]
  if unseen:
    raise ValueError(f"labels {labels.path}: classes {unseen} have no row in the training split; drop those "
                     f"rows or merge the classes")


def _check_known_subjects(labels: Labels, splits: np.ndarray, root) -> None:
  unknown = np.flatnonzero(splits == "")
  if len(unknown):
    row = int(unknown[0])
    raise ValueError(f"labels {labels.path}: {len(unknown)} of {len(labels)} rows name subjects that the MEDS "
                     f"dataset {root} does not have (or has in no split); first: row {row}, subject_id "
                     f"{labels.subject_ids[row]}")


def _check_history_before(labels: Labels, rows: np.ndarray, first_events: np.ndarray) -> None:
  times = labels.prediction_times[rows]
  empty = np.isnat(first_events) | (times <= first_events)
  if empty.any():
    i = int(np.flatnonzero(empty)[0])
    row = int(rows[i])
    raise ValueError(f"labels {labels.path}: {int(empty.sum())} rows have a prediction_time at or before the "
                     f"subject's first event, so the model would see no history; first: row {row}, subject_id "
                     f"{labels.subject_ids[row]}, prediction_time {times[i]}, first event {first_events[i]}")
