"""Random-access reader for single-cell expression in AnnData (.h5ad) files.

This module owns turning one .h5ad file into per-cell records that a Grain pipeline can
index:

  dataset = ExpressionDataset("pbmc.h5ad", layer="counts", label_columns=("cell_type",))
  source = dataset.source("train")   # a picklable random-access sequence
  record = source[0]                 # {"cell_id", "genes", "counts", "labels"}

A record holds the cell's expressed genes only: `genes` are int32 indices into
`dataset.gene_names` (ascending) of the nonzero entries, `counts` their float32 values,
`labels` float32 [len(label_names)] (categorical obs columns as integer codes into
`label_categories[name]`, numeric columns as they are, NaN where missing).

The matrix is `X` or a layer (`layers/<name>`, e.g. raw counts), dense or sparse (CSR or
CSC). In memory it is held as one CSR matrix. With `backed=True` rows are read from the
file on demand (dense or CSR; CSC would need the whole matrix for every cell and is
refused), so a file larger than memory works; the open file is never pickled, each
process opens it lazily on its first read.

Opening scans the matrix once in row blocks: negative, NaN or infinite values are an
error naming the file, the cell and the gene; cells with no expressed gene are skipped
and counted. Gene ids are `var_names` or a `var` column (`gene_column`); duplicated or
empty ids are an error. Splits come from an obs column (`split_column`) when present,
else from `splits.hash_split_buckets` over each cell's subject (obs `subject_id`, else
obs_names), so a donor's cells share a split. Logs carry counts only.
"""
from __future__ import annotations

import logging
import os
import pathlib
import threading
from typing import Any, Sequence

import h5py
import numpy as np
import pandas as pd
import scipy.sparse as sp

from biofm_jax.data.sources import splits as splits_lib
from biofm_jax.data.sources.indexing import checked_index

log = logging.getLogger(__name__)

_SPARSE_ENCODINGS = {"csr_matrix": "csr", "csc_matrix": "csc"}
SUBJECT_COLUMN = "subject_id"  # obs column naming each cell's donor, when the file has one
# Rows per scan block aim at this many stored values: bounded memory, few h5py calls.
_VALUES_PER_BLOCK = 4_000_000

# Every key of ExpressionDataset.stats (all ints):
STAT_KEYS = (
    "cells",  # obs rows in the file
    "genes",  # var rows in the file
    "nonzeros",  # expressed (nonzero) values over all cells
    "empty_cells",  # cells with no expressed gene: in no split, skipped
    "explicit_zeros",  # zeros stored in a sparse matrix; ignored
    "duplicate_cell_ids",  # obs_names repeated (allowed; they share a hash split)
    "fallback_split",  # 1 when there was no split column and hash splits were used
    "cells_without_split",  # non-empty cells whose split column value is missing
    "backed",  # 1 when rows are read from the file on demand
)


# ================================================================ reading elements
def matrix_key(layer: str | None) -> str:
  """The h5ad element holding the expression matrix."""
  return f"layers/{layer}" if layer else "X"


def _read_elem(element):
  from anndata import io  # heavy (0.3 s to import); only the in-memory reads and frames use it
  return io.read_elem(element)


def _matrix_format(file: h5py.File, key: str, path: pathlib.Path) -> str:
  """'dense', 'csr' or 'csc'; errors name the file and what it holds instead."""
  if key not in file:
    layers = list(file["layers"].keys()) if "layers" in file else []
    raise ValueError(f"{path}: no expression matrix {key!r}; layers in the file: {layers}")
  element = file[key]
  if isinstance(element, h5py.Dataset):
    if element.ndim != 2:
      raise ValueError(f"{path}: {key} has {element.ndim} dimension(s), expected 2 (cells x genes)")
    return "dense"
  encoding = element.attrs.get("encoding-type", "")
  if encoding not in _SPARSE_ENCODINGS:
    raise ValueError(f"{path}: {key} has encoding-type {encoding!r}, expected a dense array "
                     f"or one of {sorted(_SPARSE_ENCODINGS)}")
  return _SPARSE_ENCODINGS[encoding]


def _matrix_shape(file: h5py.File, key: str, fmt: str) -> tuple[int, int]:
  element = file[key]
  shape = element.shape if fmt == "dense" else element.attrs["shape"]
  return int(shape[0]), int(shape[1])


def _stored_values(file: h5py.File, key: str, fmt: str, shape: tuple[int, int]) -> int:
  return shape[0] * shape[1] if fmt == "dense" else int(file[key]["data"].shape[0])


def _read_in_memory(file: h5py.File, key: str) -> sp.csr_matrix:
  matrix = _read_elem(file[key])
  matrix = sp.csr_matrix(matrix, dtype=np.float32)  # dense and CSC alike
  matrix.sort_indices()
  return matrix


def _open_h5ad(path: pathlib.Path) -> h5py.File:
  if not path.is_file():
    raise ValueError(f"{path}: AnnData file not found")
  try:
    return h5py.File(path, "r")
  except OSError as e:
    raise ValueError(f"{path}: not a readable .h5ad (HDF5) file ({e})") from e


def _read_frame(file: h5py.File, name: str, path: pathlib.Path) -> pd.DataFrame:
  if name not in file:
    raise ValueError(f"{path}: no {name!r} element; expected an AnnData .h5ad file")
  try:
    return _read_elem(file[name])
  except Exception as e:  # anndata raises many types on malformed elements
    raise ValueError(f"{path}: could not read {name!r} ({type(e).__name__}: {e})") from e


def _matrix_layout(file: h5py.File, key: str, path: pathlib.Path, expected: tuple[int, int],
                   backed: bool) -> tuple[str, tuple[int, int], int]:
  """Format, shape and stored values of the matrix, checked against obs and var."""
  fmt = _matrix_format(file, key, path)
  shape = _matrix_shape(file, key, fmt)
  if shape != expected:
    raise ValueError(f"{path}: {key} has shape {shape}, expected ({expected[0]} obs, "
                     f"{expected[1]} var)")
  if backed and fmt == "csc":
    raise ValueError(f"{path}: {key} is stored as CSC (by gene); backed mode reads cells on "
                     "demand and would read the whole matrix for each. Rewrite it as CSR "
                     "(adata.X = adata.X.tocsr()) or open it with backed=False")
  return fmt, shape, _stored_values(file, key, fmt, shape)


def _gene_names(var: pd.DataFrame, gene_column: str | None, path: pathlib.Path) -> tuple[str, ...]:
  """Gene ids from var_names or a var column; duplicated or empty ids are an error."""
  if gene_column:
    if gene_column not in var.columns:
      raise ValueError(f"{path}: var has no column {gene_column!r} (gene_column); "
                       f"var columns: {list(var.columns)}")
    where, values = f"var column {gene_column!r}", var[gene_column]
  else:
    where, values = "var_names", var.index.to_series()
  missing = values.isna().to_numpy() | (values.astype(str).str.strip() == "").to_numpy()
  if missing.any():
    raise ValueError(f"{path}: {where} has {int(missing.sum())} missing or empty gene id(s), "
                     f"first at var row {int(np.flatnonzero(missing)[0])}; expected a gene id "
                     "in every row")
  names = values.astype(str).to_numpy()
  duplicated = pd.Index(names).duplicated()
  if duplicated.any():
    raise ValueError(f"{path}: {where} has {int(duplicated.sum())} duplicated gene id(s), e.g. "
                     f"{names[duplicated][0]!r}; expected unique gene ids (aggregate them or "
                     "pick another var column with gene_column)")
  return tuple(names.tolist())


def _label_matrix(obs: pd.DataFrame, columns: Sequence[str], path: pathlib.Path
                  ) -> tuple[np.ndarray, dict[str, tuple[str, ...]]]:
  """float32 [cells, len(columns)] and the category names of categorical columns."""
  values = np.full((len(obs), len(columns)), np.nan, np.float32)
  categories: dict[str, tuple[str, ...]] = {}
  for j, name in enumerate(columns):
    if name not in obs.columns:
      raise ValueError(f"{path}: obs has no column {name!r} (label_columns); obs columns: "
                       f"{list(obs.columns)}")
    column = obs[name]
    if pd.api.types.is_numeric_dtype(column.dtype) and not isinstance(column.dtype,
                                                                       pd.CategoricalDtype):
      values[:, j] = column.to_numpy(np.float32, na_value=np.nan)
      continue
    # Strings and categoricals alike: integer codes, -1 (missing) -> NaN.
    categorical = pd.Categorical(column)
    codes = categorical.codes.astype(np.float32)
    codes[categorical.codes < 0] = np.nan
    values[:, j] = codes
    categories[name] = tuple(str(c) for c in categorical.categories)
  return values, categories


# ================================================================ matrix rows
class _Rows:
  """Row access to the matrix, in memory (a CSR matrix) or backed (the file, lazily)."""

  def __init__(self, path: pathlib.Path, key: str, fmt: str,
               matrix: sp.csr_matrix | None = None):
    self.path, self.key, self.fmt, self.matrix = path, key, fmt, matrix
    self._open_state()

  def _open_state(self) -> None:
    self._file, self._element, self._pid = None, None, None
    self._lock = threading.Lock()

  def __getstate__(self) -> dict:
    # An open h5py handle must not cross a process boundary: each process reopens.
    state = dict(self.__dict__)
    for name in ("_file", "_element", "_pid", "_lock"):
      state.pop(name)
    return state

  def __setstate__(self, state: dict) -> None:
    self.__dict__.update(state)
    self._open_state()

  def _backed_element(self):
    """The open element in this process: an h5py dataset (dense), else CSR arrays."""
    with self._lock:
      if self._element is None or self._pid != os.getpid():  # a forked child reopens too
        self._file = h5py.File(self.path, "r")
        element = self._file[self.key]
        if self.fmt == "dense":
          self._element = element
        else:
          # indptr (one int per cell) in memory; values and gene indices stay on disk.
          self._element = (element["indptr"][:].astype(np.int64), element["indices"],
                           element["data"], int(element.attrs["shape"][1]))
        self._pid = os.getpid()
      return self._element

  def block(self, start: int, stop: int) -> sp.csr_matrix:
    """Rows [start, stop) as a CSR matrix with sorted indices (explicit zeros kept)."""
    if self.matrix is not None:
      return self.matrix[start:stop]
    element = self._backed_element()
    if self.fmt == "dense":
      block = sp.csr_matrix(element[start:stop], dtype=np.float32)
    else:
      # Direct slices of the CSR arrays: one small read each, not a sparse-dataset lookup.
      indptr, indices, data, num_genes = element
      lo, hi = int(indptr[start]), int(indptr[stop])
      block = sp.csr_matrix((data[lo:hi].astype(np.float32), indices[lo:hi],
                             indptr[start: stop + 1] - lo), shape=(stop - start, num_genes))
    block.sort_indices()
    return block

  def row(self, i: int) -> tuple[np.ndarray, np.ndarray]:
    """(int32 gene indices, float32 values) of row i's nonzero entries, ascending genes."""
    if self.matrix is not None:
      lo, hi = self.matrix.indptr[i], self.matrix.indptr[i + 1]
      indices, data = self.matrix.indices[lo:hi], self.matrix.data[lo:hi]
    else:
      block = self.block(i, i + 1)
      indices, data = block.indices, block.data
    expressed = data != 0
    return indices[expressed].astype(np.int32), data[expressed].astype(np.float32)


def _check_block(block: sp.csr_matrix, start: int, path: pathlib.Path, key: str,
                 cell_ids: np.ndarray, gene_names: Sequence[str]) -> None:
  bad = ~(np.isfinite(block.data) & (block.data >= 0))
  if bad.any():
    position = int(np.flatnonzero(bad)[0])
    row = start + int(np.searchsorted(block.indptr, position, side="right")) - 1
    raise ValueError(f"{path}: {key} has value {float(block.data[position])} in cell "
                     f"{cell_ids[row]!r} (obs row {row}) for gene "
                     f"{gene_names[block.indices[position]]!r}; expected finite, "
                     f"non-negative counts ({int(bad.sum())} such value(s) in rows "
                     f"{start}..{start + block.shape[0] - 1})")


def _scan(rows: _Rows, shape: tuple[int, int], stored: int, cell_ids: np.ndarray,
          gene_names: Sequence[str]) -> tuple[np.ndarray, int, np.ndarray]:
  """Validates every value; returns expressed genes per cell (int32), explicit zeros and each
  gene's total count over all cells (float64; vocabulary coverage reads it)."""
  num_cells = shape[0]
  per_row = max(1, -(-stored // max(num_cells, 1)))
  block_rows = max(1, _VALUES_PER_BLOCK // per_row)
  expressed = np.zeros(num_cells, np.int32)
  totals = np.zeros(shape[1], np.float64)
  explicit_zeros = 0
  for start in range(0, num_cells, block_rows):
    stop = min(start + block_rows, num_cells)
    block = rows.block(start, stop)
    _check_block(block, start, rows.path, rows.key, cell_ids, gene_names)
    stored_per_row = np.diff(block.indptr)
    zero_rows = np.repeat(np.arange(stop - start), stored_per_row)[block.data == 0]
    zeros = np.bincount(zero_rows, minlength=stop - start)
    explicit_zeros += int(zeros.sum()) if rows.fmt != "dense" else 0
    expressed[start:stop] = stored_per_row - zeros
    totals += np.bincount(block.indices, weights=block.data, minlength=shape[1])
  return expressed, explicit_zeros, totals


def _subject_ids(obs: pd.DataFrame, cell_ids: np.ndarray) -> np.ndarray:
  """str [cells]: obs column SUBJECT_COLUMN where the file has it and the cell a value, else
  the cell id (a cell without a known donor is its own subject)."""
  if SUBJECT_COLUMN not in obs.columns:
    return cell_ids
  column = obs[SUBJECT_COLUMN]
  missing = column.isna().to_numpy()
  values = column.to_numpy(dtype=object)
  # A numeric id column with a missing value is stored as float: 42.0 must still be "42",
  # as MEDS writes it, or the subject would silently never join its other modalities.
  as_text = [str(int(v)) if isinstance(v, (float, np.floating)) and float(v).is_integer() else str(v)
             for v in values]
  return np.where(missing, cell_ids, np.array(as_text, dtype=object)).astype(object)


# ================================================================ splits
def _column_splits(obs: pd.DataFrame, column: str, kept: np.ndarray,
                   stats: dict[str, int]) -> dict[str, np.ndarray]:
  """Split name -> obs rows (of kept cells), standard names first, others sorted."""
  values = obs[column]
  missing = values.isna().to_numpy()
  names = values.astype(str).to_numpy(dtype=object)
  stats["cells_without_split"] = int((missing & kept).sum())
  found = set(names[kept & ~missing].tolist())
  order = splits_lib.ordered(found)
  return {name: np.flatnonzero(kept & ~missing & (names == name)).astype(np.int64)
          for name in order}


def _hash_splits(subject_ids: np.ndarray, kept: np.ndarray, fractions: Sequence[float],
                 seed: int) -> dict[str, np.ndarray]:
  # Over every cell's subject, so a cell's split does not depend on which other cells are empty.
  buckets = splits_lib.hash_split_buckets(subject_ids, fractions, seed)
  return {name: np.flatnonzero(kept & (buckets == i)).astype(np.int64)
          for i, name in enumerate(splits_lib.STANDARD_SPLITS)}


# ================================================================ public API
class ExpressionSource:
  """The cells of one split: random access, one matrix row per __getitem__.

  Holds numpy arrays and a picklable row reader, so it pickles to Grain workers (a backed
  reader reopens the file there). `cell_ids`, `subject_ids` (the donor of each cell, see
  `ExpressionDataset.subject_ids`) and `labels` (float32 [cells, num_labels]) are known
  without reading the matrix.
  """

  def __init__(self, rows: np.ndarray, cell_ids: np.ndarray, labels: np.ndarray,
               gene_names: tuple[str, ...], reader: _Rows,
               subject_ids: np.ndarray | None = None):
    self.rows = rows  # obs row of each record
    self.cell_ids = cell_ids
    self.subject_ids = cell_ids if subject_ids is None else subject_ids
    self.labels = labels
    self.gene_names = gene_names
    self._reader = reader

  def __len__(self) -> int:
    return len(self.rows)

  @property
  def record_keys(self) -> list[str]:
    """Each cell's obs name."""
    return [str(c) for c in self.cell_ids]

  def __getitem__(self, index: int) -> dict:
    i = checked_index(index, len(self), "ExpressionSource ... cells")
    genes, counts = self._reader.row(int(self.rows[i]))
    return {"cell_id": str(self.cell_ids[i]), "genes": genes, "counts": counts,
            "labels": self.labels[i].copy()}

  def __repr__(self) -> str:
    return f"ExpressionSource(cells={len(self)}, genes={len(self.gene_names)})"


class ExpressionDataset:
  """One .h5ad file, validated, with its splits.

  Attributes:
    path, backed, layer: as given; `key` is the matrix element read ("X" or "layers/...").
    gene_names: gene ids in var order; a record's `genes` index into them.
    label_names, label_categories: the label columns, and category names of the
      categorical ones (code k means label_categories[name][k]).
    splits: split name -> int64 obs rows of non-empty cells.
    subject_ids: str [cells] the subject (donor) of every obs row: the obs column
      `subject_id` when the file has one (a missing value falls back to the cell id), else
      the cell ids; multimodal joins match cells to a subject's other modalities by it.
    genes_per_cell: int32 [cells] expressed genes of every obs row (0 = skipped).
    gene_totals: float64 [genes] each gene's summed counts over every cell.
    stats: counts only, safe to log; every key is listed in `STAT_KEYS`.
  """

  def __init__(self, path: str | os.PathLike, *, backed: bool = False, layer: str | None = None,
               gene_column: str | None = None, split_column: str = "split",
               label_columns: Sequence[str] = (),
               fallback_fractions: Sequence[float] = (0.8, 0.1, 0.1), fallback_seed: int = 0):
    self.path, self.backed, self.layer = pathlib.Path(path), bool(backed), layer or None
    self.key = matrix_key(self.layer)
    with _open_h5ad(self.path) as file:
      obs, var = (_read_frame(file, name, self.path) for name in ("obs", "var"))
      fmt, shape, stored = _matrix_layout(file, self.key, self.path, (len(obs), len(var)),
                                          self.backed)
      matrix = None if self.backed else _read_in_memory(file, self.key)
    self._index(obs, var, _Rows(self.path, self.key, fmt, matrix), shape, stored, gene_column=gene_column,
                split_column=split_column, label_columns=label_columns, fallback_fractions=fallback_fractions,
                fallback_seed=fallback_seed)

  def _index(self, obs: pd.DataFrame, var: pd.DataFrame, reader: Any, shape: tuple[int, int], stored: int, *,
             gene_column: str | None, split_column: str, label_columns: Sequence[str],
             fallback_fractions: Sequence[float], fallback_seed: int) -> None:
    """Everything but opening the file: gene ids, labels, the validating scan, splits.
    `reader` gives matrix rows (`block`, `row`); other stores (`soma.py`) hand in their own."""
    self.label_names = tuple(label_columns)
    self.stats: dict[str, int] = dict.fromkeys(STAT_KEYS, 0)
    self.stats["backed"] = int(self.backed)
    self.gene_names = _gene_names(var, gene_column, self.path)
    self.labels, self.label_categories = _label_matrix(obs, self.label_names, self.path)
    self.cell_ids = obs.index.astype(str).to_numpy(dtype=object)
    self.subject_ids = _subject_ids(obs, self.cell_ids)
    self._reader = reader
    self.genes_per_cell, explicit_zeros, self.gene_totals = _scan(self._reader, shape, stored, self.cell_ids,
                                                                  self.gene_names)
    kept = self.genes_per_cell > 0
    self.stats.update(cells=shape[0], genes=shape[1], nonzeros=int(self.genes_per_cell.sum()),
                      empty_cells=int((~kept).sum()), explicit_zeros=explicit_zeros,
                      duplicate_cell_ids=int(pd.Index(self.cell_ids).duplicated().sum()))
    if not kept.any():
      raise ValueError(f"{self.path}: {self.key} has no expressed value in any of its "
                       f"{shape[0]} cells")
    if split_column and split_column in obs.columns:
      self.splits = _column_splits(obs, split_column, kept, self.stats)
    else:
      self.stats["fallback_split"] = 1
      # By subject, so all cells of a donor share a split (no donor in train and evaluation).
      self.splits = _hash_splits(self.subject_ids, kept, fallback_fractions, fallback_seed)
    log.info("AnnData %s: %s", self.path.name, ", ".join(f"{k}={v}" for k, v in self.stats.items()))

  def source(self, split: str) -> ExpressionSource:
    """The non-empty cells of `split`, in obs order."""
    if split not in self.splits:
      raise ValueError(f"{self.path}: unknown split {split!r}; available splits: "
                       f"{list(self.splits)}")
    rows = self.splits[split]
    return ExpressionSource(rows, self.cell_ids[rows], self.labels[rows], self.gene_names,
                            self._reader, self.subject_ids[rows])

  def __repr__(self) -> str:
    return (f"ExpressionDataset({str(self.path)!r}, cells={self.stats['cells']}, "
            f"genes={self.stats['genes']}, splits={ {k: len(v) for k, v in self.splits.items()} })")
