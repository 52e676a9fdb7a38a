"""Single-cell expression from a TileDB-SOMA experiment, read out of core.

CELLxGENE Census and other atlases are SOMA experiments (`tiledbsoma`); so is any AnnData
converted with `tiledbsoma.io.from_anndata`. `SomaExpressionDataset(uri, measurement="RNA",
layer="raw")` behaves like `anndata.ExpressionDataset` (same records, checks, splits,
labels and stats), but the matrix stays in the experiment: rows are read by blocks of
contiguous cells (`soma_joinid` ranges) into a small cache, so memory holds the obs
columns it needs and a few blocks, whatever the number of cells.

Random access over an atlas would read a whole block for every cell. Training therefore
reads cells in block-buffered order (`data/pipeline.py`, `block_shuffle`): the blocks are
shuffled every epoch, and the cells of `buffer_blocks` consecutive blocks are shuffled
together, as CELLxGENE Census's loaders do. Every cell is read once per epoch, and each
block once per epoch per process.
"""
from __future__ import annotations

import collections
import pathlib
import threading
from typing import Sequence

import numpy as np
import pandas as pd
import scipy.sparse as sp

from biofm_jax.modalities.omics.anndata import ExpressionDataset

BLOCK_CELLS = 1024  # cells per read: one TileDB query each
CACHE_BLOCKS = 16  # blocks kept per process (the default training buffer is 8 blocks)


def is_soma_experiment(path: str | pathlib.Path) -> bool:
  """A folder holding a TileDB group with an `obs` dataframe and `ms` measurements."""
  path = pathlib.Path(path)
  return path.is_dir() and (path / "obs").is_dir() and (path / "ms").is_dir()


class _SomaRows:
  """Row blocks of one X layer of a SOMA measurement, with the reader interface of
  `anndata._Rows` (`block`, `row`). The experiment is opened lazily in each process."""

  fmt = "sparse"

  def __init__(self, uri: str, measurement: str, layer: str, num_cells: int, num_genes: int,
               block_cells: int | None = None, cache_blocks: int | None = None):
    self.path, self.key = pathlib.Path(uri), f"ms/{measurement}/X/{layer}"
    self.uri, self.measurement, self.layer = uri, measurement, layer
    self.num_cells, self.num_genes = num_cells, num_genes
    self.block_cells, self.cache_blocks = block_cells or BLOCK_CELLS, cache_blocks or CACHE_BLOCKS
    self._open_state()

  def _open_state(self) -> None:
    self._experiment, self._array = None, None  # the experiment too: closing it closes the array
    self._cache, self._lock = collections.OrderedDict(), threading.Lock()
    self.blocks_read = 0  # queries this process made (tests and benchmarks count them)

  def __getstate__(self) -> dict:
    state = dict(self.__dict__)
    for name in ("_experiment", "_array", "_cache", "_lock", "blocks_read"):
      state.pop(name)
    return state

  def __setstate__(self, state: dict) -> None:
    self.__dict__.update(state)
    self._open_state()

  def _x(self):
    if self._array is None:
      import tiledbsoma  # loads TileDB (a second): only SOMA runs need it
      self._experiment = tiledbsoma.Experiment.open(self.uri)
      self._array = self._experiment.ms[self.measurement].X[self.layer]
    return self._array

  def block(self, start: int, stop: int) -> sp.csr_matrix:
    """Cells [start, stop) (soma_joinids) as CSR with sorted gene indices."""
    table = self._x().read(coords=(slice(start, stop - 1),)).tables().concat()
    self.blocks_read += 1
    cells = table.column("soma_dim_0").to_numpy() - start
    genes = table.column("soma_dim_1").to_numpy()
    values = table.column("soma_data").to_numpy().astype(np.float32)
    matrix = sp.csr_matrix((values, (cells, genes)), shape=(stop - start, self.num_genes))
    matrix.sort_indices()
    return matrix

  def row(self, i: int) -> tuple[np.ndarray, np.ndarray]:
    number = i // self.block_cells
    with self._lock:
      matrix = self._cache.get(number)
      if matrix is None:
        start = number * self.block_cells
        matrix = self.block(start, min(start + self.block_cells, self.num_cells))
        self._cache[number] = matrix
        if len(self._cache) > self.cache_blocks:
          self._cache.popitem(last=False)
      else:
        self._cache.move_to_end(number)
    lo, hi = matrix.indptr[i - number * self.block_cells: i - number * self.block_cells + 2]
    indices, data = matrix.indices[lo:hi], matrix.data[lo:hi]
    expressed = data != 0
    return indices[expressed].astype(np.int32), data[expressed].astype(np.float32)


class SomaExpressionDataset(ExpressionDataset):
  """A SOMA experiment's cells, as `ExpressionDataset` gives an .h5ad file's."""

  def __init__(self, uri: str | pathlib.Path, *, measurement: str = "RNA", layer: str | None = None,
               gene_column: str | None = None, split_column: str = "split", label_columns: Sequence[str] = (),
               fallback_fractions: Sequence[float] = (0.8, 0.1, 0.1), fallback_seed: int = 0):
    try:
      import tiledbsoma  # loads TileDB (a second): only SOMA runs need it
    except ImportError as e:
      raise ValueError(f"{uri}: is a TileDB-SOMA experiment; reading it needs tiledbsoma "
                       "(pip install -e '.[soma]')") from e
    self.path, self.backed, self.layer = pathlib.Path(uri), True, layer or "data"
    self.key = f"ms/{measurement}/X/{self.layer}"
    try:
      experiment = tiledbsoma.Experiment.open(str(uri))
    except Exception as e:  # tiledbsoma raises its own error types for missing or foreign folders
      raise ValueError(f"{uri}: not a readable TileDB-SOMA experiment ({e})") from e
    with experiment:
      if measurement not in experiment.ms:
        raise ValueError(f"{uri}: no measurement {measurement!r}; it has {sorted(experiment.ms.keys())}")
      ms = experiment.ms[measurement]
      if self.layer not in ms.X:
        raise ValueError(f"{uri}: measurement {measurement!r} has no X layer {self.layer!r}; it has "
                         f"{sorted(ms.X.keys())} (config.data.omics.layer)")
      wanted = [c for c in {split_column, "subject_id", *label_columns} if c]
      obs_columns = [c for c in experiment.obs.keys() if c in wanted]
      obs = experiment.obs.read(column_names=["soma_joinid", "obs_id", *obs_columns]).concat().to_pandas()
      var = ms.var.read().concat().to_pandas()
    missing = [c for c in label_columns if c not in obs.columns]
    if missing:
      raise ValueError(f"{uri}: obs has no column(s) {missing} (config.data.omics.label_columns)")
    # Rows are soma_joinids; these experiments number cells 0..n-1 (from_anndata, Census).
    obs = obs.sort_values("soma_joinid")
    if not (obs["soma_joinid"].to_numpy() == np.arange(len(obs))).all():
      raise ValueError(f"{uri}: obs soma_joinids are not 0..{len(obs) - 1}; this reader needs dense ids")
    var = var.sort_values("soma_joinid")
    obs = obs.set_index(obs["obs_id"].astype(str)).drop(columns=["soma_joinid", "obs_id"])
    var = var.set_index(var["var_id"].astype(str) if "var_id" in var.columns else var.index.astype(str))
    reader = _SomaRows(str(uri), measurement, self.layer, len(obs), len(var))
    # The scan sizes its blocks by values per cell. Not from the array's `nnz`: on an
    # experiment written in many fragments that reads every coordinate (3.3 GB at 1M cells).
    sample = reader.block(0, min(len(obs), BLOCK_CELLS)) if len(obs) else sp.csr_matrix((0, len(var)))
    stored = int(sample.nnz / max(sample.shape[0], 1) * len(obs))
    self._index(pd.DataFrame(obs), var, reader, (len(obs), len(var)), stored, gene_column=gene_column,
                split_column=split_column, label_columns=label_columns, fallback_fractions=fallback_fractions,
                fallback_seed=fallback_seed)
