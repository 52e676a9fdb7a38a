"""Highly-variable genes, Seurat v3 flavour, computed by streaming cells.

`seurat_v3` gives the same genes, ranks and normalised variances as
`scanpy.pp.highly_variable_genes(adata, flavor="seurat_v3")` on raw counts (one batch),
without holding the matrix: two passes over the cells keep only per-gene sums, so memory
is O(genes) whatever the number of cells.

The method (Stuart et al. 2019, as scanpy computes it):
1. Per gene, the mean and the variance (ddof=1) of its raw counts.
2. A loess fit (degree 2, span 0.3: scikit-misc's, the one scanpy calls) of log10 variance
   on log10 mean over genes of non-zero variance gives each gene's expected variance.
3. Counts are standardised by the expected standard deviation, clipped at sqrt(cells) so a
   few outlier cells cannot make a gene look variable; the variance of these clipped
   standardised values is the gene's normalised variance.
4. Genes ranked by normalised variance, largest first; the top `n_top` are the HVGs.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Iterable

import numpy as np
from skmisc.loess import loess  # the loess scanpy calls for seurat_v3

SPAN = 0.3  # scanpy's default loess span for seurat_v3


@dataclasses.dataclass(frozen=True)
class HighlyVariable:
  """Per-gene Seurat v3 statistics over the scanned cells, in panel order."""
  means: np.ndarray  # float64 [genes]
  variances: np.ndarray  # float64 [genes], ddof=1
  variances_norm: np.ndarray  # float64 [genes]: the clipped standardised variance
  num_cells: int

  def top(self, n_top: int) -> np.ndarray:
    """int64 panel indices of the `n_top` most variable genes, most variable first
    (ties broken by panel order)."""
    return np.argsort(-self.variances_norm, kind="stable")[:n_top]


def _records(source: Any, positions: Iterable[int]) -> Iterable[tuple[np.ndarray, np.ndarray]]:
  for i in positions:
    record = source[int(i)]
    yield np.asarray(record["genes"], np.int64), np.asarray(record["counts"], np.float64)


def _check_counts(counts: np.ndarray, where: str) -> None:
  """Seurat v3 models raw counts; normalised values would select other genes silently."""
  if len(counts) and (counts.min() < 0 or not np.all(counts == np.round(counts))):
    raise ValueError(f"{where}: highly-variable genes (Seurat v3) need raw counts, but the "
                     f"values are not non-negative integers (e.g. {counts[counts != np.round(counts)][:3]}); "
                     "choose the raw-count layer with config.data.omics.layer")


def seurat_v3(source: Any, num_genes: int, positions: Iterable[int] | None = None, *,
              span: float = SPAN, where: str = "highly_variable_genes") -> HighlyVariable:
  """Streams `source[i]` (records of "genes" panel indices and raw "counts") twice."""
  positions = np.arange(len(source)) if positions is None else np.asarray(list(positions))
  n = len(positions)
  if n < 2:
    raise ValueError(f"{where}: needs at least 2 cells to estimate variances, got {n}")
  total, total_sq = np.zeros(num_genes), np.zeros(num_genes)
  for genes, counts in _records(source, positions):
    _check_counts(counts, where)
    np.add.at(total, genes, counts)
    np.add.at(total_sq, genes, counts * counts)
  mean = total / n
  # The sum of squared deviations from the two sums; clipped at 0 against rounding.
  variance = np.maximum(total_sq - n * mean * mean, 0.0) / (n - 1)

  varying = variance > 0
  if varying.sum() < 3:
    raise ValueError(f"{where}: only {int(varying.sum())} genes vary over {n} cells; "
                     "a loess fit of variance on mean needs more")
  fitted_log_var = np.zeros(num_genes)
  model = loess(np.log10(mean[varying]), np.log10(variance[varying]), span=span, degree=2)
  model.fit()
  fitted_log_var[varying] = model.outputs.fitted_values
  reg_std = np.sqrt(10.0 ** fitted_log_var)
  clip = reg_std * np.sqrt(n) + mean

  clipped, clipped_sq = np.zeros(num_genes), np.zeros(num_genes)
  for genes, counts in _records(source, positions):
    counts = np.minimum(counts, clip[genes])  # zeros (absent genes) are never clipped
    np.add.at(clipped, genes, counts)
    np.add.at(clipped_sq, genes, counts * counts)
  variances_norm = (n * mean * mean + clipped_sq - 2 * clipped * mean) / ((n - 1) * reg_std ** 2)
  return HighlyVariable(means=mean, variances=variance, variances_norm=variances_norm, num_cells=n)
