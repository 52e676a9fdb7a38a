"""What an exported fine-tuned model predicts, read back from its export.json.

The scoring paths (`predict_meds.py` for MEDS label rows, `predict_records.py` for raw
records, `predict_subjects.py` for a fused model's subjects) turn the exported function's
logits into predictions with the task the export recorded: its type, classes and label
statistics (`data/labels.TaskInfo`) and its config. `labels_have_targets` says whether a
table of rows to score also holds the task's outcome (then it is written beside them).
"""
from __future__ import annotations

import dataclasses
import pathlib
from typing import Any

import pyarrow.parquet as pq

from biofm_jax.data.labels import TaskInfo

_TASK_INFO_FIELDS = tuple(f.name for f in dataclasses.fields(TaskInfo))


def exported_task(model: Any, directory: pathlib.Path) -> tuple[TaskInfo, dict]:
  """(task info, task config) of an exported fine-tuned model (`export_loader.ExportedModel`);
  an export of a pre-trained encoder is a clear error."""
  info = model.info
  if "task" not in info:
    raise ValueError(f"{directory}: an exported pre-trained encoder returns embeddings, not predictions; export a "
                     f"fine-tuned run (experiments/export.py --workdir=<fine-tuning workdir>)")
  task = info["task"]
  fields = {k: task[k] for k in _TASK_INFO_FIELDS if k in task}
  for name in ("classes", "time_bin_edges", "prior_logits"):
    fields[name] = tuple(fields.get(name, ()))
  config = dict(task.get("config", {"type": task["type"]}))
  config["classes"] = fields["classes"] if task["type"] == "multiclass" else config.get("classes", ())  # training's ids
  return TaskInfo(**fields), config


def labels_have_targets(path, task: dict) -> bool:
  """Whether the labels file holds the task's outcome columns (else its rows are only scored)."""
  path = pathlib.Path(path)
  files = sorted(path.rglob("*.parquet")) if path.is_dir() else [path]
  if not files or not files[0].exists():
    raise FileNotFoundError(f"labels file {path} does not exist")
  names = set(pq.read_schema(files[0]).names)
  kind = task.get("type")
  wanted = {"binary": [task.get("value_column") or "boolean_value"],
            "regression": [task.get("value_column") or "float_value"],
            "multiclass": [task.get("value_column") or "categorical_value", "integer_value"],
            "multilabel": list(task.get("label_columns") or ()),
            "survival": [task.get("time_column") or "float_value", task.get("event_column") or "boolean_value"]}
  columns = wanted.get(kind, [])
  if kind == "multiclass":
    return bool(names & set(columns))
  return all(c in names for c in columns)
