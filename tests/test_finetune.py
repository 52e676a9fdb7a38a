"""Fine-tuning from a pre-training checkpoint, and the validation report with its baselines.

One tiny EHR model is pre-trained per worker (300 steps on 600 synthetic subjects) and
every test adapts it: full, frozen and LoRA fine-tuning, survival under heavy censoring,
and the report that compares the pre-trained model with classical baselines and with the
same architecture trained from scratch on the same few labels.
"""
import json
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import scipy.sparse
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

import helpers
from biofm_jax.config import load_config
from biofm_jax.eval.downstream import EvaluationOptions, evaluate_task
from biofm_jax.eval.finetuned import score_finetuned
from biofm_jax.train.finetune import finetune, finetune_config
from biofm_jax.train.loop import train_and_evaluate

FINETUNE = str(helpers.REPO / "configs" / "finetune.py")


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("pretrained")
  config = helpers.config_for("configs/ehr_bert.py:tiny", train__num_steps=450, train__eval_every=450,
                              train__log_every=150, data__ehr__synthetic_subjects=600, checkpoint__every_steps=450)
  train_and_evaluate(config, workdir)
  return workdir


def task_config(pretrained, preset="high_risk,tiny", **overrides):
  flat = {**helpers.QUIET, **{k.replace("__", "."): v for k, v in overrides.items()}}
  return finetune_config(load_config(f"{FINETUNE}:{preset}", flat), pretrained)


@pytest.mark.parametrize("mode", ["frozen", "lora"])
def test_frozen_and_lora_fine_tuning_keep_the_pretrained_backbone_exactly(pretrained, tmp_path, mode):
  config = task_config(pretrained, finetune__mode=mode, train__num_steps=30, train__eval_every=30)
  summary = finetune(config, tmp_path / mode)
  tuned = helpers.final_params(tmp_path / mode, config)
  original = helpers.final_params(pretrained, None)
  helpers.assert_trees_close(tuned["backbone"], original, atol=0.0)  # restored whole, then never moved
  assert np.abs(tuned["head"]["kernel"]).sum() > 0
  if mode == "lora":
    assert any(np.abs(x).sum() > 0 for x in np.asarray(tuned["lora"]["transformer"]["layers"]["mlp"]["wo"]["lora_b"]))
  # Below the loss of the training prior alone (the base rate, no history at all).
  # Seen: frozen 0.520, LoRA 0.508 against the prior's 0.596.
  prior = _prior_only_loss(tmp_path / mode)
  assert summary["eval/task_loss"] < 0.95 * prior, (summary["eval/task_loss"], prior)


def _prior_only_loss(workdir) -> float:
  """Binary cross-entropy on the tuning rows of predicting every row as the training rows'
  base rate."""
  from biofm_jax.train.runs import open_run
  _, data, _, _, _ = open_run(workdir)
  rate = float(np.mean(data.split_labels("train").metric_targets()["label"]))
  tuning = np.asarray(data.split_labels("tuning").metric_targets()["label"], np.float64)
  return float(-np.mean(tuning * np.log(rate) + (1 - tuning) * np.log(1 - rate)))


def test_regression_fine_tuning_predicts_the_planted_risk_in_its_own_units(pretrained, tmp_path):
  config = task_config(pretrained, "risk,tiny")
  finetune(config, tmp_path / "risk")
  scores = score_finetuned(tmp_path / "risk", config)
  assert scores["held_out"]["r2"] > 0.2 and scores["held_out"]["pearson"] > 0.5, scores
  # Targets are standardised for training; predictions come back in the label's units.
  from biofm_jax.eval.finetuned import predict_split
  from biofm_jax.train.runs import open_run
  _, data, setup, params, _ = open_run(tmp_path / "risk")
  predicted, _ = predict_split(setup, params, data, "held_out", batch_size=16)
  truth = data.split_labels("held_out").targets["label"]
  assert abs(predicted.mean() - truth.mean()) < 0.5 * truth.std()


def test_multilabel_fine_tuning_on_two_boolean_columns(pretrained, tmp_path):
  from biofm_jax.data.labels import write_labels
  from biofm_jax.modalities.ehr.synthetic_labels import synthetic_labels
  cols = synthetic_labels(pretrained / "artifacts" / "synthetic_meds", "high_risk")
  path = write_labels(tmp_path / "multi.parquet", cols["subject_id"], cols["prediction_time"],
                      high_risk=cols["risk"] > 0.5, died=cols["died"], sex=cols["sex"])
  config = task_config(pretrained, task__type="multilabel", task__labels=str(path),
                       task__label_columns="('high_risk', 'died')", train__num_steps=30, train__eval_every=30)
  finetune(config, tmp_path / "multi")
  held_out = score_finetuned(tmp_path / "multi", config)["held_out"]
  assert held_out["macro_auroc"] > 0.65, held_out  # seen: 0.73 on 60 rows; a model without history: 0.5


def test_survival_fine_tuning_ranks_a_planted_hazard_under_heavy_censoring(pretrained, tmp_path):
  config = task_config(pretrained, "survival,tiny", task__synthetic_censor_fraction=0.7)
  finetune(config, tmp_path / "survival")
  scores = score_finetuned(tmp_path / "survival", config)
  held_out = scores["held_out"]
  assert held_out["events"] < 0.45 * held_out["n"]  # heavily censored
  assert held_out["c_index"] > 0.6, scores

  # The fine-tuned model exports (config read from its checkpoint) and runs without the library.
  from biofm_jax.objectives.logistic_hazard import risk_score
  exported, logits, got = helpers.export_and_compare_task_logits(tmp_path / "survival", tmp_path / "export", "ehr")
  assert exported.info["task"]["type"] == "survival" and exported.info["output"] == ["task", "logits"]
  assert not list((tmp_path / "export" / "artifacts").glob("labels_*"))
  np.testing.assert_allclose(risk_score(got), risk_score(logits), atol=1e-4)


def test_the_report_compares_pretraining_with_baselines_and_from_scratch_on_the_same_few_labels(pretrained, tmp_path):
  few = dict(finetune__train_labels_per_class=16)
  tuned = tmp_path / "finetuned"
  finetune(task_config(pretrained, **few), tuned)
  options = EvaluationOptions(finetuned_workdir=str(tuned), from_scratch_steps=60, few_shot_ks=(1, 4, 16),
                              few_shot_seeds=(0, 1), bootstrap_samples=100)
  report = evaluate_task(task_config(pretrained, **few), tmp_path / "report", options)
  saved = json.loads((tmp_path / "report" / "report.json").read_text())
  assert saved["held_out"]["auroc"] == pytest.approx(report["splits"]["held_out"]["metrics"]["auroc"])
  assert set(saved["baselines"]) == {"probe", "count_lr", "count_gbm", "from_scratch"}
  assert saved["task"]["name"] == "high_risk" and saved["task"]["prediction_time_cut"] == "inclusive"
  assert saved["task"]["rows"]["train"] == 32  # 16 per class
  lo, hi = saved["splits"]["held_out"]["intervals"]["auroc"]
  assert lo <= saved["held_out"]["auroc"] <= hi
  assert set(saved["splits"]["held_out"]["subgroups"]) == {"sex", "age_band"}
  assert set(saved["splits"]["held_out"]["subgroups_not_formed"]) == {"race", "ethnicity"}  # no RACE// codes
  assert "RACE//" in saved["splits"]["held_out"]["subgroups_not_formed"]["race"]
  assert saved["few_shot"]["k"] == [1, 4, 16] and set(saved["few_shot"]["methods"]) == {
      "probe", "count_lr", "count_gbm"}
  for name in ("report.md", "report.html", "roc.png", "calibration.png", "few_shot.png"):
    assert (tmp_path / "report" / name).exists(), name

  # Pre-training helps with few labels: fine-tuning and the probe beat training from scratch.
  finetuned = saved["held_out"]["auroc"]
  scratch = saved["baselines"]["from_scratch"]["held_out"]["metrics"]["auroc"]
  probe = saved["baselines"]["probe"]["held_out"]["metrics"]["auroc"]
  assert finetuned > scratch + 0.05 and probe > scratch + 0.05, (finetuned, probe, scratch)
  assert any("from scratch" in line and f"{finetuned - scratch:+.3f}" in line for line in saved["summary"])
  assert "from scratch" in (tmp_path / "report" / "report.md").read_text()

  # The count-of-codes baseline equals an independent scikit-learn computation on the same split.
  from biofm_jax.train.finetune import open_labeled_data
  data = open_labeled_data(task_config(pretrained, **few), tmp_path / "independent")
  records = {s: data.records(s) for s in ("train", "held_out")}
  vocabulary = sorted({str(c) for r in records["train"] for c in r["codes"]})
  column = {c: i for i, c in enumerate(vocabulary)}

  def counts(rs):
    x = scipy.sparse.lil_matrix((len(rs), len(vocabulary)), dtype=np.float32)
    for i, r in enumerate(rs):
      for c in r["codes"]:
        if str(c) in column:
          x[i, column[str(c)]] += 1
    return x.tocsr()
  y = {s: data.split_labels(s).targets["label"].astype(int) for s in records}
  model = make_pipeline(StandardScaler(with_mean=False), LogisticRegression(C=1.0, max_iter=2000))
  model.fit(counts(records["train"]), y["train"])
  independent = roc_auc_score(y["held_out"], model.predict_proba(counts(records["held_out"]))[:, 1])
  reported = saved["baselines"]["count_lr"]["held_out"]["metrics"]["auroc"]
  assert reported == pytest.approx(independent, abs=1e-9)

  # Every model's predictions, in meds-evaluation's schema, score as the report says.
  predictions = tmp_path / "report" / "predictions"
  assert {p.name for p in predictions.iterdir()} == {"finetuned", "probe", "count_lr", "count_gbm", "from_scratch"}
  for model, body in [("finetuned", saved["splits"]), *((m, b) for m, b in saved["baselines"].items())]:
    for split in ("tuning", "held_out"):
      table = pq.read_table(predictions / model / f"{split}.parquet")
      assert table.column_names == ["subject_id", "prediction_time", "boolean_value", "predicted_boolean_value",
                                    "predicted_boolean_probability"]
      assert table.schema.field("prediction_time").type == pa.timestamp("us")
      np.testing.assert_array_equal(table.column("subject_id").to_numpy(), data.split_labels(split).subject_ids)
      auroc = roc_auc_score(table.column("boolean_value").to_numpy(zero_copy_only=False),
                            table.column("predicted_boolean_probability").to_numpy())
      assert auroc == pytest.approx(body[split]["metrics"]["auroc"], abs=1e-6), (model, split)
  # Each subgroup's figures are those of its own rows of the prediction file.
  table = pq.read_table(predictions / "finetuned" / "held_out.parquet").to_pydict()
  truth, scores = np.asarray(table["boolean_value"], int), np.asarray(table["predicted_boolean_probability"])
  covariates = data.covariates("held_out", dict(options.subgroup_codes))
  for column in ("sex", "age_band"):
    groups = saved["splits"]["held_out"]["subgroups"][column]
    assert sum(g["n"] for g in groups.values()) == len(truth)
    for value, figures in groups.items():
      rows = np.asarray([str(v) for v in covariates[column]]) == value
      assert figures["n"] == rows.sum(), (column, value)
      if not figures.get("too_small") and len(set(truth[rows])) == 2:
        assert figures["auroc"] == pytest.approx(roc_auc_score(truth[rows], scores[rows]), abs=1e-9), (column, value)
  with pytest.raises(ValueError, match="predictions exists: pass --overwrite"):
    evaluate_task(task_config(pretrained, **few), tmp_path / "report", options)


def test_a_checkpoint_that_does_not_match_the_config_is_named(pretrained, tmp_path):
  with pytest.raises(ValueError, match="model.num_layers: checkpoint 2, config 3"):
    task_config(pretrained, model__num_layers=3, model__embed_dim=32)  # embed_dim matches: only one named
  # A backbone built differently from the checkpoint (here wider MLPs) names each parameter that differs.
  from biofm_jax.train.finetune import build_finetune_training, load_pretrained, open_labeled_data
  config = task_config(pretrained)
  with config.unlocked():
    config.model.mlp_dim = 48
  setup = build_finetune_training(config, open_labeled_data(config, tmp_path / "artifacts"))
  with pytest.raises(ValueError, match=r"does not match the model's .*mlp.*checkpoint \(2, 32, 64\), "
                                       r"model \(2, 32, 48\)"):
    load_pretrained(setup.init_state(0), setup, pretrained)


def test_withholding_a_modality_is_for_fused_models(pretrained):
  with pytest.raises(ValueError, match=r"finetune.withhold is \['omics'\], but .* pre-trained one modality"):
    task_config(pretrained, finetune__withhold=("omics",))


def test_command_line_errors_name_what_is_wrong(pretrained, tmp_path):
  from biofm_jax.data.labels import write_labels
  labels = write_labels(tmp_path / "unknown.parquet", [424242, 424243],
                        np.array(["2020-01-01", "2020-02-01"], "datetime64[us]"), boolean_value=[True, False])
  command = [sys.executable, "experiments/evaluate.py", f"--pretrained={pretrained}", f"--labels={labels}",
             f"--workdir={tmp_path / 'eval'}", "--config=configs/finetune.py:high_risk,tiny"]
  result = subprocess.run(command, cwd=helpers.REPO, capture_output=True, text=True, timeout=300)
  assert result.returncode == 2
  assert "error: labels" in result.stderr and "no usable label rows" in result.stderr, result.stderr[-2000:]
  assert "2 name subjects the MEDS dataset does not have" in result.stderr
  result = subprocess.run(command + ["--strict_labels"], cwd=helpers.REPO, capture_output=True, text=True,
                          timeout=300)
  assert result.returncode == 2
  assert "error: labels" in result.stderr and "subject_id 424242" in result.stderr, result.stderr[-2000:]
  result = subprocess.run(
      [sys.executable, "experiments/finetune.py", "--config=configs/finetune.py:high_risk,tiny",
       f"--pretrained={tmp_path / 'nowhere'}", f"--workdir={tmp_path / 'ft'}"],
      cwd=helpers.REPO, capture_output=True, text=True, timeout=300)
  assert result.returncode == 2 and "no checkpoints directory" in result.stderr, result.stderr[-2000:]


def test_the_embed_command_writes_the_library_s_embeddings_of_each_record(pretrained, tmp_path):
  out = tmp_path / "embeddings.parquet"
  result = subprocess.run([sys.executable, "experiments/embed.py", f"--pretrained={pretrained}", f"--out={out}",
                           "--splits=tuning"], cwd=helpers.REPO, capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-2000:]
  from biofm_jax.train.embed import embed_split
  from biofm_jax.train.runs import open_run
  config, data, setup, params, _ = open_run(pretrained)
  expected = embed_split(setup, params, data, "tuning", batch_size=config.data.batch_size)
  table = pq.read_table(out).to_pydict()
  assert table["subject_id"] == [int(s) for s in data.source("tuning").subject_ids]
  assert set(table["split"]) == {"tuning"} and all(t is None for t in table["prediction_time"])
  np.testing.assert_allclose(np.asarray(table["embedding"], np.float32), expected, atol=1e-5, rtol=0)
  assert f"wrote {len(expected)} embeddings of dimension {config.model.embed_dim}" in result.stdout


def test_lp_ft_starts_the_head_at_the_logistic_probe_of_the_training_rows(pretrained, tmp_path):
  """finetune.head_init='probe': before any step the task model's training-row predictions
  are those of an L2 logistic regression on what the head reads (standardised, normalised
  pre-trained embeddings), fitted independently here."""
  from biofm_jax.eval.finetuned import predict_split
  from biofm_jax.train import finetune as finetune_lib
  config = task_config(pretrained, finetune__head_init="probe", finetune__backbone_lr_scale=0.1)
  data = finetune_lib.open_labeled_data(config, tmp_path / "artifacts")
  setup = finetune_lib.build_finetune_training(config, data)
  state = finetune_lib.initial_state(config, setup, data)
  scores, embeddings = predict_split(setup, state.params, data, "train", batch_size=32)
  x = finetune_lib.head_inputs(embeddings, np.asarray(state.params["input_mean"]),
                               np.asarray(state.params["input_scale"]))
  y = data.split_labels("train").metric_targets()["label"].astype(int)
  expected = LogisticRegression(max_iter=2000).fit(x, y).predict_proba(x)[:, 1]
  np.testing.assert_allclose(scores, expected, atol=2e-4)
  assert roc_auc_score(y, scores) > 0.7  # a head that already fits, not a prior
  zeros = finetune_lib.initial_state(task_config(pretrained), setup, data)
  assert np.ptp(predict_split(setup, zeros.params, data, "train", batch_size=32)[0]) < 1e-6
  with pytest.raises(ValueError, match="head_init is 'lp'"):
    finetune_lib.initial_state(task_config(pretrained, finetune__head_init="lp"), setup, data)


def test_epochs_set_the_steps_from_the_label_count_and_a_rerun_keeps_them(pretrained, tmp_path):
  """finetune.epochs: train.num_steps = epochs x training rows / batch, rounded up, whatever
  train.num_steps says; few-shot rows count as the rows; the warm-up shrinks to fit."""
  from biofm_jax.train.checkpoint import pretrained_checkpoint
  config = task_config(pretrained, finetune__epochs=0.5, finetune__train_labels_per_class=40, train__num_steps=999,
                       train__warmup_steps=30, train__eval_every=1000)
  summary = finetune(config, tmp_path / "ft")
  expected = -(-0.5 * 80 // config.data.batch_size)  # 80 few-shot rows in batches of 16: 3 steps
  assert summary["steps"] == expected == 3
  _, step, saved = pretrained_checkpoint(tmp_path / "ft")
  assert step == 3 and saved["train"]["num_steps"] == 3 and saved["train"]["warmup_steps"] == 0
  again = finetune(config, tmp_path / "ft")  # the same labels give the same steps: nothing to do
  assert again["start_step"] == again["steps"] == 3
  with pytest.raises(ValueError, match="finetune.epochs is -1.0"):
    finetune(task_config(pretrained, finetune__epochs=-1.0), tmp_path / "bad")
