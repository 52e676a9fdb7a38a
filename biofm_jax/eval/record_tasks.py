"""Validation on labels the records carry themselves: cell types in an AnnData obs column,
a diagnosis column of a feature table (the data section's `label_columns`).

The model is scored by a linear probe on its frozen embeddings, beside the classical
baseline that published comparisons found hard to beat for that modality, on the same
splits and labels:
  omics    L1 logistic regression on library-size normalised counts (log1p inside), the
           baseline that matched scGPT on cell-type annotation
  tabular  logistic regression on the raw features (training-split mean imputation plus
           missingness indicators, one-hot categories)
plus a few-shot sweep of both. The report is written as for EHR tasks (`downstream.py`).
Fine-tuning and the from-scratch baseline are built for EHR labels only so far.
"""
from __future__ import annotations

import logging
import pathlib
from typing import Any

import numpy as np
import scipy.sparse as sp

from biofm_jax.data.labeled import TaskInfo
from biofm_jax.eval import downstream, predictions

log = logging.getLogger("biofm_jax")
NORMALIZE_TOTAL = 1e4
RAW_BASELINES = {"omics": ("l1_logistic_expression", "l1_logistic",
                           "L1 logistic regression on normalised counts (log1p)"),
                 "tabular": ("logistic_raw_features", "logistic",
                             "logistic regression on the raw features (mean-imputed, missing indicators, one-hot)")}


def expression_features(source) -> sp.csr_matrix:
  """[cells, genes] counts scaled to NORMALIZE_TOTAL per cell (the usual normalize_total)."""
  rows, cols, values = [], [], []
  for i in range(len(source)):
    record = source[i]
    counts = record["counts"].astype(np.float64)
    total = counts.sum()
    rows.append(np.full(len(counts), i))
    cols.append(record["genes"])
    values.append(counts * (NORMALIZE_TOTAL / total) if total > 0 else counts)
  return sp.csr_matrix((np.concatenate(values), (np.concatenate(rows), np.concatenate(cols))),
                       shape=(len(source), len(source.gene_names)), dtype=np.float32)


def table_features(train_source, source) -> np.ndarray:
  """[rows, F + F + categories]: numeric values (NaN -> training mean), missingness
  indicators, and one-hot categories seen in training."""
  means = np.nanmean(np.where(np.isfinite(train_source.numeric), train_source.numeric, np.nan), axis=0)
  means = np.where(np.isfinite(means), means, 0.0)
  numeric = np.asarray(source.numeric, np.float64)
  missing = ~np.isfinite(numeric)
  parts = [np.where(missing, means, numeric), missing.astype(np.float64)]
  for j in range(train_source.categorical.shape[1]):
    seen = sorted({str(v) for v in train_source.categorical[:, j] if _present(v)})
    values = np.array([str(v) if _present(v) else "" for v in source.categorical[:, j]], dtype=object)
    parts.append(np.stack([values == c for c in seen], axis=1).astype(np.float64) if seen
                 else np.zeros((len(values), 0)))
  return np.concatenate(parts, axis=1)


def _present(value) -> bool:
  return value is not None and not (isinstance(value, float) and np.isnan(value)) and str(value) != ""


def raw_features(data, splits) -> dict[str, Any]:
  if data.name == "omics":
    return {s: expression_features(data.source(s)) for s in splits}
  if data.name == "tabular":
    return {s: table_features(data.source("train"), data.source(s)) for s in splits}
  raise ValueError(f"record labels are evaluated for omics and tabular runs; this run's data is {data.name!r} "
                   f"(for EHR, give a MEDS labels file)")


def label_targets(data, label_column: str, splits) -> tuple[TaskInfo, dict[str, np.ndarray], dict[str, np.ndarray]]:
  """(task info, {split: int class ids}, {split: rows with a label}) of one label column.
  Classes are the values seen in training; two classes make a binary task."""
  per_split = {}
  for split in splits:
    values, names = data.labels(split)
    if label_column not in names:
      raise ValueError(f"label column {label_column!r} is not among the run's label columns {list(names)} "
                       f"(config.data.{data.name}.label_columns)")
    per_split[split] = values[:, names.index(label_column)]
  classes = np.unique(per_split["train"][np.isfinite(per_split["train"])])
  if len(classes) < 2:
    raise ValueError(f"label column {label_column!r} has {len(classes)} class(es) in the training split")
  rows = {s: np.flatnonzero(np.isin(v, classes)) for s, v in per_split.items()}
  ids = {s: np.searchsorted(classes, per_split[s][rows[s]]).astype(np.int64) for s in splits}
  kind = "binary" if len(classes) == 2 else "multiclass"
  info = TaskInfo(kind, 1 if kind == "binary" else len(classes), classes=tuple(str(c) for c in classes))
  return info, ids, rows


def evaluate_record_labels(pretrained_workdir: str | pathlib.Path, out_dir: str | pathlib.Path, label_column: str,
                           options: downstream.EvaluationOptions = downstream.EvaluationOptions()) -> dict:
  """Probe vs the modality's classical baseline on `label_column`; writes the report."""
  from biofm_jax.eval.embeddings import embed_split
  from biofm_jax.train.loop import open_run
  workdir, out_dir = pathlib.Path(pretrained_workdir).absolute(), pathlib.Path(out_dir).absolute()
  predictions.check_writable(out_dir, options.overwrite)
  config, data, setup, params, _ = open_run(workdir)
  splits = tuple(options.splits)
  every = ("train",) + splits
  features = raw_features(data, every)
  info, ids, rows = label_targets(data, label_column, every)
  log.info("evaluation: embedding %s with the pre-trained %s model", ", ".join(every), data.name)
  embeddings = {s: embed_split(setup, params, data, s, batch_size=config.data.batch_size)[rows[s]] for s in every}
  features = {s: features[s][rows[s]] for s in every}
  baseline, model_name, description = RAW_BASELINES[data.name]
  train_y = ids["train"]
  scores = {
      downstream.PROBE: {s: downstream.fit_predict("logistic", info, embeddings["train"], train_y, embeddings[s],
                                                   options.seed) for s in splits},
      baseline: {s: downstream.fit_predict(model_name, info, features["train"], train_y, features[s], options.seed)
                 for s in splits}}
  descriptions = {downstream.PROBE: {"method": "logistic regression on frozen pooled embeddings"},
                  baseline: {"method": description, "features": int(features["train"].shape[1])}}
  targets = {s: {"label": ids[s]} for s in splits}
  covariates = {s: {} for s in splits}
  few_shot = ({downstream.PROBE: (embeddings["train"], embeddings["held_out"], "logistic"),
               baseline: (features["train"], features["held_out"], model_name)} if "held_out" in splits else {})
  # Rows without a label, or with a class training never saw, cannot be scored: say how many.
  dropped = {s: int(len(data.source(s)) - len(ids[s])) for s in every}
  task = {"name": label_column, "type": info.type, "labels": f"{data.name} label column {label_column!r}",
          "classes": list(info.classes), "rows": {s: int(len(ids[s])) for s in every},
          "rows_without_a_training_class": dropped, "outputs": info.num_outputs}
  model = {"name": downstream.PROBE, "pretrained": str(workdir), **descriptions[downstream.PROBE]}
  out_dir.mkdir(parents=True, exist_ok=True)
  # Records have no MEDS prediction time: their predictions are keyed by the row's index in its split.
  row_ids = {s: {"row_index": rows[s].astype(np.int64)} for s in splits}
  return downstream.write_evaluation(out_dir, task, model, info, scores, descriptions, targets, covariates,
                                     train_y, few_shot, options, row_ids=row_ids)
