"""The 12-lead ECG modality (`biofm_jax/modalities/ecg/`): WFDB records written by wfdb's own
writer (formats 16 and 212), lead selection and masking, resampling, normalisation and
crops, bad records, the MAE objective, pre-training, probes beside the rhythm baseline,
and fusion with EHR."""
from __future__ import annotations

import json
import os

import numpy as np
import pyarrow.parquet as pq
import pytest
import wfdb

import helpers
from biofm_jax.eval import downstream
from biofm_jax.eval.record_tasks import evaluate_record_labels
from biofm_jax.modalities.ecg import data as ecg
from biofm_jax.modalities.ecg.mae import ECGReconstruction
from biofm_jax.modalities.ecg.source import ECGDataset
from biofm_jax.modalities.ecg.synthetic import write_synthetic_ecg
from biofm_jax.modalities.ehr.synthetic import write_synthetic_meds
from biofm_jax.train.metric_writer import read_metrics

LEADS = ("I", "II", "V1")


def write_record(folder, name, signal, *, fs=100, leads=("I", "II", "V1"), fmt="16"):
  wfdb.wrsamp(name, fs=fs, units=["mV"] * len(leads), sig_name=list(leads), p_signal=np.asarray(signal, float),
              fmt=[fmt] * len(leads), write_dir=str(folder))
  return folder / f"{name}.hea"


def sine(seconds, fs, hz, leads=3):
  t = np.arange(int(seconds * fs)) / fs
  return np.stack([(k + 1) * np.sin(2 * np.pi * hz * t) + k for k in range(leads)], axis=1)


# ================================================================ reading WFDB
def test_folder_of_records_reads_leads_by_name_and_masks_the_missing(tmp_path):
  write_record(tmp_path, "a", sine(4, 100, 1.0), fmt="212")
  write_record(tmp_path / "", "b", sine(4, 100, 1.0, leads=2), leads=("ii", "I"))  # other order, other case
  dataset = ECGDataset(tmp_path, leads=LEADS)
  records = {r.subject_id: r for r in dataset.records}
  assert records["a"].channels == (0, 1, 2) and records["b"].channels == (1, 0, -1)
  assert dataset.stats["leads_missing"] == 1 and sum(len(v) for v in dataset.splits.values()) == 2
  source = ECGSource_of(dataset, "b")
  item = source[0]
  assert item["lead_present"].tolist() == [True, True, False]
  expected = sine(4, 100, 1.0, leads=2)
  np.testing.assert_allclose(item["signal"][:, 0], expected[:, 1], atol=2e-3)  # lead I was written second
  np.testing.assert_allclose(item["signal"][:, 1], expected[:, 0], atol=2e-3)
  assert not item["signal"][:, 2].any() and item["fs"] == 100


def ECGSource_of(dataset, subject):
  split = next(s for s, rows in dataset.splits.items() if subject in [dataset.records[i].subject_id for i in rows])
  source = dataset.source(split)
  keep = [r for r in source.records if r.subject_id == subject]
  return type(source)(keep, source.leads, source.on_error, source.num_labels)


def test_manifest_gives_subjects_splits_and_labels(tmp_path):
  for name in ("r1", "r2", "r3"):
    write_record(tmp_path / "wf", name, sine(2, 100, 2.0)) if (tmp_path / "wf").exists() else (
        (tmp_path / "wf").mkdir(), write_record(tmp_path / "wf", name, sine(2, 100, 2.0)))
  (tmp_path / "m.csv").write_text("subject_id,path,split,afib\n7,wf/r1.hea,train,1\n7,wf/r2,train,0\n"
                                  "8,wf/r3.hea,tuning,\n")
  dataset = ECGDataset(tmp_path / "m.csv", leads=LEADS)
  assert {s: len(r) for s, r in dataset.splits.items()} == {"train": 2, "tuning": 1}
  labels = dataset.source("train").labels
  assert labels.tolist() == [[1.0], [0.0]] and np.isnan(dataset.source("tuning").labels[0, 0])
  assert dataset.source("train").record_times() is None
  (tmp_path / "dated.csv").write_text("subject_id,path,split,acquisition_time,afib\n7,wf/r1.hea,train,2021-03-04T08:00,1\n"
                                      "7,wf/r2,train,2021-05-01,0\n")
  dated = ECGDataset(tmp_path / "dated.csv", leads=LEADS)
  assert dated.label_names == ("afib",)
  np.testing.assert_array_equal(dated.source("train").record_times(),
                                np.array(["2021-03-04T08:00", "2021-05-01"], "datetime64[us]"))
  (tmp_path / "bad.csv").write_text("subject_id,path,split\n7,wf/r1.hea,train\n7,wf/r2.hea,tuning\n")
  with pytest.raises(ValueError, match="subject '7' is in splits 'train' and 'tuning'"):
    ECGDataset(tmp_path / "bad.csv", leads=LEADS)


def bad_records(folder):
  """One good record and one of each kind of bad one; {name: the reason it is skipped}."""
  folder.mkdir()
  write_record(folder, "good", sine(3, 100, 1.0))
  write_record(folder, "nodat", sine(3, 100, 1.0))
  (folder / "nodat.dat").unlink()
  write_record(folder, "short", sine(3, 100, 1.0))
  os.truncate(folder / "short.dat", 100)
  write_record(folder, "fmt", sine(3, 100, 1.0))
  header = (folder / "fmt.hea").read_text().replace("fmt.dat 16 ", "fmt.dat 999 ")
  (folder / "fmt.hea").write_text(header)
  write_record(folder, "noleads", sine(3, 100, 1.0), leads=("aVR", "aVL", "aVF"))
  return {"nodat": "missing", "short": "truncated", "fmt": "format", "noleads": "leads"}


def test_bad_records_raise_naming_file_and_field_or_are_skipped_and_counted(tmp_path):
  expected = bad_records(tmp_path / "wf")
  messages = {"nodat": r"nodat\.hea: signal file .*nodat\.dat does not exist",
              "short": r"short\.dat: 100 bytes, but the header's sig_len=300 for 3 signals needs 1800",
              "fmt": r"fmt\.hea: field 'fmt' is \['999'\]",
              "noleads": r"noleads\.hea: field 'sig_name' is \['aVR', 'aVL', 'aVF'\]; none of the configured"}
  for name, message in messages.items():
    only = tmp_path / f"only_{name}"
    only.mkdir()
    for path in (tmp_path / "wf").glob(f"{name}.*"):
      (only / path.name).write_bytes(path.read_bytes())
    (only / "good.hea").write_bytes((tmp_path / "wf" / "good.hea").read_bytes())
    (only / "good.dat").write_bytes((tmp_path / "wf" / "good.dat").read_bytes())
    with pytest.raises(ValueError, match=message):
      ECGDataset(only, leads=LEADS)
  dataset = ECGDataset(tmp_path / "wf", leads=LEADS, on_error="skip")
  assert [r.subject_id for r in dataset.records] == ["good"]
  assert dataset.stats["skipped"] == 4
  assert all(dataset.stats[f"skipped_{reason}"] == 1 for reason in expected.values())


def test_nan_samples_fail_at_read_time_or_are_replaced_and_listed_with_skip(tmp_path):
  signal = sine(3, 100, 1.0)
  signal[17, 1] = np.nan  # wfdb writes the format's invalid-sample value; it reads back as NaN
  (tmp_path / "wf").mkdir()
  write_record(tmp_path / "wf", "nan", signal)
  write_record(tmp_path / "wf", "ok", sine(3, 100, 1.0))
  (tmp_path / "m.csv").write_text("subject_id,path,split\n1,wf/nan.hea,train\n2,wf/ok.hea,train\n")
  with pytest.raises(ValueError, match=r"nan\.dat: field 'signal' is not finite \(nan\) at sample 17 of signal 1"):
    ECGDataset(tmp_path / "m.csv", leads=LEADS).source("train")[0]
  skip_file = str(tmp_path / "skipped.csv")
  source = ECGDataset(tmp_path / "m.csv", leads=LEADS, on_error="skip", skip_file=skip_file).source("train")
  item = source[0]
  assert item["subject_id"] == "2" and item["readable"]  # the next readable record of the split
  assert "nan" in (tmp_path / "skipped.csv").read_text() and ToExample(length=200, patch=20).map(item)[ecg.VALID]


# ================================================================ transforms
def ToExample(length, patch):
  class Chain:
    def map(self, record):
      for t in (ecg.ResampleECG(100), ecg.NormalizeLeads(), ecg.CenterCropECG(length), ecg.ToECGExample(patch)):
        record = t.map(record)
      return record
  return Chain()


def test_resampling_keeps_the_rhythm_and_normalising_scales_each_lead():
  fs, hz = 125, 3.0
  present = np.array([True, True, False])
  signal = sine(4, fs, hz)
  signal[:, 2] = 0
  record = {"signal": signal.astype(np.float32), "lead_present": present, "fs": np.float32(fs), "readable": True}
  resampled = ecg.ResampleECG(100).map(record)
  assert resampled["signal"].shape == (400, 3) and resampled["fs"] == 100
  spectrum = np.abs(np.fft.rfft(resampled["signal"][:, 0]))
  assert np.argmax(spectrum) * 100 / 400 == pytest.approx(hz)  # the 3 Hz wave is still at 3 Hz
  normal = ecg.NormalizeLeads().map(resampled)["signal"]
  np.testing.assert_allclose(normal[:, :2].mean(axis=0), 0, atol=1e-5)
  np.testing.assert_allclose(normal[:, :2].std(axis=0), 1, atol=1e-4)
  assert not normal[:, 2].any()


def test_crops_pad_short_records_and_tokens_mark_absent_leads_and_padding():
  record = {"signal": np.ones((90, 3), np.float32), "lead_present": np.array([True, False, True]),
            "fs": np.float32(100), "readable": True}
  example = ecg.ToECGExample(20).map(ecg.CenterCropECG(120).map(record))
  present = example[ecg.TOKEN_PRESENT].reshape(3, 6)  # lead-major: 3 leads x 6 patches
  assert present.tolist() == [[True] * 5 + [False], [False] * 6, [True] * 5 + [False]]
  assert example[ecg.SIGNAL].shape == (120, 3) and not example[ecg.SIGNAL][90:].any()
  long = {**record, "signal": np.arange(300, dtype=np.float32)[:, None].repeat(3, 1)}
  assert ecg.CenterCropECG(100).map(long)["signal"][0, 0] == 100
  starts = {int(ecg.RandomCropECG(100).random_map(long, np.random.default_rng(s))["signal"][0, 0]) for s in range(30)}
  assert len(starts) > 10 and min(starts) >= 0 and max(starts) <= 200


def test_reconstruction_loss_counts_only_present_masked_tokens_of_valid_examples():
  masked = np.array([[0, 3, 5], [0, 1, 2]], np.int32)
  batch = {"ecg": {ecg.TOKEN_PRESENT: np.array([[True, True, True, False, True, True], [True] * 6]),
                   ecg.MASKED: masked, ecg.VALID: np.array([True, False])}}
  target = np.random.default_rng(0).normal(size=(2, 3, 4)).astype(np.float32)
  outputs = {"ecg": {"predicted_patches": target + 1.0, "target_patches": target}}
  objective = ECGReconstruction(norm_pix_loss=False)
  assert float(objective.counts(batch)["reconstruction_loss"]) == 2.0  # token 3 is absent, example 2 padding
  assert float(objective.sums(outputs, batch)["reconstruction_loss"]) == pytest.approx(2.0)


# ================================================================ training, probes, fusion
@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("ecg_run")
  config = helpers.config_for("configs/ecg_mae.py:tiny", train__num_steps=30, train__eval_every=30,
                              data__ecg__synthetic_subjects=240)
  helpers.train(config, workdir)
  return workdir


def test_ecg_pretrains_and_its_reconstruction_loss_falls(pretrained):
  losses = helpers.train_losses(pretrained)
  steps = sorted(losses)
  assert steps[-1] == 30 and np.isfinite(list(losses.values())).all()
  assert losses[steps[-1]] < 0.9 * losses[steps[0]]


def test_probe_on_the_planted_rhythm_sits_beside_the_rr_baseline(pretrained, tmp_path):
  evaluate_record_labels(pretrained, tmp_path / "eval", "afib", downstream.EvaluationOptions(
      few_shot_ks=(), bootstrap_samples=20))
  saved = json.loads((tmp_path / "eval" / "report.json").read_text())
  assert saved["task"]["name"] == "afib" and saved["task"]["type"] == "binary"
  assert saved["model"]["name"] == "probe" and list(saved["baselines"]) == ["logistic_rhythm_features"]
  for split in ("tuning", "held_out"):
    baseline = saved["baselines"]["logistic_rhythm_features"][split]["metrics"]
    assert baseline["n"] == saved[split]["n"] >= 15
    assert baseline["auroc"] > 0.85  # RR irregularity is the planted signal
    # The report's figures are the predictions file's, and the probe finds the rhythm too.
    recomputed = helpers.binary_scores_in_predictions(tmp_path / "eval", "probe", split)
    assert recomputed["n"] == saved[split]["n"] and recomputed["auroc"] == pytest.approx(saved[split]["auroc"], abs=1e-9)


def test_ecg_fuses_with_ehr_by_subject(tmp_path):
  meds = write_synthetic_meds(tmp_path / "meds", num_subjects=80, seed=0)
  splits = pq.read_table(tmp_path / "meds" / "metadata" / "subject_splits.parquet").to_pylist()
  manifest = write_synthetic_ecg(tmp_path / "ecg", subject_ids=[str(r["subject_id"]) for r in splits[:60]], seed=1)
  split_of = {str(r["subject_id"]): r["split"] for r in splits}  # a subject keeps its EHR split
  lines = manifest.read_text().splitlines()
  manifest.write_text("\n".join([lines[0] + ",split"] + [f"{line},{split_of[line.split(',')[0]]}" for line in lines[1:]]))
  config = helpers.config_for("configs/multimodal_fusion.py:tiny", data__multimodal__modalities=("ehr", "ecg"),
                              data__ehr__path=str(meds), data__ecg__path=str(manifest),
                              objective__contrastive__pairs="ehr-ecg", train__num_steps=6, train__eval_every=6,
                              train__log_every=2, checkpoint__every_steps=6)
  summary = helpers.train(config, tmp_path / "run")
  records = [r for r in read_metrics(tmp_path / "run") if "train/loss" in r]
  assert records and all(np.isfinite(r["train/loss"]) for r in records)
  assert any("ecg/reconstruction_loss" in key for key in records[-1])
  assert any("contrastive" in key for key in records[-1])
  assert summary["steps"] == 6 and np.isfinite(summary["eval/loss"])
  # Fused, the ECG tower is aligned with the EHR one and its recall is measured on the tuning subjects.
  assert summary["retrieval/ehr->ecg/subjects"] > 0 and "retrieval/ehr->ecg/recall@10" in summary
