"""Per-row predictions as parquet, in meds-evaluation's `PredictionSchema`.

Every model an evaluation or a fine-tuning run scores leaves its predictions at

  <workdir>/predictions/<model>/<split>.parquet     (model: probe, finetuned, count_lr, ...)

one row per label row, in the labels' order: `subject_id`, `prediction_time`, the true
label under its `meds.LabelSchema` name, and the prediction. For binary tasks the columns
are exactly meds-evaluation's (`meds_evaluation.schema.PredictionSchema`, 0.0.6):
`boolean_value`, `predicted_boolean_value` (probability >= 0.5) and
`predicted_boolean_probability`, so `meds-evaluation-cli predictions_path=<file>` scores
the file as it is. meds-evaluation scores binary tasks only; the other task types follow
the same naming:

  multiclass  categorical_value (class name), predicted_categorical_value,
              predicted_categorical_probability_<class> per class
  multilabel  <label column> (bool), predicted_<label column>_probability per column
  regression  float_value, predicted_float_value (in the labels' units)
  survival    float_value (days), boolean_value (event), predicted_risk (higher = earlier)

A predictions folder that exists is replaced only with `overwrite=True`; the new one is
written beside it and moved into place, so a crash leaves the old one or the new one whole.
"""
from __future__ import annotations

import pathlib
import shutil
from typing import Mapping

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

PREDICTIONS_DIR = "predictions"
SUBJECT_ID, PREDICTION_TIME = "subject_id", "prediction_time"
BOOLEAN, FLOAT, CATEGORICAL = "boolean_value", "float_value", "categorical_value"
PREDICTED_BOOLEAN, PREDICTED_PROBABILITY = "predicted_boolean_value", "predicted_boolean_probability"


def check_writable(workdir: str | pathlib.Path, overwrite: bool) -> pathlib.Path:
  """`workdir/predictions`; an error if it exists and `overwrite` is not set (checked
  before any work is done, so a long evaluation never ends in a refusal)."""
  path = pathlib.Path(workdir) / PREDICTIONS_DIR
  if path.exists() and not overwrite:
    raise ValueError(f"{path} exists: pass --overwrite to replace its predictions, or choose another workdir")
  return path


RECORD_KEY, ROW_INDEX = "record_key", "row_index"


def label_row_ids(labels) -> dict[str, np.ndarray]:
  """The id columns of label rows (`data/labels.Labels`): subject and prediction time for MEDS
  labels; for labels records carry, the record (its key: a file, a cell, a FASTA id) and its
  index in its split (as the probe reports write)."""
  if labels.row_index is not None:
    return record_row_ids(labels.record_keys, labels.row_index)
  return {SUBJECT_ID: np.asarray(labels.subject_ids, np.int64),
          PREDICTION_TIME: np.asarray(labels.prediction_times, "datetime64[us]")}


def record_row_ids(keys, row_index) -> dict[str, np.ndarray]:
  """The id columns of record rows: `record_key` (where the records have keys) and `row_index`."""
  ids = {} if keys is None else {RECORD_KEY: np.asarray(keys, object)}  # text already (`record_task.record_keys`)
  return {**ids, ROW_INDEX: np.asarray(row_index, np.int64)}


def prediction_table(task_type: str, row_ids: Mapping[str, np.ndarray], targets: Mapping[str, np.ndarray],
                     scores: np.ndarray, classes=()) -> pa.Table:
  """One split's predictions (`scores` as `eval/metrics.py` takes them) as a table whose
  first columns are `row_ids` (`label_row_ids`: subject and prediction time for MEDS labels,
  record key and row index for records)."""
  columns: dict[str, pa.Array] = {name: pa.array(values) for name, values in row_ids.items()}
  scores = np.asarray(scores)
  truth = bool(targets)  # rows scored without a known outcome have no label column
  if task_type == "binary":
    probability = scores.astype(np.float32)
    if truth:
      columns[BOOLEAN] = pa.array(np.asarray(targets["label"]) > 0.5)
    columns[PREDICTED_BOOLEAN] = pa.array(probability >= 0.5)
    columns[PREDICTED_PROBABILITY] = pa.array(probability)
  elif task_type == "multiclass":
    names = np.asarray(classes, dtype=object)
    if truth:
      columns[CATEGORICAL] = pa.array(names[np.asarray(targets["label"], np.int64)].tolist(), pa.string())
    columns[f"predicted_{CATEGORICAL}"] = pa.array(names[scores.argmax(axis=1)].tolist(), pa.string())
    for j, name in enumerate(classes):
      columns[f"predicted_{CATEGORICAL}_probability_{name}"] = pa.array(scores[:, j].astype(np.float32))
  elif task_type == "multilabel":
    for j, name in enumerate(classes):
      if truth:
        columns[name] = pa.array(np.asarray(targets["label"])[:, j] > 0.5)
      columns[f"predicted_{name}_probability"] = pa.array(scores[:, j].astype(np.float32))
  elif task_type == "regression":
    if truth:
      columns[FLOAT] = pa.array(np.asarray(targets["label"], np.float32))
    columns[f"predicted_{FLOAT}"] = pa.array(scores.astype(np.float32))
  elif task_type == "survival":
    if truth:
      columns[FLOAT] = pa.array(np.asarray(targets["time"], np.float32))
      columns[BOOLEAN] = pa.array(np.asarray(targets["event"], bool))
    columns["predicted_risk"] = pa.array(scores.astype(np.float32))
  else:
    raise ValueError(f"predictions: unknown task type {task_type!r}")
  return pa.table(columns)


def write_table(path: str | pathlib.Path, table: pa.Table, *, overwrite: bool) -> pathlib.Path:
  """One predictions file, written to a temporary name and moved into place."""
  path = pathlib.Path(path)
  if path.exists() and not overwrite:
    raise ValueError(f"{path} exists: pass --overwrite to replace it")
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_name(path.name + ".tmp")
  pq.write_table(table, tmp)
  tmp.replace(path)
  return path


def write_predictions(workdir: str | pathlib.Path, tables: Mapping[str, Mapping[str, pa.Table]], *,
                      overwrite: bool) -> pathlib.Path:
  """Writes `tables` ({model: {split: table}}) as `workdir/predictions/<model>/<split>.parquet`."""
  final = check_writable(workdir, overwrite)
  staging = final.with_name(PREDICTIONS_DIR + ".tmp")
  shutil.rmtree(staging, ignore_errors=True)
  for model, by_split in tables.items():
    (staging / model).mkdir(parents=True)
    for split, table in by_split.items():
      pq.write_table(table, staging / model / f"{split}.parquet")
  if final.exists():
    old = final.with_name(PREDICTIONS_DIR + ".old")
    shutil.rmtree(old, ignore_errors=True)
    final.rename(old)
    staging.rename(final)
    shutil.rmtree(old)
  else:
    staging.rename(final)
  return final
