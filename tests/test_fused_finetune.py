"""The fused patient model downstream: fine-tuned on a labels table keyed by subject, every
subject scored from whichever modalities it has (HAIM's setting), through the same entry
as every other fine-tuning run."""
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import helpers
from biofm_jax.config import load_config
from biofm_jax.eval.finetuned import predict_finetuned, score_finetuned
from biofm_jax.train.finetune import finetune, finetune_config, open_labeled_data

FINETUNE = str(helpers.REPO / "configs" / "finetune.py")


@pytest.fixture(scope="module")
def fused_run(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("fused")
  helpers.train(helpers.config_for("configs/multimodal_fusion.py:tiny", train__num_steps=20, train__eval_every=0,
                                   checkpoint__every_steps=20), workdir)
  return workdir


def latents(run) -> pd.DataFrame:
  return pd.read_csv(next((run / "artifacts").rglob("latents.csv")))


def write_subject_labels(path, subject_ids, values, **extra):
  """A subject-level labels table: subject_id and boolean_value, no prediction_time."""
  pq.write_table(pa.table({"subject_id": pa.array(np.asarray(subject_ids, np.int64)),
                           "boolean_value": pa.array(np.asarray(values, bool)), **extra}), path)
  return path


def task_config(run, labels, **overrides):
  flat = {**helpers.QUIET, "task.labels": str(labels), **{k.replace("__", "."): v for k, v in overrides.items()}}
  return finetune_config(load_config(f"{FINETUNE}:binary,tiny", flat), run)


def test_the_fused_model_predicts_a_planted_outcome_for_every_subject_whatever_it_lacks(fused_run, tmp_path):
  truth = latents(fused_run)
  labels = write_subject_labels(tmp_path / "outcome.parquet", truth["subject_id"], truth["outcome"])
  config = task_config(fused_run, labels)
  finetune(config, tmp_path / "ft")
  scores = score_finetuned(tmp_path / "ft", config)
  # Seen: held-out AUROC 0.80 and tuning 0.90 on 40 subjects each (heart failure or death,
  # from a 20-step fused model and 60 fine-tuning steps).
  assert scores["held_out"]["auroc"] > 0.65 and scores["tuning"]["auroc"] > 0.65, scores
  data, predicted = predict_finetuned(tmp_path / "ft", config)
  assert data.embedding_output == ("fused", "embedding")
  for split in ("tuning", "held_out"):
    rows = data.split_labels(split)
    in_split = truth[truth["split"] == split]
    # Every labelled subject of the split is scored, those missing modalities included.
    assert sorted(rows.subject_ids.tolist()) == sorted(in_split["subject_id"].tolist())
    assert np.isfinite(predicted[split]).all()
    lacking = in_split[(in_split[["has_ehr", "has_imaging", "has_omics", "has_tabular"]] == 0).any(axis=1)]
    assert len(lacking) > 0 and set(lacking["subject_id"]) <= set(rows.subject_ids.tolist())
    # Each row's target is its subject's outcome.
    outcome = dict(zip(truth["subject_id"], truth["outcome"].astype(float)))
    assert rows.targets["label"].tolist() == [outcome[s] for s in rows.subject_ids.tolist()]


def test_subject_labels_the_join_cannot_use_are_one_line_errors(fused_run, tmp_path):
  truth = latents(fused_run)
  ids = truth["subject_id"].to_numpy()
  twice = write_subject_labels(tmp_path / "twice.parquet", np.concatenate([ids, ids[:1]]),
                               np.zeros(len(ids) + 1, bool))
  with pytest.raises(ValueError, match=rf"subject_id {ids[0]} has 2 rows; subject-level labels take one row"):
    open_labeled_data(task_config(fused_run, twice), tmp_path / "a")
  timed = write_subject_labels(tmp_path / "timed.parquet", ids, truth["outcome"],
                               prediction_time=pa.array(np.full(len(ids), np.datetime64("2020-01-01", "us"))))
  with pytest.raises(ValueError, match="row 0 has a prediction_time; subject-level labels over multimodal data"):
    open_labeled_data(task_config(fused_run, timed), tmp_path / "b")
  with pytest.raises(ValueError, match="config.task.labels is empty: a fused model is fine-tuned on a labels table"):
    open_labeled_data(task_config(fused_run, ""), tmp_path / "c")
  one_class = write_subject_labels(tmp_path / "one_class.parquet", ids, np.zeros(len(ids), bool))
  with pytest.raises(ValueError, match=r"column 'boolean_value' has one class \(False\) in the training split"):
    open_labeled_data(task_config(fused_run, one_class), tmp_path / "d")


def test_fused_fine_tuning_examples_meet_the_step_with_image_augmentation_on_the_device(tmp_path):
  """Training examples without masking, as the join yields them with `augment="device"`
  (canvas images and seeds), match the spec the step is compiled for, and the device
  transform turns them into the examples the model reads."""
  import grain
  from biofm_jax.data.labels import read_labels
  from biofm_jax.data.record_task import RecordTaskData
  from biofm_jax.modalities import registry
  config = helpers.config_for("configs/multimodal_fusion.py:tiny", data__imaging__augment="device",
                              data__imaging__canvas_size=(40, 40))
  joined = registry.open_multimodal_data(config.data, objectives=config.objective, artifacts_dir=tmp_path / "a",
                                         seed=0)
  truth = pd.read_csv(next((tmp_path / "a").rglob("latents.csv")))
  labels = write_subject_labels(tmp_path / "lesion.parquet", truth["subject_id"], truth["lesion"])
  task = RecordTaskData.from_subject_labels(joined, read_labels(labels, {"type": "binary"}))
  spec = task.train_example_spec()
  assert spec["imaging"]["image"][0] == (40, 40, 1) and "augment_seed" in spec["imaging"]
  assert not {"visible_patches", "masked_patches"} & set(spec["imaging"])
  rng = np.random.default_rng(0)
  examples = []
  for i in range(4):
    x = task.source("train")[i]
    for transform in task.transforms(train=True):
      x = transform.random_map(x, rng) if isinstance(transform, grain.transforms.RandomMap) else transform.map(x)
    examples.append(x)
  for modality, fields in spec.items():
    for name, (shape, dtype) in fields.items():
      assert examples[0][modality][name].shape == tuple(shape), (modality, name)
  stacked = {m: {k: np.stack([e[m][k] for e in examples]) for k in spec[m]} for m in spec}
  augmented = task.device_transform()(stacked)
  for name, (shape, _) in task.example_spec()["imaging"].items():
    assert augmented["imaging"][name].shape[1:] == tuple(shape), name
