"""Random-access reader for any valid MEDS dataset directory.

This module owns turning a MEDS directory (https://github.com/Medical-Event-Data-Standard)
into per-subject records that a Grain pipeline can index:

  dataset = MEDSDataset("/data/mimic_meds")
  source = dataset.source("train")          # a picklable random-access sequence
  record = source[0]                        # {"subject_id", "codes", "times", "numeric_values"}

What it accepts is what real MEDS writers produce: data files flat in `data/` or in nested
shard folders, extra columns, integer subject ids of any width, timestamps of any unit or
time zone, float64 values, dictionary-encoded codes, a missing `subject_splits.parquet`.
What it refuses, with an error naming the file, the column and what was expected: missing
required columns, types that cannot be cast without changing meaning, null subject ids or
codes, unreadable parquet files.

Everything is held in memory as a few compact numpy arrays sorted by subject, with codes
dictionary-encoded; a record is a slice. Birth and death codes are not interpreted here
(the EHR tokenizer does that); only counts about them are kept in `stats`. Rows equal to
an earlier row of their subject are dropped by default and counted (`duplicates.py`: the
rule the event store applies too). Nothing here logs subject ids or record contents.
Finding, opening and standardising the data files is `meds_files.py`'s, shared with the
event store's indexing.
"""
from __future__ import annotations

import logging
import os
import pathlib
from typing import Sequence

import meds
import numpy as np
import pyarrow as pa

# hash_splits lives in splits.py (shared by all modalities); re-exported for old imports.
from biofm_jax.data.sources.splits import hash_splits  # noqa: F401
from biofm_jax.data.sources.splits import ordered as ordered_splits
from biofm_jax.data.sources.indexing import checked_index
from biofm_jax.modalities.ehr import duplicates
from biofm_jax.modalities.ehr.meds_files import (NAT, FileEvents, cast_column, find_data_files, is_string_like,
                                                open_parquet, read_data_file)

log = logging.getLogger(__name__)

US_PER_DAY = 86_400 * 1_000_000  # MEDS times are microseconds

# ---------------------------------------------------------------- all events
def is_meds_sorted(subjects: np.ndarray, times: np.ndarray) -> bool:
  step = np.diff(subjects)
  same_subject = step == 0
  return bool((step >= 0).all() and (times[1:][same_subject] >= times[:-1][same_subject]).all())


class _Events:
  """All rows sorted by (subject, time) with static rows first, and per-subject offsets."""

  def __init__(self, files: Sequence[pathlib.Path], stats: dict[str, int], drop_duplicates: bool):
    vocab: dict[str, int] = {}
    parts: list[FileEvents] = []
    part_files: list[int] = []
    subject_file_pairs = 0
    for file, path in enumerate(files):
      events = read_data_file(path)
      if events is None:
        stats["empty_files"] += 1
        continue
      # Map this file's codes onto one vocabulary shared by all files: a dict lookup per
      # distinct code in the file, not per row.
      to_global = np.array([vocab.setdefault(c, len(vocab)) for c in events.code_strings],
                           np.int32)
      events.local_codes = to_global[events.local_codes]
      stats["nan_values"] += events.nan_values
      stats["unsorted_files"] += not is_meds_sorted(events.subjects, events.times)
      subject_file_pairs += len(np.unique(events.subjects))
      parts.append(events)
      part_files.append(file)
    if not parts:
      raise ValueError(f"{files[0].parent}: all {len(files)} MEDS data file(s) have 0 rows")

    subjects = np.concatenate([p.subjects for p in parts])
    times = np.concatenate([p.times for p in parts])
    code_ids = np.concatenate([p.local_codes for p in parts])
    values = np.concatenate([p.values for p in parts])
    row_files = np.repeat(np.asarray(part_files, np.int32), [len(p.subjects) for p in parts])
    del parts
    if not is_meds_sorted(subjects, times):
      order = np.lexsort((times, subjects))  # stable: file order kept within equal times
      subjects, times, code_ids, values, row_files = (subjects[order], times[order], code_ids[order],
                                                      values[order], row_files[order])
    # The rule every reader applies (`duplicates.py`): a row equal to an earlier one.
    duplicate = duplicates.duplicate_rows(subjects, times, code_ids, values)
    stats["duplicate_rows"] = int(duplicate.sum())
    self.duplicate_subjects, self.duplicate_counts = np.unique(subjects[duplicate], return_counts=True)
    self.duplicates_by_file = {str(files[f].name): int(n) for f, n in
                               zip(*np.unique(row_files[duplicate], return_counts=True))}
    del row_files
    if drop_duplicates and stats["duplicate_rows"]:
      keep = ~duplicate
      subjects, times, code_ids, values = subjects[keep], times[keep], code_ids[keep], values[keep]
    starts = np.flatnonzero(np.diff(subjects)) + 1
    starts = np.concatenate([[0], starts]).astype(np.int64)

    self.subject_ids: np.ndarray = subjects[starts]
    self.starts: np.ndarray = starts
    self.ends: np.ndarray = np.append(starts[1:], len(subjects)).astype(np.int64)
    self.times: np.ndarray = times.view("datetime64[us]")
    self.code_ids: np.ndarray = code_ids
    self.code_vocab: np.ndarray = np.array(list(vocab), dtype=object)
    self.values: np.ndarray = values

    static = times == NAT
    stats["rows"] = len(subjects)
    stats["subjects"] = len(self.subject_ids)
    stats["codes"] = len(vocab)
    stats["static_rows"] = int(static.sum())
    stats["numeric_values"] = int((~np.isnan(values)).sum())
    stats["static_only_subjects"] = int(np.logical_and.reduceat(static, starts).sum())
    stats["subjects_in_multiple_files"] = subject_file_pairs - stats["subjects"]
    birth = vocab.get(meds.birth_code, -1)
    with_birth = np.logical_or.reduceat(code_ids == birth, starts)
    stats["subjects_without_birth"] = int((~with_birth).sum())
    death = vocab.get(meds.death_code, -1)
    stats["subjects_with_death"] = int(np.logical_or.reduceat(code_ids == death, starts).sum())


# ---------------------------------------------------------------- splits
def read_split_file(path: pathlib.Path) -> dict[str, np.ndarray]:
  """Split name -> sorted unique subject ids, standard names first, others sorted."""
  parquet = open_parquet(path)
  schema = parquet.schema_arrow
  subject_col = meds.SubjectSplitSchema.subject_id_name
  split_col = meds.SubjectSplitSchema.split_name
  for name in (subject_col, split_col):
    if name not in schema.names:
      raise ValueError(f"{path}: missing column {name!r}; meds.SubjectSplitSchema requires "
                       f"{meds.SubjectSplitSchema.required_columns()}")
  if not pa.types.is_integer(schema.field(subject_col).type):
    raise ValueError(f"{path}: column {subject_col!r} has type "
                     f"{schema.field(subject_col).type}, expected int64")
  if not is_string_like(schema.field(split_col).type):
    raise ValueError(f"{path}: column {split_col!r} has type {schema.field(split_col).type}, "
                     "expected string")
  table = parquet.read(columns=[subject_col, split_col])
  for name in (subject_col, split_col):
    if table.column(name).null_count:
      raise ValueError(f"{path}: column {name!r} has {table.column(name).null_count} null "
                       "value(s)")
  ids = cast_column(path, subject_col, table.column(subject_col), pa.int64()).to_numpy()
  names = np.array(table.column(split_col).cast(pa.string()).to_pylist(), dtype=object)
  # A subject in two splits would leak between training and evaluation.
  order = np.argsort(ids, kind="stable")
  sorted_ids, sorted_names = ids[order], names[order]
  clash = (sorted_ids[1:] == sorted_ids[:-1]) & (sorted_names[1:] != sorted_names[:-1])
  conflicts = len(np.unique(sorted_ids[1:][clash]))
  if conflicts:
    raise ValueError(f"{path}: {conflicts} subject(s) appear in more than one split")
  found = set(names.tolist())
  order = ordered_splits(found)
  return {name: np.unique(ids[names == name]) for name in order}


def check_split_file_matches(path: pathlib.Path, listed_with_events: int, subjects: int) -> None:
  if subjects and not listed_with_events:  # the split file of another dataset
    raise ValueError(f"{path}: names none of the data's {subjects} subjects; is it this dataset's "
                     "split file? (remove it to split subjects by a hash of their id)")


# Every key of MEDSDataset.stats (all ints):
STAT_KEYS = (
    "files",  # *.parquet files found under data/
    "empty_files",  # of which had 0 rows (skipped)
    "unsorted_files",  # files not sorted by (subject_id, time); sorted on load
    "subjects_in_multiple_files",  # MEDS says one file per subject; tolerated, counted
    "rows",  # event rows loaded
    "subjects",  # subjects with at least one row
    "codes",  # distinct codes
    "static_rows",  # rows with a null time
    "static_only_subjects",  # subjects whose rows are all static
    "numeric_values",  # rows with a numeric value
    "nan_values",  # NaN numeric values, treated as "no value"
    "subjects_without_birth",  # subjects with no meds.birth_code row (age unknown)
    "subjects_with_death",  # subjects with a meds.death_code row
    "fallback_split",  # 1 when subject_splits.parquet was absent and hash_splits was used
    "split_subjects_without_events",  # listed in the split file but no rows; dropped
    "subjects_without_split",  # have rows but absent from the split file; in no split
    "duplicate_rows",  # rows equal to an earlier row of the subject (`duplicates.py`); dropped by default
)


# ---------------------------------------------------------------- public API
def cut_record(record: dict, prediction_time: np.datetime64, *, inclusive: bool = True) -> dict:
  """A record cut to what a label at `prediction_time` may use: its static rows and the
  events at or before that time (`meds.LabelSchema`: "data may be used ... up to and
  including this time"), or with `inclusive=False` only those strictly before it."""
  cutoff = np.datetime64(prediction_time, "us")
  before = record["times"] <= cutoff if inclusive else record["times"] < cutoff
  keep = np.isnat(record["times"]) | before
  return {**record, **{k: record[k][keep] for k in ("codes", "times", "numeric_values")}}


class MEDSSource:
  """The records of one split: a random-access sequence that Grain can index.

  Holds only numpy arrays (shared with the dataset, not copied), so it pickles to workers.
  """

  def __init__(self, subject_ids: np.ndarray, starts: np.ndarray, ends: np.ndarray,
               events: _Events):
    self.subject_ids: np.ndarray = subject_ids.astype(np.int64, copy=False)
    self._starts, self._ends = starts, ends
    self._times, self._code_ids = events.times, events.code_ids
    self._code_vocab, self._values = events.code_vocab, events.values

  def __len__(self) -> int:
    return len(self.subject_ids)

  def __getitem__(self, index: int) -> dict:
    i = checked_index(index, len(self), "MEDSSource ... subjects")
    rows = slice(self._starts[i], self._ends[i])
    return {
        "subject_id": np.int64(self.subject_ids[i]),
        "codes": self._code_vocab[self._code_ids[rows]],
        "times": self._times[rows].copy(),
        "numeric_values": self._values[rows].copy(),
    }

  def record_until(self, index: int, prediction_time: np.datetime64, *, inclusive: bool = True) -> dict:
    """Record `index` cut at `prediction_time` (`cut_record`)."""
    return cut_record(self[index], prediction_time, inclusive=inclusive)

  def event_counts(self) -> np.ndarray:
    """int64 [subjects]: rows per subject, static ones included."""
    return (self._ends - self._starts).astype(np.int64)

  def static_counts(self) -> np.ndarray:
    """int64 [subjects]: rows with a null time per subject (they sort first in a record)."""
    static = np.concatenate([[0], np.cumsum(np.isnat(self._times), dtype=np.int64)])
    return static[self._ends] - static[self._starts]

  def first_event_times(self) -> np.ndarray:
    """datetime64[us] [subjects]: each subject's first timed event; NaT for static-only ones.
    Rows are sorted with static rows (NaT) first, so it is the first non-NaT row."""
    out = np.full(len(self), np.datetime64("NaT"), "datetime64[us]")
    for i, (start, end) in enumerate(zip(self._starts, self._ends)):
      times = self._times[start:end]
      timed = np.flatnonzero(~np.isnat(times))
      if len(timed):
        out[i] = times[timed[0]]
    return out

  def __repr__(self) -> str:
    return f"MEDSSource(subjects={len(self)})"


class MEDSDataset:
  """A MEDS directory loaded into memory, with its subject splits.

  Attributes:
    root: the dataset directory.
    splits: split name -> sorted int64 ids of subjects that have events. Read from
      `metadata/subject_splits.parquet` when present (custom split names kept); otherwise
      `hash_splits(ids, fallback_fractions, fallback_seed)` into train/tuning/held_out.
    stats: counts only, safe to log; every key is listed in `STAT_KEYS`.
  """

  def __init__(self, root: str | os.PathLike, *,
               fallback_fractions: Sequence[float] = (0.8, 0.1, 0.1),
               fallback_seed: int = 0, drop_duplicates: bool = True):
    self.root = pathlib.Path(root)
    self.drop_duplicates = bool(drop_duplicates)
    files = find_data_files(self.root / meds.data_subdirectory)
    self.stats: dict[str, int] = dict.fromkeys(STAT_KEYS, 0)
    self.stats["files"] = len(files)
    self._events = _Events(files, self.stats, self.drop_duplicates)
    self.splits = self._load_splits(fallback_fractions, fallback_seed)
    events = self._events
    duplicates.log_duplicates(f"MEDS {self.root}", duplicates.counts_by_split(
        events.duplicate_subjects, events.duplicate_counts, self.splits), events.duplicates_by_file,
        dropped=self.drop_duplicates)
    log.info("MEDS %s: %s", self.root, ", ".join(f"{k}={v}" for k, v in self.stats.items()))

  def _load_splits(self, fractions: Sequence[float], seed: int) -> dict[str, np.ndarray]:
    subject_ids = self._events.subject_ids
    split_path = self.root / meds.subject_splits_filepath
    if not split_path.exists():
      self.stats["fallback_split"] = 1
      return hash_splits(subject_ids, fractions, seed)
    splits = {}
    for name, ids in read_split_file(split_path).items():
      has_events = np.isin(ids, subject_ids, assume_unique=True)
      self.stats["split_subjects_without_events"] += int((~has_events).sum())
      splits[name] = ids[has_events]
    check_split_file_matches(split_path, sum(len(ids) for ids in splits.values()), len(subject_ids))
    listed = np.concatenate([np.zeros(0, np.int64), *splits.values()])
    self.stats["subjects_without_split"] = int(
        (~np.isin(subject_ids, listed, assume_unique=True)).sum())
    return splits

  def source(self, split: str) -> MEDSSource:
    """The records of `split`, in increasing subject id order."""
    if split not in self.splits:
      raise ValueError(f"{self.root}: unknown split {split!r}; available splits: "
                       f"{list(self.splits)}")
    ids = self.splits[split]
    positions = np.searchsorted(self._events.subject_ids, ids)
    return MEDSSource(ids, self._events.starts[positions], self._events.ends[positions],
                      self._events)

  def all_subjects(self) -> MEDSSource:
    """The records of every subject with events, in any split or none, by increasing id
    (scoring new records, where splits do not matter)."""
    events = self._events
    return MEDSSource(events.subject_ids, events.starts, events.ends, events)

  def __repr__(self) -> str:
    return (f"MEDSDataset({str(self.root)!r}, subjects={self.stats['subjects']}, "
            f"rows={self.stats['rows']}, splits={ {k: len(v) for k, v in self.splits.items()} })")
