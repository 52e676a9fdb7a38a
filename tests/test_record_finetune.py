"""Fine-tuning every record modality on a label column its records carry: the same entry,
task heads and adaptation modes as EHR fine-tuning, with no branch on the modality.

A 2D MAE model is fine-tuned on its planted lesion and must find it on held-out images;
each other record modality walks the same path (pre-train, fine-tune, score, predictions
keyed by record); bad label settings are one-line errors.
"""
import json
import subprocess
import sys

import numpy as np
import pyarrow.parquet as pq
import pytest
from sklearn.metrics import roc_auc_score

import helpers
from biofm_jax.config import load_config
from biofm_jax.eval.finetuned import predict_finetuned, score_finetuned
from biofm_jax.train.finetune import finetune, finetune_config, open_labeled_data

FINETUNE = str(helpers.REPO / "configs" / "finetune.py")


def pretrain(spec, workdir, steps, **overrides):
  config = helpers.config_for(spec, train__num_steps=steps, train__eval_every=0, checkpoint__every_steps=steps,
                              **overrides)
  helpers.train(config, workdir)
  return workdir


def task_config(pretrained, preset="binary,tiny", **overrides):
  flat = {**helpers.QUIET, **{k.replace("__", "."): v for k, v in overrides.items()}}
  return finetune_config(load_config(f"{FINETUNE}:{preset}", flat), pretrained)


@pytest.fixture(scope="module")
def mae_run(tmp_path_factory):
  return pretrain("configs/imaging_mae.py:tiny", tmp_path_factory.mktemp("mae"), 100,
                  data__imaging__synthetic_subjects=300)


def test_a_fine_tuned_mae_model_finds_the_planted_lesion_on_held_out_images(mae_run, tmp_path):
  config = task_config(mae_run, task__label_column="lesion", train__num_steps=120)
  assert config.task.name == "lesion"
  summary = finetune(config, tmp_path / "full")
  scores = score_finetuned(tmp_path / "full", config)
  # Seen: held-out AUROC 0.82 on 30 images (tuning 0.79), from a 100-step MAE.
  assert scores["held_out"]["auroc"] > 0.7 and scores["tuning"]["auroc"] > 0.7, scores
  assert summary["train/loss"] < 0.69  # below a head that has learnt nothing (log 2)
  data, _ = predict_finetuned(tmp_path / "full", config)
  assert data.info.type == "binary" and data.modality == "imaging"

  # The fine-tuned model exports and runs without the library, as the library runs it.
  exported, _, _ = helpers.export_and_compare_task_logits(tmp_path / "full", tmp_path / "export", "imaging")
  assert exported.info["task"]["type"] == "binary" and exported.info["task"]["config"]["label_column"] == "lesion"


def test_frozen_record_fine_tuning_trains_only_the_head(mae_run, tmp_path):
  config = task_config(mae_run, task__label_column="lesion", finetune__mode="frozen", train__num_steps=10)
  finetune(config, tmp_path / "frozen")
  tuned = helpers.final_params(tmp_path / "frozen", config)
  pretrained = helpers.final_params(mae_run, None)
  # The backbone is the pre-trained model without its MAE decoder (no patches are masked in
  # fine-tuning, so no reconstruction head is built), restored whole and never moved.
  assert set(pretrained) - set(tuned["backbone"]) == {"decoder"}
  helpers.assert_trees_close(tuned["backbone"], {k: pretrained[k] for k in tuned["backbone"]}, atol=0.0)
  assert np.abs(tuned["head"]["kernel"]).sum() > 0


# Each record modality's tiny preset, the label column its synthetic records carry, and the task type.
RECORD_TASKS = [("configs/ecg_mae.py:tiny", "afib", "binary"),
                ("configs/tabular_features.py:tiny", "malignant", "binary"),
                ("configs/omics_expression.py:tiny", "cell_type", "multiclass"),
                ("configs/omics_sequence.py:tiny", "motif", "binary")]


@pytest.mark.parametrize("spec, column, task_type", RECORD_TASKS, ids=[c for _, c, _ in RECORD_TASKS])
def test_every_record_modality_fine_tunes_and_scores_each_labelled_record(spec, column, task_type, tmp_path):
  run = pretrain(spec, tmp_path / "pre", 2)
  config = task_config(run, task__type=task_type, task__label_column=column, train__num_steps=4,
                       train__eval_every=4, checkpoint__every_steps=4)
  summary = finetune(config, tmp_path / "ft")
  assert summary["steps"] == 4 and np.isfinite(summary["eval/task_loss"])
  data, scores = predict_finetuned(tmp_path / "ft", config)
  assert data.info.type == task_type and data.modality == run_modality(spec)
  for split, values in scores.items():
    labels = data.split_labels(split)
    assert len(values) == len(labels) > 0 and np.isfinite(values).all()
    # Every record with a value in the column is a row, the others are counted.
    values_of_split, names = data.data.labels(split)
    assert len(labels) + data.without_label[split] == len(values_of_split)
    assert np.isfinite(values_of_split[labels.row_index, list(names).index(column)]).all()


def run_modality(spec):
  return {"ecg_mae": "ecg", "tabular_features": "tabular", "omics_expression": "omics",
          "omics_sequence": "sequence"}[spec.split("/")[1].split(".")[0]]


def test_the_finetune_command_writes_record_predictions_keyed_by_record(tmp_path):
  run = pretrain("configs/tabular_features.py:tiny", tmp_path / "pre", 2)
  result = subprocess.run([sys.executable, "experiments/finetune.py", f"--config={FINETUNE}:binary,tiny",
                           f"--pretrained={run}", f"--workdir={tmp_path / 'ft'}", "--config.task.label_column=malignant",
                           "--config.train.num_steps=4", "--config.train.eval_every=4",
                           "--config.checkpoint.every_steps=4", "--config.train.peak_flops_per_device=1e9"],
                          cwd=helpers.REPO, capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  assert "=== fine-tuning (malignant, binary" in result.stdout
  data = open_labeled_data(task_config(run, task__label_column="malignant"), tmp_path / "reopened")
  saved = json.loads((tmp_path / "ft" / "finetune_metrics.json").read_text())
  for split in ("tuning", "held_out"):
    labels = data.split_labels(split)
    table = pq.read_table(tmp_path / "ft" / "predictions" / "finetuned" / f"{split}.parquet").to_pydict()
    # One row per labelled record, keyed by the record's index in its split, in that order.
    assert table["row_index"] == labels.row_index.tolist() and saved[split]["n"] == len(labels)
    truth = np.asarray(table["boolean_value"], int)
    assert truth.tolist() == labels.targets["label"].astype(int).tolist()
    recomputed = roc_auc_score(truth, np.asarray(table["predicted_boolean_probability"]))
    assert recomputed == pytest.approx(saved[split]["auroc"], abs=1e-6)


def test_record_label_settings_that_cannot_work_are_one_line_errors(mae_run, tmp_path):
  with pytest.raises(ValueError, match=r"task\.label_column 'tumour' is not among the imaging records' label "
                                       r"columns \['lesion'"):
    open_labeled_data(task_config(mae_run, task__label_column="tumour"), tmp_path / "a")
  with pytest.raises(ValueError, match=r"config\.task\.label_column is empty: imaging records are fine-tuned"):
    open_labeled_data(task_config(mae_run), tmp_path / "b")
  with pytest.raises(ValueError, match=r"task\.type 'survival': record labels are fine-tuned as one of"):
    open_labeled_data(task_config(mae_run, task__label_column="lesion", task__type="survival"), tmp_path / "c")
