"""Duplicate MEDS rows: one rule for every EHR reader, so training and serving see the same rows.

A row is a duplicate when an earlier row of the same subject has the same time, code and
numeric value (NaN equal to NaN), wherever the two rows are: in one data file or in two
(a file copied into the dataset twice doubles every row). "Earlier" is the order in which
the readers merge rows: data files in path order, within a file its (stable) time order.
The first occurrence is kept. The in-memory reader (`meds.MEDSDataset`), the event store
(`event_indexing.py` at build time, `event_store.py` at read time) and scoring
(`eval/predict_meds.py`, which reads the setting from the export) all apply this rule, and
by default drop what it finds; `drop_duplicates=False` keeps the rows (still counted).

Counts are logged per split and per file (paths only, never rows or subject ids).
"""
from __future__ import annotations

import logging
from typing import Mapping

import numpy as np

log = logging.getLogger(__name__)

# How many files' counts the log line names (the rest are summed).
_FILES_NAMED = 5


def duplicate_rows(subjects: np.ndarray, times: np.ndarray, codes: np.ndarray,
                   values: np.ndarray) -> np.ndarray:
  """bool: rows identical (subject, time, code, value; NaN equal to NaN) to an earlier row."""
  values = np.asarray(values, np.float32)
  value_bits = np.where(np.isnan(values), np.float32(np.nan), values).view(np.int32)
  order = np.lexsort((np.arange(len(subjects)), value_bits, codes, times, subjects))
  same = np.zeros(len(subjects), bool)
  keys = (subjects, times, codes, value_bits)
  same[order[1:]] = np.logical_and.reduce([np.asarray(k)[order[1:]] == np.asarray(k)[order[:-1]] for k in keys])
  return same


def counts_by_split(duplicate_subjects: np.ndarray, duplicate_counts: np.ndarray,
                    splits: Mapping[str, np.ndarray]) -> dict[str, int]:
  """Duplicate rows per split, from per-subject counts (subjects in no split: "none")."""
  out, seen = {}, np.zeros(len(duplicate_subjects), bool)
  for name, ids in splits.items():
    member = np.isin(duplicate_subjects, ids)
    out[name], seen = int(duplicate_counts[member].sum()), seen | member
  if (~seen).any():
    out["none"] = int(duplicate_counts[~seen].sum())
  return out


def log_duplicates(where: str, by_split: Mapping[str, int], by_file: Mapping[str, int], *, dropped: bool) -> None:
  """One warning with the counts, when there are duplicates."""
  total = sum(by_split.values())
  if not total:
    return
  files = sorted(by_file.items(), key=lambda kv: (-kv[1], kv[0]))
  named = ", ".join(f"{name}: {count}" for name, count in files[:_FILES_NAMED])
  rest = sum(count for _, count in files[_FILES_NAMED:])
  more = f", {len(files) - _FILES_NAMED} more files: {rest}" if len(files) > _FILES_NAMED else ""
  action = "dropped" if dropped else "kept (drop_duplicates=False)"
  log.warning("%s: %d duplicate MEDS rows (same subject, time, code and value as an earlier row) %s; by split: %s; "
              "by file: %s%s", where, total, action, ", ".join(f"{k}={v}" for k, v in by_split.items()), named, more)
