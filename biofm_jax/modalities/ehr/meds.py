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
"""
from __future__ import annotations

import logging
import os
import pathlib
from typing import Sequence

import meds
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

# hash_splits lives in splits.py (shared by all modalities); re-exported for old imports.
from biofm_jax.data.sources.splits import hash_splits  # noqa: F401
from biofm_jax.data.sources.splits import ordered as ordered_splits
from biofm_jax.data.sources.indexing import checked_index
from biofm_jax.modalities.ehr import duplicates

log = logging.getLogger(__name__)

_SUBJECT = meds.DataSchema.subject_id_name
_TIME = meds.DataSchema.time_name
_CODE = meds.DataSchema.code_name
_VALUE = meds.DataSchema.numeric_value_name
REQUIRED_COLUMNS = tuple(meds.DataSchema.required_columns())
READ_COLUMNS = (_SUBJECT, _TIME, _CODE, _VALUE)

US_PER_DAY = 86_400 * 1_000_000  # MEDS times are microseconds

# numpy's NaT is int64 min, so static rows (null time) sort before every timed row.
NAT = np.iinfo(np.int64).min

# Like pyarrow.dataset, skip files and folders starting with these: `_SUCCESS` markers,
# `.crc` side files and macOS `._name.parquet` resource forks are not data.
_IGNORED_PREFIXES = (".", "_")


# ---------------------------------------------------------------- column types
def _is_string_like(t: pa.DataType) -> bool:
  if pa.types.is_dictionary(t):
    return _is_string_like(t.value_type)
  return pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_string_view(t)


# Types each column may have on disk: all of them convert to the standard MEDS type without
# changing what a value means (wider/narrower ints, other time units and zones, wider
# floats). An all-null column (pa.null, as pandas writes it) is fine where nulls are.
_ACCEPTED_TYPES = {
    _SUBJECT: (pa.types.is_integer, "an integer type"),
    _TIME: (lambda t: pa.types.is_timestamp(t) or pa.types.is_date(t) or pa.types.is_null(t),
            "a timestamp or date type"),
    _CODE: (_is_string_like, "a string type"),
    _VALUE: (lambda t: (pa.types.is_floating(t) or pa.types.is_integer(t)
                        or pa.types.is_decimal(t) or pa.types.is_null(t)),
             "a numeric type"),
}


def check_column_types(path: pathlib.Path, schema: pa.Schema) -> None:
  for name, (accepts, description) in _ACCEPTED_TYPES.items():
    if name not in schema.names:
      continue
    found = schema.field(name).type
    if not accepts(found):
      expected = meds.DataSchema.schema().field(name).type
      raise ValueError(f"{path}: column {name!r} has type {found}, expected {expected} "
                       f"(meds.DataSchema) or {description} that casts to it safely")


def cast_column(path: pathlib.Path, name: str, column: pa.ChunkedArray,
          target: pa.DataType) -> pa.ChunkedArray:
  """Casts to the standard type; fails (naming the file) on overflow, never wraps."""
  if pa.types.is_timestamp(column.type) and column.type.unit == "ns":
    # Sub-microsecond digits are below MEDS resolution: drop them, keep overflow checks.
    options = pc.CastOptions(target_type=target, allow_time_truncate=True)
  elif name == _VALUE:
    # float64 -> float32 and big ints -> float32 lose precision by design of the standard.
    options = pc.CastOptions.unsafe(target)
  else:
    options = pc.CastOptions.safe(target)
  try:
    return pc.cast(column, options=options)
  except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as e:
    raise ValueError(f"{path}: column {name!r} of type {column.type} cannot be cast to "
                     f"{target} (meds.DataSchema): {e}") from e


# ---------------------------------------------------------------- one data file
class _FileEvents:
  """The rows of one data file as compact numpy arrays (codes local to this file)."""

  def __init__(self, subjects, times, local_codes, code_strings, values, nan_values):
    self.subjects: np.ndarray = subjects  # int64
    self.times: np.ndarray = times  # int64 microseconds, NAT for static rows
    self.local_codes: np.ndarray = local_codes  # int32 indices into code_strings
    self.code_strings: list[str] = code_strings
    self.values: np.ndarray = values  # float32, NaN for no value
    self.nan_values: int = nan_values


def open_parquet(path: pathlib.Path) -> pq.ParquetFile:
  try:
    return pq.ParquetFile(path)
  except (pa.ArrowException, OSError) as e:
    raise ValueError(f"{path}: not a readable parquet file ({e})") from e


def open_data_file(path: pathlib.Path) -> pq.ParquetFile:
  """The parquet file, its MEDS columns and their types checked (errors name the file)."""
  parquet = open_parquet(path)
  schema = parquet.schema_arrow
  missing = [name for name in REQUIRED_COLUMNS if name not in schema.names]
  if missing:
    raise ValueError(f"{path}: missing required MEDS column(s) {missing}; "
                     f"meds.DataSchema requires {list(REQUIRED_COLUMNS)}")
  check_column_types(path, schema)
  return parquet


def read_data_file(path: pathlib.Path) -> _FileEvents | None:
  """Reads, validates and standardises one file; None when it has no rows."""
  parquet = open_data_file(path)
  if parquet.metadata.num_rows == 0:
    return None
  try:
    table = parquet.read(columns=[c for c in READ_COLUMNS if c in parquet.schema_arrow.names])
  except (pa.ArrowException, OSError) as e:
    raise ValueError(f"{path}: parquet file could not be read ({e})") from e
  return standardize_table(path, table)


def standardize_table(path: pathlib.Path, table: pa.Table, first_row: int = 0) -> _FileEvents:
  """Rows of a data file (all of it, or a batch starting at `first_row`) as compact arrays
  of the standard MEDS types; errors name the file (and the rows, for a batch)."""
  for name in (_SUBJECT, _CODE):
    nulls = table.column(name).null_count
    if nulls:
      where = f" (rows {first_row}..{first_row + table.num_rows - 1})" if first_row else ""
      raise ValueError(f"{path}: column {name!r} has {nulls} null value(s){where}; "
                       "meds.DataSchema requires it to be non-null")

  standard = meds.DataSchema.schema()
  subjects = cast_column(path, _SUBJECT, table.column(_SUBJECT), pa.int64())
  times = cast_column(path, _TIME, table.column(_TIME), standard.field(_TIME).type)
  times = pc.fill_null(times.cast(pa.int64()), NAT)
  codes = cast_column(path, _CODE, table.column(_CODE), pa.large_string())
  codes = codes.combine_chunks().dictionary_encode()
  if _VALUE in table.column_names:
    values = cast_column(path, _VALUE, table.column(_VALUE), standard.field(_VALUE).type)
    null_values = values.null_count
    values = pc.fill_null(values, np.float32(np.nan)).to_numpy()
  else:  # numeric_value is optional in meds.DataSchema: absent means no values
    null_values = table.num_rows
    values = np.full(table.num_rows, np.nan, np.float32)
  return _FileEvents(
      subjects=subjects.to_numpy(),
      times=times.to_numpy(),
      local_codes=codes.indices.to_numpy(zero_copy_only=False).astype(np.int32),
      code_strings=codes.dictionary.to_pylist(),
      values=values.astype(np.float32, copy=False),
      nan_values=int(np.isnan(values).sum()) - null_values)


def find_data_files(data_dir: pathlib.Path) -> list[pathlib.Path]:
  """Every `*.parquet` under `data_dir`, recursively, in a deterministic order."""
  if not data_dir.is_dir():
    raise ValueError(f"{data_dir}: MEDS data directory not found "
                     f"(expected `{meds.data_subdirectory}/` with *.parquet files)")
  files = sorted(
      p for p in data_dir.rglob("*.parquet")
      if p.is_file() and not any(part.startswith(_IGNORED_PREFIXES)
                                 for part in p.relative_to(data_dir).parts))
  if not files:
    raise ValueError(f"{data_dir}: no *.parquet files found (searched recursively)")
  return files


# ---------------------------------------------------------------- all events
def is_meds_sorted(subjects: np.ndarray, times: np.ndarray) -> bool:
  step = np.diff(subjects)
  same_subject = step == 0
  return bool((step >= 0).all() and (times[1:][same_subject] >= times[:-1][same_subject]).all())


class _Events:
  """All rows sorted by (subject, time) with static rows first, and per-subject offsets."""

  def __init__(self, files: Sequence[pathlib.Path], stats: dict[str, int], drop_duplicates: bool):
    vocab: dict[str, int] = {}
    parts: list[_FileEvents] = []
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
  if not _is_string_like(schema.field(split_col).type):
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
