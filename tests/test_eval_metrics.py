"""Downstream-task metrics agree with independent scikit-learn/lifelines computations and behave sensibly."""
from __future__ import annotations

import numpy as np
import pytest
from lifelines import KaplanMeierFitter
from lifelines.utils import concordance_index
from scipy.stats import pearsonr
from sklearn import metrics as skm
from sklearn.calibration import calibration_curve

from biofm_jax.eval import metrics as M


def _binary(n, seed=0):
  rng = np.random.default_rng(seed)
  prob = rng.uniform(size=n)
  label = (rng.uniform(size=n) < prob).astype(np.int64)  # calibrated by construction
  return {"label": label}, prob


def _planted_survival(n, seed=0, censor_rate=0.0):
  """Exponential event times with rate exp(risk); optional independent exponential censoring."""
  rng = np.random.default_rng(seed)
  risk = rng.normal(scale=1.5, size=n)
  event_time = rng.exponential(1.0 / np.exp(risk))
  if censor_rate == 0.0:
    return {"time": event_time, "event": np.ones(n, bool)}, risk
  censor_time = rng.exponential(1.0 / censor_rate, size=n)
  return {"time": np.minimum(event_time, censor_time), "event": event_time <= censor_time}, risk


def test_binary_metrics_match_sklearn():
  targets, prob = _binary(500)
  got = M.task_metrics("binary", targets, prob)
  label = targets["label"]
  assert got["auroc"] == pytest.approx(skm.roc_auc_score(label, prob))
  assert got["auprc"] == pytest.approx(skm.average_precision_score(label, prob))
  assert got["brier"] == pytest.approx(skm.brier_score_loss(label, prob))
  assert got["prevalence"] == pytest.approx(label.mean())
  assert got["n"] == 500


def test_ece_matches_brute_force_binning():
  targets, prob = _binary(2000, seed=3)
  prob = prob ** 2  # miscalibrate so the value is not trivially near zero
  bins = np.clip((prob * 10).astype(int), 0, 9)
  # sklearn puts a probability exactly on an inner edge in the lower bin; none are on an edge here.
  expected = sum(np.mean(bins == b) * abs(prob[bins == b].mean() - targets["label"][bins == b].mean())
                 for b in range(10) if np.any(bins == b))
  assert M.task_metrics("binary", targets, prob)["ece"] == pytest.approx(expected)


def test_ece_small_when_calibrated_and_large_when_not():
  targets, prob = _binary(20000, seed=1)
  assert M.task_metrics("binary", targets, prob)["ece"] < 0.03
  overconfident = np.clip((prob - 0.5) * 3 + 0.5, 0, 1)
  assert M.task_metrics("binary", targets, overconfident)["ece"] > 0.1
  assert M.task_metrics("binary", targets, np.sqrt(prob))["ece"] > 0.1


def test_single_class_binary_gives_nan_auroc_without_error():
  got = M.task_metrics("binary", {"label": np.zeros(20, int)}, np.linspace(0, 1, 20))
  assert np.isnan(got["auroc"]) and np.isnan(got["auprc"])
  assert np.isfinite(got["brier"]) and np.isfinite(got["ece"])


def test_multiclass_metrics_match_sklearn():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(400, 4))
  prob = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
  label = rng.integers(0, 4, size=400)
  got = M.task_metrics("multiclass", {"label": label}, prob)
  assert got["accuracy"] == pytest.approx(skm.accuracy_score(label, prob.argmax(1)))
  assert got["balanced_accuracy"] == pytest.approx(skm.balanced_accuracy_score(label, prob.argmax(1)))
  assert got["macro_auroc"] == pytest.approx(skm.roc_auc_score(label, prob, multi_class="ovr", average="macro"))
  assert got["log_loss"] == pytest.approx(skm.log_loss(label, prob))
  # A class absent from the labels is left out of the macro average, not an error.
  present = label != 3
  got = M.task_metrics("multiclass", {"label": label[present]}, prob[present])
  expected = np.mean([skm.roc_auc_score(label[present] == c, prob[present, c]) for c in range(3)])
  assert got["macro_auroc"] == pytest.approx(expected)


def test_multilabel_metrics_skip_single_class_labels():
  rng = np.random.default_rng(0)
  prob = rng.uniform(size=(300, 3))
  label = (rng.uniform(size=(300, 3)) < prob).astype(int)
  label[:, 2] = 0
  got = M.task_metrics("multilabel", {"label": label}, prob)
  assert got["macro_auroc"] == pytest.approx(np.mean([skm.roc_auc_score(label[:, j], prob[:, j]) for j in (0, 1)]))
  assert got["macro_auprc"] == pytest.approx(
      np.mean([skm.average_precision_score(label[:, j], prob[:, j]) for j in (0, 1)]))


def test_regression_metrics_match_sklearn():
  rng = np.random.default_rng(0)
  y = rng.normal(size=300)
  pred = y + rng.normal(scale=0.5, size=300)
  got = M.task_metrics("regression", {"label": y}, pred)
  assert got["mae"] == pytest.approx(skm.mean_absolute_error(y, pred))
  assert got["rmse"] == pytest.approx(np.sqrt(skm.mean_squared_error(y, pred)))
  assert got["r2"] == pytest.approx(skm.r2_score(y, pred))
  assert got["pearson"] == pytest.approx(pearsonr(y, pred)[0])


def test_survival_c_index_matches_lifelines_and_finds_planted_hazard():
  targets, risk = _planted_survival(1000)
  got = M.task_metrics("survival", targets, risk)
  assert got["c_index"] == pytest.approx(concordance_index(targets["time"], -risk, targets["event"]))
  assert got["c_index"] > 0.7
  assert got["events"] == 1000 and got["n"] == 1000
  assert M.task_metrics("survival", targets, -risk)["c_index"] < 0.3


def test_survival_c_index_survives_heavy_censoring():
  targets, risk = _planted_survival(2000, seed=1, censor_rate=8.0)
  censored = 1 - targets["event"].mean()
  assert 0.7 < censored < 0.9
  assert M.task_metrics("survival", targets, risk)["c_index"] > 0.65


def test_unknown_task_and_mismatched_lengths_are_clear_errors():
  with pytest.raises(ValueError, match="unknown task type"):
    M.task_metrics("ranking", {"label": np.zeros(3)}, np.zeros(3))
  with pytest.raises(ValueError, match="'label'"):
    M.task_metrics("binary", {"label": np.zeros(4)}, np.zeros(3))
  with pytest.raises(ValueError, match="'event'"):
    M.task_metrics("survival", {"time": np.ones(3), "event": np.ones(2, bool)}, np.zeros(3))
  with pytest.raises(ValueError, match="'time'"):
    M.task_metrics("survival", {"event": np.ones(3, bool)}, np.zeros(3))


def test_primary_metric():
  assert [M.primary_metric(t) for t in M.TASK_TYPES] == ["auroc", "macro_auroc", "macro_auroc", "r2", "c_index"]


def test_bootstrap_contains_estimate_narrows_with_n_and_is_deterministic():
  small_targets, small_prob = _binary(200, seed=0)
  large_targets, large_prob = _binary(4000, seed=0)
  small = M.bootstrap_intervals("binary", small_targets, small_prob, num_samples=100)
  large = M.bootstrap_intervals("binary", large_targets, large_prob, num_samples=100)
  assert set(small) == {"auroc", "auprc", "brier", "ece"}
  point = M.task_metrics("binary", small_targets, small_prob)
  for name in ("auroc", "auprc", "brier"):
    lo, hi = small[name]
    assert lo <= point[name] <= hi
    assert large[name][1] - large[name][0] < (hi - lo) / 2
  assert small == M.bootstrap_intervals("binary", small_targets, small_prob, num_samples=100)
  assert small != M.bootstrap_intervals("binary", small_targets, small_prob, num_samples=100, seed=1)


def test_auroc_with_interval_is_the_report_s_auroc_and_its_bootstrap_interval():
  targets, prob = _binary(300, seed=2)
  value, low, high = M.auroc_with_interval(targets["label"], prob, num_samples=50, seed=3)
  assert value == M.task_metrics("binary", targets, prob)["auroc"] and low < value < high
  assert (low, high) == M.bootstrap_intervals("binary", targets, prob, num_samples=50, seed=3)["auroc"]


def test_bootstrap_ignores_nan_resamples():
  label = np.zeros(30, int)
  label[0] = 1  # many resamples miss the single positive: auroc NaN there
  prob = np.linspace(0, 1, 30)[::-1].copy()
  intervals = M.bootstrap_intervals("binary", {"label": label}, prob, num_samples=50)
  assert np.isfinite(intervals["auroc"]).all()
  survival = M.bootstrap_intervals("survival", *_planted_survival(300), num_samples=30)
  assert set(survival) == {"c_index"} and survival["c_index"][0] > 0.6


def test_subgroup_metrics_equal_metrics_on_the_subset():
  targets, prob = _binary(300, seed=2)
  sex = np.array(["F", "M"] * 150, dtype=object)
  site = np.array([1] * 295 + [2] * 5)
  age = np.where(np.arange(300) % 7 == 0, np.nan, 50.0)
  got = M.subgroup_metrics("binary", targets, prob, {"sex": sex, "site": site, "age": age})
  female = sex == "F"
  expected = M.task_metrics("binary", {"label": targets["label"][female]}, prob[female])
  assert got["sex"]["F"] == {"n": int(female.sum()), **expected}
  assert got["site"]["2"] == {"n": 5, "too_small": True}
  assert got["site"]["1"]["n"] == 295
  assert got["age"]["missing"]["n"] == int(np.isnan(age).sum())
  with_none = M.subgroup_metrics("binary", targets, prob, {"ward": np.array([None, "a"] * 150, dtype=object)})
  assert set(with_none["ward"]) == {"a", "missing"}


def test_single_class_subgroup_gives_nan_auroc():
  targets, prob = _binary(100, seed=0)
  group = np.where(targets["label"] == 1, "cases", "controls")
  got = M.subgroup_metrics("binary", targets, prob, {"g": group})
  assert np.isnan(got["g"]["cases"]["auroc"]) and np.isnan(got["g"]["controls"]["auroc"])


def test_curves_binary_and_survival():
  targets, prob = _binary(500)
  got = M.curves("binary", targets, prob)
  fpr, tpr, _ = skm.roc_curve(targets["label"], prob)
  np.testing.assert_allclose(got["roc"][0], fpr)
  np.testing.assert_allclose(got["roc"][1], tpr)
  frac, mean_pred = calibration_curve(targets["label"], prob, n_bins=10)
  np.testing.assert_allclose(got["calibration"][0], mean_pred)
  np.testing.assert_allclose(got["calibration"][1], frac)

  s_targets, risk = _planted_survival(300)
  km = M.curves("survival", s_targets, risk)["km"]
  assert list(km) == ["low", "mid", "high"]
  low = np.argsort(risk)[:100]
  reference = KaplanMeierFitter().fit(s_targets["time"][low], s_targets["event"][low]).survival_function_
  np.testing.assert_allclose(km["low"][1], reference.iloc[:, 0].to_numpy())
  # Higher predicted risk should die sooner: median survival ordered low > mid > high.
  medians = [timeline[np.argmax(surv <= 0.5)] for timeline, surv in km.values()]
  assert medians[0] > medians[1] > medians[2]
  assert M.curves("regression", {"label": np.zeros(3)}, np.zeros(3)) == {}
