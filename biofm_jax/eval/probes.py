"""Linear probes: how much of a label a frozen embedding holds, by logistic regression.

The probe standardises features with training-split statistics and fits scikit-learn's
L2 logistic regression; the score is the AUROC on held-out records.
"""
from __future__ import annotations

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler


def linear_probe_auroc(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray,
                       *, regularization: float = 1.0) -> float:
  """AUROC on (test_x, test_y) of a logistic regression fitted on (train_x, train_y)."""
  for name, y in (("train", train_y), ("test", test_y)):
    if len(np.unique(y)) != 2:
      raise ValueError(f"linear probe needs both classes in the {name} labels, got {np.unique(y)}")
  probe = make_pipeline(StandardScaler(), LogisticRegression(C=regularization, max_iter=2000))
  probe.fit(train_x, train_y)
  return float(roc_auc_score(test_y, probe.predict_proba(test_x)[:, 1]))


def linear_probe_accuracy(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray,
                          *, regularization: float = 1.0) -> float:
  """Held-out accuracy of a multinomial logistic regression (e.g. cell types)."""
  probe = make_pipeline(StandardScaler(), LogisticRegression(C=regularization, max_iter=2000))
  probe.fit(train_x, train_y)
  return float((probe.predict(test_x) == test_y).mean())
