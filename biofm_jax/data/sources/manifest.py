"""Manifest CSVs of record files: one row per record, `subject_id` and `path` (relative to the
CSV) required, some reserved columns a modality reads itself (`split`, `modality`,
`acquisition_time`), every other column a numeric label (empty for missing). Imaging and ECG
read theirs here, so a manifest means the same for every modality that takes one.

`acquisition_time` (optional; ISO 8601, e.g. 2021-03-04 or 2021-03-04T10:15) is when the
record was made: a fused model's label row with a prediction time then reads only records
made at or before it (`data/subject_labels.py`). Where the column exists every row needs one,
so no record of unknown time is read as if it came before.
"""
from __future__ import annotations

import csv
import dataclasses
import pathlib
from typing import Sequence

import numpy as np

ACQUISITION_TIME = "acquisition_time"


@dataclasses.dataclass(frozen=True)
class ManifestRow:
  line: int  # the CSV line, for messages
  subject_id: str
  path: pathlib.Path  # resolved against the CSV's folder
  fields: dict[str, str]  # the reserved columns' cells, stripped
  labels: tuple[float, ...]


def _label(csv_path: pathlib.Path, line: int, column: str, text: str) -> float:
  if not text.strip():
    return float("nan")
  try:
    return float(text)
  except ValueError:
    raise ValueError(f"{csv_path}: line {line}, column {column!r}: {text!r} is not a number; "
                     "label columns must be numeric (empty for missing)") from None


def acquisition_time(csv_path: pathlib.Path, line: int, text: str) -> np.datetime64:
  """A manifest cell of the acquisition_time column, as datetime64[us]."""
  if not text:
    raise ValueError(f"{csv_path}: line {line}, column {ACQUISITION_TIME!r} is empty; where the column exists "
                     "every record needs its time (a record of unknown time could postdate a prediction)")
  try:
    return np.datetime64(text.replace(" ", "T"), "us")
  except ValueError:
    raise ValueError(f"{csv_path}: line {line}, column {ACQUISITION_TIME!r}: {text!r} is not an ISO 8601 date or "
                     "time (e.g. 2021-03-04 or 2021-03-04T10:15)") from None


def read_manifest(csv_path: pathlib.Path, reserved: Sequence[str]) -> tuple[list[ManifestRow], tuple[str, ...],
                                                                              tuple[str, ...]]:
  """(rows, label column names, all column names) of a manifest; errors name the file,
  line and column. `reserved`: the columns besides subject_id and path that are not labels."""
  with open(csv_path, newline="", encoding="utf-8-sig") as f:  # -sig: spreadsheet BOMs
    reader = csv.DictReader(f)
    columns = [c.strip() for c in reader.fieldnames or ()]
    missing = [c for c in ("subject_id", "path") if c not in columns]
    if missing or len(set(columns)) != len(columns):
      raise ValueError(f"{csv_path}: manifest columns {columns}; expected unique names "
                       f"including 'subject_id' and 'path' (missing {missing})")
    reader.fieldnames = columns
    label_names = tuple(c for c in columns if c not in ("subject_id", "path", *reserved))
    rows = []
    for row in reader:
      line = reader.line_num
      subject, relative = (row.get("subject_id") or "").strip(), (row.get("path") or "").strip()
      if not subject or not relative:
        raise ValueError(f"{csv_path}: line {line}: empty 'subject_id' or 'path'")
      rows.append(ManifestRow(line, subject, (csv_path.parent / relative).resolve(),
                              {c: (row.get(c) or "").strip() for c in reserved},
                              tuple(_label(csv_path, line, c, row.get(c) or "") for c in label_names)))
  return rows, label_names, tuple(columns)
