"""Validation on labels the records carry themselves: cell types in an AnnData obs column,
a diagnosis column of a feature table (the data section's `label_columns`).

The model is scored by a linear probe on its frozen embeddings, beside the classical
baseline that published comparisons found hard to beat for that modality, on the same
splits and labels:
  omics    L1 logistic regression on library-size normalised counts (log1p inside), the
           baseline that matched scGPT on cell-type annotation
  tabular  logistic regression on the raw features (training-split mean imputation plus
           missingness indicators, one-hot categories)
  imaging  logistic regression on first-order intensity and gradient statistics and an
           8-per-axis thumbnail (radiomics' first-order family, MedMNIST's pixel baselines)
  sequence logistic regression on k-mer frequencies (DNA 4-mers, protein dipeptides)
  ecg      logistic regression on RR-interval irregularity and lead amplitudes
plus a few-shot sweep of both. The report is written as for EHR tasks (`downstream.py`).
Records fine-tune on the same columns (`data/record_task.py`, `experiments/finetune.py
--config.task.label_column=...`); the report with the fine-tuned model and the from-scratch
baseline beside these is `downstream.evaluate_task`'s, whose raw-feature baseline is the
same (`raw_baselines.py`).
"""
from __future__ import annotations

import logging
import pathlib
from typing import Any

import numpy as np

from biofm_jax.data.labels import TaskInfo
from biofm_jax.data.record_task import record_keys
from biofm_jax.eval import downstream, prediction_files
from biofm_jax.modalities import registry
from biofm_jax.train.embed import embed_split
from biofm_jax.train.runs import open_run

log = logging.getLogger("biofm_jax")


def raw_features(data, splits) -> dict[str, Any]:
  """{split: the modality's raw features for its registered classical baseline}."""
  row = registry.get(data.name)
  if row.baseline is None or row.labeled is not None:
    raise ValueError(f"record labels are evaluated for modalities with a raw-feature baseline "
                     f"({[m.name for m in registry.MODALITIES.values() if m.baseline and m.labeled is None]}); this "
                     f"run's data is {data.name!r} (for EHR, give a MEDS labels file)")
  baseline = row.baseline
  return {s: baseline.features(data.source("train"), data.source(s)) for s in splits}


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
  workdir, out_dir = pathlib.Path(pretrained_workdir).absolute(), pathlib.Path(out_dir).absolute()
  prediction_files.check_writable(out_dir, options.overwrite)
  config, data, setup, params, _ = open_run(workdir)
  splits = tuple(options.splits)
  every = ("train",) + splits
  features = raw_features(data, every)
  info, ids, rows = label_targets(data, label_column, every)
  log.info("evaluation: embedding %s with the pre-trained %s model", ", ".join(every), data.name)
  embeddings = {s: embed_split(setup, params, data, s, batch_size=config.data.batch_size)[rows[s]] for s in every}
  features = {s: features[s][rows[s]] for s in every}
  raw = registry.get(data.name).baseline
  baseline, model_name, description = raw.name, raw.model, raw.description
  train_y = ids["train"]
  scores = {
      downstream.PROBE: {s: downstream.fit_predict_task("logistic", info, embeddings["train"], train_y, embeddings[s],
                                                   options.seed) for s in splits},
      baseline: {s: downstream.fit_predict_task(model_name, info, features["train"], train_y, features[s], options.seed)
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
  # Records have no MEDS prediction time: their predictions are keyed by the record and its index in its split.
  row_ids = {s: prediction_files.record_row_ids(record_keys(data.source(s), rows[s]), rows[s]) for s in splits}
  return downstream.write_evaluation(out_dir, task, model, info, scores, descriptions, targets, covariates,
                                     train_y, few_shot, options, row_ids=row_ids)
