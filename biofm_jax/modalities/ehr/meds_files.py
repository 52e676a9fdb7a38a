"""One MEDS data file: finding the files of a dataset, opening one with its columns and
types checked, and standardising its rows to compact numpy arrays of the MEDS types.

The in-memory reader (`meds.py`) and the event store's indexing (`event_indexing.py`,
`event_store.py`) both read data files through here, so they accept and refuse the same
files, with errors naming the file, the column and what was expected.
"""
from __future__ import annotations

import pathlib

import meds
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

_SUBJECT = meds.DataSchema.subject_id_name
_TIME = meds.DataSchema.time_name
_CODE = meds.DataSchema.code_name
_VALUE = meds.DataSchema.numeric_value_name
REQUIRED_COLUMNS = tuple(meds.DataSchema.required_columns())
READ_COLUMNS = (_SUBJECT, _TIME, _CODE, _VALUE)

# numpy's NaT is int64 min, so static rows (null time) sort before every timed row.
NAT = np.iinfo(np.int64).min

# Like pyarrow.dataset, skip files and folders starting with these: `_SUCCESS` markers,
# `.crc` side files and macOS `._name.parquet` resource forks are not data.
_IGNORED_PREFIXES = (".", "_")


# ---------------------------------------------------------------- column types
def is_string_like(t: pa.DataType) -> bool:
  if pa.types.is_dictionary(t):
    return is_string_like(t.value_type)
  return pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_string_view(t)


# Types each column may have on disk: all of them convert to the standard MEDS type without
# changing what a value means (wider/narrower ints, other time units and zones, wider
# floats). An all-null column (pa.null, as pandas writes it) is fine where nulls are.
_ACCEPTED_TYPES = {
    _SUBJECT: (pa.types.is_integer, "an integer type"),
    _TIME: (lambda t: pa.types.is_timestamp(t) or pa.types.is_date(t) or pa.types.is_null(t),
            "a timestamp or date type"),
    _CODE: (is_string_like, "a string type"),
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
class FileEvents:
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


def read_data_file(path: pathlib.Path) -> FileEvents | None:
  """Reads, validates and standardises one file; None when it has no rows."""
  parquet = open_data_file(path)
  if parquet.metadata.num_rows == 0:
    return None
  try:
    table = parquet.read(columns=[c for c in READ_COLUMNS if c in parquet.schema_arrow.names])
  except (pa.ArrowException, OSError) as e:
    raise ValueError(f"{path}: parquet file could not be read ({e})") from e
  return standardize_table(path, table)


def standardize_table(path: pathlib.Path, table: pa.Table, first_row: int = 0) -> FileEvents:
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
  return FileEvents(
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
