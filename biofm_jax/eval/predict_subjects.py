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

`labels` (optional) is a subject-keyed table (`subject_id`, a `prediction_time` when the
model was fine-tuned with one, and the task's outcome columns when known): only its rows are
scored, in its order, with the outcome beside the prediction; a row with a time reads each
subject's EHR only up to it, by the export's cut (`data/subject_labels.py`, as fine-tuning
read it). Rows whose subject no given record names, or with nothing to read before their
time, are counted (`strict_labels`: an error naming the first). Without it, every joined
subject is scored, in every split its records fall in.
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
from biofm_jax.data.subject_labels import TimedItems, match_subject_labels
from biofm_jax.eval import prediction_files
from biofm_jax.eval.exported_task import exported_task, labels_have_targets
from biofm_jax.eval.predict_records import every_split
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
  nothing_before: int  # label rows with no given record to read at their prediction time
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


def score_subjects(export_dir: str | pathlib.Path, records: Mapping[str, str | pathlib.Path], *,
                   labels: str | pathlib.Path | None = None, strict_labels: bool = False,
                   batch_size: int = 64) -> ScoredSubjects:
  """Predictions of the exported fused model for every subject of `records` (or every row of `labels`)."""
  directory = pathlib.Path(export_dir)
  model = load_exported(directory)
  info, task = exported_task(model, directory)
  modalities = fused_modalities(model, directory)
  unknown = sorted(set(records) - set(modalities))
  if unknown or not records:
    raise ValueError(f"--records names {unknown or 'no modality'}: {directory} takes {list(modalities)}")
  # Modalities the model was fine-tuned without (finetune.withhold) are read from no file, as in its run.
  withheld = set(model.info["data"]["multimodal"].get("withhold", ()))
  given = tuple(sorted(set(records) - withheld))
  if not given:
    raise ValueError(f"{directory}: was fine-tuned without {sorted(withheld)}, and --records gives only "
                     f"{sorted(records)}; give the records of another modality it takes")
  with_targets = labels is not None and labels_have_targets(labels, task)
  table_rows = read_labels(labels, task, with_targets=with_targets) if labels is not None else None
  cut = model.info["task"].get("prediction_time_cut") or "inclusive"
  with tempfile.TemporaryDirectory(prefix="biofm_predict_") as tmp:
    join = _open_join(model, directory, {m: str(records[m]) for m in given}, pathlib.Path(tmp))
    splits = every_split(join)
    if not splits:
      raise ValueError(f"{dict(records)}: no subject was found")
    subjects = sum(len(join.source(s)) for s in splits)
    # Per split: what to read (at each label row's time) and each row's position in the output.
    if table_rows is not None:
      found, counts = match_subject_labels(join, table_rows, splits, cut=cut)
      views = {s: TimedItems(join.source(s), rows, cut) for s, rows in found.items()}
      positions = {s: rows.rows for s, rows in found.items()}
      kept = np.sort(np.concatenate([rows.rows for rows in found.values()]))
      missing = np.setdiff1d(np.arange(len(table_rows)), kept)
      if strict_labels and len(missing):
        raise ValueError(f"labels {table_rows.path}: {len(missing)} of {len(table_rows)} rows cannot be scored "
                         f"({counts['subjects_in_no_split']} name subjects no given record has, "
                         f"{counts['rows_with_nothing_before_prediction_time']} have nothing before their "
                         f"prediction_time); first: row {missing[0]}, subject_id {table_rows.subject_ids[missing[0]]}")
    else:
      views = {s: join.source(s) for s in splits}
      starts = np.cumsum([0] + [len(views[s]) for s in splits])
      positions = {s: np.arange(starts[k], starts[k + 1]) for k, s in enumerate(splits)}
      kept, counts = np.arange(starts[-1]), {}
    if not len(kept):
      raise ValueError(f"no subject to score: {subjects} joined from {sorted(records)}"
                       + (f", none of them among the {len(table_rows)} rows of {table_rows.path}"
                          if table_rows is not None else ""))
    transforms = join.transforms(train=False, mask=False)
    spec = join.embedding_spec()
    absent = {m: {name: (tuple(f["shape"]), np.dtype(f["dtype"])) for name, f in model.inputs[m].items()}
              for m in modalities if m not in given}
    logits, patterns, order, ids = [], [], [], []
    for split in splits:
      view = views[split]
      if not len(view):
        continue
      dataset = pipeline.make_eval_dataset(view, transforms, global_batch_size=batch_size, seed=0, example_spec=spec)
      split_logits, split_patterns = [], []
      for b in pipeline.make_iterator(dataset):
        inputs = {m: {name: b[m][name] for name in model.inputs[m]} for m in given}
        size = len(b[given[0]][B.PRESENT])
        for m, fields in absent.items():  # a modality not given: the join's padding, marked absent
          inputs[m] = B.padding_example({name: ((size, *shape), dtype) for name, (shape, dtype) in fields.items()})
        split_logits.append(model(inputs))
        split_patterns += ["+".join(m for m in given if bool(b[m][B.PRESENT][i])) for i in range(size)]
      logits.append(np.concatenate(split_logits)[:len(view)])  # the last batch's padding dropped
      patterns += split_patterns[:len(view)]
      order += positions[split].tolist()
      ids += [view[i]["subject_id"] for i in range(len(view))]
  # In the labels' order (or split by split).
  back = np.argsort(np.asarray(order, np.int64), kind="stable")
  scores = task_predictions(info, np.concatenate(logits)[back])
  patterns, ids = [patterns[j] for j in back], [ids[j] for j in back]
  if table_rows is not None:
    rows = table_rows.rows(kept)
    row_ids = prediction_files.label_row_ids(rows)
    targets = rows.metric_targets() if with_targets else {}
  else:
    row_ids, targets = {prediction_files.SUBJECT_ID: _subject_id_column(ids)}, {}
  row_ids = {**row_ids, AVAILABILITY: np.asarray(patterns, object)}
  table = prediction_files.prediction_table(info.type, row_ids, targets, scores, info.classes)
  by_pattern = {p: patterns.count(p) for p in sorted(set(patterns))}
  return ScoredSubjects(table, subjects, len(kept), counts.get("subjects_in_no_split", 0),
                        counts.get("rows_with_nothing_before_prediction_time", 0), by_pattern)


def _subject_id_column(ids: list[str]) -> np.ndarray:
  """The join's subject ids (text) as MEDS's int64 where every one is an integer."""
  if all(s.lstrip("-").isdigit() for s in ids):
    return np.asarray([int(s) for s in ids], np.int64)
  return np.asarray(ids, object)
