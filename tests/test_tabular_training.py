"""Tabular masked-feature pre-training: the loss falls, embeddings keep the label, and
the shared checks (mesh agreement, exact resume) hold as for the other modalities."""
import csv

import numpy as np
import pytest

import helpers
from biofm_jax.train.embed import embed_split

SPEC = "configs/tabular_features.py:tiny"


def train_and_embed(workdir, label: str, **overrides):
  """Pre-trains, then returns (train x, train y, test x, test y, raw-feature splits, metrics)."""
  config, data, setup, params, metrics = helpers.pretrain_and_restore(SPEC, workdir, **overrides)
  column = list(data.dataset.label_columns).index(label)

  def split_arrays(splits, weights=params):
    x = np.concatenate([embed_split(setup, weights, data, s, batch_size=config.data.batch_size) for s in splits])
    y = np.concatenate([data.source(s).labels[:, column] for s in splits])
    raw = np.concatenate([np.stack([data.source(s)[i]["numeric"] for i in range(len(data.source(s)))])
                          for s in splits])
    return x, y, raw

  untrained = helpers.params_at_init(setup, config)
  at_init = helpers.probe_auroc(*split_arrays(["train"], untrained)[:2], *split_arrays(["tuning", "held_out"], untrained)[:2])
  return split_arrays(["train"]), split_arrays(["tuning", "held_out"]), metrics, at_init


def write_breast_cancer_csv(path):
  from sklearn.datasets import load_breast_cancer
  data = load_breast_cancer()
  with open(path, "w", newline="") as f:
    writer = csv.writer(f)
    writer.writerow(["subject_id", *data.feature_names, "diagnosis"])
    for i, (row, target) in enumerate(zip(data.data, data.target)):
      writer.writerow([f"case{i:04d}", *row, int(target)])
  return path


def test_breast_cancer_probe_is_close_to_logistic_regression_on_raw_features(tmp_path):
  path = write_breast_cancer_csv(tmp_path / "breast_cancer.csv")
  (train_x, train_y, train_raw), (test_x, test_y, test_raw), metrics, at_init = train_and_embed(
      tmp_path / "run", "diagnosis", data__tabular__path=str(path), data__tabular__label_columns=("diagnosis",),
      train__num_steps=300)
  assert train_raw.shape[1] == 30 and train_x.shape[0] == len(train_y)
  losses = [r["train/loss"] for r in metrics if "train/loss" in r]
  assert losses[-1] < 0.7 * losses[0]
  probe = helpers.probe_auroc(train_x, train_y, test_x, test_y)
  raw = helpers.probe_auroc(train_raw, train_y, test_raw, test_y)
  print(f"breast cancer ({len(test_y)} held-out cases): probe on embeddings AUROC {probe:.3f}, "
        f"logistic regression on the 30 raw features AUROC {raw:.3f}, probe at initialisation {at_init:.3f}")
  assert probe > raw - 0.05
  assert probe > at_init - 0.02  # seen: 0.980 against 0.985 at initialisation, 0.984 on raw features


def test_synthetic_radiomics_loss_falls_and_embeddings_keep_the_label(tmp_path):
  (train_x, train_y, _), (test_x, test_y, _), metrics, at_init = train_and_embed(tmp_path, "malignant",
                                                                                  train__num_steps=200)
  losses = [r["train/loss"] for r in metrics if "train/loss" in r]
  evals = [r["eval/loss"] for r in metrics if "eval/loss" in r]
  print(f"synthetic table: train loss {losses[0]:.3f} -> {losses[-1]:.3f}, held-out {evals}")
  # The held-out loss is measured from step 100 on; the untrained loss is the first train loss.
  assert losses[-1] < 0.8 * losses[0] and evals[-1] < 0.8 * losses[0]
  auroc = helpers.probe_auroc(train_x, train_y, test_x, test_y)
  print(f"synthetic table: 'malignant' AUROC of a linear probe on embeddings {auroc:.3f}, at initialisation {at_init:.3f}")
  assert auroc > 0.7
  # Seen: 0.806 against 0.822 at initialisation: masked-feature pre-training does not yet add
  # to what random column embeddings keep of this label; it must not lose it either.
  assert auroc > at_init - 0.05


@pytest.mark.devices(8)  # a mesh of up to 8 devices (tests/conftest.py)
def test_sharded_training_agrees_across_meshes(tmp_path_factory):
  runs = helpers.train_on_meshes(SPEC, [(8, 1, 1), (2, 2, 2)], tmp_path_factory.mktemp,
                                 **helpers.constant_lr_overrides(8))
  helpers.assert_runs_agree(runs, atol=1e-5)


def test_resume_reproduces_the_uninterrupted_run(tmp_path):
  helpers.assert_resume_reproduces(SPEC, tmp_path / "resumed", stop_at=6, num_steps=12)
