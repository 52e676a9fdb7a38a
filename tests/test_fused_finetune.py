"""The fused patient model downstream: fine-tuned on a labels table keyed by subject, every
subject scored from whichever modalities it has (HAIM's setting), through the same entry
as every other fine-tuning run."""
import json
import subprocess
import sys

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import helpers
from biofm_jax.config import load_config
from biofm_jax.eval.downstream import EvaluationOptions, evaluate_task
from biofm_jax.eval.finetuned import predict_finetuned, score_finetuned
from biofm_jax.eval.predict_records import score_records
from biofm_jax.eval.predict_subjects import parse_records, score_subjects
from biofm_jax.eval.raw_baselines import haim_features
from biofm_jax.modalities import registry
from biofm_jax.export import export_run
from biofm_jax.modalities.synthetic_cohort import cohort_paths
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


@pytest.fixture(scope="module")
def fused_outcome(fused_run, tmp_path_factory):
  """The fused model fine-tuned on the planted outcome: (config, workdir, labels file)."""
  workdir = tmp_path_factory.mktemp("fused_outcome")
  truth = latents(fused_run)
  labels = write_subject_labels(workdir / "outcome.parquet", truth["subject_id"], truth["outcome"])
  config = task_config(fused_run, labels)
  finetune(config, workdir / "ft")
  return config, workdir / "ft", labels


def test_the_fused_model_predicts_a_planted_outcome_for_every_subject_whatever_it_lacks(fused_run, fused_outcome):
  truth = latents(fused_run)
  config, run, _ = fused_outcome
  scores = score_finetuned(run, config)
  # Seen: held-out AUROC 0.83 on 40 subjects (heart failure or death, from a 20-step fused
  # model and 60 fine-tuning steps; 0.80 before the head standardised its inputs).
  assert scores["held_out"]["auroc"] > 0.65 and scores["tuning"]["auroc"] > 0.65, scores
  data, predicted = predict_finetuned(run, config)
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


MODALITY_COLUMNS = {"ehr": "has_ehr", "imaging": "has_imaging", "omics": "has_omics", "tabular": "has_tabular"}


def test_an_exported_fused_model_scores_each_subject_from_the_raw_files_of_whatever_it_has(
    fused_run, fused_outcome, tmp_path):
  config, run, labels = fused_outcome
  data, predicted = predict_finetuned(run, config)
  export_dir, _ = export_run(run, tmp_path / "export")
  assert json.loads((export_dir / "export.json").read_text())["modality_objectives"] == {
      "ehr": "masked", "imaging": "mae", "omics": "masked", "tabular": "masked_features"}
  files = {m: str(p) for m, p in cohort_paths(next((fused_run / "artifacts").rglob("cohort.json")).parent).items()}

  # Every modality's raw files: each subject's prediction is the fine-tuning run's own.
  scored = score_subjects(export_dir, files, labels=labels)
  table = scored.table.to_pandas()
  truth = latents(fused_run).set_index("subject_id")
  assert scored.scored == scored.subjects == len(truth) and scored.unknown_subjects == 0
  assert table["subject_id"].tolist() == pd.read_parquet(labels)["subject_id"].tolist()  # the labels' order
  row_of = {s: i for i, s in enumerate(table["subject_id"])}
  for split in ("tuning", "held_out"):
    rows = data.split_labels(split)
    index = [row_of[s] for s in rows.subject_ids]
    np.testing.assert_allclose(table["predicted_boolean_probability"].to_numpy()[index], predicted[split], atol=1e-5)
    assert table["boolean_value"].to_numpy()[index].tolist() == (rows.targets["label"] > 0.5).tolist()
  # Each row names the modalities its subject brought, as the cohort planted them.
  for subject, pattern in zip(table["subject_id"], table["modalities"]):
    assert pattern == "+".join(m for m, c in MODALITY_COLUMNS.items() if truth.loc[subject, c]), subject
  assert sum(scored.by_pattern.values()) == len(table)

  # New patients without images or expression: those two enter as the join's padding, so a
  # subject who has only EHR and features gets exactly the score it got with all four given.
  partial = score_subjects(export_dir, {"ehr": files["ehr"], "tabular": files["tabular"]}).table.to_pandas()
  has = truth[["has_ehr", "has_tabular"]].astype(bool).any(axis=1)
  assert sorted(partial["subject_id"]) == sorted(truth.index[has])
  assert set(partial["modalities"]) == {"ehr", "tabular", "ehr+tabular"}
  only_these = truth.index[has & ~truth[["has_imaging", "has_omics"]].astype(bool).any(axis=1)]
  full = table.set_index("subject_id")["predicted_boolean_probability"]
  part = partial.set_index("subject_id")["predicted_boolean_probability"]
  assert len(only_these) > 10
  np.testing.assert_allclose(part[only_these].to_numpy(), full[only_these].to_numpy(), atol=1e-6)
  others = truth.index[has & truth[["has_imaging", "has_omics"]].astype(bool).any(axis=1)]
  assert np.abs(part[others].to_numpy() - full[others].to_numpy()).max() > 1e-4  # what is left out counts

  # The command writes the same table, and says what it did.
  out = tmp_path / "predictions.parquet"
  pairs = ",".join(f"{m}={p}" for m, p in files.items())
  result = subprocess.run([sys.executable, "experiments/predict.py", f"--exported={export_dir}",
                           f"--records={pairs}", f"--labels={labels}", f"--out={out}"],
                          cwd=helpers.REPO, capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  assert f"scored {len(truth)} of {len(truth)} subjects" in result.stdout
  assert pd.read_parquet(out).equals(table)

  # What it cannot score is one line each.
  with pytest.raises(ValueError, match=r"--records names \['ecg'\]: .* takes \['ehr', 'imaging', 'omics', 'tabular'\]"):
    score_subjects(export_dir, {"ecg": files["ehr"]})
  with pytest.raises(ValueError, match=r"a fused model of \['ehr', 'imaging', 'omics', 'tabular'\]: name each "
                                       r"modality's records as modality=path pairs"):
    score_records(export_dir, files["tabular"])
  with pytest.raises(ValueError, match="a fused model takes modality=path pairs"):
    parse_records("ehr=/a,imaging")
  mixed = write_subject_labels(tmp_path / "mixed.parquet", truth.index[:2], [True, False],
                               prediction_time=pa.array([np.datetime64("2020-01-01", "us"), None]))
  with pytest.raises(ValueError, match=r"mixed.parquet: column 'prediction_time' is null in row 1 \(subject_id"):
    score_subjects(export_dir, files, labels=mixed)
  strangers = write_subject_labels(tmp_path / "strangers.parquet", [truth.index[0], 999_999_999], [True, False])
  assert score_subjects(export_dir, files, labels=strangers).unknown_subjects == 1
  with pytest.raises(ValueError, match=r"1 of 2 rows cannot be scored \(1 name subjects no given record has, 0 "
                                       r"have nothing before their prediction_time\); first: row 1, subject_id 999999999"):
    score_subjects(export_dir, files, labels=strangers, strict_labels=True)


def test_a_withheld_modality_is_given_to_no_subject_in_training_evaluation_and_scoring(fused_run, tmp_path):
  """finetune.withhold: the fused model fine-tuned on expression alone (an ablation): only
  subjects with a profile are labelled rows, and scoring reads no other modality's files."""
  truth = latents(fused_run)
  labels = write_subject_labels(tmp_path / "outcome.parquet", truth["subject_id"], truth["outcome"])
  config = task_config(fused_run, labels, finetune__withhold=("ehr", "imaging", "tabular"), train__num_steps=4,
                       train__eval_every=4, checkpoint__every_steps=4)
  assert tuple(config.data.multimodal.withhold) == ("ehr", "imaging", "tabular")
  finetune(config, tmp_path / "ft")
  data, predicted = predict_finetuned(tmp_path / "ft", config, splits=("held_out",))
  held = truth[truth["split"] == "held_out"]
  assert sorted(data.split_labels("held_out").subject_ids.tolist()) == sorted(held[held["has_omics"] == 1]["subject_id"])
  export_dir, _ = export_run(tmp_path / "ft", tmp_path / "export")
  files = {m: str(p) for m, p in cohort_paths(next((fused_run / "artifacts").rglob("cohort.json")).parent).items()}
  given_all = score_subjects(export_dir, files).table.to_pandas()
  given_omics = score_subjects(export_dir, {"omics": files["omics"]}).table.to_pandas()
  assert set(given_all["modalities"]) == {"omics"} and given_all.equals(given_omics)
  row_of = dict(zip(given_all["subject_id"], given_all["predicted_boolean_probability"]))
  np.testing.assert_allclose([row_of[s] for s in data.split_labels("held_out").subject_ids], predicted["held_out"],
                             atol=1e-5)
  with pytest.raises(ValueError, match=r"fine-tuned without \['ehr', 'imaging', 'tabular'\]"):
    score_subjects(export_dir, {"ehr": files["ehr"]})


def test_the_fused_report_sets_the_fine_tuned_model_beside_haim_and_from_scratch_per_availability_pattern(
    fused_run, fused_outcome, tmp_path):
  config, run, _ = fused_outcome
  report = evaluate_task(config, tmp_path / "report", EvaluationOptions(
      finetuned_workdir=str(run), from_scratch_steps=config.train.num_steps, few_shot_ks=(8,), few_shot_seeds=(0,),
      bootstrap_samples=50))
  assert report["model"]["name"] == "finetuned"
  assert set(report["baselines"]) == {"probe", "haim_gbm", "from_scratch"}
  haim = report["baselines"]["haim_gbm"]["description"]
  assert set(haim["parts"]) == {"ehr", "imaging", "omics", "tabular"}
  held_out = {name: body["held_out"]["metrics"]["auroc"] for name, body in report["baselines"].items()}
  held_out["finetuned"] = report["splits"]["held_out"]["metrics"]["auroc"]
  print("fused report, held-out AUROC:", held_out)
  # Seen (40 held-out subjects): fine-tuned 0.83, probe 0.66, from scratch 0.84, HAIM 0.996.
  # The generated outcome follows a latent risk that the raw features (tabular values, image
  # intensities) carry almost directly, so HAIM's raw features win on this cohort, and a
  # 20-step fused model adds little.
  assert held_out["haim_gbm"] > 0.8 and min(held_out.values()) > 0.5, held_out
  # Results per availability pattern: every held-out subject in exactly one, as the cohort planted it.
  truth = latents(fused_run).set_index("subject_id")
  patterns = report["splits"]["held_out"]["subgroups"]["modalities"]
  in_split = truth[truth["split"] == "held_out"]
  planted = in_split.apply(lambda r: "+".join(m for m, c in MODALITY_COLUMNS.items() if r[c]), axis=1)
  assert {p: body["n"] for p, body in patterns.items()} == planted.value_counts().to_dict()
  written = pq.read_table(tmp_path / "report" / "predictions" / "haim_gbm" / "held_out.parquet").to_pydict()
  assert sorted(written["subject_id"]) == sorted(in_split.index)


def test_haim_features_are_each_modality_s_raw_features_with_an_absent_indicator(fused_outcome, tmp_path):
  config, _, _ = fused_outcome
  data = open_labeled_data(config, tmp_path / "a")
  features = haim_features(data, ("train", "held_out"))[0]["train"]
  joined, items = data.data, data.source("train").items
  # Blocks in modality order, each the modality's raw features followed by its absent indicator.
  widths = {m: registry.get(m).baseline.features(module.source("train"), module.source("train")).shape[1]
            for m, module in joined.modules.items()}
  assert features.shape == (len(items), sum(widths.values()) + len(widths))
  start = 0
  for m, width in widths.items():
    present = np.asarray([bool(data.source("train").view[int(i)]["records"].get(m)) for i in items])
    assert 0 < present.sum() < len(items), m
    assert features[:, start + width].tolist() == (~present).astype(float).tolist(), m
    block = features[:, start:start + width]
    # An absent modality's features are the mean of the training subjects who have it.
    np.testing.assert_allclose(block[~present], np.broadcast_to(block[present].mean(axis=0), block[~present].shape),
                               rtol=1e-6, atol=1e-9, err_msg=m)
    start += width + 1


def apply(transforms, x):
  """`x` through grain transforms, as an evaluation pipeline applies them (its seed: 0)."""
  import grain
  for t in transforms:
    x = t.random_map(x, np.random.default_rng(0)) if isinstance(t, grain.transforms.RandomMap) else t.map(x)
  return x


def ehr_spans(data) -> dict[int, tuple[np.datetime64, np.datetime64]]:
  """{subject_id: (first, last) timed EHR event} over every split of a fused run's EHR part."""
  ehr, spans = data.data.modules["ehr"], {}
  for split in ("train", "tuning", "held_out"):
    source = ehr.source(split)
    for i, subject in enumerate(source.subject_ids):
      times = source[i]["times"]
      times = times[~np.isnat(times)]
      if len(times):
        spans[int(subject)] = (times.min(), times.max())
  return spans


def test_timed_labels_cut_each_subject_s_ehr_at_its_prediction_time_and_serve_the_same_way(fused_run, tmp_path):
  """A labels table with a prediction_time per row: the fused model reads each subject's EHR
  only up to that time (as EHR fine-tuning does) and every other modality whole; a subject
  whose EHR starts after the time is scored without it, one with nothing else is dropped."""
  truth = latents(fused_run).set_index("subject_id")
  untimed = task_config(fused_run, write_subject_labels(tmp_path / "plain.parquet", truth.index, truth["outcome"]))
  spans = ehr_spans(open_labeled_data(untimed, tmp_path / "plain"))
  ehr_only = [s for s in truth.index if truth.loc[s, "has_ehr"] and not truth.loc[
      s, ["has_imaging", "has_omics", "has_tabular"]].astype(bool).any()]
  with_others = [s for s in spans if s not in ehr_only]
  early = {ehr_only[0], with_others[0]}  # a time before their first EHR event
  times = [spans[s][0] - np.timedelta64(1, "D") if s in early else
           spans[s][0] + (spans[s][1] - spans[s][0]) // 2 if s in spans else np.datetime64("2020-01-01", "us")
           for s in truth.index]
  labels = write_subject_labels(tmp_path / "timed.parquet", truth.index, truth["outcome"],
                                prediction_time=pa.array(np.asarray(times, "datetime64[us]")))
  config = task_config(fused_run, labels, train__num_steps=4, train__eval_every=4, checkpoint__every_steps=4)
  data = open_labeled_data(config, tmp_path / "a")
  assert data.cut == "inclusive" and data.dropped == {"subjects_in_no_split": 0,
                                                       "rows_with_nothing_before_prediction_time": 1}
  ehr = data.data.modules["ehr"]
  tokenize = ehr.transforms(train=False, mask=False)
  cut_somewhere = 0
  for split in ("tuning", "held_out"):
    rows, source = data.split_labels(split), data.source(split)
    patterns = data.covariates(split)["modalities"]
    ehr_source = ehr.source(split)
    position = {int(s): i for i, s in enumerate(ehr_source.subject_ids)}
    for i in range(len(rows)):
      subject, time = int(rows.subject_ids[i]), rows.prediction_times[i]
      example = apply(data.data.transforms(train=False, mask=False), source[i]["record"])
      if subject in early or subject not in spans:
        assert "ehr" not in patterns[i].split("+") and not example["ehr"]["present"], subject
        continue
      # The EHR part is the EHR module's own example of the record cut at the row's time.
      record = ehr_source.record_until(position[subject], time, inclusive=True)
      expected = apply(tokenize, record)
      for name, value in expected["ehr"].items():
        np.testing.assert_array_equal(example["ehr"][name], value, err_msg=f"{subject} {name}")
      cut_somewhere += len(record["times"]) < len(ehr_source[position[subject]]["times"])
  assert cut_somewhere > 10

  # Fine-tuned on these rows and exported, the model scores the same rows from the raw files alike.
  finetune(config, tmp_path / "ft")
  data, predicted = predict_finetuned(tmp_path / "ft", config)
  export_dir, _ = export_run(tmp_path / "ft", tmp_path / "export")
  assert json.loads((export_dir / "export.json").read_text())["task"]["prediction_time_cut"] == "inclusive"
  files = {m: str(p) for m, p in cohort_paths(next((fused_run / "artifacts").rglob("cohort.json")).parent).items()}
  scored = score_subjects(export_dir, files, labels=labels)
  assert scored.nothing_before == 1 and scored.scored == len(truth) - 1
  table = scored.table.to_pandas()
  assert table["prediction_time"].notna().all()
  row_of = {s: i for i, s in enumerate(table["subject_id"])}
  for split in ("tuning", "held_out"):
    index = [row_of[s] for s in data.split_labels(split).subject_ids]
    np.testing.assert_allclose(table["predicted_boolean_probability"].to_numpy()[index], predicted[split], atol=1e-5)
  with pytest.raises(ValueError, match=r"1 of 400 rows cannot be scored \(0 name subjects no given record has, 1 "
                                       r"have nothing before their prediction_time\)"):
    score_subjects(export_dir, files, labels=labels, strict_labels=True)


def test_subject_labels_the_join_cannot_use_are_one_line_errors(fused_run, tmp_path):
  truth = latents(fused_run)
  ids = truth["subject_id"].to_numpy()
  twice = write_subject_labels(tmp_path / "twice.parquet", np.concatenate([ids, ids[:1]]),
                               np.zeros(len(ids) + 1, bool))
  with pytest.raises(ValueError, match=rf"subject_id {ids[0]} has 2 rows; subject-level labels take one row"):
    open_labeled_data(task_config(fused_run, twice), tmp_path / "a")
  same_time = write_subject_labels(tmp_path / "same_time.parquet", np.concatenate([ids[:2], ids[:1]]),
                                   [True, False, True],
                                   prediction_time=pa.array(np.full(3, np.datetime64("2020-01-01", "us"))))
  with pytest.raises(ValueError, match=rf"rows 0 and 2 have the same subject_id {ids[0]} and prediction_time"):
    open_labeled_data(task_config(fused_run, same_time), tmp_path / "b")
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
