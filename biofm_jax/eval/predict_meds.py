"""Scoring raw MEDS records with an exported fine-tuned model: no config, no checkpoint.

`score_meds(export_dir, meds_dir, labels_path)` reads what the export carries (the
tokeniser's vocabulary and value bins in `artifacts/`, export.json's data config for the
window rule and its task for the label settings and the prediction-time cut), reads the
label rows (`meds.LabelSchema`; the outcome columns are optional: rows to score need not
have one) and the MEDS records with the library's reader, cuts each record at its row's
prediction time exactly as fine-tuning did, tokenises it, runs the exported function
(`export_loader`, the same standalone loader a deployer uses) and turns its logits into
the task's predictions. Duplicate MEDS rows are dropped or kept as in training (the data
config's `drop_duplicates`, `modalities/ehr/duplicates.py`). Rows of unknown subjects or without history are dropped and
counted (or, with `strict_labels`, an error), as in training.
"""
from __future__ import annotations

import dataclasses
import logging
import pathlib

import numpy as np
import pyarrow as pa

from biofm_jax.data import batch as B
from biofm_jax.modalities.ehr.data import VOCAB_FILENAME, EHRVocab
from biofm_jax.modalities.ehr.tokenize import TokenizeEHR, input_fields
from biofm_jax.data.labels import TaskInfo
from biofm_jax.modalities.ehr.task_data import CUTS, history_rows
from biofm_jax.data.labels import read_labels
from biofm_jax.modalities.ehr.meds import MEDSDataset
from biofm_jax.eval import prediction_files
from biofm_jax.eval.exported_task import exported_task, labels_have_targets
from biofm_jax.export_loader import ARTIFACTS_DIR, load_exported
from biofm_jax.objectives.supervised import predictions as task_predictions

log = logging.getLogger("biofm_jax")


@dataclasses.dataclass(frozen=True)
class Scored:
  """What `score_meds` returns: the predictions table and the counts behind it."""
  table: pa.Table
  rows: int  # label rows read
  scored: int
  dropped_unknown_subject: int
  dropped_no_history: int
  no_known_code: int  # scored rows none of whose codes the vocabulary knows (only [UNK] tokens)


def _exported_task(model, directory: pathlib.Path) -> tuple[TaskInfo, dict, dict]:
  """(task info, task config, EHR data config) from export.json; errors say what the export is."""
  info, config = exported_task(model, directory)
  if set(model.inputs) != {"ehr"} or "ehr" not in model.info.get("data", {}):
    raise ValueError(f"{directory}: scores EHR models fine-tuned on MEDS labels; this export takes "
                     f"{sorted(model.inputs)}" + ("" if "data" in model.info else " and predates export format 2"))
  return info, config, model.info["data"]["ehr"]


def score_meds(export_dir: str | pathlib.Path, meds_dir: str | pathlib.Path, labels_path: str | pathlib.Path, *,
               strict_labels: bool = False, batch_size: int = 64) -> Scored:
  """Predictions of the exported model for every usable row of the labels file."""
  directory = pathlib.Path(export_dir)
  model = load_exported(directory)
  info, task, ehr = _exported_task(model, directory)
  cut = model.info["task"].get("prediction_time_cut", "inclusive")
  if cut not in CUTS:
    raise ValueError(f"{directory}/export.json: prediction_time_cut {cut!r}, expected one of {CUTS}")
  vocab = EHRVocab.load(directory / ARTIFACTS_DIR / VOCAB_FILENAME)
  tokenize = TokenizeEHR(vocab, int(ehr["max_len"]), ehr["window"], input_fields(ehr))
  labels_table_has_targets = labels_have_targets(labels_path, task)
  labels = read_labels(labels_path, task, with_targets=labels_table_has_targets)
  if np.isnat(labels.prediction_times).any():
    row = int(np.flatnonzero(np.isnat(labels.prediction_times))[0])
    raise ValueError(f"labels {labels.path}: row {row} (subject_id {labels.subject_ids[row]}) has no prediction_time")
  # The rows training read: the export records the duplicate rule (exports made before it
  # existed: the default, which training then applied through the event store).
  source = MEDSDataset(meds_dir, drop_duplicates=bool(ehr.get("drop_duplicates", True))).all_subjects()
  positions, known, usable, _ = history_rows(source, labels.subject_ids, labels.prediction_times, cut)
  unknown, no_history = int((~known).sum()), int((known & ~usable).sum())
  if strict_labels and (unknown or no_history):
    row = int(np.flatnonzero(~usable)[0])
    raise ValueError(f"labels {labels.path}: {unknown} rows name subjects {meds_dir} does not have and {no_history} "
                     f"have no event the {cut} cut keeps; first: row {row}, subject_id {labels.subject_ids[row]}")
  rows = np.flatnonzero(usable)
  if not len(rows):
    raise ValueError(f"labels {labels.path}: none of its {len(labels)} rows can be scored ({unknown} of unknown "
                     f"subjects, {no_history} without history in {meds_dir})")
  logits, no_known_code = [], 0
  for start in range(0, len(rows), batch_size):
    examples = [tokenize.map(source.record_until(int(positions[i]), labels.prediction_times[i],
                                                 inclusive=cut == "inclusive")) for i in rows[start:start + batch_size]]
    for example in examples:
      events = example[B.EHR_MASK] & (example[B.EHR_CODES] != B.CLS_ID)
      no_known_code += int(not (example[B.EHR_CODES][events] != B.UNK_ID).any())
    batch = {"ehr": {name: np.stack([e[name] for e in examples]) for name in model.inputs["ehr"]}}
    logits.append(model(batch))
  scores = task_predictions(info, np.concatenate(logits))
  kept = labels.rows(rows)
  targets = kept.metric_targets() if labels_table_has_targets else {}
  table = prediction_files.prediction_table(info.type, prediction_files.label_row_ids(kept), targets, scores,
                                           info.classes)
  return Scored(table, len(labels), len(rows), unknown, no_history, no_known_code)
