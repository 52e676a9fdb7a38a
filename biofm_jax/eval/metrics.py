"""Metrics of a downstream task's predictions: point estimates, bootstrap intervals, subgroups, curves.

This module owns how a task's predictions are scored, on plain numpy arrays. It computes
nothing itself that scikit-learn or lifelines already provide (AUROC, average precision,
Brier score, calibration bins, C-index, Kaplan-Meier); it chooses, guards and combines them.

Task types and their arrays (N rows):

  binary      targets {"label": [N] 0/1}               predictions [N] probability of class 1
  multiclass  targets {"label": [N] int class id}      predictions [N, C] class probabilities
  multilabel  targets {"label": [N, K] 0/1}            predictions [N, K] probabilities
  regression  targets {"label": [N] float}             predictions [N]
  survival    targets {"time": [N] float > 0 (days to event or censoring),
                       "event": [N] bool}              predictions [N] risk score (higher = earlier event)

A metric that is undefined on the data at hand (AUROC with a single class, Pearson of a
constant, C-index without a comparable pair) is NaN, never an exception, so that
bootstrap resamples and small subgroups can be scored without special cases.
"""
from __future__ import annotations

import warnings
from typing import Mapping

import numpy as np
from lifelines import KaplanMeierFitter
from lifelines.utils import concordance_index
from scipy.stats import pearsonr
from sklearn.calibration import calibration_curve
from sklearn import metrics as skm

from biofm_jax.data.batch import TASK_TYPES


_TARGET_FIELDS = {"binary": ("label",), "multiclass": ("label",), "multilabel": ("label",),
                  "regression": ("label",), "survival": ("time", "event")}
_PRIMARY_METRIC = {"binary": "auroc", "multiclass": "macro_auroc", "multilabel": "macro_auroc",
                   "regression": "r2", "survival": "c_index"}
# Counts and base rates describe the data, not the model: they get no interval.
_DESCRIPTIVE = ("n", "events", "prevalence")
ECE_BINS = 10
MISSING = "missing"


def primary_metric(task_type: str) -> str:
  """The metric a task's model comparisons are judged by (higher is better for all of them)."""
  _check_task_type(task_type)
  return _PRIMARY_METRIC[task_type]


def task_metrics(task_type: str, targets: Mapping[str, np.ndarray], predictions: np.ndarray) -> dict[str, float]:
  """All metrics of `task_type` for these targets and predictions (see the module docstring)."""
  targets, predictions = _validated(task_type, targets, predictions)
  with warnings.catch_warnings():
    # Degenerate inputs (one class, constant column) are reported as NaN, not warned about.
    warnings.simplefilter("ignore")
    return _METRICS[task_type](targets, predictions)


def bootstrap_intervals(task_type: str, targets: Mapping[str, np.ndarray], predictions: np.ndarray, *,
                        num_samples: int = 200, seed: int = 0, level: float = 0.95) -> dict[str, tuple[float, float]]:
  """Percentile intervals of every model metric, resampling rows with replacement.

  Resamples where a metric is NaN (e.g. a single class drawn) are left out of that metric's
  interval; a metric NaN in every resample gets (NaN, NaN).
  """
  targets, predictions = _validated(task_type, targets, predictions)
  if not 0 < level < 1:
    raise ValueError(f"level must be in (0, 1), got {level}")
  n = len(predictions)
  rng = np.random.default_rng(seed)
  draws: dict[str, list[float]] = {}
  for _ in range(num_samples):
    rows = rng.integers(0, n, size=n)
    sample = task_metrics(task_type, _take(targets, rows), predictions[rows])
    for name, value in sample.items():
      if name not in _DESCRIPTIVE:
        draws.setdefault(name, []).append(value)
  tail = 100 * (1 - level) / 2
  return {name: _percentile_interval(np.asarray(values, np.float64), tail) for name, values in draws.items()}


def auroc_with_interval(label: np.ndarray, scores: np.ndarray, *, num_samples: int = 200,
                        seed: int = 0) -> tuple[float, float, float]:
  """(AUROC, low, high) of binary scores: the value and its 95% bootstrap interval."""
  targets = {"label": np.asarray(label, np.float64)}
  scores = np.asarray(scores, np.float64)
  low, high = bootstrap_intervals("binary", targets, scores, num_samples=num_samples, seed=seed)["auroc"]
  return float(task_metrics("binary", targets, scores)["auroc"]), float(low), float(high)


def subgroup_metrics(task_type: str, targets: Mapping[str, np.ndarray], predictions: np.ndarray,
                     groups: Mapping[str, np.ndarray], *, min_size: int = 10) -> dict[str, dict[str, dict]]:
  """{column: {str(value): {"n": n, **task_metrics}}} for each value of each grouping column.

  None and NaN values form the group "missing". Groups of fewer than `min_size` rows get
  only {"n": n, "too_small": True}: their metrics would be noise.
  """
  targets, predictions = _validated(task_type, targets, predictions)
  n = len(predictions)
  result: dict[str, dict[str, dict]] = {}
  for column, values in groups.items():
    keys = np.array([group_key(v) for v in np.asarray(values, dtype=object).reshape(-1)], dtype=object)
    if len(keys) != n:
      raise ValueError(f"group column {column!r} has {len(keys)} rows, predictions have {n}")
    result[column] = {}
    for key in sorted(set(keys), key=lambda k: (k == MISSING, k)):
      rows = np.flatnonzero(keys == key)
      if len(rows) < min_size:
        result[column][key] = {"n": len(rows), "too_small": True}
      else:
        result[column][key] = {"n": len(rows), **task_metrics(task_type, _take(targets, rows), predictions[rows])}
  return result


def curves(task_type: str, targets: Mapping[str, np.ndarray], predictions: np.ndarray) -> dict:
  """Data for plots: ROC and calibration for binary tasks, Kaplan-Meier by risk tertile for survival.

  binary:   {"roc": (fpr, tpr), "calibration": (mean_predicted, fraction_positive)}
            (ROC is omitted when only one class is present: it is undefined)
  survival: {"km": {"low" | "mid" | "high": (timeline, survival_probability)}}
  others:   {}
  """
  targets, predictions = _validated(task_type, targets, predictions)
  if task_type == "binary":
    label = targets["label"]
    out = {}
    if _has_both_classes(label):
      fpr, tpr, _ = skm.roc_curve(label, predictions)
      out["roc"] = (fpr, tpr)
    fraction_positive, mean_predicted = calibration_curve(label, predictions, n_bins=ECE_BINS, strategy="uniform")
    out["calibration"] = (mean_predicted, fraction_positive)
    return out
  if task_type == "survival":
    return {"km": _km_by_risk_tertile(targets["time"], targets["event"], predictions)}
  return {}


# --- per-task metrics -------------------------------------------------------------------------------


def _binary_metrics(targets, prob):
  label = targets["label"]
  both = _has_both_classes(label)
  return {
      "auroc": float(skm.roc_auc_score(label, prob)) if both else float("nan"),
      "auprc": float(skm.average_precision_score(label, prob)) if both else float("nan"),
      "brier": float(skm.brier_score_loss(label, prob)),
      "ece": expected_calibration_error(label, prob),
      "prevalence": float(label.mean()),
      "n": len(label),
  }


def _multiclass_metrics(targets, prob):
  label = targets["label"]
  num_classes = prob.shape[1]
  return {
      "accuracy": float(skm.accuracy_score(label, prob.argmax(axis=1))),
      "balanced_accuracy": float(skm.balanced_accuracy_score(label, prob.argmax(axis=1))),
      # One-vs-rest AUROC per class, averaged over the classes that occur with both outcomes.
      "macro_auroc": _macro_over_defined_columns(skm.roc_auc_score, _one_hot(label, num_classes), prob),
      "log_loss": float(skm.log_loss(label, prob, labels=np.arange(num_classes))),
      "n": len(label),
  }


def _multilabel_metrics(targets, prob):
  label = targets["label"]
  return {
      "macro_auroc": _macro_over_defined_columns(skm.roc_auc_score, label, prob),
      "macro_auprc": _macro_over_defined_columns(skm.average_precision_score, label, prob),
      "n": len(label),
  }


def _regression_metrics(targets, pred):
  label = targets["label"]
  constant = np.ptp(label) == 0 or np.ptp(pred) == 0
  return {
      "mae": float(skm.mean_absolute_error(label, pred)),
      "rmse": float(skm.root_mean_squared_error(label, pred)),
      # R^2 of a constant target is undefined (sklearn would return 0 or 1 by convention).
      "r2": float(skm.r2_score(label, pred)) if np.ptp(label) > 0 else float("nan"),
      "pearson": float(pearsonr(label, pred)[0]) if not constant and len(label) > 1 else float("nan"),
      "n": len(label),
  }


def _survival_metrics(targets, risk):
  time, event = targets["time"], targets["event"]
  try:
    # lifelines scores predicted times (higher = later), so a risk score enters negated.
    c_index = float(concordance_index(time, -risk, event))
  except ZeroDivisionError:  # no comparable pair (e.g. no events)
    c_index = float("nan")
  return {"c_index": c_index, "n": len(time), "events": int(event.sum())}


_METRICS = {"binary": _binary_metrics, "multiclass": _multiclass_metrics, "multilabel": _multilabel_metrics,
            "regression": _regression_metrics, "survival": _survival_metrics}


def expected_calibration_error(label: np.ndarray, prob: np.ndarray, *, n_bins: int = ECE_BINS) -> float:
  """Bin-size-weighted mean |mean probability - fraction positive| over equal-width bins.

  The per-bin means come from sklearn's calibration_curve(strategy="uniform"); the bin
  weights use the same edges and assignment as sklearn does (np.searchsorted on the inner
  edges of linspace(0, 1, n_bins + 1)), so the two line up bin for bin over non-empty bins.
  """
  fraction_positive, mean_predicted = calibration_curve(label, prob, n_bins=n_bins, strategy="uniform")
  inner_edges = np.linspace(0.0, 1.0, n_bins + 1)[1:-1]
  counts = np.bincount(np.searchsorted(inner_edges, prob), minlength=n_bins)
  weights = counts[counts > 0] / len(prob)
  return float(np.sum(weights * np.abs(mean_predicted - fraction_positive)))


# --- helpers ----------------------------------------------------------------------------------------


def _check_task_type(task_type: str) -> None:
  if task_type not in TASK_TYPES:
    raise ValueError(f"unknown task type {task_type!r}; expected one of {TASK_TYPES}")


def _validated(task_type, targets, predictions):
  """Targets as numpy arrays of the right dtype, checked for presence and length against predictions."""
  _check_task_type(task_type)
  predictions = np.asarray(predictions, np.float64)
  n = len(predictions)
  expected_ndim = 2 if task_type in ("multiclass", "multilabel") else 1
  if predictions.ndim != expected_ndim:
    raise ValueError(f"{task_type} predictions must be {expected_ndim}-D, got shape {predictions.shape}")
  out = {}
  for field in _TARGET_FIELDS[task_type]:
    if field not in targets:
      raise ValueError(f"{task_type} targets need field {field!r}; got {sorted(targets)}")
    values = np.asarray(targets[field])
    if len(values) != n:
      raise ValueError(f"targets[{field!r}] has {len(values)} rows but predictions have {n}")
    out[field] = values
  if task_type == "multilabel" and out["label"].shape != predictions.shape:
    raise ValueError(f"targets['label'] shape {out['label'].shape} != predictions shape {predictions.shape}")
  if task_type == "survival":
    out["event"] = out["event"].astype(bool)
  if n == 0:
    raise ValueError("no rows to score")
  return out, predictions


def _take(targets, rows):
  return {field: values[rows] for field, values in targets.items()}


def _has_both_classes(label) -> bool:
  return len(np.unique(label)) == 2


def _one_hot(label, num_classes):
  return (np.asarray(label).reshape(-1, 1) == np.arange(num_classes)).astype(np.int64)


def _macro_over_defined_columns(score_fn, indicator, prob) -> float:
  """score_fn's macro average over the columns where both 0 and 1 occur; NaN when none does."""
  positives = indicator.sum(axis=0)
  defined = (positives > 0) & (positives < len(indicator))
  if not defined.any():
    return float("nan")
  return float(score_fn(indicator[:, defined], prob[:, defined], average="macro"))


def _percentile_interval(values, tail) -> tuple[float, float]:
  values = values[~np.isnan(values)]
  if len(values) == 0:
    return (float("nan"), float("nan"))
  lo, hi = np.percentile(values, [tail, 100 - tail])
  return (float(lo), float(hi))


def group_key(value) -> str:
  if value is None or (isinstance(value, (float, np.floating)) and np.isnan(value)):
    return MISSING
  return str(value)


def _km_by_risk_tertile(time, event, risk):
  """Kaplan-Meier survival of the lowest, middle and highest third of rows by predicted risk.

  Thirds are taken by rank, not by quantile value, so tied scores still give three
  non-empty groups of near-equal size.
  """
  order = np.argsort(risk, kind="stable")
  km = {}
  for name, rows in zip(("low", "mid", "high"), np.array_split(order, 3)):
    if len(rows) == 0:
      continue
    fitter = KaplanMeierFitter().fit(time[rows], event_observed=event[rows], label=name)
    survival = fitter.survival_function_
    km[name] = (survival.index.to_numpy(np.float64), survival.iloc[:, 0].to_numpy(np.float64))
  return km
