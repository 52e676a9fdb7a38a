"""Table files as Arrow tables: which files a path holds (a CSV, a parquet file, or a folder
of parquet parts), CSV read with every column as text and its delimiter detected, parquet
read as written, several parts concatenated; the label columns a generated table
declares in its metadata; and cells as text or numbers (with "." or "," as the decimal
mark). `source.py` turns the tables into features and labels.
"""
from __future__ import annotations

import csv
import json
import math
import pathlib

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

_IGNORED_PREFIXES = (".", "_")  # hidden files and _SUCCESS markers beside parquet parts


def table_files(path: pathlib.Path) -> list[pathlib.Path]:
  expected = "expected a CSV file (.csv, .csv.gz), a .parquet file or a folder of them"
  files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix == ".parquet"
                 and not p.name.startswith(_IGNORED_PREFIXES)) if path.is_dir() else [path]
  if not files or not files[0].is_file():
    raise ValueError(f"{path}: {'holds no parquet files' if path.is_dir() else 'does not exist'}"
                     f"; {expected}")
  if not files[0].name.lower().endswith((".csv", ".csv.gz", ".csv.bz2", ".parquet")):
    raise ValueError(f"{path}: unsupported file type; {expected}")
  return files


DELIMITERS = ",;\t|"
# Parquet schema metadata in which a generated table names its label columns, so they stay
# out of the features when the config names none (`synthetic.py`, the joint cohort).
LABEL_COLUMNS_KEY = b"biofm_jax.label_columns"


def sniff_delimiter(path: pathlib.Path) -> str:
  """The delimiter of a CSV file from its first lines: `,`, `;`, tab or `|`."""
  with open(path, newline="", encoding="utf-8-sig", errors="replace") as f:
    sample = "".join(f.readline() for _ in range(20))
  try:
    return csv.Sniffer().sniff(sample, delimiters=DELIMITERS).delimiter
  except csv.Error:
    return ","  # one column, or nothing to tell: the standard


def _header_fields(path: pathlib.Path, delimiter: str) -> list[str]:
  with open(path, newline="", encoding="utf-8-sig", errors="replace") as f:
    return next(csv.reader(f, delimiter=delimiter), [])


def other_delimiter_hint(names, delimiter: str) -> str:
  """A hint for a header read as one column that holds another delimiter ('' otherwise)."""
  others = [d for d in DELIMITERS if d != delimiter and len(names) == 1 and d in names[0]]
  return f"; the header is one column holding {others[0]!r}: set data.tabular.delimiter={others[0]!r}" if others else ""


def declare_label_columns(table: pa.Table, names) -> pa.Table:
  """`table` with `names` declared as its label columns (for a generated table)."""
  return table.replace_schema_metadata({**(table.schema.metadata or {}), LABEL_COLUMNS_KEY: json.dumps(list(names))})


def declared_label_columns(table: pa.Table) -> tuple[str, ...]:
  """The label columns a generated parquet table declares in its schema metadata."""
  raw = (table.schema.metadata or {}).get(LABEL_COLUMNS_KEY)
  return tuple(json.loads(raw)) if raw else ()


def _read_csv(path: pathlib.Path, use_threads: bool = True, delimiter: str = "") -> pa.Table:
  """Every column as strings: our rules, not pyarrow's type inference, decide the kinds
  (and ids like "007" keep their leading zeros). `delimiter` "" is sniffed from the file."""
  delimiter = delimiter or sniff_delimiter(path)
  ragged = []  # (line, fields, expected) of the first malformed row

  def on_invalid_row(row) -> str:
    ragged.append((row.number, row.actual_columns, row.expected_columns))
    return "error"
  read_options = pacsv.ReadOptions(use_threads=use_threads)
  parse_options = pacsv.ParseOptions(delimiter=delimiter, invalid_row_handler=on_invalid_row)
  names: list[str] = []
  try:
    reader = pacsv.open_csv(path, read_options=read_options, parse_options=parse_options)
    names = reader.schema.names
    reader.close()
    return pacsv.read_csv(
        path, read_options=read_options, parse_options=parse_options,
        convert_options=pacsv.ConvertOptions(column_types={name: pa.string() for name in names},
                                             strings_can_be_null=False))
  except (pa.ArrowInvalid, OSError) as e:
    if ragged and ragged[0][0] is None and use_threads:
      return _read_csv(path, use_threads=False, delimiter=delimiter)  # only one thread knows line numbers
    if ragged:
      line, fields, expected = ragged[0]
      raise ValueError(f"{path}, line {line}: {fields} fields, expected {expected} as in "
                       f"the header{other_delimiter_hint(names or _header_fields(path, delimiter), delimiter)}"
                       ) from None
    # pyarrow may quote the offending row after the second ": "; record contents stay out.
    reason = ": ".join(str(e).splitlines()[0].split(": ")[:2])
    raise ValueError(f"{path}: cannot read as CSV ({reason})") from None


def read_table_file(path: pathlib.Path, delimiter: str = "") -> pa.Table:
  if path.suffix.lower() == ".parquet":
    try:
      return pq.read_table(path)
    except (pa.ArrowException, OSError) as e:
      raise ValueError(f"{path}: cannot read as parquet ({e})") from None
  return _read_csv(path, delimiter=delimiter)


def concat_tables(tables: list[pa.Table], files: list[pathlib.Path]) -> pa.Table:
  names = tables[0].schema.names
  for table, file in zip(tables[1:], files[1:]):
    if table.schema.names != names:
      raise ValueError(f"{file}: columns {table.schema.names} differ from {files[0]}'s "
                       f"{names}; every part of a table must have the same columns")
  try:
    return pa.concat_tables(tables, promote_options="permissive")
  except pa.ArrowException as e:
    raise ValueError(f"{files[0].parent}: parquet parts have incompatible column types "
                     f"({e})") from None


# ---------------------------------------------------------------- cells
def _is_number(kind: pa.DataType) -> bool:
  return pa.types.is_integer(kind) or pa.types.is_floating(kind) or pa.types.is_decimal(kind)


def column_texts(column: pa.ChunkedArray, where: str) -> np.ndarray:
  """object [rows] of stripped str, None where empty or null."""
  kind = column.type
  if pa.types.is_dictionary(kind):
    column, kind = column.cast(kind.value_type), kind.value_type
  if pa.types.is_string(kind) or pa.types.is_large_string(kind):
    cells = [None if v is None else (v.strip() or None) for v in column.to_pylist()]
  elif pa.types.is_boolean(kind):
    cells = [None if v is None else ("true" if v else "false") for v in column.to_pylist()]
  elif pa.types.is_integer(kind):
    cells = [None if v is None else str(v) for v in column.to_pylist()]
  elif _is_number(kind):  # 2.0 -> "2", as a CSV would most likely spell it
    floats = [None if v is None else float(v) for v in column.to_pylist()]
    cells = [None if v is None or not math.isfinite(v) else
             str(int(v)) if v.is_integer() else repr(v) for v in floats]
  else:
    raise ValueError(f"{where}: has type {kind}; expected numbers, strings or bools "
                     "(list it in exclude_columns to skip it)")
  return np.array(cells, dtype=object).reshape(len(cells))


def is_none(cells: np.ndarray) -> np.ndarray:
  """bool [rows]: the cell is None (missing)."""
  return np.fromiter((c is None for c in cells), dtype=bool, count=len(cells))


def _number(text: str, decimal: str) -> float:
  """`text` as a float with `decimal` as its decimal mark; ValueError when it is none."""
  if decimal == ",":
    if "." in text:  # a thousands mark or a foreign decimal point: neither is guessed at
      raise ValueError(text)
    text = text.replace(",", ".")
  return float(text)


def parse_numbers(texts: np.ndarray, decimal: str = ".") -> tuple[np.ndarray, np.ndarray]:
  """float64 values (NaN where missing) and a bool mask of non-empty cells that are not
  finite numbers. Each distinct text is parsed once: tables repeat values a lot."""
  filled = np.where(is_none(texts), "", texts).astype(str)
  unique, inverse = np.unique(filled, return_inverse=True)
  parsed = np.full(len(unique), np.nan)
  for i, text in enumerate(unique.tolist()):
    try:
      parsed[i] = _number(text, decimal) if text else np.nan
    except ValueError:
      pass
  values = parsed[inverse.reshape(-1)]
  values[~np.isfinite(values)] = np.nan
  return values, (filled != "") & np.isnan(values)


def column_numbers(column: pa.ChunkedArray, where: str, decimal: str = ".") -> tuple[np.ndarray, int, np.ndarray]:
  """float64 [rows] (NaN where missing), the count of non-empty cells, and a bool mask of
  the non-empty cells that are not finite numbers (junk text, inf)."""
  kind = column.type
  if _is_number(kind) or pa.types.is_boolean(kind):
    values = pc.cast(column, pa.float64()).to_numpy(zero_copy_only=False).astype(np.float64)
    bad = np.isinf(values)
    values[bad] = np.nan
    return values, int(len(values) - column.null_count), bad
  texts = column_texts(column, where)
  values, bad = parse_numbers(texts, decimal)
  return values, int(np.count_nonzero(~is_none(texts))), bad
