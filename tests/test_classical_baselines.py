"""Classical baselines: count-of-codes features, the baseline models and the few-shot sweep.

Every test runs on a synthetic EHR-like cohort with a planted signal: a few codes are
more frequent in records of the positive (or of each non-zero) class.
"""
from __future__ import annotations

from collections import Counter

import numpy as np
import pandas as pd
import pytest
from lifelines import CoxPHFitter
from lifelines.utils import concordance_index
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import r2_score, roc_auc_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from biofm_jax.data.labels import few_shot_indices
from biofm_jax.eval import classical as C
from biofm_jax.modalities.ehr.baseline import CodeCountFeaturizer

BACKGROUND_CODES = [f"ICD10/C{i:02d}" for i in range(30)] + [f"LAB/L{i:02d}" for i in range(20)]
SIGNAL_GROUPS = [["ICD10/C03", "LAB/L07", "ICD10/C11"], ["ICD10/C20", "LAB/L15", "LAB/L02"]]
NUM_TRAIN = 300


def make_record(rng, code_probs) -> dict:
  """A birth row (static: NaT time) followed by Poisson(30) timed events."""
  events = rng.choice(np.array(BACKGROUND_CODES, dtype=object), size=rng.poisson(30) + 1, p=code_probs)
  minutes = np.sort(rng.integers(0, 10 * 365 * 24 * 60, len(events)))
  times = np.datetime64("2010-01-01T00:00", "us") + minutes.astype("timedelta64[m]")
  values = np.where([c.startswith("LAB/") for c in events], rng.normal(size=len(events)), np.nan)
  return {"codes": np.concatenate([np.array(["MEDS_BIRTH"], dtype=object), events]),
          "times": np.concatenate([np.array(["NaT"], "datetime64[us]"), times]),
          "numeric_values": np.concatenate([[np.nan], values]).astype(np.float32)}


def make_cohort(num_records: int, num_classes: int, seed: int) -> tuple[list[dict], np.ndarray]:
  """Records whose class c > 0 makes the codes of SIGNAL_GROUPS[c - 1] three times as likely."""
  rng = np.random.default_rng(seed)
  base = rng.dirichlet(np.full(len(BACKGROUND_CODES), 5.0))
  labels = rng.integers(0, num_classes, num_records)
  records = []
  for label in labels:
    probs = base.copy()
    if label > 0:
      probs[[BACKGROUND_CODES.index(c) for c in SIGNAL_GROUPS[label - 1]]] *= 3.0
    records.append(make_record(rng, probs / probs.sum()))
  return records, labels


@pytest.fixture(scope="module")
def binary_cohort():
  records, labels = make_cohort(400, 2, seed=0)
  featurizer = CodeCountFeaturizer().fit(records[:NUM_TRAIN])
  return {"records": records, "featurizer": featurizer,
          "train_x": featurizer.transform(records[:NUM_TRAIN]), "train_y": labels[:NUM_TRAIN],
          "test_x": featurizer.transform(records[NUM_TRAIN:]), "test_y": labels[NUM_TRAIN:]}


def test_code_counts_match_a_counter_per_record(binary_cohort):
  featurizer, records = binary_cohort["featurizer"], binary_cohort["records"]
  assert featurizer.feature_names == sorted(set(np.concatenate([r["codes"] for r in records[:NUM_TRAIN]])))
  unseen_codes = np.array(["ICD10/UNSEEN"] * 3, dtype=object)
  unseen = dict(records[-1], codes=np.concatenate([records[-1]["codes"], unseen_codes]))
  checked = [records[0], records[1], records[NUM_TRAIN + 5], unseen]
  matrix = featurizer.transform(checked)
  assert matrix.dtype == np.float32 and matrix.shape == (4, len(featurizer.feature_names))
  for row, record in zip(matrix.toarray(), checked):
    counts = Counter(record["codes"])
    assert row.tolist() == [counts.get(code, 0) for code in featurizer.feature_names]
  assert "ICD10/UNSEEN" not in featurizer.feature_names


def test_min_count_keeps_codes_seen_often_enough(binary_cohort):
  train = binary_cohort["records"][:NUM_TRAIN]
  totals = Counter(np.concatenate([r["codes"] for r in train]))
  threshold = sorted(totals.values())[len(totals) // 2]
  featurizer = CodeCountFeaturizer(min_count=threshold).fit(train)
  assert featurizer.feature_names == sorted(code for code, n in totals.items() if n >= threshold)
  assert featurizer.transform(train).shape == (NUM_TRAIN, len(featurizer.feature_names))


def test_transform_before_fit_is_an_error(binary_cohort):
  with pytest.raises(ValueError, match="not fitted"):
    CodeCountFeaturizer().transform(binary_cohort["records"][:2])


def test_logistic_matches_an_independent_sklearn_pipeline(binary_cohort):
  b = binary_cohort
  predictions = C.fit_predict("logistic", "binary", b["train_x"], b["train_y"], b["test_x"])
  reference = make_pipeline(StandardScaler(with_mean=False), LogisticRegression(C=1.0, max_iter=2000))
  reference.fit(b["train_x"], b["train_y"])
  expected = roc_auc_score(b["test_y"], reference.predict_proba(b["test_x"])[:, 1])
  assert predictions.shape == (len(b["test_y"]),)
  assert abs(roc_auc_score(b["test_y"], predictions) - expected) < 1e-9
  assert expected > 0.8  # the planted signal is there to be found


@pytest.mark.parametrize("model, min_auroc", [("gbm", 0.75), ("l1_logistic", 0.75)])
def test_nonlinear_and_sparse_baselines_find_the_planted_signal(binary_cohort, model, min_auroc):
  b = binary_cohort
  predictions = C.fit_predict(model, "binary", b["train_x"], b["train_y"], b["test_x"], seed=0)
  assert ((predictions >= 0) & (predictions <= 1)).all()
  assert roc_auc_score(b["test_y"], predictions) > min_auroc


@pytest.mark.parametrize("model", C.MODELS)
def test_multiclass_probabilities_cover_classes_absent_from_train(model):
  records, labels = make_cohort(400, 3, seed=1)
  labels = np.where(labels == 2, 3, labels)  # class 2 never occurs: its column must be zeros
  featurizer = CodeCountFeaturizer().fit(records[:NUM_TRAIN])
  probs = C.fit_predict(model, "multiclass", featurizer.transform(records[:NUM_TRAIN]), labels[:NUM_TRAIN],
                        featurizer.transform(records[NUM_TRAIN:]))
  assert probs.shape == (100, 4)
  np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-6)  # float32 counts: float32-exact
  assert (probs[:, 2] == 0).all()
  assert (probs.argmax(axis=1) == labels[NUM_TRAIN:]).mean() > 0.5  # chance is 1/3


def test_ridge_recovers_a_planted_linear_signal(binary_cohort):
  b = binary_cohort
  weights = np.random.default_rng(2).normal(size=b["train_x"].shape[1])
  noise = np.random.default_rng(3).normal(scale=2.0, size=400)
  target = np.concatenate([b["train_x"] @ weights, b["test_x"] @ weights]) + noise
  predictions = C.fit_predict("logistic", "regression", b["train_x"], target[:NUM_TRAIN], b["test_x"])
  assert r2_score(target[NUM_TRAIN:], predictions) > 0.5


def planted_survival(x: np.ndarray, seed: int) -> dict:
  """Exponential event times with log hazard linear in the signal codes' counts, plus censoring."""
  rng = np.random.default_rng(seed)
  signal = x[:, :3].sum(axis=1)
  hazard = np.exp(1.5 * (signal - signal.mean()) / signal.std())
  event_time, censor_time = rng.exponential(1 / hazard), rng.exponential(2.0, len(x))
  return {"time": np.minimum(event_time, censor_time), "event": event_time <= censor_time}


@pytest.mark.parametrize("noise_columns", [0, 250])  # 250: wider than lifelines handles, L-BFGS fits
def test_cox_baseline_ranks_planted_hazards(binary_cohort, noise_columns):
  b, names = binary_cohort, binary_cohort["featurizer"].feature_names
  signal_first = [names.index(c) for c in SIGNAL_GROUPS[0]] + [i for i, c in enumerate(names)
                                                                if c not in SIGNAL_GROUPS[0]]
  x = np.concatenate([b["train_x"].toarray(), b["test_x"].toarray()])[:, signal_first]
  x = np.concatenate([x, np.random.default_rng(4).poisson(1.0, (len(x), noise_columns))], axis=1)
  outcome = planted_survival(x, seed=5)
  train_y = {key: value[:NUM_TRAIN] for key, value in outcome.items()}
  risk = C.fit_predict("logistic", "survival", x[:NUM_TRAIN], train_y, x[NUM_TRAIN:])
  assert risk.shape == (100,)
  # concordance_index expects predicted survival times: higher risk = shorter
  assert concordance_index(outcome["time"][NUM_TRAIN:], -risk, outcome["event"][NUM_TRAIN:]) > 0.65


def test_lbfgs_cox_fallback_solves_the_lifelines_problem():
  rng = np.random.default_rng(6)
  x = rng.normal(size=(200, 4))
  x = (x - x.mean(0)) / x.std(0, ddof=1)
  event_time = rng.exponential(1 / np.exp(x @ np.array([0.8, -0.5, 0.0, 0.3])))
  censor_time = rng.exponential(2.0, 200)
  time, event = np.minimum(event_time, censor_time), event_time <= censor_time
  frame = dict({f"x{i}": x[:, i] for i in range(4)}, time=time, event=event)
  lifelines_beta = CoxPHFitter(penalizer=0.1).fit(pd.DataFrame(frame), "time", "event").params_.to_numpy()
  np.testing.assert_allclose(C.penalized_cox_beta(x, time, event, 0.1), lifelines_beta, atol=1e-4)


def test_gbm_does_not_do_survival():
  x = np.zeros((4, 2))
  with pytest.raises(ValueError, match="'gbm'.*'survival'"):
    C.fit_predict("gbm", "survival", x, {"time": np.ones(4), "event": np.ones(4)}, x)


@pytest.mark.parametrize("model", C.MODELS)
def test_one_example_per_class_still_fits(binary_cohort, model):
  b = binary_cohort
  rows = few_shot_indices(b["train_y"], k=1, seed=0)
  predictions = C.fit_predict(model, "binary", b["train_x"][rows], b["train_y"][rows], b["test_x"])
  assert np.isfinite(predictions).all() and ((predictions >= 0) & (predictions <= 1)).all()


@pytest.mark.parametrize("model", C.MODELS)
def test_single_class_training_labels_are_rejected_by_name(binary_cohort, model):
  b = binary_cohort
  with pytest.raises(ValueError, match=f"{model} binary baseline needs at least two classes"):
    C.fit_predict(model, "binary", b["train_x"][:5], np.ones(5, int), b["test_x"])


def test_unknown_model_is_rejected(binary_cohort):
  b = binary_cohort
  with pytest.raises(ValueError, match="unknown baseline model 'svm'"):
    C.fit_predict("svm", "binary", b["train_x"], b["train_y"], b["test_x"])


def test_few_shot_indices_take_k_per_class_deterministically():
  labels = np.array([0] * 50 + [1] * 30 + [2] * 3)
  rows = few_shot_indices(labels, k=4, seed=7)
  assert np.bincount(labels[rows]).tolist() == [4, 4, 3]  # class 2 has only 3 rows: all of them
  assert (np.diff(rows) > 0).all()  # sorted, no repeats
  np.testing.assert_array_equal(rows, few_shot_indices(labels, k=4, seed=7))
  assert not np.array_equal(rows, few_shot_indices(labels, k=4, seed=8))
  assert set(few_shot_indices(labels, k=2, seed=7)) <= set(rows)  # nested in k for one seed


def test_sweep_drops_ks_that_some_class_cannot_supply():
  labels = np.array([0] * 5 + [1] * 3)
  result = C.few_shot_sweep({"count": len}, labels, float, ks=(1, 2, 4, 8), seeds=(0, 1))
  assert result["k"] == [1, 2] and result["seeds"] == [0, 1]
  assert result["methods"]["count"] == {"mean": [2.0, 4.0], "std": [0.0, 0.0], "runs": [[2.0, 2.0], [4.0, 4.0]]}


def test_logistic_few_shot_auroc_rises_with_k(binary_cohort):
  b = binary_cohort

  def logistic(rows):
    return C.fit_predict("logistic", "binary", b["train_x"][rows], b["train_y"][rows], b["test_x"])

  result = C.few_shot_sweep({"logistic": logistic}, b["train_y"], lambda p: roc_auc_score(b["test_y"], p),
                            ks=(1, 4, 16, 64), seeds=(0, 1, 2))
  curve = result["methods"]["logistic"]
  assert result["k"] == [1, 4, 16, 64]
  assert [len(runs) for runs in curve["runs"]] == [3] * 4
  assert curve["mean"][-1] > curve["mean"][0] + 0.1
