"""The tabular modality's raw-feature baseline: the features a logistic regression is given."""
from __future__ import annotations

import numpy as np


def table_features(train_source, source) -> np.ndarray:
  """[rows, F + F + categories]: numeric values (NaN -> training mean), missingness
  indicators, and one-hot categories seen in training."""
  means = np.nanmean(np.where(np.isfinite(train_source.numeric), train_source.numeric, np.nan), axis=0)
  means = np.where(np.isfinite(means), means, 0.0)
  numeric = np.asarray(source.numeric, np.float64)
  missing = ~np.isfinite(numeric)
  parts = [np.where(missing, means, numeric), missing.astype(np.float64)]
  for j in range(train_source.categorical.shape[1]):
    seen = sorted({str(v) for v in train_source.categorical[:, j] if _present(v)})
    values = np.array([str(v) if _present(v) else "" for v in source.categorical[:, j]], dtype=object)
    parts.append(np.stack([values == c for c in seen], axis=1).astype(np.float64) if seen
                 else np.zeros((len(values), 0)))
  return np.concatenate(parts, axis=1)


def _present(value) -> bool:
  return value is not None and not (isinstance(value, float) and np.isnan(value)) and str(value) != ""
