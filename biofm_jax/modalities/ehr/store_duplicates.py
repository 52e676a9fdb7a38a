"""Duplicate rows across data files of an event store (`duplicates.py` has the rule).

Each data file is indexed alone (`event_indexing.py`), so a file drops its own duplicates
while it is indexed; a row equal to one of an earlier file (a subject in several files, a
file copied twice) can only be found once every file is written. The merge reads back the
rows of subjects held by several files (only those), finds such rows, and the index keeps
per entry how many there are; `EventStore.read` drops them when it merges a subject's
files, and the training counts and value sample leave them out, so the store holds what
the in-memory reader holds.
"""
from __future__ import annotations

import dataclasses
import pathlib

import numpy as np

from biofm_jax.data.sources import splits as splits_lib
from biofm_jax.modalities.ehr.duplicates import duplicate_rows
from biofm_jax.modalities.ehr.event_store import NAT, ShardReader


@dataclasses.dataclass
class CrossFile:
  """Rows equal to a row of their subject in an earlier data file (MEDS wants one file per
  subject; a file copied twice breaks that): per index entry, and each such row's file,
  shard row, code, value and whether its subject trains."""
  rows: np.ndarray
  static: np.ndarray
  files: np.ndarray
  shard_rows: np.ndarray
  codes: np.ndarray
  values: np.ndarray
  train: np.ndarray


def cross_file_duplicates(staging: pathlib.Path, table: dict, code_maps: dict, train: np.ndarray) -> CrossFile:
  """Reads back the rows of every subject held by several files (only those) and finds the
  rows that `duplicate_rows` flags across files, with the order the reader merges them in
  (entries in file order), as `EventStore.read` does."""
  entries = len(table["subject_id"])
  rows, static = np.zeros(entries, np.int64), np.zeros(entries, np.int64)
  found: list[tuple] = []
  subjects = table["subject_id"]
  starts = np.flatnonzero(np.r_[True, subjects[1:] != subjects[:-1]])
  ends = np.r_[starts[1:], entries]
  reader = ShardReader(staging)
  try:
    for first, last in zip(starts[ends - starts > 1].tolist(), ends[ends - starts > 1].tolist()):
      parts = [reader.read(int(table["file"][e]), int(table["start"][e]), int(table["end"][e]))
               for e in range(first, last)]
      codes = [code_maps[int(table["file"][e])][p[0]] for e, p in zip(range(first, last), parts)]
      within = np.concatenate([duplicate_rows(np.zeros(len(c), np.int64), p[1], c, p[2])
                               for c, p in zip(codes, parts)])
      times, values, codes = (np.concatenate(x) for x in ([p[1] for p in parts], [p[2] for p in parts], codes))
      cross = duplicate_rows(np.zeros(len(codes), np.int64), times, codes, values) & ~within
      entry = np.repeat(np.arange(first, last), [len(p[1]) for p in parts])
      offset = np.arange(len(codes)) - np.repeat(np.cumsum([0] + [len(p[1]) for p in parts[:-1]]),
                                                 [len(p[1]) for p in parts])
      np.add.at(rows, entry[cross], 1)
      np.add.at(static, entry[cross & (times == NAT)], 1)
      found.append((table["file"][entry[cross]], table["start"][entry[cross]] + offset[cross], codes[cross],
                    values[cross], train[entry[cross]]))
  finally:
    reader.close()
  columns = [np.concatenate(c) if c else np.zeros(0, t) for c, t in
             zip(zip(*found) if found else [()] * 5, (np.int32, np.int64, np.int32, np.float32, bool))]
  return CrossFile(rows, static, *columns)


def without_dropped(part, cross: CrossFile | None):
  """The part's value sample less the rows the store drops (a bottom-k sample less some of
  its entries is still a uniform sample of what remains)."""
  if cross is None:
    return part.sketch_codes, part.sketch_keys, part.sketch_values
  rows = cross.shard_rows[(cross.files == part.file) & cross.train & np.isfinite(cross.values)]
  dropped = splits_lib.splitmix64(rows.astype(np.uint64) ^ (np.uint64(part.file) << np.uint64(40)))
  keep = ~np.isin(part.sketch_keys, dropped)
  return part.sketch_codes[keep], part.sketch_keys[keep], part.sketch_values[keep]
