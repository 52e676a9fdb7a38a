"""Labelled records of any record modality (images, ECGs, cells, sequences, table rows), for
fine-tuning and its evaluation: the label is one of the columns the records carry (a
manifest's, an AnnData obs's, a table's `label_columns`).

`RecordTaskData` wraps the pre-training data module opened as the pre-trained run opened it
(its vocabulary, statistics and splits) and yields one example per labelled record: the
record through the module's own transforms without pre-training masking (training
augmentation included), plus the row's targets under `batch.TASK`, as the EHR task data
does. Records without a value in the column are left out and counted; classes come from the
training rows:

  binary       a column of two values (0/1, or any two: the larger is the positive class)
  multiclass   the values seen in training, in sorted order
  regression   the value itself (standardised for training with training statistics)

Rows are keyed by their record (`Labels.record_keys`: its file, cell or FASTA id) and its
index in its split (`Labels.row_index`): a record modality has no MEDS prediction time, and
the predictions files say which record each row is.

Over the multimodal join (the fused model), labels come from a table keyed by `subject_id`
(`from_subject_labels`: `meds.LabelSchema` value columns; one row per subject, or rows with
a `prediction_time` at which each subject's EHR is cut, `subject_labels.py`), and each
subject brings whichever modalities it has: a subject missing some still gets a
prediction. Those rows keep their subject ids (and times), and so do their predictions.
"""
from __future__ import annotations

import copy
import pathlib
from typing import Any, Mapping

import grain
import numpy as np

from biofm_jax.data import batch
from biofm_jax.data.labels import Labels, TaskInfo, check_classes_in_training, task_info, task_targets
from biofm_jax.data.module import DataModuleDefaults, unmasked_train_spec
from biofm_jax.data.subject_labels import TimedItems, match_subject_labels

RECORD_TASK_TYPES = ("binary", "multiclass", "regression")  # from one label column
OUTCOME_COLUMN_TYPES = ("multilabel", "survival")  # from several (`outcome_labels`)


def label_values(data: Any, label_column: str, split: str) -> np.ndarray:
  """float64 [records] of `split`'s records in `label_column` (NaN: no value), checked to exist."""
  values, names = data.labels(split)
  if label_column not in names:
    raise ValueError(f"task.label_column {label_column!r} is not among the {data.name} records' label columns "
                     f"{list(names)} (config.data.{data.name}.label_columns)")
  return np.asarray(values, np.float64)[:, list(names).index(label_column)]


def record_labels(data: Any, label_column: str, task_type: str, split: str, column: np.ndarray,
                  classes: tuple[float, ...] = ()) -> Labels:
  """The labelled rows of `split` for `label_column`, whose values are `column`
  (`label_values`; `classes`: the training split's values, for classification)."""
  known = np.isfinite(column)
  if task_type == "regression":
    rows, targets, class_names = np.flatnonzero(known), column[known].astype(np.float32), ()
  else:
    rows = np.flatnonzero(known & np.isin(column, classes))
    ids = np.searchsorted(np.asarray(classes), column[rows])
    class_names = tuple(_class_name(c) for c in classes)
    targets = ids.astype(np.float32) if task_type == "binary" else ids.astype(np.int32)
  return _rows_labels(data, split, rows, task_type, (label_column,), {batch.TASK_LABEL: targets},
                      class_names if task_type == "multiclass" else ())


def _rows_labels(data: Any, split: str, rows: np.ndarray, task_type: str, columns: tuple[str, ...],
                 targets: dict[str, np.ndarray], classes: tuple[str, ...]) -> Labels:
  """The `Labels` of records `rows` of `split` with their `targets`, keyed by record."""
  source = data.source(split)
  subjects = getattr(source, "subject_ids", None)
  subject_ids = np.zeros(len(rows), np.int64)
  if subjects is not None:  # integer subject ids where the records have them (joins, reports)
    as_int = [int(s) if str(s).lstrip("-").isdigit() else -1 for s in np.asarray(subjects)[rows]]
    subject_ids = np.asarray(as_int, np.int64)
  return Labels(pathlib.Path(f"{data.name}:{','.join(columns)}"), task_type, subject_ids,
                np.full(len(rows), np.datetime64("NaT"), "datetime64[us]"), targets, classes, columns=columns,
                row_index=rows, record_keys=record_keys(source, rows))


def outcome_labels(data: Any, task_type: str, columns: tuple[str, ...], split: str) -> tuple[Labels, int]:
  """(the labelled rows of `split`, how many records lack a value) for a task read from several
  of the records' columns: multilabel (`columns`: 0/1 flags) or survival (`columns`: days to
  the event or to censoring, and 1 where the event was seen). A value outside those is an
  error naming the column, the split and the record."""
  values = np.stack([label_values(data, c, split) for c in columns], axis=1)
  rows = np.flatnonzero(np.isfinite(values).all(axis=1))
  flags = list(range(len(columns))) if task_type == "multilabel" else [1]
  for j in flags:
    bad = rows[~np.isin(values[rows, j], (0.0, 1.0))]
    if len(bad):
      raise ValueError(f"{data.name} records, label column {columns[j]!r}: {values[bad[0], j]:g} in record "
                       f"{int(bad[0])} of split {split!r}; {'a flag' if task_type == 'multilabel' else 'an event'} "
                       f"column holds 0 or 1")
  if task_type == "survival":
    bad = rows[values[rows, 0] < 0]
    if len(bad):
      raise ValueError(f"{data.name} records, label column {columns[0]!r}: {values[bad[0], 0]:g} days in record "
                       f"{int(bad[0])} of split {split!r}; a survival time is 0 or more")
    targets = {batch.TASK_TIME: values[rows, 0].astype(np.float32), batch.TASK_EVENT: values[rows, 1] > 0.5}
    return _rows_labels(data, split, rows, task_type, columns, targets, ()), len(values) - len(rows)
  return (_rows_labels(data, split, rows, task_type, columns, {batch.TASK_LABEL: values[rows].astype(np.float32)},
                       tuple(columns)), len(values) - len(rows))


def record_keys(source: Any, rows: np.ndarray) -> np.ndarray | None:
  """The keys of `source`'s records `rows` (a file, a cell, a FASTA id: the source's
  `record_keys`), as text; None for a source without keys."""
  keys = getattr(source, "record_keys", None)
  return None if keys is None else np.asarray([str(k) for k in keys], object)[np.asarray(rows, np.int64)]


def _class_name(value: float) -> str:
  return str(int(value)) if float(value).is_integer() else str(value)


def training_classes(data: Any, label_column: str, task_type: str) -> tuple[float, ...]:
  """The values the training split's records take in `label_column` (classification)."""
  if task_type not in RECORD_TASK_TYPES:
    raise ValueError(f"task.type {task_type!r}: a record label column is fine-tuned as one of {RECORD_TASK_TYPES} "
                     f"(several columns: {OUTCOME_COLUMN_TYPES})")
  if task_type == "regression":
    return ()
  column = label_values(data, label_column, "train")
  classes = tuple(float(v) for v in np.unique(column[np.isfinite(column)]))
  if len(classes) < 2:
    raise ValueError(f"task.label_column {label_column!r} has {len(classes)} class(es) in the training split's "
                     f"{data.name} records; a classifier needs two")
  if task_type == "binary" and len(classes) != 2:
    raise ValueError(f"task.label_column {label_column!r} has {len(classes)} classes in the training split "
                     f"({[_class_name(c) for c in classes][:6]}); set task.type='multiclass'")
  return classes


def splits_of(data: Any) -> list[str]:
  """The standard splits `data` has (training first; a module without one says so when asked)."""
  splits = []
  for split in ("train", "tuning", "held_out"):
    try:
      data.source(split)
    except (KeyError, ValueError):
      if split == "train":
        raise
      continue
    splits.append(split)
  return splits


class LabeledRecords:
  """The labelled records of one split: item i = {"record": the source's item `items[i]`,
  "targets": label row i's}."""

  def __init__(self, source: Any, labels: Labels, items: np.ndarray):
    self.view, self.labels, self.items = source, labels, np.asarray(items, np.int64)

  def __len__(self) -> int:
    return len(self.labels)

  def __getitem__(self, index: int) -> dict:
    i = int(index)
    return {"record": self.view[int(self.items[i])],
            "targets": {k: v[i] for k, v in self.labels.targets.items()}}


class _OnRecord(grain.transforms.Map):
  """A record transform of the wrapped module, applied to the record beside its targets."""

  def __init__(self, inner: grain.transforms.Map):
    self.inner = inner

  def map(self, element: Mapping[str, Any]) -> dict:
    return {"record": self.inner.map(element["record"]), "targets": element["targets"]}


class _RandomOnRecord(grain.transforms.RandomMap):
  def __init__(self, inner: grain.transforms.RandomMap):
    self.inner = inner

  def random_map(self, element: Mapping[str, Any], rng: np.random.Generator) -> dict:
    return {"record": self.inner.random_map(element["record"], rng), "targets": element["targets"]}


def on_records(transforms: list) -> list:
  """The module's transforms, each applied to the record part of a labelled element."""
  wrapped = []
  for t in transforms:
    if isinstance(t, grain.transforms.RandomMap):
      wrapped.append(_RandomOnRecord(t))
    elif isinstance(t, grain.transforms.Map):
      wrapped.append(_OnRecord(t))
    else:
      raise ValueError(f"fine-tuning on records: the data module's transform {type(t).__name__} is neither a Map "
                       "nor a RandomMap, so it cannot carry the labels beside the record")
  return wrapped


class AttachTargets(grain.transforms.Map):
  """{"record": {modality: example}, "targets"} -> {modality: example, "task": targets}."""

  def __init__(self, info: TaskInfo):
    self.info = info

  def map(self, element: Mapping[str, Any]) -> dict:
    return {**element["record"], batch.TASK: task_targets(element["targets"], self.info)}


AVAILABILITY = "modalities"  # a joined subject's subgroup column: the modalities it brings, "ehr+imaging"


class RecordTaskData(DataModuleDefaults):
  """A labelled task over a record modality's data module, or over the multimodal join of a
  patient's modalities, as the loop and evaluations see it."""

  def __init__(self, data: Any, labels: Mapping[str, Labels], items: Mapping[str, np.ndarray], *, label_name: str,
               embedding_output: tuple[str, ...], without_label: Mapping[str, int],
               dropped: Mapping[str, int] | None = None, num_time_bins: int = 8,
               label_classes: tuple[float, ...] = (), views: Mapping[str, Any] | None = None,
               cut: str | None = None):
    """`views`: per split, what `items` index instead of `data.source(split)` (labelled
    subjects at their prediction times, `subject_labels.TimedItems`); `cut`: the rule those
    times were applied with (None: the rows have none)."""
    if "train" not in labels or not len(labels["train"]):
      raise ValueError(f"{data.name} labels {label_name!r}: no labelled record in the training split")
    self.data, self.label_column, self.embedding_output = data, label_name, tuple(embedding_output)
    self.modality = data.name
    self.name = f"labeled_{data.name}"
    self.num_time_bins = num_time_bins
    self._labels = dict(labels)
    views = dict(views or {})
    self._sources = {s: LabeledRecords(views[s] if s in views else data.source(s), rows, items[s])
                     for s, rows in self._labels.items()}
    self.cut = cut
    self.without_label = dict(without_label)  # records (subjects) of each split that no label row names
    self.dropped = dict(dropped or {})
    # The label column's values behind the class ids (classification over a record column),
    # exported so raw records' labels map to the same ids.
    self.label_classes = tuple(float(v) for v in label_classes)
    check_classes_in_training(self._labels["train"], np.arange(len(self._labels["train"])))
    self.info = task_info(self._labels["train"], np.arange(len(self._labels["train"])), num_time_bins)

  @classmethod
  def from_label_column(cls, data: Any, label_column: str, task_type: str) -> RecordTaskData:
    """The records' own label column (a manifest's, an obs's, a table's `label_columns`)."""
    classes = training_classes(data, label_column, task_type)
    labels, without, unseen = {}, {}, {}
    for split in splits_of(data):
      column = label_values(data, label_column, split)
      labels[split] = record_labels(data, label_column, task_type, split, column, classes)
      without[split] = int((~np.isfinite(column)).sum())
      unseen[split] = len(column) - without[split] - len(labels[split])  # a class training never saw
    return cls(data, labels, {s: rows.row_index for s, rows in labels.items()}, label_name=label_column,
               embedding_output=(data.name, "embedding"), without_label=without,
               dropped={"records_of_a_class_not_in_training": sum(unseen.values())}, label_classes=classes)

  @classmethod
  def from_outcome_columns(cls, data: Any, task_type: str, columns: tuple[str, ...]) -> RecordTaskData:
    """Several of the records' own columns (`outcome_labels`): multilabel flags, or a survival
    time and event. Records without a value in every column are left out and counted."""
    if task_type not in OUTCOME_COLUMN_TYPES:
      raise ValueError(f"task.type {task_type!r}: several label columns make a {' or '.join(OUTCOME_COLUMN_TYPES)} task")
    labels, without = {}, {}
    for split in splits_of(data):
      labels[split], without[split] = outcome_labels(data, task_type, tuple(columns), split)
    return cls(data, labels, {s: rows.row_index for s, rows in labels.items()}, label_name=",".join(columns),
               embedding_output=(data.name, "embedding"), without_label=without)

  @classmethod
  def from_subject_labels(cls, data: Any, labels: Labels, *, num_time_bins: int = 8,
                          cut: str = "inclusive") -> RecordTaskData:
    """A labels table keyed by `subject_id` (`meds.LabelSchema`'s value columns; one row per
    subject, or rows with a `prediction_time`) over the multimodal join, where each subject
    brings whichever modalities it has and a timed row sees its EHR only up to its time
    (`subject_labels.py`, by `cut`). Rows of subjects in no split, or with nothing before
    their time, are dropped and counted."""
    found, dropped = match_subject_labels(data, labels, splits_of(data), cut=cut)
    timed = not np.isnat(labels.prediction_times).all()
    by_split = {s: labels.rows(rows.rows) for s, rows in found.items()}  # rows keep their subject ids
    views = {s: TimedItems(data.source(s), rows, cut) for s, rows in found.items()}
    items = {s: np.arange(len(rows.items), dtype=np.int64) for s, rows in found.items()}
    without = {}  # subjects of each split that no label row names
    for s, rows in found.items():
      subjects = np.asarray(data.source(s).subject_ids)
      without[s] = len(set(subjects.tolist())) - len(set(subjects[rows.items].tolist()))
    embedding = ("fused", "embedding") if len(data.model_info()) > 1 else (data.name, "embedding")
    return cls(data, by_split, items, label_name=str(labels.path), embedding_output=embedding,
               without_label=without, dropped=dropped, num_time_bins=num_time_bins, views=views,
               cut=cut if timed else None)

  def with_train_rows(self, rows: np.ndarray) -> RecordTaskData:
    """A copy whose training split keeps only `rows` (indices into it): few-shot training."""
    out = copy.copy(self)
    train = self._labels["train"].rows(rows)
    out._labels = {**self._labels, "train": train}
    source = self._sources["train"]
    out._sources = {**self._sources, "train": LabeledRecords(source.view, train, source.items[rows])}
    out.info = task_info(train, np.arange(len(train)), self.num_time_bins)
    return out

  def source(self, split: str) -> LabeledRecords:
    if split not in self._sources:
      raise ValueError(f"{self.name}: unknown split {split!r}; splits: {list(self._sources)}")
    return self._sources[split]

  def split_labels(self, split: str) -> Labels:
    return self.source(split).labels

  def splits(self) -> tuple[str, ...]:
    return tuple(self._sources)

  def transforms(self, train: bool, mask: bool = False) -> list:
    del mask  # fine-tuning never masks: the whole record is the input
    return on_records(self.data.transforms(train=train, mask=False)) + [AttachTargets(self.info)]

  def example_spec(self) -> dict:
    return {**self.data.embedding_spec(), batch.TASK: batch.task_example_spec(self.info.type, self.info.num_outputs)}

  embedding_spec = example_spec

  def train_example_spec(self) -> dict:
    """As the module's training examples arrive before its device transform, without the
    fields only pre-training masking adds."""
    return {**unmasked_train_spec(self.data), batch.TASK: batch.task_example_spec(self.info.type,
                                                                                   self.info.num_outputs)}

  def device_transform(self):
    return self.data.device_transform()

  def model_info(self) -> dict[str, dict]:
    return self.data.model_info()

  def covariates(self, split: str, subgroup_codes: Any = None) -> dict[str, np.ndarray]:
    """Subgroup columns of `split`'s rows: over a join, the modalities each subject brings
    (`AVAILABILITY`, e.g. "ehr+imaging"); records carry none yet."""
    del subgroup_codes
    source = self.source(split)
    if not hasattr(self.data, "join"):
      return {}
    # As each row reads the subject (at its prediction time: an EHR with nothing before it is absent).
    return {AVAILABILITY: np.asarray(["+".join(sorted(source.view[int(i)]["records"])) for i in source.items],
                                     object)}

  def summary(self) -> dict[str, Any]:
    out: dict[str, Any] = {f"labels_{s}": len(labels) for s, labels in self._labels.items()}
    out.update(task=self.info.type, outputs=self.info.num_outputs, labels=self.label_column,
               records_without_a_label=sum(self.without_label.values()), **self.dropped)
    return out
