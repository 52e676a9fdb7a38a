"""A synthetic single-cell expression file with planted cell types, for demos and tests.

This module owns `write_synthetic_anndata`: an .h5ad whose structure a model can learn
and a linear probe can recover:

* counts are negative-binomial (a gamma-Poisson mixture) around per-gene base means that
  span orders of magnitude, so most entries are zero as in real droplet data;
* each cell type has its own marker genes expressed far above their base mean, so cell
  type is written in the profile (obs column `cell_type`, categorical);
* library sizes (sequencing depth per cell) vary 5x, so library-size normalisation matters;
* X is a float32 CSR matrix of counts; obs `split` holds train/tuning/held_out (80/10/10);
  var_names are "GENE0001", "GENE0002", ....

The same arguments always give the same file, written to a temporary name and renamed
into place, so a crash never leaves a half-written file that a later run would reuse.
"""
from __future__ import annotations

import os
import pathlib

import numpy as np

from biofm_jax.data.sources import splits as splits_lib
import pandas as pd
import scipy.sparse as sp

MARKERS_PER_TYPE = 8
MARKER_FOLD_CHANGE = 12.0  # how far above its base mean a marker gene is expressed
NB_DISPERSION = 2.0  # gamma shape: smaller means more overdispersed counts
LIBRARY_RANGE = (1.0, 5.0)  # per-cell depth factors, log-uniform over a 5x range
SPLIT_FRACTIONS = (0.8, 0.1, 0.1)


def _base_means(num_genes: int, rng: np.random.Generator) -> np.ndarray:
  # Log-normal: a few highly expressed genes and a long tail of rarely detected ones.
  return rng.lognormal(mean=-1.0, sigma=1.3, size=num_genes)


def _marker_genes(num_genes: int, num_cell_types: int, rng: np.random.Generator) -> np.ndarray:
  """[num_cell_types, MARKERS_PER_TYPE] distinct gene indices, disjoint between types."""
  per_type = min(MARKERS_PER_TYPE, num_genes // num_cell_types)
  if per_type < 1:
    raise ValueError(f"write_synthetic_anndata: num_genes {num_genes} is too few for "
                     f"{num_cell_types} cell types with marker genes")
  chosen = rng.permutation(num_genes)[: per_type * num_cell_types]
  return chosen.reshape(num_cell_types, per_type)


def synthetic_counts(num_cells: int, num_genes: int, num_cell_types: int, seed: int, *,
                     cell_types: np.ndarray | None = None,
                     log_effects: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
  """float32 [cells, genes] counts and int64 [cells] cell types; pure and deterministic.

  `cell_types` (int [cells]; None: drawn uniformly) and `log_effects` (float [cells, genes]
  added to the log of every mean; None: none) let a caller plant per-cell (or per-sample)
  structure, e.g. modalities/synthetic_cohort.py's subject latents.
  """
  rng = np.random.default_rng(seed)
  means = np.tile(_base_means(num_genes, rng), (num_cell_types, 1))
  markers = _marker_genes(num_genes, num_cell_types, rng)
  for cell_type, genes in enumerate(markers):
    means[cell_type, genes] = np.maximum(means[cell_type, genes], 0.5) * MARKER_FOLD_CHANGE
  if cell_types is None:
    cell_types = rng.integers(0, num_cell_types, size=num_cells)
  cell_types = np.asarray(cell_types, np.int64)
  library = np.exp(rng.uniform(*np.log(LIBRARY_RANGE), size=num_cells))
  mu = means[cell_types] * library[:, None]
  if log_effects is not None:
    mu = mu * np.exp(log_effects)
  rates = rng.gamma(shape=NB_DISPERSION, scale=mu / NB_DISPERSION)
  return rng.poisson(rates).astype(np.float32), cell_types


def _split_names(num_cells: int, seed: int) -> np.ndarray:
  """Exactly 80/10/10 (rounded) over a seeded permutation of the cells."""
  rng = np.random.default_rng([seed, 1])
  bounds = np.round(np.cumsum(SPLIT_FRACTIONS[:2]) * num_cells).astype(int)
  names = np.empty(num_cells, dtype=object)
  order = rng.permutation(num_cells)
  names[order[: bounds[0]]] = splits_lib.STANDARD_SPLITS[0]
  names[order[bounds[0]: bounds[1]]] = splits_lib.STANDARD_SPLITS[1]
  names[order[bounds[1]:]] = splits_lib.STANDARD_SPLITS[2]
  return names


def write_synthetic_anndata(path: str | os.PathLike, *, num_cells: int = 600,
                            num_genes: int = 200, num_cell_types: int = 4,
                            seed: int = 0) -> pathlib.Path:
  """Writes the .h5ad to `path` atomically and returns the path."""
  import anndata  # heavy; only writing a synthetic .h5ad needs it

  if num_cells < 1 or num_genes < 1 or num_cell_types < 1:
    raise ValueError(f"write_synthetic_anndata: num_cells {num_cells}, num_genes {num_genes} "
                     f"and num_cell_types {num_cell_types} must be >= 1")
  path = pathlib.Path(path)
  counts, cell_types = synthetic_counts(num_cells, num_genes, num_cell_types, seed)
  type_names = [f"type_{k}" for k in range(num_cell_types)]
  obs = pd.DataFrame(
      {"cell_type": pd.Categorical.from_codes(cell_types, categories=type_names),
       "split": pd.Categorical(_split_names(num_cells, seed),
                               categories=list(splits_lib.STANDARD_SPLITS))},
      index=[f"cell_{i:06d}" for i in range(num_cells)])
  var = pd.DataFrame(index=[f"GENE{j + 1:04d}" for j in range(num_genes)])
  adata = anndata.AnnData(X=sp.csr_matrix(counts), obs=obs, var=var)
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_name(f".{path.stem}.partial-{os.getpid()}.h5ad")
  try:
    adata.write_h5ad(tmp)
    os.replace(tmp, path)
  finally:
    if tmp.exists():
      tmp.unlink()
  return path
