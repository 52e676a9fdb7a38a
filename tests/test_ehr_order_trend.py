"""The order/trend cohort (counts of codes blind, the drivers and the oracle not), and the
EHR inputs that let a model see what counts cannot: each value's quantile within its code,
and the days since the previous event."""
from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import meds
import numpy as np
import pyarrow.parquet as pq
import pytest
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score

from biofm_jax.data import batch as B
from biofm_jax.data import packing
from biofm_jax.modalities.ehr import data as ehr
from biofm_jax.modalities.ehr import synthetic_order_trend as ot
from biofm_jax.modalities.ehr.baseline import CodeCountFeaturizer
from biofm_jax.modalities.ehr.meds import MEDSDataset

REPO = pathlib.Path(__file__).resolve().parents[1]
BOTH = {"value_inputs": "bins+quantile", "time_inputs": "age+offset+gap"}


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
  root = ot.write_order_trend_meds(tmp_path_factory.mktemp("ot") / "meds", num_subjects=1500, seed=3)
  return root, ot.write_order_trend_labels(root, root.parent / "labels.parquet")


def _records(root):
  source = MEDSDataset(root).all_subjects()
  return {int(record["subject_id"]): record for record in (source[i] for i in range(len(source)))}


def test_every_subject_has_the_same_informative_codes_and_counts_of_codes_predict_nothing(cohort):
  root, labels_path = cohort
  records, latents = _records(root), ot.read_latents(root)
  labels = pq.read_table(labels_path).to_pandas()
  assert sorted(records) == sorted(labels.subject_id) == sorted(latents["subject_id"].tolist())
  for record in records.values():
    codes = np.asarray(record["codes"], object)
    assert (codes == ot.LAB_CODE).sum() == ot.VISITS == (codes == ot.NOISE_LAB_CODE).sum()
    assert (codes == ot.FIRST_CODE).sum() == 1 == (codes == ot.SECOND_CODE).sum()
    assert record["times"][~np.isnat(record["times"])].max() < labels.prediction_time[
        labels.subject_id == record["subject_id"]].iloc[0]  # the label's time follows the whole record
  # The outcome, as labels, is the latent drawn with the oracle's probability.
  by_id = dict(zip(latents["subject_id"].tolist(), latents["outcome"].tolist()))
  assert labels.boolean_value.tolist() == [by_id[s] for s in labels.subject_id]
  y = labels.boolean_value.to_numpy()
  assert 0.3 < y.mean() < 0.6
  oracle = dict(zip(latents["subject_id"].tolist(), latents["oracle"].tolist()))
  assert roc_auc_score(y, [oracle[s] for s in labels.subject_id]) > 0.85
  # Counts of codes (EHRSHOT's features), fit on two thirds and scored on the rest: chance.
  ordered = [records[int(s)] for s in labels.subject_id]
  counts = CodeCountFeaturizer().fit(ordered).transform(ordered).toarray()
  cut = 1000
  model = LogisticRegression(max_iter=2000).fit(np.log1p(counts[:cut]), y[:cut])
  assert abs(roc_auc_score(y[cut:], model.predict_proba(np.log1p(counts[cut:]))[:, 1]) - 0.5) < 0.08


def test_each_driver_is_planted_in_the_records(cohort):
  """The eGFR slope of the last visits follows the trend, chest pain precedes the nitrate
  exactly when the latent says so, and the last gap is short exactly for a soon return."""
  root, _ = cohort
  records, latents = _records(root), ot.read_latents(root)
  slopes, firsts, gaps = [], [], []
  for subject in latents["subject_id"].tolist():
    r = records[int(subject)]
    codes, times = np.asarray(r["codes"], object), r["times"]
    lab = np.flatnonzero(codes == ot.LAB_CODE)
    slopes.append(np.polyfit(np.arange(ot.TREND_VISITS), r["numeric_values"][lab[-ot.TREND_VISITS:]], 1)[0])
    firsts.append(np.flatnonzero(codes == ot.FIRST_CODE)[0] < np.flatnonzero(codes == ot.SECOND_CODE)[0])
    gaps.append((times[lab[-1]] - times[lab[-2]]) / np.timedelta64(1, "D"))
  assert np.corrcoef(slopes, latents["trend"])[0, 1] > 0.9
  assert np.array_equal(firsts, latents["first_code_first"])
  assert np.array_equal(np.asarray(gaps) < ot.SOON_DAYS, latents["soon"])


def test_a_written_cohort_is_the_same_given_its_arguments_and_refuses_a_used_folder(tmp_path):
  a = ot.write_order_trend_meds(tmp_path / "a", num_subjects=20, seed=1)
  b = ot.write_order_trend_meds(tmp_path / "b", num_subjects=20, seed=1)
  for name in ("data/0.parquet", "data/1.parquet", meds.subject_splits_filepath, ot.LATENTS_FILEPATH):
    assert pq.read_table(a / name).equals(pq.read_table(b / name)), name
  with pytest.raises(ValueError, match="not an empty directory"):
    ot.write_order_trend_meds(a, num_subjects=20)


def _vocab_and_record():
  values = np.r_[np.arange(100.0), [np.nan] * 3].astype(np.float32)
  codes = np.asarray(["LAB"] * 100 + ["DX"] * 3, object)
  vocab = ehr.EHRVocab.build([{"codes": codes, "numeric_values": values}], min_count=1, num_value_bins=4)
  start = np.datetime64("2021-01-01T00:00", "us")
  day = np.timedelta64(86_400_000_000, "us")
  record = {"subject_id": 1, "codes": np.asarray(["GENDER//F", "LAB", "DX", "LAB", "DX", "LAB"], object),
            "times": np.r_[[np.datetime64("NaT", "us")], start + np.array([0, 0, 3, 3, 10]) * day],
            "numeric_values": np.asarray([np.nan, 10.0, np.nan, 10.5, np.nan, 90.0], np.float32)}
  return vocab, record


def test_the_tokeniser_gives_each_value_its_quantile_and_each_event_the_days_since_the_previous_one():
  vocab, record = _vocab_and_record()
  out = ehr.TokenizeEHR(vocab, 10, inputs=ehr.input_fields(BOTH)).map(record)
  # CLS, the static row, then the events: LAB 10 and LAB 10.5 share a bin, not a quantile.
  assert out[B.EHR_VALUE_BINS][[2, 4]].tolist() == [1, 1]
  np.testing.assert_allclose(out[B.EHR_VALUE_QUANTILE][:7], [0, 0, 10 / 99, 0, 10.5 / 99, 0, 90 / 99], atol=1e-6)
  np.testing.assert_allclose(out[B.EHR_GAP][:7], [0, 0, 0, 0, 3, 0, 7])
  assert out[B.EHR_GAP_KNOWN][:7].tolist() == [False, False, False, True, True, True, True]
  # Without the options the example is what it was.
  assert set(ehr.TokenizeEHR(vocab, 10).map(record)) == set(B.EHR_INPUT_FIELDS)
  # A masked token's value is a target: its quantile is hidden with its bin.
  masked = ehr.MaskEHR(vocab.size, mask_rate=0.99).random_map(out, np.random.default_rng(0))
  hidden = masked[B.EHR_TARGET_MASK]
  assert hidden[[2, 4, 6]].all() and (masked[B.EHR_VALUE_QUANTILE][hidden] == 0).all()
  # Packing keeps every optional field in its place.
  wide = ehr.TokenizeEHR(vocab, 16, inputs=ehr.input_fields(BOTH)).map(record)
  packed = packing.pack_examples([wide, wide], 16)
  for name in B.EHR_OPTIONAL_INPUTS:
    np.testing.assert_array_equal(packed[name][7:14], out[name][:7])


def test_value_options_are_checked_and_an_old_vocabulary_cannot_give_quantiles(tmp_path):
  with pytest.raises(ValueError, match="value_inputs is 'exact'"):
    ehr.input_fields({"value_inputs": "exact"})
  with pytest.raises(ValueError, match="time_inputs is 'tokens'"):
    ehr.input_fields({"time_inputs": "tokens"})
  assert ehr.input_fields({}) == ()  # runs saved before the options existed
  vocab, record = _vocab_and_record()
  path = tmp_path / "ehr_vocab.json"
  vocab.save(path)
  assert ehr.EHRVocab.load(path) == vocab
  payload = json.loads(path.read_text())
  del payload["value_quantile_points"]  # as vocabularies were saved before
  path.write_text(json.dumps(payload))
  old = ehr.EHRVocab.load(path)
  assert old.value_bins(record["codes"], record["numeric_values"]).tolist() == \
      vocab.value_bins(record["codes"], record["numeric_values"]).tolist()
  with pytest.raises(ValueError, match="saved before value quantiles"):
    ehr.TokenizeEHR(old, 10, inputs=ehr.input_fields(BOTH)).map(record)


def test_the_encoder_reads_the_optional_inputs_when_the_batch_carries_them():
  import jax
  import jax.numpy as jnp
  from biofm_jax.modalities.ehr.encoder import EHREncoder
  from biofm_jax.models.layers import TransformerConfig
  vocab, record = _vocab_and_record()
  example = ehr.TokenizeEHR(vocab, 10, inputs=ehr.input_fields(BOTH)).map(record)
  batch = {k: jnp.asarray(v)[None] for k, v in example.items()}
  encoder = EHREncoder(TransformerConfig(num_layers=1, embed_dim=16, num_heads=2, mlp_dim=32, max_len=10),
                       vocab.size, vocab.num_value_bins)
  params = encoder.init(jax.random.key(0), batch, train=False)["params"]
  assert {"value_quantile_projection", "gap_projection"} <= set(params)
  tokens = encoder.apply({"params": params}, batch, train=False)[0]
  moved = encoder.apply({"params": params}, {**batch, B.EHR_GAP: batch[B.EHR_GAP] * 2}, train=False)[0]
  assert np.abs(np.asarray(tokens - moved))[0, 4].max() > 1e-3  # the gapped token changed
  np.testing.assert_array_equal(np.asarray(tokens)[0, :3], np.asarray(moved)[0, :3])
  plain = {k: v for k, v in batch.items() if k not in B.EHR_OPTIONAL_INPUTS}
  assert not {"value_quantile_projection", "gap_projection"} & set(encoder.init(jax.random.key(0), plain,
                                                                                 train=False)["params"])


def test_the_benchmark_pretrains_with_the_options_and_scores_every_method_on_the_same_rows(tmp_path):
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  subprocess.run([sys.executable, str(REPO / "benchmarks/ehr_order_trend.py"), "--preset=tiny", "--steps=4",
                  "--objectives=next", "--subjects=200", "--finetune_steps=2", "--bootstrap=5", "--name=both",
                  "--order_in_states",
                  f"--workdir={tmp_path}", *(f"--set=data.ehr.{k}={v}" for k, v in BOTH.items())],
                 cwd=REPO, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
  result = json.loads((tmp_path / "ehr_order_trend_both_ft2_default.json").read_text())["held_out_auroc"]["next"]
  assert {"finetuned", "probe", "count_lr", "count_gbm", "oracle", "driver_features_lr"} <= set(result)
  assert set(result["order_in_states_auroc"]) == {"chest_pain_token", "nitrate_token", "mean", "last_visit"}
  from biofm_jax.train.finetune import saved_config
  config = saved_config(tmp_path / "next_tiny_both_4" / "pretrained")
  assert {k: config.data.ehr[k] for k in BOTH} == BOTH
  # The oracle is scored on the held-out label rows the report scored.
  splits = pq.read_table(tmp_path / "cohort" / meds.subject_splits_filepath).to_pandas()
  held = set(splits.subject_id[splits.split == "held_out"])
  assert result["held_out_rows"] == len(held) == 20
  latents = ot.read_latents(tmp_path / "cohort")
  rows = np.isin(latents["subject_id"], list(held))
  assert result["oracle"][0] == round(roc_auc_score(latents["outcome"][rows], latents["oracle"][rows]), 4)


def test_a_token_model_offers_its_mean_first_and_last_token_summaries():
  import jax.numpy as jnp
  from biofm_jax.models.description import token_summaries
  hidden = jnp.arange(2 * 4 * 3, dtype=jnp.float32).reshape(2, 4, 3)
  mask = jnp.asarray([[True, True, True, False], [True, True, False, False]])
  out = {k: np.asarray(v) for k, v in token_summaries(hidden, mask).items()}
  h = np.asarray(hidden)
  np.testing.assert_allclose(out["embedding"], [h[0, :3].mean(0), h[1, :2].mean(0)])
  np.testing.assert_allclose(out["cls_embedding"], h[:, 0])
  np.testing.assert_allclose(out["last_embedding"], [h[0, 2], h[1, 1]])


def test_the_last_visit_summary_averages_the_events_within_a_day_of_the_last_one():
  import jax.numpy as jnp
  from biofm_jax.modalities.ehr.model import last_visit_embedding
  hidden = jnp.arange(2 * 5 * 2, dtype=jnp.float32).reshape(2, 5, 2)
  example = {B.EHR_MASK: jnp.asarray([[1, 1, 1, 1, 0], [1, 1, 0, 0, 0]], bool),
             B.EHR_TIME_KNOWN: jnp.asarray([[0, 1, 1, 1, 0], [0, 0, 0, 0, 0]], bool),
             B.EHR_TIME: jnp.asarray([[0, 0, 30.2, 31.0, 0], [0] * 5], jnp.float32)}
  out = np.asarray(last_visit_embedding(hidden, example))
  h = np.asarray(hidden)
  np.testing.assert_allclose(out[0], h[0, 2:4].mean(0))  # day 30.2 and 31, not day 0 nor padding
  np.testing.assert_allclose(out[1], h[1, :2].mean(0))  # no timed event: every real token


@pytest.fixture(scope="module")
def trend_model(cohort, tmp_path_factory):
  """The tiny masked model with value quantiles, pre-trained on the cohort."""
  import helpers
  from biofm_jax.train.loop import train_and_evaluate
  root, _ = cohort
  workdir = tmp_path_factory.mktemp("trend_model")
  config = helpers.config_for("configs/ehr_bert.py:tiny", data__ehr__path=str(root), data__ehr__max_len=48,
                              data__ehr__value_inputs="bins+quantile", train__num_steps=400,
                              train__learning_rate=3e-3, train__eval_every=0, train__log_every=200,
                              checkpoint__every_steps=400)
  train_and_evaluate(config, workdir)
  return workdir


def _embeddings(workdir, records) -> np.ndarray:
  import jax.numpy as jnp
  from biofm_jax.train.runs import open_run
  _, data, setup, params, _ = open_run(workdir)
  tokenize = data.tokenizer()
  examples = [tokenize.map(r) for r in records]
  batch = {"ehr": {k: jnp.asarray(np.stack([e[k] for e in examples])) for k in examples[0]}}
  return np.asarray(setup.model.apply({"params": params}, batch)["ehr"]["embedding"])


def test_the_probe_reads_the_lab_trend_and_loses_it_when_values_become_their_code_s_median(cohort, trend_model):
  """A learning check that fails if the model turns blind to how values move: the probe on
  held-out embeddings against the same records with every eGFR value replaced by the
  code's training median (the counts, codes, order and times unchanged)."""
  import helpers
  root, labels_path = cohort
  records = _records(root)
  labels = pq.read_table(labels_path).to_pandas().set_index("subject_id")
  splits = pq.read_table(root / meds.subject_splits_filepath).to_pandas()
  train_ids = splits.subject_id[splits.split == "train"].tolist()
  test_ids = splits.subject_id[splits.split != "train"].tolist()  # tuning and held-out: 300 rows
  lab_values = np.concatenate([records[s]["numeric_values"][np.asarray(records[s]["codes"], object) == ot.LAB_CODE]
                               for s in train_ids])
  median = np.float32(np.median(lab_values))

  def flattened(record):
    values = record["numeric_values"].copy()
    values[np.asarray(record["codes"], object) == ot.LAB_CODE] = median
    return {**record, "numeric_values": values}
  train_x = _embeddings(trend_model, [records[s] for s in train_ids])
  y_train, y_test = labels.boolean_value[train_ids].to_numpy(), labels.boolean_value[test_ids].to_numpy()
  intact = helpers.probe_auroc(train_x, y_train, _embeddings(trend_model, [records[s] for s in test_ids]), y_test)
  flat = helpers.probe_auroc(train_x, y_train, _embeddings(trend_model, [flattened(records[s]) for s in test_ids]),
                             y_test)
  assert intact > 0.6 and intact - flat > 0.12, (intact, flat)  # seen: 0.644 and 0.452


def _shuffled(record, rng):
  """The record with its timed events' codes and values dealt out again over the same times:
  every code and value is kept and every time is kept, only which event came when is lost."""
  timed = np.flatnonzero(~np.isnat(record["times"]))
  order = timed[rng.permutation(len(timed))]
  codes, values = np.asarray(record["codes"], object).copy(), record["numeric_values"].copy()
  codes[timed], values[timed] = codes[order], values[order]
  return {**record, "codes": codes, "numeric_values": values}


def test_the_probe_loses_the_outcome_when_each_timeline_is_shuffled(cohort, trend_model):
  """A learning check that fails if the model turns blind to order: the probe, fitted on
  intact training timelines, scores held-out timelines intact and with their events dealt out
  again over the same times (same codes, values, counts and times; a bag of codes sees no
  difference, the eGFR trend and the order of chest pain and nitrate are gone)."""
  import helpers
  root, labels_path = cohort
  records = _records(root)
  labels = pq.read_table(labels_path).to_pandas().set_index("subject_id")
  splits = pq.read_table(root / meds.subject_splits_filepath).to_pandas()
  train_ids = splits.subject_id[splits.split == "train"].tolist()
  test_ids = splits.subject_id[splits.split != "train"].tolist()
  rng = np.random.default_rng(0)
  shuffled = [_shuffled(records[s], rng) for s in test_ids]
  counts = CodeCountFeaturizer().fit([records[s] for s in test_ids])
  assert (counts.transform([records[s] for s in test_ids]) != counts.transform(shuffled)).nnz == 0
  train_x = _embeddings(trend_model, [records[s] for s in train_ids])
  y_train, y_test = labels.boolean_value[train_ids].to_numpy(), labels.boolean_value[test_ids].to_numpy()
  intact = helpers.probe_auroc(train_x, y_train, _embeddings(trend_model, [records[s] for s in test_ids]), y_test)
  mixed = helpers.probe_auroc(train_x, y_train, _embeddings(trend_model, shuffled), y_test)
  print(f"probe AUROC on held-out timelines: intact {intact:.3f}, shuffled {mixed:.3f}")
  assert intact > 0.6 and intact - mixed > 0.1, (intact, mixed)  # seen: 0.644 and 0.457


def test_a_fine_tuned_model_with_the_inputs_exports_and_scores_raw_meds_as_the_run_does(cohort, trend_model, tmp_path):
  """LP-FT from the trend model, a few steps, with the last visit's summary; its export
  reads the MEDS files and the labels and gives the run's own held-out predictions."""
  import helpers
  from biofm_jax.config import load_config
  from biofm_jax.eval.finetuned import predict_finetuned
  from biofm_jax.eval.predict_meds import score_meds
  from biofm_jax.train.finetune import finetune, finetune_config
  root, labels_path = cohort
  config = finetune_config(load_config(f"{REPO}/configs/finetune.py:binary", {
      **helpers.QUIET, "task.labels": str(labels_path), "task.embedding": "ehr/last_visit_embedding",
      "train.num_steps": 6, "train.eval_every": 6, "checkpoint.every_steps": 6}), trend_model)
  assert (config.finetune.head_init, config.finetune.backbone_lr_scale) == ("probe", 0.3)  # the preset's recipe
  finetune(config, tmp_path / "ft")
  data, scores = predict_finetuned(tmp_path / "ft", splits=("held_out",))
  subprocess.run([sys.executable, "experiments/export.py", f"--workdir={tmp_path / 'ft'}", f"--out={tmp_path / 'export'}"],
                 cwd=REPO, check=True, capture_output=True, timeout=300)
  table = score_meds(tmp_path / "export", root, labels_path).table.to_pandas().set_index("subject_id")
  held = data.split_labels("held_out").subject_ids
  np.testing.assert_allclose(table.predicted_boolean_probability[held].to_numpy(), scores["held_out"], atol=1e-5)
