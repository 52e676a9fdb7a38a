"""Labelled EHR examples for fine-tuning and evaluation, with the prediction-time cut enforced.

`EHRTaskData` joins a labels file (`labels.py`) to a MEDS dataset: one example per label
row, made of the subject's static rows and the events a label at the row's
`prediction_time` may use, tokenised exactly as in pre-training, plus the row's targets
under `batch.TASK`. The cut follows `meds.LabelSchema` ("data may be used ... up to and
including this time", `cut="inclusive"`, the default); `cut="strict"` keeps only events
strictly before it. It happens in the source (`MEDSSource.record_until`), before any
transform sees the record, so no later event can reach the model whatever the config.

Label rows take their subject's MEDS split. Rows naming subjects the dataset does not
have, and rows whose subject has no event the cut keeps (no history to predict from), are
dropped and counted (`dropped`, per split, in the logs and the report); with
`strict_labels=True` they are an error naming the file, row and subject. Rows without a
prediction time, and a label column with one class in the training split, are errors.
"""
from __future__ import annotations

import copy
import logging
from typing import Any, Mapping

import pathlib

import grain
import ml_collections
import numpy as np

from biofm_jax.config import config_to_dict
from biofm_jax.data import batch
from biofm_jax.data.artifacts import copy_regular_files
from biofm_jax.modalities.ehr.data import VOCAB_FILENAME, EHRData, TokenizeEHR
from biofm_jax.modalities.ehr.synthetic_labels import write_synthetic_labels
from biofm_jax.modalities.ehr.windows import birth_time
from biofm_jax.modalities.ehr.meds import US_PER_DAY
from biofm_jax.data.labels import Labels, TaskInfo, check_classes_in_training, read_labels, task_info, task_targets
from biofm_jax.data.module import DataModuleDefaults

log = logging.getLogger("biofm_jax")
AGE_BANDS = ((0, 40, "<40"), (40, 60, "40-59"), (60, 80, "60-79"), (80, 200, "80+"))
CUTS = ("inclusive", "strict")  # events at or before the prediction time (MEDS) / strictly before it
UNKNOWN_SUBJECT = "unknown_subject"
UNKNOWN = "unknown"  # a subgroup value no code or column gives
# Subgroups read from a record's codes, as MEDS ETLs write them (MIMIC-IV: GENDER//F, others SEX//F,
# RACE//..., ETHNICITY//...): the value is what follows the first matching prefix.
SUBGROUP_CODE_PREFIXES = {"sex": ("GENDER//", "SEX//"), "race": ("RACE//",), "ethnicity": ("ETHNICITY//",)}
_US_PER_YEAR = US_PER_DAY * batch.DAYS_PER_YEAR


def history_rows(meds: Any, subject_ids: np.ndarray, prediction_times: np.ndarray, cut: str):
  """For label rows (`subject_ids`, `prediction_times`) over a `MEDSSource`: (positions in
  it, whether the subject is in it, whether the subject has an event that `cut` keeps,
  the subject's first timed event or NaT)."""
  n = len(meds.subject_ids)
  positions = np.minimum(np.searchsorted(meds.subject_ids, subject_ids), max(n - 1, 0))
  known = np.zeros(len(subject_ids), bool) if not n else meds.subject_ids[positions] == subject_ids
  first_events = np.full(len(subject_ids), np.datetime64("NaT"), "datetime64[us]")
  first_events[known] = meds.first_event_times()[positions[known]]
  times = np.asarray(prediction_times, "datetime64[us]")
  usable = known & ~np.isnat(first_events) & (first_events <= times if cut == "inclusive" else first_events < times)
  return positions, known, usable, first_events


class LabeledSource:
  """The label rows of one split; record i = that row's history (cut) and its targets."""

  def __init__(self, meds_source: Any, positions: np.ndarray, labels: Labels, inclusive: bool = True):
    self._meds, self._positions, self.labels, self.inclusive = meds_source, positions, labels, inclusive

  def __len__(self) -> int:
    return len(self.labels)

  def __getitem__(self, index: int) -> dict:
    i = int(index)
    record = self._meds.record_until(int(self._positions[i]), self.labels.prediction_times[i],
                                     inclusive=self.inclusive)
    record["targets"] = {k: v[i] for k, v in self.labels.targets.items()}
    return record

  def __repr__(self) -> str:
    return f"LabeledSource(rows={len(self)})"


class TokenizeLabeled(grain.transforms.Map):
  """Cut record -> {"ehr": the tokenised history, "task": its targets}."""

  def __init__(self, tokenize: TokenizeEHR, info: TaskInfo):
    self.tokenize, self.info = tokenize, info

  def map(self, record: Mapping[str, Any]) -> dict:
    return {"ehr": self.tokenize.map(record), batch.TASK: task_targets(record["targets"], self.info)}


class EHRTaskData(DataModuleDefaults):
  """A labelled EHR task as the pipeline, the training loop and the evaluation see it."""
  name = "labeled_ehr"
  modality = "ehr"
  embedding_output = ("ehr", "embedding")  # where the backbone's outputs hold what the task head reads

  def __init__(self, ehr: EHRData, labels: Labels, *, num_time_bins: int = 8, cut: str = "inclusive",
               strict_labels: bool = False):
    if cut not in CUTS:
      raise ValueError(f"task.prediction_time_cut {cut!r}: expected one of {CUTS}")
    self.ehr, self.labels, self.num_time_bins, self.cut = ehr, labels, num_time_bins, cut
    dataset = ehr.dataset
    if np.isnat(labels.prediction_times).any():
      row = int(np.flatnonzero(np.isnat(labels.prediction_times))[0])
      raise ValueError(f"labels {labels.path}: EHR labels need a prediction_time; row {row} "
                       f"(subject_id {labels.subject_ids[row]}) has none")
    split_of = {int(s): name for name, ids in dataset.splits.items() for s in ids}
    splits = np.array([split_of.get(int(s), "") for s in labels.subject_ids], dtype=object)
    usable = np.zeros(len(labels), bool)
    first_events = np.full(len(labels), np.datetime64("NaT"), "datetime64[us]")
    positions = np.zeros(len(labels), np.int64)
    meds_sources = {name: dataset.source(name) for name in dataset.splits}
    for name, meds in meds_sources.items():
      rows = np.flatnonzero(splits == name)
      positions[rows], _, usable[rows], first_events[rows] = history_rows(
          meds, labels.subject_ids[rows], labels.prediction_times[rows], cut)
    self.dropped = _dropped_counts(splits, usable, dataset.splits)
    if strict_labels:
      _check_all_rows_usable(labels, splits, usable, first_events, self.dropped, dataset.root, cut)
    if self.dropped["total"]:
      log.warning("labels %s: dropped %d of %d rows (%s)", labels.path, self.dropped["total"], len(labels),
                  _describe_dropped(self.dropped, cut))
    self._rows = {name: np.flatnonzero((splits == name) & usable) for name in dataset.splits}
    self._sources: dict[str, LabeledSource] = {
        name: LabeledSource(meds_sources[name], positions[rows], labels.rows(rows), inclusive=cut == "inclusive")
        for name, rows in self._rows.items()}
    train = self._rows.get("train", np.zeros(0, np.int64))
    if not len(train):
      raise ValueError(f"labels {labels.path}: no usable label rows for subjects of the training split "
                       f"({_describe_dropped(self.dropped, cut) or 'none in the labels file'})")
    check_classes_in_training(labels, train)
    self.info = task_info(labels, train, num_time_bins)

  def with_train_rows(self, rows: np.ndarray) -> EHRTaskData:
    """A copy whose training split keeps only `rows` (indices into it): few-shot training."""
    train = self.source("train")
    out = copy.copy(self)
    out._sources = {**self._sources, "train": LabeledSource(train._meds, train._positions[rows], train.labels.rows(rows),
                                                            train.inclusive)}
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
    return [TokenizeLabeled(self.ehr.tokenizer(), self.info)]

  def example_spec(self) -> dict:
    return {**self.ehr.embedding_spec(), batch.TASK: batch.task_example_spec(self.info.type, self.info.num_outputs)}

  embedding_spec = example_spec

  def model_info(self) -> dict[str, dict]:
    return self.ehr.model_info()

  def summary(self) -> dict[str, Any]:
    out: dict[str, Any] = {f"labels_{name}": len(rows) for name, rows in self._rows.items()}
    out["task"] = self.info.type
    out["outputs"] = self.info.num_outputs
    out["labels_dropped"] = self.dropped["total"]
    return out

  def records(self, split: str):
    """The cut records of `split`, in row order (for count-of-codes baselines)."""
    source = self.source(split)
    return [source[i] for i in range(len(source))]

  def splits(self) -> tuple[str, ...]:
    return tuple(self._sources)

  def covariates(self, split: str, subgroup_codes: Mapping[str, tuple[str, ...]] | None = None,
                 ) -> dict[str, np.ndarray]:
    """Subgroup columns of `split`'s rows: the labels file's own extra columns; one column per
    entry of `subgroup_codes` ({name: code prefixes}, default `SUBGROUP_CODE_PREFIXES`) read
    from each row's record, unless the labels file has that column; and the age at the
    prediction time and its band. A row without the code or a birth event is "unknown"."""
    source = self.source(split)
    prefixes = {name: tuple(p) for name, p in (SUBGROUP_CODE_PREFIXES if subgroup_codes is None
                                               else subgroup_codes).items()
                if name not in source.labels.covariates}
    ages = np.full(len(source), np.nan)
    from_codes = {name: np.full(len(source), UNKNOWN, dtype=object) for name in prefixes}
    for i in range(len(source)):
      record = source[i]
      codes = np.asarray(record["codes"], dtype=object)
      birth = birth_time(codes, record["times"])
      if birth is not None:
        ages[i] = (source.labels.prediction_times[i] - birth).astype(np.int64) / _US_PER_YEAR
      for name, starts in prefixes.items():
        match = next((str(c) for c in codes if str(c).startswith(starts)), None)
        if match is not None:
          from_codes[name][i] = match[next(len(p) for p in starts if match.startswith(p)):]
    bands = np.array([UNKNOWN] * len(ages), dtype=object)
    for low, high, name in AGE_BANDS:
      bands[(ages >= low) & (ages < high)] = name
    return {**from_codes, **source.labels.covariates, "age_years": ages, "age_band": bands}


def _dropped_counts(splits: np.ndarray, usable: np.ndarray, split_names) -> dict[str, Any]:
  """{"unknown_subject": n, "no_history": {split: n}, "total": n} over every split."""
  no_history = {name: int(((splits == name) & ~usable).sum()) for name in split_names}
  unknown = int((splits == "").sum())
  return {UNKNOWN_SUBJECT: unknown, "no_history": no_history, "total": unknown + sum(no_history.values())}


def _describe_dropped(dropped: Mapping[str, Any], cut: str) -> str:
  parts = []
  if dropped[UNKNOWN_SUBJECT]:
    parts.append(f"{dropped[UNKNOWN_SUBJECT]} name subjects the MEDS dataset does not have (or has in no split)")
  no_history = {k: v for k, v in dropped["no_history"].items() if v}
  if no_history:
    when = "at or before" if cut == "inclusive" else "strictly before"
    parts.append(f"{sum(no_history.values())} have no event {when} their prediction_time ("
                 + ", ".join(f"{k} {v}" for k, v in no_history.items()) + ")")
  return "; ".join(parts)


def _check_all_rows_usable(labels: Labels, splits, usable, first_events, dropped, root, cut: str) -> None:
  """`strict_labels`: a row that would be dropped is an error naming the first one."""
  if not dropped["total"]:
    return
  row = int(np.flatnonzero(~usable)[0])
  if splits[row] == "":
    first = f"row {row}, subject_id {labels.subject_ids[row]} (not in {root})"
  else:
    first = (f"row {row}, subject_id {labels.subject_ids[row]}, prediction_time {labels.prediction_times[row]}, "
             f"first event {first_events[row]}")
  raise ValueError(f"labels {labels.path}: {dropped['total']} of {len(labels)} rows cannot be used: "
                   f"{_describe_dropped(dropped, cut)}; first: {first} (without strict_labels they are dropped "
                   f"and counted)")


def open_labeled_ehr(config: ml_collections.ConfigDict, artifacts_dir: pathlib.Path, targets: str) -> EHRTaskData:
  """`EHRTaskData` for `config.task` (MEDS label rows) over the pre-trained run's MEDS data,
  tokenised with its vocabulary and as its objective's `targets` were (the registry's
  `labeled` entry for EHR)."""
  pretrained_artifacts = pathlib.Path(config.finetune.pretrained) / "artifacts"
  artifacts_dir.mkdir(parents=True, exist_ok=True)
  if not (artifacts_dir / VOCAB_FILENAME).exists():  # a regular file by name, never through a link
    copy_regular_files(pretrained_artifacts, artifacts_dir, [VOCAB_FILENAME],
                       f"pretrained run {config.finetune.pretrained}")
  ehr_cfg = ml_collections.ConfigDict(config_to_dict(config.data.ehr))
  if not ehr_cfg.path:  # the pre-training run generated its cohort: use that one
    ehr_cfg.path = str(pretrained_artifacts / "synthetic_meds")
  ehr = EHRData.from_config(ehr_cfg, targets=targets, artifacts_dir=artifacts_dir)
  labels = read_labels(labels_path(config, ehr_cfg.path, artifacts_dir), config.task)
  return EHRTaskData(ehr, labels, num_time_bins=config.task.num_time_bins,
                     cut=config.task.get("prediction_time_cut", "inclusive"),
                     strict_labels=config.task.get("strict_labels", False))


def labels_path(config: ml_collections.ConfigDict, meds_root: str, artifacts_dir: pathlib.Path) -> pathlib.Path:
  """`task.labels`, or for a synthetic cohort the labels of `task.synthetic`, written once."""
  if config.task.labels:
    return pathlib.Path(config.task.labels)
  if not config.task.synthetic:
    raise ValueError("config.task.labels is empty: give a MEDS labels parquet file (or task.synthetic for "
                     "the synthetic cohort)")
  censor = config.task.synthetic_censor_fraction
  suffix = f"_seed{config.seed}" + (f"_censor{censor:g}" if censor else "")
  path = artifacts_dir / f"labels_{config.task.synthetic}{suffix}.parquet"  # other settings, other file
  if not path.exists():
    write_synthetic_labels(meds_root, path, config.task.synthetic, seed=config.seed,
                           censor_fraction=config.task.synthetic_censor_fraction)
  return path
