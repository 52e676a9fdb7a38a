"""Expression and feature-table models validated on their records' own labels, beside the
classical baseline of each modality (L1 logistic regression on normalised counts; logistic
regression on the raw features)."""
import json

import anndata
import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.multiclass import OneVsRestClassifier

import helpers
from biofm_jax.eval.downstream import EvaluationOptions
from biofm_jax.eval.record_tasks import evaluate_record_labels
from biofm_jax.train.loop import train_and_evaluate
from biofm_jax.train.runs import open_run

FAST = EvaluationOptions(few_shot_ks=(1, 4), few_shot_seeds=(0, 1), bootstrap_samples=50)


def pretrain(spec, workdir):
  train_and_evaluate(helpers.config_for(spec, train__num_steps=40, train__eval_every=40, checkpoint__every_steps=40),
                     workdir)
  return workdir


def test_expression_probe_is_reported_beside_l1_logistic_regression_on_normalised_counts(tmp_path):
  run = pretrain("configs/omics_expression.py:tiny", tmp_path / "omics")
  report = evaluate_record_labels(run, tmp_path / "report", "cell_type", FAST)
  saved = json.loads((tmp_path / "report" / "report.json").read_text())
  assert saved["task"]["type"] == "multiclass" and len(saved["task"]["classes"]) >= 3
  assert set(saved["baselines"]) == {"l1_logistic_expression"}
  assert saved["few_shot"]["k"] == [1, 4]
  assert "held_out" in saved and "macro_auroc" in saved["held_out"]
  assert report["summary"] and (tmp_path / "report" / "report.md").exists()

  # The baseline is what an independent scikit-learn pipeline gives on the same cells.
  _, data, _, _, _ = open_run(run)
  adata = anndata.read_h5ad(data.dataset.path)
  names = tuple(data.dataset.label_names)

  def split(name):
    source = data.source(name)
    x = np.asarray(adata.X[source.rows].todense() if hasattr(adata.X, "todense") else adata.X[source.rows],
                   np.float64)
    x = np.log1p((x * (1e4 / x.sum(1, keepdims=True))).astype(np.float32))
    return x, source.labels[:, names.index("cell_type")].astype(int)
  (x_train, y_train), (x_test, y_test) = split("train"), split("held_out")
  model = OneVsRestClassifier(LogisticRegression(C=1.0, l1_ratio=1.0, solver="liblinear", max_iter=2000,
                                                 random_state=0)).fit(x_train, y_train)
  independent = roc_auc_score(y_test, model.predict_proba(x_test), multi_class="ovr", average="macro")
  reported = saved["baselines"]["l1_logistic_expression"]["held_out"]["metrics"]["macro_auroc"]
  assert reported == pytest.approx(independent, abs=0.01)


def test_table_probe_is_reported_beside_logistic_regression_on_raw_features(tmp_path):
  run = pretrain("configs/tabular_features.py:tiny", tmp_path / "tabular")
  evaluate_record_labels(run, tmp_path / "report", "malignant", FAST)
  saved = json.loads((tmp_path / "report" / "report.json").read_text())
  assert saved["task"]["type"] == "binary"
  baseline = saved["baselines"]["logistic_raw_features"]
  assert baseline["held_out"]["metrics"]["auroc"] > 0.7  # the planted signal is in the raw features
  recomputed = helpers.binary_scores_in_predictions(tmp_path / "report", "probe", "held_out")
  assert recomputed["auroc"] == pytest.approx(saved["held_out"]["auroc"], abs=1e-9)
  assert saved["held_out"]["auroc"] > 0.7  # seen: 0.80 beside the raw features' 0.85
  assert (tmp_path / "report" / "roc.png").exists()
  with pytest.raises(ValueError, match="'diagnosis' is not among the run's label columns \\['malignant'\\]"):
    evaluate_record_labels(run, tmp_path / "other", "diagnosis", FAST)


@pytest.mark.parametrize("spec, column, baseline", [
    ("configs/imaging_mae.py:tiny", "lesion", "logistic_intensity_features"),
    ("configs/omics_sequence.py:tiny", "motif", "logistic_kmer_frequencies")], ids=["imaging", "sequence"])
def test_images_and_sequences_are_reported_beside_their_raw_feature_baselines(spec, column, baseline, tmp_path):
  run = pretrain(spec, tmp_path / "run")
  evaluate_record_labels(run, tmp_path / "report", column, FAST)
  saved = json.loads((tmp_path / "report" / "report.json").read_text())
  assert saved["task"]["type"] == "binary" and list(saved["baselines"]) == [baseline]
  for split in ("tuning", "held_out"):
    recomputed = helpers.binary_scores_in_predictions(tmp_path / "report", baseline, split)
    assert recomputed["auroc"] == pytest.approx(saved["baselines"][baseline][split]["metrics"]["auroc"], abs=1e-9)
  # Both planted signals are within the baselines' reach: a bright lesion, a motif's k-mers.
  assert saved["baselines"][baseline]["held_out"]["metrics"]["auroc"] > 0.7, saved["baselines"][baseline]
