"""Random-access reader for feature tables: CSV, one parquet file or a folder of them.

This module owns turning a table of imaging-derived features (radiomics, cell morphology)
or any other per-subject table into records a Grain pipeline can index:

  dataset = TabularDataset("features.csv", label_columns=("malignant",))
  source = dataset.source("train")   # picklable random-access sequence
  record = source[0]
  # {"subject_id": str, "numeric": float64 [F] (NaN = missing),
  #  "categorical": object [C] (str, None = missing), "labels": float64 [L] (NaN = missing)}

The whole table is read once with pyarrow and held in memory as numpy arrays (one row
per subject); `source.subject_ids` and `source.labels` need no per-row reads.

Columns. `id_column` names the subject (required, unique, non-empty); a column named
`split` assigns rows to splits (an empty cell: in no split), else the hash split of
`splits.py` over the ids decides, so a subject lands in the same split as in every
other modality. `label_columns` are kept out of the features and must be numeric;
`exclude_columns` are dropped. Every other column is a feature:

* categorical_columns=None (auto): bool and dictionary columns are categorical; integer,
  float and decimal columns numeric; a string column (every CSV column is read as
  strings, so a CSV reads the same as its parquet twin) is numeric when at least
  MIN_NUMERIC_FRACTION of its non-empty cells parse as finite numbers, else categorical.
* categorical_columns=(...) (explicit, may be empty): exactly those are categorical
  (numeric codes become their text: 1 -> "1"); every other column must be numeric, and a
  string column that is mostly text is an error naming it.

Numbers in text cells use `decimal` as their decimal mark: "." (default), or "," for a
European CSV (usually `delimiter=";"`; a cell holding "." is then not a number). With "."
a column that would turn categorical but whose cells are numbers written with a comma
("3,5") is an error naming the columns and the setting, not a silent category column; so
is a table without any feature column, or whose feature columns are all empty.

Missing values: an empty cell or a null is missing. In a numeric column, a non-empty cell
that is not a finite number ("n/a", "?", "inf") is read as missing and counted in
stats["non_numeric_cells"] (and per column in `non_numeric_cells_by_column`); the cells
themselves are never logged. Categorical values are stripped text; bools read as
"true"/"false".

Errors are ValueErrors naming the file, the (1-based data) row and the column.
"""
from __future__ import annotations

import collections
import logging
import os
import pathlib
from typing import Sequence

import numpy as np
import pyarrow as pa

from biofm_jax.data.sources import splits as splits_lib
from biofm_jax.data.sources.indexing import checked_index
from biofm_jax.modalities.tabular.table_files import (column_numbers, column_texts, concat_tables,
                                                    declared_label_columns, is_none, other_delimiter_hint,
                                                    read_table_file, table_files)

log = logging.getLogger(__name__)

SPLIT_COLUMN = "split"
DECIMAL_MARKS = (".", ",")
_NAMED_COLUMNS = 5  # columns named in an error; the count says how many more
# A string column is numeric when at least this share of its non-empty cells are numbers:
# a few "n/a" or "?" cells in a measurement column are junk, a column of words is not.
MIN_NUMERIC_FRACTION = 0.5

# Every key of TabularDataset.stats (ints, safe to log).
STAT_KEYS = (
    "rows", "files", "numeric_columns", "categorical_columns", "label_columns",
    "excluded_columns", "missing_numeric_cells",  # includes the non-numeric cells below
    "non_numeric_cells",  # junk text or inf in numeric columns, read as missing
    "non_numeric_columns",  # numeric columns holding at least one such cell
    "missing_categorical_cells", "missing_label_cells",
    "constant_columns",  # features with at most one distinct present value (all rows)
    "all_missing_columns",  # features without any present value
    "fallback_split",  # 1 when there is no split column and the hash split was used
    "rows_without_split",  # rows whose split cell is empty (in no split)
)


# ---------------------------------------------------------------- column kinds
def _mostly_numeric(nonempty: int, non_numbers: int) -> bool:
  return nonempty == 0 or (nonempty - non_numbers) >= MIN_NUMERIC_FRACTION * nonempty


def comma_decimal_numbers(column: pa.ChunkedArray, where: str) -> bool:
  """Whether a text column that is not numbers with a decimal point is numbers once ","
  is read as the decimal mark (a European CSV's "3,5")."""
  if not (pa.types.is_string(column.type) or pa.types.is_large_string(column.type)):
    return False
  _, nonempty, bad = column_numbers(column, where, decimal=",")
  return nonempty > 0 and _mostly_numeric(nonempty, int(bad.sum()))


def _named(columns: Sequence[str]) -> str:
  more = len(columns) - _NAMED_COLUMNS
  return f"{list(columns[:_NAMED_COLUMNS])}" + (f" and {more} more" if more > 0 else "")


# ---------------------------------------------------------------- public API
class TabularSource:
  """The rows of one split: random access over in-memory arrays, picklable.

  Attributes: subject_ids (list of str), numeric float64 [rows, F], categorical object
  [rows, C], labels float64 [rows, L] and the column names of each.
  """

  def __init__(self, subject_ids: Sequence[str], numeric: np.ndarray, categorical: np.ndarray,
               labels: np.ndarray, *, numeric_columns: Sequence[str],
               categorical_columns: Sequence[str], label_columns: Sequence[str]):
    self.subject_ids = list(subject_ids)
    self.numeric, self.categorical, self.labels = numeric, categorical, labels
    self.numeric_columns = tuple(numeric_columns)
    self.categorical_columns = tuple(categorical_columns)
    self.label_columns = tuple(label_columns)

  def __len__(self) -> int:
    return len(self.subject_ids)

  @property
  def record_keys(self) -> list[str]:
    """Each row's id column value (a table holds one row per subject)."""
    return list(self.subject_ids)

  def __getitem__(self, index: int) -> dict:
    i = checked_index(index, len(self), "TabularSource ... rows")
    # Copies: a transform that writes into its input must not change the table.
    return {"subject_id": self.subject_ids[i], "numeric": self.numeric[i].copy(),
            "categorical": self.categorical[i].copy(), "labels": self.labels[i].copy()}

  def __repr__(self) -> str:
    return (f"TabularSource(rows={len(self)}, numeric={len(self.numeric_columns)}, "
            f"categorical={len(self.categorical_columns)}, labels={len(self.label_columns)})")


class TabularDataset:
  """A feature table read into memory, with its column kinds, splits and stats.

  Attributes:
    path: the CSV file, parquet file or folder of parquet files.
    numeric_columns, categorical_columns, label_columns: names in file order.
    splits: split name -> int64 row indices (STANDARD_SPLITS first, then custom names).
    stats: counts only (the keys of STAT_KEYS), safe to log.
    non_numeric_cells_by_column: numeric column -> cells read as missing because they were
      not numbers (only columns with some).
  """

  def __init__(self, path: str | os.PathLike, *, id_column: str = "subject_id",
               label_columns: Sequence[str] = (),
               categorical_columns: Sequence[str] | None = None,
               exclude_columns: Sequence[str] = (),
               fallback_fractions: Sequence[float] = (0.8, 0.1, 0.1), fallback_seed: int = 0,
               delimiter: str = "", decimal: str = "."):
    self.path, self.delimiter, self.decimal = pathlib.Path(path), delimiter, decimal
    if delimiter and (len(delimiter) != 1 or delimiter in "\"\n\r"):
      raise ValueError(f"data.tabular.delimiter is {delimiter!r}; expected one character such as ',' or ';' "
                       f"('' detects it)")
    if decimal not in DECIMAL_MARKS or decimal == delimiter:
      raise ValueError(f"data.tabular.decimal is {decimal!r} (delimiter {delimiter!r}); expected one of "
                       f"{DECIMAL_MARKS}, other than the delimiter (a European CSV: decimal=',', delimiter=';')")
    self.stats: dict[str, int] = dict.fromkeys(STAT_KEYS, 0)
    label_columns = _column_names(label_columns, "label_columns")
    exclude_columns = _column_names(exclude_columns, "exclude_columns")
    if categorical_columns is not None:
      categorical_columns = _column_names(categorical_columns, "categorical_columns")
    self._files = table_files(self.path)
    tables = [read_table_file(f, delimiter) for f in self._files]
    self._file_rows = [t.num_rows for t in tables]
    table = concat_tables(tables, self._files) if len(tables) > 1 else tables[0]
    self.stats["files"], self.stats["rows"] = len(self._files), table.num_rows
    if table.num_rows == 0:
      raise ValueError(f"{self.path}: the table has no rows")
    names = table.schema.names
    label_columns = label_columns or declared_label_columns(tables[0])
    self._check_names(names, id_column, label_columns, categorical_columns, exclude_columns)

    self.subject_ids = self._read_ids(table.column(id_column), id_column)
    self.label_columns = tuple(label_columns)
    self._labels = self._read_labels(table)
    reserved = {id_column, SPLIT_COLUMN, *label_columns, *exclude_columns}
    features = [n for n in names if n not in reserved]
    self.stats["excluded_columns"] = len(exclude_columns)
    self._read_features(table, features, categorical_columns)
    self._count_columns()
    self._check_usable_features(names, features)
    if SPLIT_COLUMN in names:
      self.splits = self._column_splits(table.column(SPLIT_COLUMN))
    else:
      self.stats["fallback_split"] = 1
      buckets = splits_lib.hash_split_buckets(self.subject_ids, fallback_fractions, fallback_seed)
      self.splits = {name: np.flatnonzero(buckets == i).astype(np.int64)
                     for i, name in enumerate(splits_lib.STANDARD_SPLITS)}
    if self.stats["non_numeric_cells"]:
      log.warning("tabular %s: %d non-numeric cell(s) in %d numeric column(s) read as missing",
                  self.path, self.stats["non_numeric_cells"], self.stats["non_numeric_columns"])
    log.info("tabular %s: %s", self.path, ", ".join(f"{k}={v}" for k, v in self.stats.items()))

  # -------------------------------------------------------------- where things are
  def _where(self, row: int | None = None, column: str | None = None) -> str:
    """The file, 1-based data row and column of a cell, for errors; for a CSV also the
    line (header = line 1; exact unless quoted cells span lines)."""
    file, local = self.path, row
    if row is not None:
      for file, count in zip(self._files, self._file_rows):
        if local < count:
          break
        local -= count
    parts = [str(file)]
    if row is not None:
      line = f" (line {local + 2})" if file.suffix.lower() != ".parquet" else ""
      parts.append(f"row {local + 1}{line}")
    if column is not None:
      parts.append(f"column {column!r}")
    return ", ".join(parts)

  def _check_names(self, names: list[str], id_column: str, label_columns: Sequence[str],
                   categorical_columns: Sequence[str] | None,
                   exclude_columns: Sequence[str]) -> None:
    duplicated = sorted(n for n, count in collections.Counter(names).items() if count > 1)
    if duplicated:
      raise ValueError(f"{self.path}: duplicated column names {duplicated}; expected unique names")
    if id_column not in names:
      raise ValueError(f"{self.path}: no id column {id_column!r}; expected it among the "
                       f"{len(names)} columns (set id_column to the subject id column)"
                       f"{other_delimiter_hint(names, self.delimiter)}")
    named = {"label_columns": label_columns, "categorical_columns": categorical_columns or (),
             "exclude_columns": exclude_columns}
    for field, columns in named.items():
      absent = [c for c in columns if c not in names]
      if absent:
        raise ValueError(f"{self.path}: {field} names {absent}, not columns of the table")
    roles = [id_column, SPLIT_COLUMN, *label_columns, *(categorical_columns or ()),
             *exclude_columns]
    clashes = sorted({c for c in roles if roles.count(c) > 1})
    if clashes:
      raise ValueError(f"{self.path}: columns {clashes} are named in more than one role "
                       "(id, split, label, categorical, excluded); expected one role each")

  # -------------------------------------------------------------- columns
  def _read_ids(self, column: pa.ChunkedArray, id_column: str) -> list[str]:
    ids = column_texts(column, self._where(column=id_column))
    empty = np.flatnonzero(is_none(ids))
    if len(empty):
      raise ValueError(f"{self._where(int(empty[0]), id_column)}: empty subject id "
                       f"({len(empty)} row(s) in all); expected an id in every row")
    _, counts = np.unique(ids.astype(str), return_counts=True)
    duplicated = int(np.count_nonzero(counts > 1))
    if duplicated:
      raise ValueError(f"{self._where(column=id_column)}: {duplicated} id(s) appear in more "
                       f"than one row ({int(counts[counts > 1].sum())} rows); expected one row "
                       "per subject")
    return ids.tolist()

  def _read_labels(self, table: pa.Table) -> np.ndarray:
    labels = np.full((table.num_rows, len(self.label_columns)), np.nan)
    for j, name in enumerate(self.label_columns):
      column = table.column(name)
      values, _, bad = column_numbers(column, self._where(column=name), self.decimal)
      if bad.any():
        raise ValueError(f"{self._where(int(np.flatnonzero(bad)[0]), name)}: not a finite "
                         f"number ({int(bad.sum())} such row(s)); label columns must be "
                         "numeric, empty for missing")
      labels[:, j] = values
    self.stats["label_columns"] = len(self.label_columns)
    self.stats["missing_label_cells"] = int(np.isnan(labels).sum())
    return labels

  def _read_features(self, table: pa.Table, features: list[str],
                     categorical_columns: Sequence[str] | None) -> None:
    numeric, categorical, comma_decimals = {}, {}, []
    self.non_numeric_cells_by_column: dict[str, int] = {}
    for name in features:
      listed = None if categorical_columns is None else name in categorical_columns
      column, where = table.column(name), self._where(column=name)
      try:
        texts, values, junk = _feature_column(column, where, listed, self.decimal)
      except ValueError:  # a column that must be numeric is not: say why, if a comma is the cause
        if self.decimal == "." and comma_decimal_numbers(column, where):
          comma_decimals.append(name)
          continue
        raise
      if texts is not None:
        if listed is None and self.decimal == "." and comma_decimal_numbers(column, where):
          comma_decimals.append(name)
        categorical[name] = texts
        continue
      numeric[name] = values
      if junk:
        self.non_numeric_cells_by_column[name] = junk
    if comma_decimals:
      raise ValueError(
          f"{self._where()}: columns {_named(comma_decimals)} ({len(comma_decimals)} in all) hold numbers written "
          "with a comma (a decimal comma as in 3,5, or a thousands mark as in 1,000) and would not be read as "
          "numbers; for decimal commas set data.tabular.decimal=',' (with data.tabular.delimiter=';' for a "
          "European CSV), else write the numbers without thousands marks or list the columns in "
          "categorical_columns")
    rows = table.num_rows
    self.numeric_columns, self.categorical_columns = tuple(numeric), tuple(categorical)
    self._numeric = np.stack(list(numeric.values()), axis=1) if numeric else np.zeros((rows, 0))
    self._categorical = (np.stack(list(categorical.values()), axis=1) if categorical
                         else np.empty((rows, 0), dtype=object))

  def _count_columns(self) -> None:
    s, numeric, categorical = self.stats, self._numeric, self._categorical
    s["numeric_columns"], s["categorical_columns"] = numeric.shape[1], categorical.shape[1]
    s["missing_numeric_cells"] = int(np.isnan(numeric).sum())
    s["non_numeric_cells"] = sum(self.non_numeric_cells_by_column.values())
    s["non_numeric_columns"] = len(self.non_numeric_cells_by_column)
    missing_categories = is_none(categorical.ravel()).reshape(categorical.shape)
    s["missing_categorical_cells"] = int(missing_categories.sum())
    distinct = [len(np.unique(col[~np.isnan(col)])) for col in numeric.T]
    distinct += [len(set(col[~missing].tolist())) for col, missing
                 in zip(categorical.T, missing_categories.T)]
    s["constant_columns"] = sum(n <= 1 for n in distinct)
    s["all_missing_columns"] = sum(n == 0 for n in distinct)

  def _check_usable_features(self, names: Sequence[str], features: Sequence[str]) -> None:
    """A model needs at least one feature with a value: fail here, not at the first checkpoint."""
    if not features:
      raise ValueError(f"{self.path}: no feature columns; its {len(names)} column(s) {_named(names)} are all id, "
                       "split, label or excluded columns; expected at least one feature column")
    if self.stats["all_missing_columns"] == len(features):
      raise ValueError(f"{self.path}: every feature column ({len(features)}: {_named(features)}) is empty; "
                       "expected at least one feature with values")

  def _column_splits(self, column: pa.ChunkedArray) -> dict[str, np.ndarray]:
    names = column_texts(column, self._where(column=SPLIT_COLUMN))
    self.stats["rows_without_split"] = int(is_none(names).sum())
    present = {n for n in names.tolist() if n is not None}
    order = splits_lib.ordered(present)
    return {name: np.flatnonzero(names == name).astype(np.int64) for name in order}

  # -------------------------------------------------------------- access
  def source(self, split: str) -> TabularSource:
    """The rows of `split`, in file order."""
    if split not in self.splits:
      raise ValueError(f"{self.path}: unknown split {split!r}; available splits: "
                       f"{list(self.splits)}")
    rows = self.splits[split]
    return TabularSource([self.subject_ids[i] for i in rows], self._numeric[rows],
                         self._categorical[rows], self._labels[rows],
                         numeric_columns=self.numeric_columns,
                         categorical_columns=self.categorical_columns,
                         label_columns=self.label_columns)

  def __repr__(self) -> str:
    return (f"TabularDataset({str(self.path)!r}, rows={self.stats['rows']}, "
            f"numeric={len(self.numeric_columns)}, categorical={len(self.categorical_columns)}, "
            f"splits={ {k: len(v) for k, v in self.splits.items()} })")


def _column_names(value: Sequence[str], field: str) -> tuple[str, ...]:
  if isinstance(value, (str, bytes)):  # "site" is not ("s", "i", "t", "e")
    raise ValueError(f"TabularDataset: {field}={value!r}, expected a sequence of column names")
  return tuple(value)


def _feature_column(column: pa.ChunkedArray, where: str, listed_categorical: bool | None, decimal: str = "."
                    ) -> tuple[np.ndarray | None, np.ndarray | None, int]:
  """(texts, None, 0) for a categorical column, (None, values, junk cells) for a numeric one.

  listed_categorical None means auto (see the module docstring); a string column is
  parsed once whichever kind it turns out to be.
  """
  kind = column.type
  if listed_categorical or (listed_categorical is None and (
      pa.types.is_boolean(kind) or pa.types.is_dictionary(kind))):
    return column_texts(column, where), None, 0
  values, nonempty, bad = column_numbers(column, where, decimal)  # unsupported types raise here
  junk = int(bad.sum())
  if _mostly_numeric(nonempty, junk):
    return None, values, junk
  if listed_categorical is None:
    return column_texts(column, where), None, 0
  raise ValueError(f"{where}: {junk} of {nonempty} non-empty cells are not numbers; a numeric "
                   "column was expected (list it in categorical_columns or exclude_columns)")
