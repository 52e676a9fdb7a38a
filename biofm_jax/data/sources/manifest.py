"""Manifest CSVs of record files: one row per record, `subject_id` and `path` (relative to the
CSV) required, some reserved columns a modality reads itself (`split`, `modality`), every
other column a numeric label (empty for missing). Imaging and ECG read theirs here, so a
manifest means the same for every modality that takes one.
"""
from __future__ import annotations

import csv
import dataclasses
import pathlib
from typing import Sequence


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
