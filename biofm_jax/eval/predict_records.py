"""Scoring raw records (images, ECGs, cells, sequences, table rows) with an exported
fine-tuned model: no training config, no checkpoint.

`score_records(export_dir, records_path)` opens `records_path` (an image folder or
manifest, a WFDB folder or manifest, an .h5ad file, a FASTA file, a feature table: whatever
the modality's `data.<modality>.path` takes) with the modality's own data module, configured
from export.json's `data` section and given the export's `artifacts/` (vocabulary,
statistics) copied into a private folder, so every record is read and preprocessed exactly
as fine-tuning read it. Each record goes through the module's evaluation transforms, the
exported function (`export_loader`, the standalone loader a deployer uses) gives its logits
and the task recorded in export.json turns them into predictions, one row per record keyed by
`record_key` (its file, cell or FASTA id).

When the records carry the task's label column, only the records with a value of a class
training saw are scored, with the value beside the prediction (the rows the fine-tuning
run's own predictions files hold); the others are counted (`strict_labels`: an error).
Records without the column are all scored, in every split they fall in (new records need
no training split).
"""
from __future__ import annotations

import dataclasses
import pathlib
import tempfile
from typing import Any

import ml_collections
import numpy as np
import pyarrow as pa

from biofm_jax.data import pipeline
from biofm_jax.data.artifacts import copy_regular_files
from biofm_jax.data.labels import TaskInfo
from biofm_jax.data.record_task import label_values, record_keys, splits_of
from biofm_jax.eval import prediction_files
from biofm_jax.eval.exported_task import exported_task
from biofm_jax.export_loader import ARTIFACTS_DIR, load_exported
from biofm_jax.modalities import registry
from biofm_jax.objectives.supervised import predictions as task_predictions


@dataclasses.dataclass(frozen=True)
class ScoredRecords:
  """What `score_records` returns: the predictions table and the counts behind it."""
  table: pa.Table
  modality: str
  records: int  # records read
  scored: int
  without_label: int  # records lacking a value of a training class in the task's label column


class Rows:
  """Records `rows` of a source, in that order (a random-access view for the pipeline)."""

  def __init__(self, source: Any, rows: np.ndarray):
    self._source, self._rows = source, np.asarray(rows, np.int64)

  def __len__(self) -> int:
    return len(self._rows)

  def __getitem__(self, index: int) -> Any:
    return self._source[int(self._rows[int(index)])]


def _record_modality(model: Any, directory: pathlib.Path) -> str:
  inputs = sorted(model.inputs)
  if len(inputs) > 1:
    raise ValueError(f"{directory}: a fused model of {inputs}: name each modality's records as modality=path pairs "
                     f"(--records=ehr=/data/meds,imaging=/data/scans.csv)")
  if len(inputs) != 1 or inputs[0] not in registry.MODALITIES or registry.get(inputs[0]).labeled is not None:
    raise ValueError(f"{directory}: scores models fine-tuned on one record modality's label column; this export "
                     f"takes {inputs} (EHR models score MEDS label rows: --meds and --labels)")
  modality = inputs[0]
  if modality not in model.info.get("data", {}) or "objective" not in model.info:
    raise ValueError(f"{directory}/export.json has no data config for {modality!r} or no objective: it predates "
                     f"scoring raw records; export the fine-tuning run again")
  return modality


def every_split(data: Any) -> list[str]:
  """Every split the records fall in, whatever their names: scoring needs no training split
  (new records whose split column says only `held_out`, or a folder too small for every split)."""
  splits = getattr(getattr(data, "dataset", None), "splits", None)
  return [s for s in splits if len(splits[s])] if splits is not None else splits_of(data)


def _truth(data: Any, split: str, info: TaskInfo, task: dict, values: tuple[float, ...]) -> tuple[np.ndarray, np.ndarray]:
  """(rows of `split` to score, their labels as metric targets): the rows with a value of a
  training class (any finite value, for regression) when the records carry the task's label column."""
  column = label_values(data, task["label_column"], split)
  if info.type == "regression":
    rows = np.flatnonzero(np.isfinite(column))
    return rows, column[rows].astype(np.float32)
  rows = np.flatnonzero(np.isfinite(column) & np.isin(column, values))
  return rows, np.searchsorted(np.asarray(values), column[rows])


def score_records(export_dir: str | pathlib.Path, records_path: str | pathlib.Path, *, strict_labels: bool = False,
                  batch_size: int = 64) -> ScoredRecords:
  """Predictions of the exported model for every record at `records_path`."""
  directory = pathlib.Path(export_dir)
  model = load_exported(directory)
  info, task = exported_task(model, directory)
  modality = _record_modality(model, directory)
  row = registry.get(modality)
  cfg = ml_collections.ConfigDict(model.info["data"][modality])
  cfg.path = str(records_path)
  targets = registry.objective_kind(model.info["objective"], modality).targets  # read as in training
  label_column = task.get("label_column") or ""
  values = tuple(float(v) for v in model.info["task"].get("label_values", ()))
  with tempfile.TemporaryDirectory(prefix="biofm_predict_") as tmp:
    artifacts = directory / ARTIFACTS_DIR
    names = [p.relative_to(artifacts) for p in sorted(artifacts.rglob("*")) if not p.is_dir()] if artifacts.is_dir() else []
    copy_regular_files(artifacts, tmp, names, f"export {directory}")  # a link among them is refused
    data = row.data(cfg, targets=targets, artifacts_dir=tmp)
    splits = every_split(data)
    if not splits:
      raise ValueError(f"{records_path}: no {modality} record was found")
    labelled = bool(label_column) and label_column in data.labels(splits[0])[1]
    if labelled and info.type != "regression" and len(values) != max(info.num_outputs, 2):
      raise ValueError(f"{directory}/export.json: the task's label_values {list(values)} do not match its "
                       f"{info.num_outputs} output(s); export the fine-tuning run again")
    keys, logits, truth, total = [], [], [], 0
    for split in splits:
      source = data.source(split)
      total += len(source)
      rows = np.arange(len(source))
      if labelled:
        rows, split_truth = _truth(data, split, info, task, values)
        truth.append(split_truth)
      if not len(rows):
        continue
      dataset = pipeline.make_eval_dataset(Rows(source, rows), data.transforms(train=False, mask=False),
                                           global_batch_size=batch_size, seed=0, example_spec=data.embedding_spec())
      outputs = [model({modality: {name: b[modality][name] for name in model.inputs[modality]}})
                 for b in pipeline.make_iterator(dataset)]
      logits.append(np.concatenate(outputs)[:len(rows)])  # the last batch's padding dropped
      split_keys = record_keys(source, rows)
      keys.extend(split_keys if split_keys is not None else [f"{split}:{r}" for r in rows])
  scored = sum(len(x) for x in logits)
  if labelled and strict_labels and scored < total:
    raise ValueError(f"{records_path}: {total - scored} of {total} records have no value of a training class in "
                     f"label column {label_column!r}")
  if not scored:
    raise ValueError(f"{records_path}: no record to score ({total} read"
                     + (f", none with a value of a training class in {label_column!r})" if labelled else ")"))
  scores = task_predictions(info, np.concatenate(logits))
  metric_targets = {"label": np.concatenate(truth)} if labelled else {}
  table = prediction_files.prediction_table(info.type, {prediction_files.RECORD_KEY: np.asarray(keys, object)},
                                           metric_targets, scores, info.classes)
  return ScoredRecords(table, modality, total, scored, total - scored if labelled else 0)
