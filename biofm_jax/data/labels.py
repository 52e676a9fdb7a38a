"""Downstream labels in the MEDS label format, read and checked once.

A labels file (or a directory of parquet files) follows `meds.LabelSchema`: one row per
prediction, `subject_id`, `prediction_time` and one value column, `boolean_value`,
`integer_value`, `float_value` or `categorical_value`. Which column holds the target
follows from the task type (`config.task`):

  binary       boolean_value (bool)
  multiclass   categorical_value (string) or integer_value (int)
  multilabel   the boolean columns named in `task.label_columns`
  regression   float_value (float or int)
  survival     float_value: days from prediction_time to the event or to censoring (> 0),
               boolean_value: whether the event was observed (False: censored)

`task.value_column` (and `task.time_column` / `task.event_column`) pick another column.
Any other column is kept as a covariate for subgroup reports (e.g. `sex`, `site`).

A wrong column type, a missing column, a null target or a non-positive survival time is
a `ValueError` that names the file, the column and the first bad row.

`TaskInfo` (from the training rows: outputs, classes, label statistics, the head's prior)
and `task_targets` (a row's targets as its example's `batch.TASK` part) serve every labelled
task, MEDS label rows and the label columns records carry (`data/record_task.py`) alike.
"""
from __future__ import annotations

import dataclasses
import pathlib
from typing import Any, Mapping

import meds
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from biofm_jax.data import batch

SUBJECT_ID, PREDICTION_TIME = meds.LabelSchema.subject_id_name, meds.LabelSchema.prediction_time_name
BOOLEAN, INTEGER, FLOAT, CATEGORICAL = "boolean_value", "integer_value", "float_value", "categorical_value"
DEFAULT_VALUE_COLUMN = {"binary": BOOLEAN, "multiclass": CATEGORICAL, "regression": FLOAT}


@dataclasses.dataclass(frozen=True)
class Labels:
  """Checked labels, one entry per row of the file (in file order).

  `targets` holds `batch.TASK_LABEL` (binary/regression float32 [N], multiclass int32 [N]
  class ids into `classes`, multilabel float32 [N, K]) or `batch.TASK_TIME` and
  `batch.TASK_EVENT` (survival). `covariates` holds every other column as numpy arrays.
  """
  path: pathlib.Path
  task_type: str
  subject_ids: np.ndarray  # int64 [N]
  prediction_times: np.ndarray  # datetime64[us] [N]; NaT where the file has no prediction_time
  targets: dict[str, np.ndarray]
  classes: tuple[str, ...] = ()  # multiclass class names (id = index); multilabel column names
  covariates: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)
  columns: tuple[str, ...] = ()  # the file's columns the targets were read from
  # Labels a record modality's records carry (`data/record_task.py`): each row's record, by its
  # index in its split. None for MEDS label rows, which are keyed by subject and time.
  row_index: np.ndarray | None = None
  # And the record itself, by the key its source gives it (a file, a cell, a FASTA id).
  record_keys: np.ndarray | None = None

  def __len__(self) -> int:
    return len(self.subject_ids)

  def rows(self, index: np.ndarray) -> Labels:
    """The labels of rows `index`, in that order."""
    return dataclasses.replace(
        self, subject_ids=self.subject_ids[index], prediction_times=self.prediction_times[index],
        targets={k: v[index] for k, v in self.targets.items()},
        covariates={k: v[index] for k, v in self.covariates.items()},
        row_index=None if self.row_index is None else self.row_index[index],
        record_keys=None if self.record_keys is None else self.record_keys[index])

  def metric_targets(self) -> dict[str, np.ndarray]:
    """The targets in the form `eval/metrics.py` scores: {"time", "event"} for survival,
    else {"label"} (class ids, 0/1 columns or values)."""
    if self.task_type == "survival":
      return {"time": self.targets[batch.TASK_TIME], "event": self.targets[batch.TASK_EVENT]}
    return {"label": self.targets[batch.TASK_LABEL]}

  @property
  def num_outputs(self) -> int:
    """Width of the label: classes for multiclass, labels for multilabel, else 1."""
    return len(self.classes) if self.task_type in ("multiclass", "multilabel") else 1


def _read_table(path: pathlib.Path) -> pa.Table:
  if path.is_dir():
    files = sorted(path.rglob("*.parquet"))
    if not files:
      raise ValueError(f"labels {path}: a directory without parquet files")
    tables = [pq.read_table(f) for f in files]
    try:
      return pa.concat_tables(tables, promote_options="permissive")
    except pa.ArrowInvalid as e:
      raise ValueError(f"labels {path}: the parquet files have incompatible schemas: {e}") from None
  if not path.exists():
    raise FileNotFoundError(f"labels file {path} does not exist")
  return pq.read_table(path)


def _column(table: pa.Table, path: pathlib.Path, name: str, kind: str) -> np.ndarray:
  """Column `name` as numpy, checked to be of `kind` ("bool", "int", "float", "string",
  "timestamp") and free of nulls."""
  if name not in table.column_names:
    raise ValueError(f"labels {path}: no column {name!r} (columns: {table.column_names})")
  column = table.column(name)
  t = column.type
  ok = {"bool": pa.types.is_boolean(t), "int": pa.types.is_integer(t),
        "float": pa.types.is_floating(t) or pa.types.is_integer(t),
        "string": pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_dictionary(t),
        "timestamp": pa.types.is_timestamp(t) or pa.types.is_date(t)}[kind]
  if not ok:
    raise ValueError(f"labels {path}: column {name!r} has type {t}, expected {kind} for this task")
  if column.null_count:
    row = int(pc.index(pc.is_null(column), True).as_py())
    raise ValueError(f"labels {path}: column {name!r} is null in row {row} "
                     f"(subject_id {table.column(SUBJECT_ID)[row].as_py()})")
  if kind == "timestamp":
    return column.cast(pa.timestamp("us")).to_numpy().astype("datetime64[us]")
  if kind == "string":
    return np.asarray(column.cast(pa.string()).to_pylist(), dtype=object)
  return column.to_numpy()


def _targets(table: pa.Table, path: pathlib.Path, task: Mapping[str, Any]):
  """(targets, classes, columns used) for the task type."""
  kind = task["type"]
  value_column = task.get("value_column") or DEFAULT_VALUE_COLUMN.get(kind, "")
  if kind == "binary":
    return {batch.TASK_LABEL: _column(table, path, value_column, "bool").astype(np.float32)}, (), [value_column]
  if kind == "regression":
    values = _column(table, path, value_column, "float").astype(np.float64)
    if not np.isfinite(values).all():
      row = int(np.flatnonzero(~np.isfinite(values))[0])
      raise ValueError(f"labels {path}: column {value_column!r} is not finite in row {row}")
    return {batch.TASK_LABEL: values.astype(np.float32)}, (), [value_column]
  if kind == "multiclass":
    if value_column == CATEGORICAL and CATEGORICAL not in table.column_names and INTEGER in table.column_names:
      value_column = INTEGER
    values = _column(table, path, value_column, "int" if value_column == INTEGER else "string")
    names = np.asarray([str(v) for v in values], dtype=object)
    classes = tuple(task.get("classes") or sorted(set(names), key=_natural_key))
    unknown = sorted(set(names) - set(classes))
    if unknown:
      raise ValueError(f"labels {path}: column {value_column!r} has classes {unknown[:5]} not in "
                       f"task.classes {list(classes)}")
    ids = {name: i for i, name in enumerate(classes)}
    return {batch.TASK_LABEL: np.array([ids[n] for n in names], np.int32)}, classes, [value_column]
  if kind == "multilabel":
    columns = list(task.get("label_columns") or ())
    if not columns:
      raise ValueError(f"labels {path}: a multilabel task needs task.label_columns (boolean columns)")
    matrix = np.stack([_column(table, path, c, "bool") for c in columns], axis=1).astype(np.float32)
    return {batch.TASK_LABEL: matrix}, tuple(columns), columns
  if kind == "survival":
    time_column, event_column = task.get("time_column") or FLOAT, task.get("event_column") or BOOLEAN
    times = _column(table, path, time_column, "float").astype(np.float64)
    bad = ~(np.isfinite(times) & (times > 0))
    if bad.any():
      row = int(np.flatnonzero(bad)[0])
      raise ValueError(f"labels {path}: survival time column {time_column!r} must be finite and > 0 days; "
                       f"row {row} has {times[row]}")
    events = _column(table, path, event_column, "bool")
    return ({batch.TASK_TIME: times.astype(np.float32), batch.TASK_EVENT: events.astype(bool)}, (),
            [time_column, event_column])
  raise ValueError(f"labels {path}: task.type {kind!r} is not one of {batch.TASK_TYPES}")


def _natural_key(name: str):
  """Integer-looking class names sort as numbers ("2" before "10")."""
  return (0, int(name), "") if name.lstrip("-").isdigit() else (1, 0, name)


def read_labels(path: str | pathlib.Path, task: Mapping[str, Any], *, with_targets: bool = True) -> Labels:
  """Reads and checks the labels at `path` for `task` (a mapping such as `config.task`).
  `with_targets=False` reads the rows alone (rows to score, whose outcome is not known)."""
  path = pathlib.Path(path)
  table = _read_table(path)
  if not len(table):
    raise ValueError(f"labels {path}: no rows")
  subject_ids = _column(table, path, SUBJECT_ID, "int").astype(np.int64)
  if PREDICTION_TIME in table.column_names:
    times = _column(table, path, PREDICTION_TIME, "timestamp")
  else:
    times = np.full(len(table), np.datetime64("NaT"), "datetime64[us]")
  targets, classes, used = _targets(table, path, task) if with_targets else ({}, tuple(task.get("classes") or ()), [])
  skip = {SUBJECT_ID, PREDICTION_TIME, *used}
  covariates = {name: table.column(name).to_numpy(zero_copy_only=False)
                for name in table.column_names if name not in skip and _is_scalar(table.column(name).type)}
  return Labels(path, task["type"], subject_ids, times, targets, classes, covariates, tuple(used))


def _is_scalar(t: pa.DataType) -> bool:
  return not (pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_struct(t)
              or pa.types.is_fixed_size_list(t) or pa.types.is_map(t))


def labels_name(path: str | pathlib.Path) -> str:
  """A task's name from its labels: the folder's name for a folder (ACES writes
  `<cohort_dir>/<task name>/<shard>.parquet`), the file's stem otherwise, or its folder's
  name when the stem is only a shard name (`0.parquet`, `held_out.parquet`)."""
  path = pathlib.Path(path)
  if path.is_dir():
    return path.name
  shard_like = path.stem.isdigit() or path.stem in ("train", "tuning", "held_out")
  return path.parent.name if shard_like and path.parent.name else path.stem


def write_labels(path: str | pathlib.Path, subject_ids, prediction_times, **columns) -> pathlib.Path:
  """Writes a labels parquet file: the `meds.LabelSchema` columns given, plus any others."""
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  fields = {SUBJECT_ID: pa.array(np.asarray(subject_ids, np.int64)),
            PREDICTION_TIME: pa.array(np.asarray(prediction_times).astype("datetime64[us]"), pa.timestamp("us"))}
  fields.update({name: pa.array(values) for name, values in columns.items()})
  tmp = path.with_name(path.name + ".tmp")
  pq.write_table(pa.table(fields), tmp)
  tmp.replace(path)
  return path


def few_shot_indices(labels: np.ndarray, k: int, seed: int) -> np.ndarray:
  """Sorted row indices of k rows per class (every row of a class with fewer than k).

  Each class's rows are shuffled once per seed and the first k taken, so for one seed
  the k=2 draw contains the k=1 draw: a sweep's curve moves with k, not with resampling.
  """
  if k < 1:
    raise ValueError(f"few-shot k must be at least 1, got {k}")
  labels = np.asarray(labels)
  rng = np.random.default_rng(seed)
  picks = [rng.permutation(np.flatnonzero(labels == c))[:k] for c in np.unique(labels)]
  return np.sort(np.concatenate(picks)) if picks else np.array([], np.int64)


# ------------------------------------------------------------------ what a task head needs
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
    interval[times[events] == edges[-1]] = len(edges) - 2  # the last interval is closed (objectives/logistic_hazard.py)
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


def task_targets(targets: Mapping[str, Any], info: TaskInfo) -> dict[str, np.ndarray]:
  """One row's targets as the `batch.TASK` part of its example (regression standardised
  with the training rows' statistics)."""
  spec = batch.task_example_spec(info.type, info.num_outputs)
  task = {batch.VALID: np.bool_(True), **{name: np.asarray(value, spec[name][1]) for name, value in targets.items()}}
  if info.type == "regression":
    task[batch.TASK_LABEL] = np.float32((task[batch.TASK_LABEL] - info.label_mean) / info.label_std)
  return task


def check_classes_in_training(labels: Labels, train_rows: np.ndarray) -> None:
  """A class no training row has would get a head output that never trains; a binary or
  multilabel column with one value in training, or survival without an event, teaches nothing."""
  if labels.task_type == "survival":
    if not labels.targets[batch.TASK_EVENT][train_rows].any():
      raise ValueError(f"labels {labels.path}: the event column has no event among the {len(train_rows)} "
                       "training rows; a survival model cannot learn a hazard from censoring alone")
    return
  if labels.task_type == "regression":
    return
  targets = labels.targets[batch.TASK_LABEL][train_rows]
  if labels.task_type == "multiclass":
    seen = set(np.unique(targets).tolist())
    unseen = [name for i, name in enumerate(labels.classes) if i not in seen]
    if unseen:
      raise ValueError(f"labels {labels.path}: classes {unseen} have no row in the training split; drop those "
                       f"rows or merge the classes")
    if len(seen) < 2:
      raise ValueError(f"labels {labels.path}: column {labels.columns[0]!r} has one class "
                       f"({labels.classes[targets[0]]}) in the training split's {len(train_rows)} rows")
    return
  columns = targets.reshape(len(targets), -1)
  for j, name in enumerate(labels.columns):
    values = np.unique(columns[:, j])
    if len(values) < 2:
      raise ValueError(f"labels {labels.path}: column {name!r} has one class ({bool(values[0])}) in the "
                       f"training split's {len(train_rows)} rows; a classifier needs both")
