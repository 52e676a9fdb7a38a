"""Scoring patients with an exported fine-tuned fused model: each subject's raw records of
every modality it has, joined by subject, no config, no checkpoint.

`score_subjects(export_dir, {modality: path})` opens each given path (MEDS for EHR, an image
folder or manifest, an .h5ad file, a feature table: what `data.<modality>.path` takes) with
that modality's own data module, configured from export.json's data section and given the
export's `artifacts/<modality>/` (vocabulary, statistics) copied into a private folder, and
joins the modules by subject (`data/multimodal.py`, without dropout), so each subject is
read and preprocessed exactly as the fused fine-tuning run read it.

A subject lacking a modality (or a modality not given at all: new patients with no
expression profile) is scored from what it has: that modality enters the exported function
as the join's own padding, marked absent. Predictions are keyed by `subject_id`, with the
subject's availability pattern (`modalities`, e.g. "ehr+imaging") beside them.

`labels` (optional) is a subject-keyed table (`subject_id`, and the task's outcome columns
when known): only its subjects are scored, with the outcome beside the prediction; its
subjects that no given record names are counted (`strict_labels`: an error naming the first).
Without it, every joined subject is scored, in every split its records fall in.
"""
from __future__ import annotations

import dataclasses
import pathlib
import tempfile
from typing import Any, Mapping

import ml_collections
import numpy as np
import pyarrow as pa

from biofm_jax.data import batch as B
from biofm_jax.data import pipeline
from biofm_jax.data.artifacts import copy_regular_files
from biofm_jax.data.labels import read_labels
from biofm_jax.data.multimodal import MultimodalData
from biofm_jax.data.record_task import AVAILABILITY
from biofm_jax.eval import prediction_files
from biofm_jax.eval.exported_task import exported_task, labels_have_targets
from biofm_jax.eval.predict_records import Rows, every_split
from biofm_jax.export_loader import ARTIFACTS_DIR, load_exported
from biofm_jax.modalities import registry
from biofm_jax.objectives.supervised import predictions as task_predictions


@dataclasses.dataclass(frozen=True)
class ScoredSubjects:
  """What `score_subjects` returns: the predictions table and the counts behind it."""
  table: pa.Table
  subjects: int  # subjects joined from the given records
  scored: int
  unknown_subjects: int  # label rows whose subject no given record names
  by_pattern: dict[str, int]  # scored subjects per availability pattern


def fused_modalities(model: Any, directory: pathlib.Path) -> tuple[str, ...]:
  """The modalities a fused export takes; an export of one modality is a clear error."""
  inputs = tuple(sorted(model.inputs))
  if len(inputs) < 2 or "multimodal" not in model.info.get("data", {}):
    raise ValueError(f"{directory}: takes {list(inputs)}, one modality: score its records with --records=PATH "
                     f"(or an EHR model's MEDS rows with --meds and --labels)")
  if "modality_objectives" not in model.info:
    raise ValueError(f"{directory}/export.json has no modality_objectives: it predates scoring fused models on "
                     f"raw records; export the fine-tuning run again")
  return inputs


def parse_records(text: str) -> dict[str, str]:
  """'ehr=/data/meds,imaging=/data/scans.csv' -> {"ehr": "/data/meds", "imaging": "/data/scans.csv"}."""
  out: dict[str, str] = {}
  for part in (p for p in text.split(",") if p.strip()):
    name, sep, path = part.partition("=")
    if not sep or not name.strip() or not path.strip():
      raise ValueError(f"--records {text!r}: a fused model takes modality=path pairs, e.g. ehr=/data/meds,"
                       f"imaging=/data/scans.csv")
    if name.strip() in out:
      raise ValueError(f"--records {text!r}: {name.strip()!r} is given twice")
    out[name.strip()] = path.strip()
  return out


def _open_join(model: Any, directory: pathlib.Path, records: Mapping[str, str], tmp: pathlib.Path) -> MultimodalData:
  """The given modalities' data modules, configured as in training, joined by subject."""
  artifacts = directory / ARTIFACTS_DIR
  names = [p.relative_to(artifacts) for p in sorted(artifacts.rglob("*")) if not p.is_dir()] if artifacts.is_dir() else []
  copy_regular_files(artifacts, tmp, names, f"export {directory}")  # a link among them is refused
  modules = {}
  for m, path in sorted(records.items()):
    section = ml_collections.ConfigDict(model.info["data"][m])
    section.path = str(path)
    modules[m] = registry.open_data_module(m, section, objective=model.info["modality_objectives"][m],
                                           artifacts_dir=tmp / m)
  return MultimodalData(modules)


def _subject_rows(join: MultimodalData, splits: list[str]) -> dict[str, dict[str, int]]:
  """{split: {subject id: its item in the split's source}}."""
  return {s: {str(subject): i for i, subject in enumerate(join.source(s).subject_ids)} for s in splits}


def score_subjects(export_dir: str | pathlib.Path, records: Mapping[str, str | pathlib.Path], *,
                   labels: str | pathlib.Path | None = None, strict_labels: bool = False,
                   batch_size: int = 64) -> ScoredSubjects:
  """Predictions of the exported fused model for every subject of `records` (or of `labels`)."""
  directory = pathlib.Path(export_dir)
  model = load_exported(directory)
  info, task = exported_task(model, directory)
  modalities = fused_modalities(model, directory)
  unknown = sorted(set(records) - set(modalities))
  if unknown or not records:
    raise ValueError(f"--records names {unknown or 'no modality'}: {directory} takes {list(modalities)}")
  given = tuple(sorted(records))
  with_targets = labels is not None and labels_have_targets(labels, task)
  table_rows = read_labels(labels, task, with_targets=with_targets) if labels is not None else None
  if table_rows is not None and not np.isnat(table_rows.prediction_times).all():
    row = int(np.flatnonzero(~np.isnat(table_rows.prediction_times))[0])
    raise ValueError(f"labels {table_rows.path}: row {row} has a prediction_time; a fused model scores "
                     f"subject-level rows (subject_id, and the outcome when known), as it was fine-tuned")
  with tempfile.TemporaryDirectory(prefix="biofm_predict_") as tmp:
    join = _open_join(model, directory, {m: str(records[m]) for m in given}, pathlib.Path(tmp))
    splits = every_split(join)
    if not splits:
      raise ValueError(f"{dict(records)}: no subject was found")
    items = _subject_rows(join, splits)
    subject_of = {split: {i: s for s, i in by_id.items()} for split, by_id in items.items()}
    subjects = sum(len(v) for v in items.values())
    # (split, item) of each row to score: the labels' rows in their order, else every subject.
    if table_rows is not None:
      where = {s: (split, i) for split in splits for s, i in items[split].items()}
      located = [where.get(str(int(s))) for s in table_rows.subject_ids]
      missing = [r for r, w in enumerate(located) if w is None]
      if strict_labels and missing:
        raise ValueError(f"labels {table_rows.path}: {len(missing)} of {len(table_rows)} rows name subjects no "
                         f"given record has; first: row {missing[0]}, subject_id {table_rows.subject_ids[missing[0]]}")
      kept = np.asarray([r for r, w in enumerate(located) if w is not None], np.int64)
      plan = [located[r] for r in kept]
    else:
      plan = [(split, i) for split in splits for i in range(len(items[split]))]
    if not plan:
      raise ValueError(f"no subject to score: {subjects} joined from {sorted(records)}"
                       + (f", none of them among the {len(table_rows)} rows of {table_rows.path}"
                          if table_rows is not None else ""))
    transforms = join.transforms(train=False, mask=False)
    spec = join.embedding_spec()
    absent = {m: {name: (tuple(f["shape"]), np.dtype(f["dtype"])) for name, f in model.inputs[m].items()}
              for m in modalities if m not in given}
    logits, patterns, order = [], [], []
    for split in splits:
      positions = [k for k, (s, _) in enumerate(plan) if s == split]
      if not positions:
        continue
      view = Rows(join.source(split), np.asarray([plan[k][1] for k in positions], np.int64))
      dataset = pipeline.make_eval_dataset(view, transforms, global_batch_size=batch_size, seed=0, example_spec=spec)
      split_logits, split_patterns = [], []
      for b in pipeline.make_iterator(dataset):
        inputs = {m: {name: b[m][name] for name in model.inputs[m]} for m in given}
        size = len(b[given[0]][B.PRESENT])
        for m, fields in absent.items():  # a modality not given: the join's padding, marked absent
          inputs[m] = B.padding_example({name: ((size, *shape), dtype) for name, (shape, dtype) in fields.items()})
        split_logits.append(model(inputs))
        split_patterns += ["+".join(m for m in given if bool(b[m][B.PRESENT][i])) for i in range(size)]
      logits.append(np.concatenate(split_logits)[:len(positions)])  # the last batch's padding dropped
      patterns += split_patterns[:len(positions)]
      order += positions
  # Back in plan order (the labels' order, or split by split).
  back = np.argsort(np.asarray(order, np.int64), kind="stable")
  scores = task_predictions(info, np.concatenate(logits)[back])
  patterns = [patterns[j] for j in back]
  if table_rows is not None:
    rows = table_rows.rows(kept)
    row_ids = prediction_files.label_row_ids(rows)
    targets = rows.metric_targets() if with_targets else {}
  else:
    row_ids = {prediction_files.SUBJECT_ID: _subject_id_column([subject_of[split][i] for split, i in plan])}
    targets = {}
  row_ids = {**row_ids, AVAILABILITY: np.asarray(patterns, object)}
  table = prediction_files.prediction_table(info.type, row_ids, targets, scores, info.classes)
  counts = {p: patterns.count(p) for p in sorted(set(patterns))}
  missing_count = len(table_rows) - len(kept) if table_rows is not None else 0
  return ScoredSubjects(table, subjects, len(plan), missing_count, counts)


def _subject_id_column(ids: list[str]) -> np.ndarray:
  """The join's subject ids (text) as MEDS's int64 where every one is an integer."""
  if all(s.lstrip("-").isdigit() for s in ids):
    return np.asarray([int(s) for s in ids], np.int64)
  return np.asarray(ids, object)
