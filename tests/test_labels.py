"""MEDS labels: reading and checking them, the prediction-time cut, and bad input."""
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from biofm_jax.data import batch as B
from biofm_jax.modalities.ehr.data import EHRData, EHRVocab
from biofm_jax.modalities.ehr.task_data import EHRTaskData
from biofm_jax.data.labels import read_labels, write_labels
from biofm_jax.modalities.ehr.meds import MEDSDataset
from biofm_jax.modalities.ehr.synthetic_labels import synthetic_labels, write_synthetic_labels

MAX_LEN = 64


def ehr_data(root) -> EHRData:
  dataset = MEDSDataset(root)
  train = dataset.source("train")
  vocab = EHRVocab.build((train[i] for i in range(len(train))), min_count=1, num_value_bins=5)
  return EHRData(dataset, vocab, max_len=MAX_LEN, window="recent", mask_rate=0.15, targets="masked")


@pytest.fixture(scope="module")
def cohort(synthetic_meds, tmp_path_factory):
  labels = write_synthetic_labels(synthetic_meds, tmp_path_factory.mktemp("labels") / "high_risk.parquet",
                                  "high_risk")
  return synthetic_meds, labels, ehr_data(synthetic_meds)


def test_synthetic_labels_follow_the_meds_label_schema_and_plant_their_signal(cohort, tmp_path):
  root, path, _ = cohort
  table = pq.read_table(path)
  assert {"subject_id", "prediction_time", "boolean_value", "sex"} <= set(table.column_names)
  assert table.schema.field("prediction_time").type == pa.timestamp("us")
  labels = read_labels(path, {"type": "binary"})
  assert 0.15 < labels.targets[B.TASK_LABEL].mean() < 0.45
  assert set(labels.covariates) == {"sex"}
  survival = synthetic_labels(root, "planted_survival", censor_fraction=0.8)
  light = synthetic_labels(root, "planted_survival")
  assert survival["died"].mean() < light["died"].mean() - 0.2  # heavy censoring removes events
  assert (survival["time"] >= 1.0).all()


def test_each_task_type_reads_its_column(tmp_path):
  times = np.array(["2020-01-01", "2020-02-01", "2020-03-01"], "datetime64[us]")
  path = write_labels(tmp_path / "l.parquet", [1, 2, 3], times, boolean_value=[True, False, True],
                      float_value=np.array([3.5, 10.0, 1.0], np.float32), categorical_value=["b", "a", "b"],
                      integer_value=np.array([2, 10, 2]), flag_x=[True, True, False], site=["A", "B", "A"])
  binary = read_labels(path, {"type": "binary"})
  np.testing.assert_array_equal(binary.targets[B.TASK_LABEL], [1, 0, 1])
  assert set(binary.covariates) >= {"site", "float_value", "flag_x"}
  multiclass = read_labels(path, {"type": "multiclass"})
  assert multiclass.classes == ("a", "b") and list(multiclass.targets[B.TASK_LABEL]) == [1, 0, 1]
  by_int = read_labels(path, {"type": "multiclass", "value_column": "integer_value"})
  assert by_int.classes == ("2", "10")  # numeric order, not string order
  multilabel = read_labels(path, {"type": "multilabel", "label_columns": ["boolean_value", "flag_x"]})
  np.testing.assert_array_equal(multilabel.targets[B.TASK_LABEL], [[1, 1], [0, 1], [1, 0]])
  survival = read_labels(path, {"type": "survival"})
  np.testing.assert_allclose(survival.targets[B.TASK_TIME], [3.5, 10.0, 1.0])
  np.testing.assert_array_equal(survival.targets[B.TASK_EVENT], [True, False, True])
  regression = read_labels(path, {"type": "regression"})
  np.testing.assert_allclose(regression.targets[B.TASK_LABEL], [3.5, 10.0, 1.0])


@pytest.mark.parametrize("task, columns, message", [
    ({"type": "binary"}, {"boolean_value": ["yes", "no"]}, "column 'boolean_value' has type string, expected bool"),
    ({"type": "binary"}, {"float_value": [1.0, 0.0]}, "no column 'boolean_value'"),
    ({"type": "regression"}, {"float_value": ["1.5", "2"]}, "column 'float_value' has type string"),
    ({"type": "binary"}, {"boolean_value": pa.array([True, None])}, "column 'boolean_value' is null in row 1"),
    ({"type": "survival"}, {"boolean_value": [True, False], "float_value": [5.0, 0.0]}, "row 1 has 0.0"),
    ({"type": "multiclass", "classes": ["a"]}, {"categorical_value": ["a", "z"]}, "classes \\['z'\\] not in"),
    ({"type": "ordinal"}, {"boolean_value": [True, False]}, "task.type 'ordinal'"),
])
def test_a_label_column_of_the_wrong_type_or_content_is_named(tmp_path, task, columns, message):
  path = write_labels(tmp_path / "bad.parquet", [1, 2], np.array(["2020-01-01", "2020-01-02"], "datetime64[us]"),
                      **columns)
  with pytest.raises(ValueError, match=message) as error:
    read_labels(path, task)
  assert "bad.parquet" in str(error.value)


def _labels_for(cohort, tmp_path, subject_ids, times, name="l.parquet"):
  return read_labels(write_labels(tmp_path / name, subject_ids, np.asarray(times, "datetime64[us]"),
                                  boolean_value=[True, False] * (len(subject_ids) // 2) + [True] * (len(subject_ids) % 2)),
                     {"type": "binary"})


def test_rows_of_unknown_subjects_or_without_history_are_dropped_and_counted_or_with_strict_labels_named(
    cohort, tmp_path):
  root, path, ehr = cohort
  good = read_labels(path, {"type": "binary"})
  data = EHRTaskData(ehr, good)
  held_out = data.split_labels("held_out")
  # Two unknown subjects, one training row and one held-out row with no event at or before their time.
  train_ids = list(data.split_labels("train").subject_ids[:6])
  train_times = list(data.split_labels("train").prediction_times[:6])
  ids = train_ids + [424242, 424243, int(held_out.subject_ids[0]), int(held_out.subject_ids[1])]
  early = np.datetime64("1900-01-01", "us")
  times = train_times[:1] + [early] + train_times[2:] + [train_times[0]] * 2 + [early, held_out.prediction_times[1]]
  labels = _labels_for(cohort, tmp_path, ids, times)
  lenient = EHRTaskData(ehr, labels)
  assert lenient.dropped == {"unknown_subject": 2, "no_history": {"train": 1, "tuning": 0, "held_out": 1}, "total": 4}
  assert len(lenient.split_labels("train")) == 5 and len(lenient.split_labels("held_out")) == 1
  assert lenient.summary()["labels_dropped"] == 4
  assert 1 not in np.flatnonzero(np.isin(lenient.split_labels("train").subject_ids, [ids[1]]))
  with pytest.raises(ValueError, match="4 of 10 rows cannot be used: 2 name subjects the MEDS dataset does not "
                                       "have .*; 2 have no event at or before their prediction_time \\(train 1, "
                                       "held_out 1\\); first: row 1, subject_id"):
    EHRTaskData(ehr, labels, strict_labels=True)
  no_time = write_labels(tmp_path / "nt.parquet", ids[:4], times[:4], boolean_value=[True, False] * 2)
  table = pq.read_table(no_time).drop_columns(["prediction_time"])
  pq.write_table(table, tmp_path / "nt.parquet")
  with pytest.raises(ValueError, match="EHR labels need a prediction_time; row 0"):
    EHRTaskData(ehr, read_labels(tmp_path / "nt.parquet", {"type": "binary"}))


def test_an_event_at_the_prediction_time_is_history_unless_the_cut_is_strict(cohort, tmp_path):
  """A label whose prediction time is a subject's first event (ACES's trigger): MEDS keeps it."""
  root, path, ehr = cohort
  good = EHRTaskData(ehr, read_labels(path, {"type": "binary"}))
  source = good.source("train")
  ids = source.labels.subject_ids[:10]
  firsts = np.array([source._meds.first_event_times()[p] for p in source._positions[:4]])
  # Four rows at the subject's first event, six at their ordinary (later) times.
  labels = _labels_for(cohort, tmp_path, ids, np.concatenate([firsts, source.labels.prediction_times[4:10]]))
  inclusive = EHRTaskData(ehr, labels)
  record = inclusive.source("train")[0]
  assert _last_time(record) == firsts[0]  # the event at the prediction time is seen
  assert inclusive.dropped["total"] == 0
  strict = EHRTaskData(ehr, labels, cut="strict")
  assert strict.dropped["no_history"]["train"] == 4  # nothing strictly before a first event
  with pytest.raises(ValueError, match="4 of 10 rows cannot be used: 4 have no event strictly before"):
    EHRTaskData(ehr, labels, cut="strict", strict_labels=True)
  with pytest.raises(ValueError, match="task.prediction_time_cut 'before'"):
    EHRTaskData(ehr, labels, cut="before")


def test_a_label_column_with_one_class_in_training_is_named(cohort, tmp_path):
  root, path, ehr = cohort
  labels = read_labels(path, {"type": "binary"})
  data = EHRTaskData(ehr, labels)
  train = set(data.split_labels("train").subject_ids.tolist())
  only_true = np.where(np.isin(labels.subject_ids, list(train)), True, labels.targets[B.TASK_LABEL] > 0)
  one = write_labels(tmp_path / "one.parquet", labels.subject_ids, labels.prediction_times,
                     boolean_value=only_true.tolist())
  with pytest.raises(ValueError, match="one.parquet: column 'boolean_value' has one class \\(True\\) in the "
                                       "training split"):
    EHRTaskData(ehr, read_labels(one, {"type": "binary"}))


def test_a_class_without_training_rows_is_an_error(cohort, tmp_path):
  root, path, ehr = cohort
  labels = read_labels(path, {"type": "binary"})
  data = EHRTaskData(ehr, labels)
  held_out = set(data.split_labels("held_out").subject_ids.tolist())
  names = np.where(np.isin(labels.subject_ids, list(held_out)) & (np.arange(len(labels)) % 7 == 0), "rare",
                   np.where(labels.targets[B.TASK_LABEL] > 0, "high", "low"))
  multi = write_labels(tmp_path / "multi.parquet", labels.subject_ids, labels.prediction_times,
                       categorical_value=names.tolist())
  with pytest.raises(ValueError, match="classes \\['rare'\\] have no row in the training split"):
    EHRTaskData(ehr, read_labels(multi, {"type": "multiclass"}))


def _with_extra_events(root, out, subject_id, events):
  """A copy of the MEDS cohort at `out` with `events` [(time, code, value)] added to one subject."""
  import shutil
  shutil.copytree(root, out)
  data_file = sorted((out / "data").glob("*.parquet"))
  for path in data_file:
    table = pq.read_table(path)
    if subject_id not in set(table.column("subject_id").to_pylist()):
      continue
    extra = pa.table({"subject_id": pa.array([subject_id] * len(events), pa.int64()),
                      "time": pa.array([np.datetime64(t, "us") for t, _, _ in events], pa.timestamp("us")),
                      "code": pa.array([c for _, c, _ in events], pa.string()),
                      "numeric_value": pa.array([v for _, _, v in events], pa.float32()),
                      "text_value": pa.nulls(len(events), table.schema.field("text_value").type)},
                     schema=table.schema)
    merged = pa.concat_tables([table, extra]).sort_by([("subject_id", "ascending"), ("time", "ascending")])
    pq.write_table(merged, path)
  return out


def test_events_after_the_prediction_time_never_reach_the_model(cohort, tmp_path):
  root, path, ehr = cohort
  labels = read_labels(path, {"type": "binary"})
  before = EHRTaskData(ehr, labels)
  split = "train"
  source = before.source(split)
  row = 3
  subject, cutoff = int(source.labels.subject_ids[row]), source.labels.prediction_times[row]
  future = [(cutoff + np.timedelta64(1, "us"), "MEDS_DEATH", np.nan),
            (cutoff + np.timedelta64(1, "D"), "DX//HEART_FAILURE", np.nan),
            (cutoff + np.timedelta64(30, "D"), "LAB//BNP", 9999.0)]
  tokenize = before.transforms(train=True)[0]
  expected = tokenize.map(source[row])
  for cut in ("inclusive", "strict"):
    after = EHRTaskData(ehr_data_with_vocab(ehr, _with_extra_events(root, tmp_path / f"future_{cut}", subject,
                                                                       future)), labels, cut=cut)
    strict_before = EHRTaskData(ehr, labels, cut=cut)
    got, want = tokenize.map(after.source(split)[row]), tokenize.map(strict_before.source(split)[row])
    for name in want["ehr"]:
      np.testing.assert_array_equal(got["ehr"][name], want["ehr"][name], err_msg=name)
  # The check can fail: an event at the prediction time itself is seen by default (MEDS), not with
  # the strict cut; one just before it is seen by both.
  at = [(cutoff, "DX//HEART_FAILURE", np.nan)]
  changed_root = _with_extra_events(root, tmp_path / "at", subject, at)
  inclusive = EHRTaskData(ehr_data_with_vocab(ehr, changed_root), labels)
  assert len(inclusive.source(split)[row]["codes"]) == len(source[row]["codes"]) + 1
  assert _last_time(inclusive.source(split)[row]) == cutoff
  strict = EHRTaskData(ehr_data_with_vocab(ehr, changed_root), labels, cut="strict")
  assert _last_time(strict.source(split)[row]) < cutoff
  assert len(strict.source(split)[row]["codes"]) == len(EHRTaskData(ehr, labels, cut="strict").source(split)[row]["codes"])
  past = [(cutoff - np.timedelta64(1, "m"), "DX//HEART_FAILURE", np.nan)]
  changed = EHRTaskData(ehr_data_with_vocab(ehr, _with_extra_events(root, tmp_path / "past", subject, past)),
                           labels, cut="strict")
  assert len(changed.source(split)[row]["codes"]) == len(EHRTaskData(ehr, labels, cut="strict").source(split)[row]["codes"]) + 1
  assert not np.array_equal(tokenize.map(changed.source(split)[row])["ehr"][B.EHR_TIME], expected["ehr"][B.EHR_TIME])


def _last_time(record):
  times = record["times"]
  return times[~np.isnat(times)].max()


def ehr_data_with_vocab(ehr: EHRData, root) -> EHRData:
  return EHRData(MEDSDataset(root), ehr.vocab, max_len=ehr.max_len, window=ehr.window, mask_rate=ehr.mask_rate,
                 targets=ehr.targets)


def test_labeled_examples_carry_targets_splits_and_covariates(cohort):
  _, path, ehr = cohort
  data = EHRTaskData(ehr, read_labels(path, {"type": "binary"}))
  dataset = ehr.dataset
  for split in ("train", "tuning", "held_out"):
    labels = data.split_labels(split)
    assert set(labels.subject_ids) <= set(dataset.splits[split])
  total = sum(len(data.split_labels(s)) for s in ("train", "tuning", "held_out"))
  assert total == len(read_labels(path, {"type": "binary"}))
  example = data.transforms(train=True)[0].map(data.source("tuning")[0])
  B.check_example(example["task"], data.example_spec()["task"], "task")
  B.check_example(example["ehr"], data.example_spec()["ehr"], "ehr")
  covariates = data.covariates("held_out")
  assert set(covariates["age_band"]) <= {"<40", "40-59", "60-79", "80+", "unknown"}
  assert np.isfinite(covariates["age_years"]).mean() > 0.8
