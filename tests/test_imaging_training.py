"""Imaging MAE pre-training: the loss falls, embeddings find the planted lesion, and the
shared checks (mesh agreement, exact resume) hold as they do for EHR."""
import numpy as np
import pytest

import helpers
from biofm_jax.train.embed import embed_split
from biofm_jax.train.metric_writer import read_metrics

SPEC_2D, SPEC_3D = "configs/imaging_mae.py:tiny", "configs/imaging_mae3d.py:tiny"


def train_curve(spec, workdir, **overrides):
  config = helpers.config_for(spec, train__log_every=10, train__eval_every=100, checkpoint__every_steps=1000,
                              **overrides)
  helpers.train(config, workdir)
  records = read_metrics(workdir)
  return (config, [r["train/loss"] for r in records if "train/loss" in r],
          [r["eval/loss"] for r in records if "eval/loss" in r])


@pytest.mark.parametrize("spec, device", [(SPEC_2D, False), (SPEC_3D, False), (SPEC_2D, True)])
def test_mae_reconstruction_loss_falls(spec, device, tmp_path):
  """Also with the crop, flips and jitter inside the train step (`augment="device"`), from
  canvases larger than the model's images (so the step must crop and resize them)."""
  on_device = {"data__imaging__augment": "device", "data__imaging__canvas_size": (40, 40)} if device else {}
  _, train, evals = train_curve(spec, tmp_path, train__num_steps=200, **on_device)
  print(f"{spec}: train loss {train[0]:.3f} -> {train[-1]:.3f}, held-out {evals}")
  # A constant prediction of normalised pixels scores 1.0; the model must do clearly better.
  assert train[-1] < 0.8 * train[0] and evals[-1] < 0.8
  assert evals[-1] < evals[0]


def test_linear_probe_on_mae_embeddings_finds_the_lesion(tmp_path):
  config, data, setup, params, _ = helpers.pretrain_and_restore(SPEC_2D, tmp_path, train__num_steps=300,
                                                                 data__imaging__synthetic_subjects=300)
  lesion = list(data.dataset.label_names).index("lesion")

  def embeddings_and_labels(splits, weights):
    x = np.concatenate([embed_split(setup, weights, data, s, batch_size=config.data.batch_size) for s in splits])
    y = np.concatenate([data.source(s).labels[:, lesion] for s in splits])
    return x, y

  train_x, train_y = embeddings_and_labels(["train"], params)
  test_x, test_y = embeddings_and_labels(["tuning", "held_out"], params)
  assert train_x.shape == (len(train_y), config.model.embed_dim) and np.isfinite(train_x).all()
  auroc = helpers.probe_auroc(train_x, train_y, test_x, test_y)
  untrained = helpers.params_at_init(setup, config)
  at_init = helpers.probe_auroc(*embeddings_and_labels(["train"], untrained),
                                *embeddings_and_labels(["tuning", "held_out"], untrained))
  print(f"lesion AUROC of a linear probe on MAE embeddings: {auroc:.3f} ({len(test_y)} held-out images), "
        f"at initialisation {at_init:.3f}")
  assert auroc > 0.75
  # Seen: 0.895 against 0.886 at initialisation. A bright planted lesion is found by random
  # patch features too, so this task cannot yet show what MAE adds; it does show that
  # pre-training keeps what the untrained encoder sees.
  assert auroc > at_init - 0.03


@pytest.mark.devices(8)  # a mesh of up to 8 devices (tests/conftest.py)
@pytest.mark.parametrize("spec", [SPEC_2D, SPEC_3D])
def test_sharded_training_agrees_across_meshes(spec, tmp_path_factory):
  runs = helpers.train_on_meshes(spec, [(8, 1, 1), (2, 2, 2)], tmp_path_factory.mktemp,
                                 **helpers.constant_lr_overrides(8))
  helpers.assert_runs_agree(runs, atol=1e-5)


def test_resume_reproduces_the_uninterrupted_run(tmp_path):
  helpers.assert_resume_reproduces(SPEC_2D, tmp_path / "resumed", stop_at=6, num_steps=12)
