"""Scores of a fine-tuned run: its task head's predictions on each split's label rows."""
from __future__ import annotations

import pathlib

import ml_collections
import numpy as np

from biofm_jax.train.embed import embed_split_outputs
from biofm_jax.eval.metrics import task_metrics
from biofm_jax.objectives.supervised import predictions
from biofm_jax.train.runs import open_run


def predict_split(setup, params, data, split: str, *, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
  """(scores, pooled embeddings) of every label row of `split` under a task model."""
  out = embed_split_outputs(setup, params, data, split, {"logits": ("task", "logits"),
                                                         "embedding": ("task", "embedding")}, batch_size=batch_size)
  return predictions(data.info, out["logits"]), out["embedding"]


def predict_finetuned(workdir: str | pathlib.Path, config: ml_collections.ConfigDict | None = None,
                      splits=("tuning", "held_out")):
  """(labelled data module, {split: scores}) of a fine-tuned run on each split."""
  config, data, setup, params, _ = open_run(workdir, config)
  return data, {split: predict_split(setup, params, data, split, batch_size=config.data.batch_size)[0]
                for split in splits}


def score_finetuned(workdir: str | pathlib.Path, config: ml_collections.ConfigDict | None = None,
                    splits=("tuning", "held_out")) -> dict[str, dict[str, float]]:
  """Task metrics (`eval/metrics.py`) of a fine-tuned run on each split."""
  data, scores = predict_finetuned(workdir, config, splits)
  return {split: task_metrics(data.info.type, data.split_labels(split).metric_targets(), scores[split])
          for split in splits}
