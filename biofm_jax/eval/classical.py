"""Classical baselines every evaluation report runs next to the foundation model.

Simple models match biomedical foundation models on their own benchmarks (EHRSHOT:
count-of-codes features with logistic regression or gradient boosting vs CLMBR; L1
logistic regression on expression vs scGPT on cell-type annotation), so a report
without them cannot say what pre-training bought. Each modality's features for them come
from its own folder (its registry row's `baseline`: EHR's count-of-codes features are
`modalities/ehr/baseline.py`). This module owns:

- `fit_predict`: the baseline models (`MODELS`) for binary, multiclass, regression
  and survival labels, returning test predictions in one format per task.
- `few_shot_sweep`: k labelled examples per class (`data/labels.few_shot_indices`) over several
  seeds, with any method (a foundation-model probe too) plugged in as a callable.
"""
from __future__ import annotations

from typing import Callable, Mapping, Sequence

import numpy as np
import pandas as pd
import scipy.optimize
import scipy.sparse as sp
from sklearn.ensemble import HistGradientBoostingClassifier, HistGradientBoostingRegressor
from sklearn.linear_model import LogisticRegression, Ridge
from sklearn.multiclass import OneVsRestClassifier
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import FunctionTransformer, StandardScaler

from biofm_jax.data.labels import few_shot_indices
from lifelines import CoxPHFitter
from lifelines.exceptions import ConvergenceError

MODELS = ("logistic", "l1_logistic", "gbm")
TASK_TYPES = ("binary", "multiclass", "regression", "survival")
SUPPORTED_TASKS = {
    "logistic": TASK_TYPES,
    "l1_logistic": ("binary", "multiclass"),  # a classifier only, as in the scGPT comparison
    "gbm": ("binary", "multiclass", "regression"),
}

LOGISTIC_C = 1.0
# sklearn's default. Smaller C (e.g. 0.1) zeroes every weight in the few-shot regime
# (liblinear's loss is summed, not averaged, over a handful of rows), flattening it to chance.
L1_LOGISTIC_C = 1.0
RIDGE_ALPHA = 1.0
COX_PENALIZER = 0.1
# lifelines' Newton steps build a [V, V] Hessian and stall on wide, collinear count
# features; above this width (or on its ConvergenceError) the same penalised partial
# likelihood is maximised by L-BFGS instead.
MAX_LIFELINES_FEATURES = 200
GBM_MAX_ITER = 200
GBM_LEARNING_RATE = 0.05
GBM_MIN_SAMPLES_LEAF = 20  # sklearn's default, used once the training set is large enough
DEFAULT_KS = (1, 2, 4, 8, 16, 32, 64, 128)


def fit_predict(model: str, task_type: str, train_x, train_y, test_x, *, seed: int = 0,
                num_classes: int | None = None) -> np.ndarray:
  """Fit baseline `model` on (train_x, train_y) and predict test_x.

  Returns binary: [N] P(class 1); multiclass: [N, C] probabilities for classes
  0..C-1, C = `num_classes` or max train label + 1, zero columns for classes absent
  from train; regression: [N]; survival: [N] risk score, higher = earlier event, with
  train_y a dict {"time": [N], "event": [N]}. x may be dense or scipy sparse.
  """
  check_supported(model, task_type)
  if task_type == "survival":
    return _cox_risk(train_x, train_y, test_x)
  if task_type == "regression":
    regressor = _regressor(model, train_x.shape[0], seed)
    regressor.fit(_for_model(model, train_x), np.asarray(train_y, np.float64))
    return regressor.predict(_for_model(model, test_x))
  labels = _classification_labels(model, task_type, train_y)
  classifier = _classifier(model, task_type, len(labels), seed)
  classifier.fit(_for_model(model, train_x), labels)
  width = 2 if task_type == "binary" else (num_classes or int(labels.max()) + 1)
  if width <= labels.max():
    raise ValueError(f"num_classes={num_classes} but train_y has label {labels.max()}")
  probs = np.zeros((test_x.shape[0], width))
  probs[:, classifier.classes_] = classifier.predict_proba(_for_model(model, test_x))
  return probs[:, 1] if task_type == "binary" else probs


def check_supported(model: str, task_type: str) -> None:
  """ValueError unless `model` is a known baseline that handles `task_type`."""
  if model not in SUPPORTED_TASKS:
    raise ValueError(f"unknown baseline model {model!r}; expected one of {MODELS}")
  if task_type not in TASK_TYPES:
    raise ValueError(f"unknown task type {task_type!r}; expected one of {TASK_TYPES}")
  if task_type not in SUPPORTED_TASKS[model]:
    raise ValueError(f"baseline model {model!r} does not support {task_type!r} tasks "
                     f"(supported: {SUPPORTED_TASKS[model]})")


def _classification_labels(model: str, task_type: str, train_y) -> np.ndarray:
  labels = np.asarray(train_y)
  if labels.dtype.kind not in "biu" or (labels.size and labels.min() < 0):
    raise ValueError(f"{model} {task_type} baseline needs non-negative integer labels, got {labels.dtype}")
  labels = labels.astype(np.int64)
  present = np.unique(labels)
  if len(present) < 2:
    raise ValueError(f"{model} {task_type} baseline needs at least two classes in train_y, got {present}")
  if task_type == "binary" and present.max() > 1:
    raise ValueError(f"{model} binary baseline needs labels in {{0, 1}}, got {present}")
  return labels


def _for_model(model: str, x):
  """gbm needs dense input; the linear models keep sparse counts sparse."""
  return _dense(x) if model == "gbm" else x


def _dense(x) -> np.ndarray:
  return x.toarray() if sp.issparse(x) else np.asarray(x)


def _log1p(x):
  return x.log1p() if sp.issparse(x) else np.log1p(x)


def _gbm_min_samples_leaf(num_train: int) -> int:
  # sklearn's 20 would forbid every split below 40 rows, so few-shot gbm would only ever
  # predict the prior; a tenth of the rows (at least 1) lets it split at k=1 per class.
  return max(1, min(GBM_MIN_SAMPLES_LEAF, num_train // 10))


def _gbm_options(num_train: int, seed: int) -> dict:
  return dict(max_iter=GBM_MAX_ITER, learning_rate=GBM_LEARNING_RATE, early_stopping=False,
              min_samples_leaf=_gbm_min_samples_leaf(num_train), random_state=seed)


def _classifier(model: str, task_type: str, num_train: int, seed: int):
  if model == "logistic":
    # with_mean=False keeps sparse input sparse; a zero-variance column (always, with a
    # single row) gets scale 1, not a division by zero.
    return make_pipeline(StandardScaler(with_mean=False),
                         LogisticRegression(C=LOGISTIC_C, max_iter=2000, random_state=seed))
  if model == "l1_logistic":
    # liblinear solves L1 exactly but only two classes at a time: multiclass is one-vs-rest,
    # as liblinear's multiclass mode was in older scikit-learn.
    l1 = LogisticRegression(C=L1_LOGISTIC_C, l1_ratio=1.0, solver="liblinear", max_iter=2000, random_state=seed)
    return make_pipeline(FunctionTransformer(_log1p, accept_sparse=True),
                         OneVsRestClassifier(l1) if task_type == "multiclass" else l1)
  return HistGradientBoostingClassifier(**_gbm_options(num_train, seed))


def _regressor(model: str, num_train: int, seed: int):
  if model == "logistic":
    return make_pipeline(StandardScaler(with_mean=False), Ridge(alpha=RIDGE_ALPHA))
  return HistGradientBoostingRegressor(**_gbm_options(num_train, seed))


def _cox_risk(train_x, train_y: Mapping, test_x) -> np.ndarray:
  """Log partial hazard of an L2-penalised Cox model on standardised features."""
  time = np.asarray(train_y["time"], np.float64)
  event = np.asarray(train_y["event"]).astype(bool)
  if len(time) < 2 or not event.any():
    raise ValueError("logistic survival baseline needs at least two training rows and one event")
  train, test = _dense(train_x).astype(np.float64), _dense(test_x).astype(np.float64)
  mean, std = train.mean(0), train.std(0, ddof=1)  # ddof=1: lifelines' own scaling, so both fits agree
  keep = std > 0  # constant columns carry no information and make the Hessian singular
  if not keep.any():
    return np.zeros(len(test))
  train_z = (train[:, keep] - mean[keep]) / std[keep]
  test_z = (test[:, keep] - mean[keep]) / std[keep]
  if keep.sum() <= MAX_LIFELINES_FEATURES:
    beta = _lifelines_cox_beta(train_z, time, event)
    if beta is not None:
      return test_z @ beta
  return test_z @ penalized_cox_beta(train_z, time, event, COX_PENALIZER)


def _lifelines_cox_beta(x: np.ndarray, time: np.ndarray, event: np.ndarray) -> np.ndarray | None:
  """lifelines' CoxPHFitter coefficients (Efron ties), or None when Newton fails to converge."""

  frame = pd.DataFrame(x, columns=[f"x{i}" for i in range(x.shape[1])])
  frame["time"], frame["event"] = time, event
  try:
    fitter = CoxPHFitter(penalizer=COX_PENALIZER).fit(frame, duration_col="time", event_col="event")
  except ConvergenceError:
    return None
  return fitter.params_.to_numpy()


def penalized_cox_beta(x: np.ndarray, time: np.ndarray, event: np.ndarray, penalizer: float) -> np.ndarray:
  """argmax of mean Breslow partial log-likelihood - penalizer/2 ||beta||^2, by L-BFGS.

  The objective is lifelines' for `penalizer` with l1_ratio=0 (identical when no event
  times tie); it is strictly convex, so L-BFGS reaches the unique optimum at any width.
  """
  order = np.argsort(-time, kind="stable")
  x, time, event = x[order], time[order], event[order].astype(np.float64)
  # rows sorted by time, descending: row i's risk set (time >= time_i) is rows 0..tie_end[i]
  tie_end = np.searchsorted(-time, -time, side="right") - 1
  result = scipy.optimize.minimize(_cox_objective, np.zeros(x.shape[1]), args=(x, event, tie_end, penalizer),
                                   jac=True, method="L-BFGS-B", options={"maxiter": 2000, "gtol": 1e-9})
  return result.x


def _cox_objective(beta, x, event, tie_end, penalizer):
  eta = x @ beta
  exp_eta = np.exp(eta - eta.max())  # shifted: the shift cancels in eta - log(risk)
  risk = np.cumsum(exp_eta)[tie_end]
  loglik = (event * (eta - eta.max() - np.log(risk))).sum()
  # each event j spreads 1/risk_j over its risk set; a reversed cumsum gathers it per row
  spread = np.zeros(len(eta))
  np.add.at(spread, tie_end[event > 0], 1.0 / risk[event > 0])
  row_weight = exp_eta * np.cumsum(spread[::-1])[::-1]
  grad_loglik = x.T @ (event - row_weight)
  n = len(eta)
  return -loglik / n + 0.5 * penalizer * beta @ beta, -grad_loglik / n + penalizer * beta


def few_shot_sweep(fit_predict_fns: Mapping[str, Callable[[np.ndarray], np.ndarray]], train_labels: np.ndarray,
                   test_score_fn: Callable[[np.ndarray], float], *, ks: Sequence[int] = DEFAULT_KS,
                   seeds: Sequence[int] = (0, 1, 2)) -> dict:
  """Test scores of every method trained on k labelled examples per class, per seed.

  `fit_predict_fns[name](train_indices)` trains on those rows of the training split
  and returns test predictions; `test_score_fn` scores them. ks above the smallest
  class's size are dropped: there every class would be used whole and the point would
  repeat the largest kept k rather than measure k examples per class.
  Returns {"k": [...], "seeds": [...], "methods": {name: {"mean": [per k],
  "std": [per k] (population, over seeds), "runs": [[per seed] per k]}}}.
  """
  _, class_sizes = np.unique(np.asarray(train_labels), return_counts=True)
  kept = [k for k in ks if k <= class_sizes.min()] if len(class_sizes) else []
  methods = {name: {"mean": [], "std": [], "runs": []} for name in fit_predict_fns}
  for k in kept:
    draws = [few_shot_indices(train_labels, k, seed) for seed in seeds]
    for name, fn in fit_predict_fns.items():
      runs = [float(test_score_fn(fn(indices))) for indices in draws]
      methods[name]["runs"].append(runs)
      methods[name]["mean"].append(float(np.mean(runs)))
      methods[name]["std"].append(float(np.std(runs)))
  return {"k": list(kept), "seeds": list(seeds), "methods": methods}
