"""Writes hvg_seurat_v3_reference.json: a raw-count matrix and scanpy's Seurat v3 HVGs of it.

Run once, in an environment with scanpy and scikit-misc (not a dependency of biofm_jax):
    python -m venv /tmp/hvg && /tmp/hvg/bin/pip install scanpy scikit-misc
    /tmp/hvg/bin/python tests/data/make_hvg_reference.py
tests/test_omics_data.py checks `biofm_jax.modalities.omics.hvg.seurat_v3` against it.
"""
import importlib.metadata
import json
import pathlib

import anndata
import numpy as np
import scanpy as sc
import scipy.sparse as sp

NUM_CELLS, NUM_GENES, N_TOP = 240, 150, 40


def counts_matrix(seed: int = 20261203) -> np.ndarray:
  """Negative-binomial counts over a wide range of gene means, two cell groups with their
  own marker genes, and a few outlier cells, so the loess fit and the clipping both matter."""
  rng = np.random.default_rng(seed)
  means = rng.lognormal(mean=-0.5, sigma=1.5, size=NUM_GENES)
  group = rng.integers(0, 2, NUM_CELLS)
  scale = np.ones((NUM_CELLS, NUM_GENES))
  scale[group == 1, :15] = 6.0
  scale[group == 0, 15:30] = 4.0
  mu = means * scale * rng.lognormal(0.0, 0.3, size=(NUM_CELLS, 1))  # library sizes
  dispersion = 2.0
  counts = rng.negative_binomial(dispersion, dispersion / (dispersion + mu))
  counts[rng.integers(0, NUM_CELLS, 4), rng.integers(0, NUM_GENES, 4)] += 500  # outliers
  counts[:, -3:] = 0  # genes never expressed
  return counts


def main() -> None:
  counts = counts_matrix()
  adata = anndata.AnnData(sp.csr_matrix(counts.astype(np.float32)))
  adata.var_names = [f"G{j:03d}" for j in range(NUM_GENES)]
  df = sc.pp.highly_variable_genes(adata, flavor="seurat_v3", n_top_genes=N_TOP, inplace=False)
  csr = sp.csr_matrix(counts)
  out = {
      "generator": f"tests/data/make_hvg_reference.py with scanpy {importlib.metadata.version('scanpy')}",
      "n_top_genes": N_TOP, "num_cells": NUM_CELLS, "num_genes": NUM_GENES,
      "indptr": csr.indptr.tolist(), "indices": csr.indices.tolist(), "data": csr.data.tolist(),
      "means": df["means"].tolist(), "variances": df["variances"].tolist(),
      "variances_norm": df["variances_norm"].tolist(),
      "highly_variable": np.flatnonzero(df["highly_variable"].to_numpy()).tolist(),
  }
  path = pathlib.Path(__file__).with_name("hvg_seurat_v3_reference.json")
  path.write_text(json.dumps(out))
  print(f"wrote {path}: {len(out['data'])} non-zero counts, {N_TOP} HVGs")


if __name__ == "__main__":
  main()
