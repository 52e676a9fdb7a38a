"""The classical baselines a report sets beside the foundation model, chosen by what the
labelled data is, each on the same rows as the model:

  EHR label rows      count-of-codes features of each row's record cut at its prediction
                      time: L2 logistic regression and gradient boosting (EHRSHOT's pair)
  a record modality   its registry row's raw-feature baseline (`record_tasks.py` lists them)
  the fused model     HAIM's recipe: per subject, each modality's raw features of the record
                      the model reads (its first), concatenated, with one missingness
                      indicator per modality (an absent modality's features: the training
                      mean); gradient boosting on the whole
"""
from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import numpy as np

from biofm_jax.data.join_examples import INCLUSIVE, PREDICTION_TIME
from biofm_jax.data.multimodal import MultimodalData
from biofm_jax.modalities import registry
from biofm_jax.modalities.ehr.baseline import CodeCountFeaturizer

# Model names: report.json's keys and the predictions/<model>/ folders.
COUNT_LOGISTIC, COUNT_GBM, HAIM = "count_lr", "count_gbm", "haim_gbm"


@dataclasses.dataclass(frozen=True)
class Baseline:
  """A classical model (`classical.fit_predict`'s name), its report description and its
  features per split, one row per label row."""
  model: str
  description: dict
  features: dict[str, Any]


def baselines(data: Any, splits: Sequence[str]) -> dict[str, Baseline]:
  """{name: baseline} for the labelled data module `data` on `splits` (training first)."""
  if hasattr(data, "records"):  # EHR label rows: their records, cut at the prediction time
    featurizer = CodeCountFeaturizer().fit(data.records("train"))
    counts = {s: featurizer.transform(data.records(s)) for s in splits}
    return {COUNT_LOGISTIC: Baseline("logistic", {"method": "count-of-codes features, L2 logistic regression "
                                                  "(EHRSHOT)", "features": len(featurizer.feature_names)}, counts),
            COUNT_GBM: Baseline("gbm", {"method": "count-of-codes features, gradient boosting (EHRSHOT)"}, counts)}
  if isinstance(data.data, MultimodalData):
    features, parts = haim_features(data, splits)
    return {HAIM: Baseline("gbm", {"method": "HAIM: each modality's raw features of the subject's record, "
                                   "concatenated with one missingness indicator per modality, gradient boosting",
                                   "features": int(features[splits[0]].shape[1]), "parts": parts}, features)}
  raw = registry.get(data.modality).baseline
  if raw is None:
    return {}
  records = data.data
  features = {s: np.asarray(raw.features(records.source("train"), records.source(s)))[data.source(s).items]
              for s in splits}
  return {raw.name: Baseline(raw.model, {"method": raw.description, "features": int(features[splits[0]].shape[1])},
                             features)}


def haim_features(data: Any, splits: Sequence[str]) -> tuple[dict[str, np.ndarray], dict[str, str]]:
  """({split: [label rows, features]}, {modality: what it gave}) of a labelled multimodal join:
  per modality with a raw-feature baseline, its features of the subject's first record (what
  evaluation reads; a timed modality's cut at the row's prediction time), the training rows'
  mean where the row lacks it, and a 0/1 column saying it is absent."""
  joined: MultimodalData = data.data
  blocks: dict[str, list[np.ndarray]] = {s: [] for s in splits}
  parts = {}
  # Each row's join item as the row reads it: at a prediction time, without what is absent then.
  read = {s: [data.source(s).view[int(i)] for i in data.source(s).items] for s in splits}
  for m, module in joined.modules.items():
    raw = registry.get(m).baseline
    if raw is None:
      parts[m] = "left out: no raw-feature baseline"
      continue
    first = {s: [item["records"].get(m, ()) for item in read[s]] for s in splits}
    present = {s: np.asarray([len(r) > 0 for r in first[s]], bool) for s in splits}
    cut = {s: [(r[0], item.get(PREDICTION_TIME), item.get(INCLUSIVE, True)) for r, item in zip(first[s], read[s]) if r]
           for s in splits}
    timed = hasattr(module.source("train"), "record_until") and any(t is not None for _, t, _ in cut["train"])
    if timed:  # a timed modality's features of each row's record cut at its time, as the model reads it
      train_source = _CutRecords(module.source("train"), cut["train"])
      values_of = {s: raw.features(train_source, _CutRecords(module.source(s), cut[s])) for s in splits}
    else:
      train_source = module.source("train")
      values_of = {s: _rows(raw.features(train_source, module.source(s)), [r for r, _, _ in cut[s]]) for s in splits}
    per_split = {}
    for s in splits:
      values = _dense(values_of[s])
      rows = np.full((len(read[s]), values.shape[1]), np.nan)
      rows[present[s]] = values
      per_split[s] = (rows, present[s])
    train_rows, train_present = per_split["train"]
    means = train_rows[train_present].mean(axis=0) if train_present.any() else np.zeros(train_rows.shape[1])
    for s, (rows, present) in per_split.items():
      blocks[s] += [np.where(np.isfinite(rows), rows, means), (~present).astype(np.float64)[:, None]]
    parts[m] = f"{raw.name}'s features ({train_rows.shape[1]}) + absent indicator"
  if not blocks[splits[0]]:
    raise ValueError(f"HAIM baseline: none of the joined modalities {list(joined.modules)} has raw features")
  return {s: np.concatenate(b, axis=1) for s, b in blocks.items()}, parts


def _dense(values: Any) -> np.ndarray:
  return np.asarray(values.toarray() if hasattr(values, "toarray") else values, np.float64)  # sparse counts


def _rows(values: Any, records: list[int]) -> Any:
  return values[np.asarray(records, np.int64)]


class _CutRecords:
  """Records of a timed source (EHR), one per (record, prediction time, inclusive): cut there."""

  def __init__(self, source: Any, cuts: list[tuple[int, Any, bool]]):
    self._source, self._cuts = source, cuts

  def __len__(self) -> int:
    return len(self._cuts)

  def __getitem__(self, index: int) -> Any:
    record, time, inclusive = self._cuts[int(index)]
    return self._source[record] if time is None else self._source.record_until(record, time, inclusive=inclusive)
