"""The expression modality's raw-feature baseline: normalised counts for L1 logistic regression."""
from __future__ import annotations

import numpy as np
import scipy.sparse as sp

NORMALIZE_TOTAL = 1e4


def expression_features(train_source, source) -> sp.csr_matrix:
  """[cells, genes] counts of `source` scaled to NORMALIZE_TOTAL per cell (the usual
  normalize_total); `train_source` is not needed: the scaling is per cell."""
  del train_source
  rows, cols, values = [], [], []
  for i in range(len(source)):
    record = source[i]
    counts = record["counts"].astype(np.float64)
    total = counts.sum()
    rows.append(np.full(len(counts), i))
    cols.append(record["genes"])
    values.append(counts * (NORMALIZE_TOTAL / total) if total > 0 else counts)
  return sp.csr_matrix((np.concatenate(values), (np.concatenate(rows), np.concatenate(cols))),
                       shape=(len(source), len(source.gene_names)), dtype=np.float32)
