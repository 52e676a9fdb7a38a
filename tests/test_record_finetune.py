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
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from sklearn.metrics import roc_auc_score

import helpers
from biofm_jax.config import load_config
from biofm_jax.eval.finetuned import predict_finetuned, score_finetuned
from biofm_jax.eval.model_card import fingerprint
from biofm_jax.eval.downstream import EvaluationOptions, evaluate_task
from biofm_jax.eval.predict_records import score_records
from biofm_jax.export import export_run
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


@pytest.fixture(scope="module")
def lesion_run(mae_run, tmp_path_factory):
  """The MAE fine-tuned on the planted lesion: (config, workdir, training summary)."""
  workdir = tmp_path_factory.mktemp("lesion")
  config = task_config(mae_run, task__label_column="lesion", train__num_steps=120)
  return config, workdir / "full", finetune(config, workdir / "full")


def test_a_fine_tuned_mae_model_finds_the_planted_lesion_on_held_out_images(lesion_run, tmp_path):
  config, run, summary = lesion_run
  assert config.task.name == "lesion"
  scores = score_finetuned(run, config)
  # Seen: held-out AUROC 0.97 on 30 images, from a 100-step MAE (0.82 before the head
  # standardised its inputs, models/task.py).
  assert scores["held_out"]["auroc"] > 0.7 and scores["tuning"]["auroc"] > 0.7, scores
  assert summary["train/loss"] < 0.69  # below a head that has learnt nothing (log 2)
  data, by_split = predict_finetuned(run, config)
  assert data.info.type == "binary" and data.modality == "imaging"

  # The fine-tuned model exports and runs without the library, as the library runs it.
  exported, _, _ = helpers.export_and_compare_task_logits(run, tmp_path / "export", "imaging")
  assert exported.info["task"]["type"] == "binary" and exported.info["task"]["config"]["label_column"] == "lesion"
  # predict.py scores the image folder with the export alone, as the run scored each image.
  out = tmp_path / "predictions.parquet"
  result = subprocess.run([sys.executable, "experiments/predict.py", f"--exported={tmp_path / 'export'}",
                           f"--records={run / 'artifacts' / RAW_RECORDS['imaging']}", f"--out={out}"],
                          cwd=helpers.REPO, capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  table = pq.read_table(out).to_pydict()
  assert f"scored {len(table['record_key'])} of 300 imaging records" in result.stdout
  row_of = {key: i for i, key in enumerate(table["record_key"])}
  held_out = data.split_labels("held_out")
  rows = [row_of[key] for key in held_out.record_keys]
  np.testing.assert_allclose(np.asarray(table["predicted_boolean_probability"])[rows], by_split["held_out"], atol=1e-5)
  assert np.asarray(table["boolean_value"])[rows].tolist() == held_out.targets["label"].astype(bool).tolist()


def test_the_lesion_report_sets_the_fine_tuned_model_beside_the_probe_the_raw_features_and_from_scratch(
    lesion_run, tmp_path):
  """A record model's report holds what an EHR report holds: the fine-tuned run as the model,
  the linear probe, the modality's raw-feature baseline and the architecture trained from
  scratch on the same labels, each with per-record predictions."""
  config, run, _ = lesion_run
  report = evaluate_task(config, tmp_path / "report", EvaluationOptions(
      finetuned_workdir=str(run), from_scratch_steps=config.train.num_steps, few_shot_ks=(4, 16),
      few_shot_seeds=(0,), bootstrap_samples=50))
  assert report["model"]["name"] == "finetuned" and report["task"]["rows"]["held_out"] == 30
  assert set(report["baselines"]) == {"probe", "logistic_intensity_features", "from_scratch"}
  assert report["baselines"]["logistic_intensity_features"]["description"]["features"] == 76
  held_out = {name: body["held_out"]["metrics"]["auroc"] for name, body in report["baselines"].items()}
  held_out["finetuned"] = report["splits"]["held_out"]["metrics"]["auroc"]
  assert held_out["finetuned"] == pytest.approx(score_finetuned(run, config)["held_out"]["auroc"], abs=1e-6)
  print("lesion report, held-out AUROC:", held_out)
  # Seen (30 held-out images): fine-tuned 0.97, probe 0.94, from scratch 0.99, intensity
  # features 0.98. The planted lesion is a bright blob that first-order intensity statistics
  # find directly, and 120 steps from scratch find it too: a 100-step tiny MAE does not beat
  # them here (issue 31's target is not met at this scale; benchmarks/RESULTS.md).
  assert held_out["logistic_intensity_features"] > 0.8 and min(held_out.values()) > 0.5, held_out
  assert any("pre-training vs the same architecture from scratch" in line for line in report["summary"])
  # Each model's predictions are keyed by the image, as fine-tuning wrote them.
  data, by_split = predict_finetuned(run, config)
  written = pq.read_table(tmp_path / "report" / "predictions" / "finetuned" / "held_out.parquet").to_pydict()
  # (the key is the file as each run's data module resolved it: the report regenerated the
  # synthetic images in its own folder, so compare the part below that folder)
  below = lambda keys: [str(k).split("synthetic_imaging/", 1)[1] for k in keys]  # noqa: E731
  assert below(written["record_key"]) == below(data.split_labels("held_out").record_keys)
  np.testing.assert_allclose(written["predicted_boolean_probability"], by_split["held_out"], atol=1e-6)
  for name in report["baselines"]:
    assert pq.read_table(tmp_path / "report" / "predictions" / name / "held_out.parquet").num_rows == 30


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
  # The head reads each embedding feature standardised by the training rows' statistics, as
  # the pre-trained backbone embeds them: measured before the first step, never trained.
  from biofm_jax.eval.downstream import frozen_embeddings
  embeddings = frozen_embeddings(config, open_labeled_data(config, tmp_path / "data"), ("train",))["train"]
  np.testing.assert_allclose(tuned["input_mean"], embeddings.mean(axis=0), rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(tuned["input_scale"], 1.0 / embeddings.std(axis=0), rtol=1e-3)
  standardised = (embeddings - tuned["input_mean"]) * tuned["input_scale"]
  np.testing.assert_allclose(standardised.std(axis=0), 1.0, rtol=1e-3)


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

  # Exported, the model scores the raw records (the files the runs read) as the run scored them.
  export_dir, _ = export_run(tmp_path / "ft", tmp_path / "export")
  scored = score_records(export_dir, tmp_path / "ft" / "artifacts" / RAW_RECORDS[data.modality])
  table = scored.table.to_pydict()
  row_of = {key: i for i, key in enumerate(table["record_key"])}
  assert len(row_of) == scored.scored == sum(len(data.split_labels(s)) for s in data.splits())
  assert scored.records == scored.scored + sum(data.without_label.values())
  for split, values in scores.items():
    labels = data.split_labels(split)
    rows = [row_of[key] for key in labels.record_keys]
    np.testing.assert_allclose(helpers.predicted_scores(table, task_type, data.info.classes)[rows], values, atol=1e-5)
    truth = helpers.true_labels(table, task_type, data.info.classes)[rows]
    np.testing.assert_array_equal(truth, labels.targets["label"])


# Where each modality's synthetic records are written under a run's artifacts (what a user's
# data.<modality>.path would name).
RAW_RECORDS = {"ecg": "synthetic_ecg/manifest.csv", "tabular": "synthetic_tabular", "omics": "synthetic_omics.h5ad",
               "sequence": "synthetic_sequences.fa", "imaging": "synthetic_imaging"}


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
    # One row per labelled record, keyed by the record and its index in its split, in that order.
    assert table["row_index"] == labels.row_index.tolist() and saved[split]["n"] == len(labels)
    assert table["record_key"] == labels.record_keys.tolist()
    truth = np.asarray(table["boolean_value"], int)
    assert truth.tolist() == labels.targets["label"].astype(int).tolist()
    recomputed = roc_auc_score(truth, np.asarray(table["predicted_boolean_probability"]))
    assert recomputed == pytest.approx(saved[split]["auroc"], abs=1e-6)

  # Its export's model card: the command's held-out scores (no report given, which it names as
  # a limit), the label definition, the generated table's fingerprint and the cohort counts.
  export_dir, _ = export_run(tmp_path / "ft", tmp_path / "export")
  card = json.loads((export_dir / "export.json").read_text())["model_card"]
  assert card["performance"]["held_out"]["metrics"] == saved["held_out"]
  assert card["intended_use"]["label"].startswith("the records' label column 'malignant'")
  assert card["training_data"]["sources"] == {"generated: synthetic_tabular": {
      "path": "generated by the run", **fingerprint(tmp_path / "ft" / "artifacts" / "synthetic_tabular")}}
  assert card["training_data"]["cohort"]["labelled_rows"] == {s: len(data.split_labels(s)) for s in data.splits()}
  limits = " ".join(card["known_limits"])
  assert "No bootstrap intervals, subgroups or baselines" in limits and "generated (synthetic) data" in limits
  assert "# Model card: malignant" in (export_dir / "MODEL_CARD.md").read_text()


def test_record_label_settings_that_cannot_work_are_one_line_errors(mae_run, tmp_path):
  with pytest.raises(ValueError, match=r"task\.label_column 'tumour' is not among the imaging records' label "
                                       r"columns \['lesion'"):
    open_labeled_data(task_config(mae_run, task__label_column="tumour"), tmp_path / "a")
  with pytest.raises(ValueError, match=r"config\.task\.label_column is empty: imaging records are fine-tuned"):
    open_labeled_data(task_config(mae_run), tmp_path / "b")
  with pytest.raises(ValueError, match=r"config\.task\.time_column and event_column must both be set: imaging"):
    open_labeled_data(task_config(mae_run, task__label_column="lesion", task__type="survival"), tmp_path / "c")
  with pytest.raises(ValueError, match=r"config\.task\.label_columns is empty: imaging records"):
    open_labeled_data(task_config(mae_run, task__type="multilabel"), tmp_path / "d")


def outcome_table(path, n=300, seed=0):
  """Feature rows with two flags and a time to event that follow the features: flag_a is
  f1 > 0, flag_b is f2 + f3 > 0, and the hazard grows with f4 (70% of events seen)."""
  rng = np.random.default_rng(seed)
  f = rng.normal(size=(n, 6))
  days = rng.exponential(365.0 * np.exp(-1.5 * f[:, 3]))
  table = pd.DataFrame({"subject_id": [f"S{i:04d}" for i in range(n)],
                        **{f"f{j + 1}": f[:, j] for j in range(6)},
                        "flag_a": (f[:, 0] > 0).astype(int), "flag_b": (f[:, 1] + f[:, 2] > 0).astype(int),
                        "days": np.round(days, 1), "event": (rng.random(n) < 0.7).astype(int)})
  table.loc[[3, 7], "days"] = np.nan  # records without a value are left out and counted
  table.to_csv(path, index=False)
  return table


def test_table_rows_fine_tune_on_several_flags_and_on_a_time_to_event_and_serve_them(tmp_path):
  """Multilabel (several 0/1 columns) and survival (days and event columns) from the records'
  own columns: fine-tuned, scored, exported and served from the raw table alike."""
  from biofm_jax.eval.metrics import task_metrics
  table = outcome_table(tmp_path / "rows.csv")
  run = pretrain("configs/tabular_features.py:tiny", tmp_path / "pre", 20,
                 data__tabular__path=str(tmp_path / "rows.csv"),
                 data__tabular__label_columns=("flag_a", "flag_b", "days", "event"))
  for task_type, extra in (("multilabel", {"task__label_columns": ("flag_a", "flag_b")}),
                           ("survival", {"task__time_column": "days", "task__event_column": "event"})):
    config = task_config(run, task__type=task_type, train__num_steps=60, train__eval_every=60,
                         checkpoint__every_steps=60, train__learning_rate=3e-3, **extra)
    finetune(config, tmp_path / task_type)
    data, scores = predict_finetuned(tmp_path / task_type, config, splits=("train", "tuning", "held_out"))
    rows = sum(len(data.split_labels(s)) for s in data.splits())
    left_out = 2 if task_type == "survival" else 0
    assert rows == len(table) - left_out and sum(data.without_label.values()) == left_out
    held_out = task_metrics(task_type, data.split_labels("held_out").metric_targets(), scores["held_out"])
    print(task_type, held_out)
    # Seen (34 held-out rows): macro AUROC 0.99 (multilabel), C-index 0.74 (survival, 22 events).
    assert held_out["macro_auroc" if task_type == "multilabel" else "c_index"] > 0.65, held_out
    # Exported, the model scores the raw table as the run scored each row.
    export_dir, _ = export_run(tmp_path / task_type, tmp_path / f"{task_type}_export")
    scored = score_records(export_dir, tmp_path / "rows.csv").table.to_pydict()
    row_of = {key: i for i, key in enumerate(scored["record_key"])}
    assert len(row_of) == len(table)  # every row is scored: no label column is read back
    for split in data.splits():
      labels = data.split_labels(split)
      index = [row_of[key] for key in labels.record_keys]
      predicted = helpers.predicted_scores(scored, task_type, data.info.classes)[index]
      np.testing.assert_allclose(predicted, scores[split], atol=1e-5)
    # The report sets the fine-tuned model beside the probe and the table's raw-feature baseline.
    report = evaluate_task(config, tmp_path / f"{task_type}_report", EvaluationOptions(
        finetuned_workdir=str(tmp_path / task_type), bootstrap_samples=20))
    metric = "macro_auroc" if task_type == "multilabel" else "c_index"
    assert report["splits"]["held_out"]["metrics"][metric] == pytest.approx(held_out[metric], abs=1e-6)
    assert set(report["baselines"]) == {"probe", "logistic_raw_features"}
    assert report["baselines"]["logistic_raw_features"]["held_out"]["metrics"][metric] > 0.65

  # A flag or event column holding other values, or a negative time, names the column and the record.
  bad = table.copy()
  bad.loc[bad.index[bad.subject_id == "S0010"][0], "event"] = 2
  bad.to_csv(tmp_path / "bad.csv", index=False)
  config = task_config(run, task__type="survival", task__time_column="days", task__event_column="event")
  with config.unlocked():
    config.data.tabular.path = str(tmp_path / "bad.csv")
  with pytest.raises(ValueError, match=r"tabular records, label column 'event': 2 in record \d+ of split '\w+'; an "
                                       r"event column holds 0 or 1"):
    open_labeled_data(config, tmp_path / "bad")


def test_scoring_raw_records_refuses_what_it_cannot_score(tmp_path):
  """An export's artifacts folder holding a link is refused before any record is read; an
  encoder export, an EHR export and a flag mix-up are one-line errors."""
  run = pretrain("configs/tabular_features.py:tiny", tmp_path / "pre", 2)
  encoder, _ = export_run(run, tmp_path / "encoder")
  with pytest.raises(ValueError, match="an exported pre-trained encoder returns embeddings, not predictions"):
    score_records(encoder, run / "artifacts" / RAW_RECORDS["tabular"])
  config = task_config(run, task__label_column="malignant", train__num_steps=2, train__eval_every=0,
                       checkpoint__every_steps=2)
  finetune(config, tmp_path / "ft")
  export_dir, _ = export_run(tmp_path / "ft", tmp_path / "export")
  secret = tmp_path / "secret.txt"
  secret.write_text("not for the export")
  (export_dir / "artifacts" / "extra.json").symlink_to(secret)
  with pytest.raises(ValueError, match=r"'extra\.json' leads out of .*/export/artifacts \(through '\.\.' or a link\); refused"):
    score_records(export_dir, tmp_path / "ft" / "artifacts" / RAW_RECORDS["tabular"])
  # New records need no training split: three rows whose split column says held_out are scored.
  table = pq.read_table(tmp_path / "ft" / "artifacts" / RAW_RECORDS["tabular"] / "data.parquet").slice(0, 3)
  (tmp_path / "new").mkdir()
  pq.write_table(table.set_column(table.column_names.index("split"), "split", pa.array(["held_out"] * 3)),
                 tmp_path / "new" / "data.parquet")
  (export_dir / "artifacts" / "extra.json").unlink()
  scored = score_records(export_dir, tmp_path / "new")
  assert scored.table["record_key"].to_pylist() == table["subject_id"].to_pylist() and scored.scored == 3
  ehr_like = type("Exported", (), {"inputs": {"ehr": {}}, "info": {"task": {"type": "binary"}}})()
  from biofm_jax.eval import predict_records
  with pytest.raises(ValueError, match=r"this export takes \['ehr'\] \(EHR models score MEDS label rows"):
    predict_records._record_modality(ehr_like, tmp_path)
  result = subprocess.run([sys.executable, "experiments/predict.py", f"--exported={export_dir}",
                           f"--records={run}", f"--meds={run}", f"--out={tmp_path / 'p.parquet'}"],
                          cwd=helpers.REPO, capture_output=True, text=True, timeout=120)
  assert result.returncode != 0 and "pass --records (a model fine-tuned on a record modality; modality=path pairs" in (
      result.stderr + result.stdout)
