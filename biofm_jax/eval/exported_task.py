"""What an exported fine-tuned model predicts, read back from its export.json.

Both scoring paths (`predict_meds.py` for MEDS label rows, `predict_records.py` for raw
records) turn the exported function's logits into predictions with the task the export
recorded: its type, classes and label statistics (`data/labels.TaskInfo`) and its config.
"""
from __future__ import annotations

import dataclasses
import pathlib
from typing import Any

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
