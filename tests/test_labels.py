"""MEDS labels: reading and checking them, the prediction-time cut, and bad input."""
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from biofm_jax.data import batch as B
from biofm_jax.data.ehr import EHRData, EHRVocab
from biofm_jax.data.labeled import LabeledEHRData
from biofm_jax.data.labels import read_labels, write_labels
from biofm_jax.data.sources.meds import MEDSDataset
from biofm_jax.data.sources.synthetic_labels import synthetic_labels, write_synthetic_labels

MAX_LEN = 64


def ehr_data(root) -> EHRData:
  dataset = MEDSDataset(root)
  train = dataset.source("train")
  vocab = EHRVocab.build((train[i] for i in range(len(train))), min_count=1, num_value_bins=5)
  return EHRData(dataset, vocab, max_len=MAX_LEN, window="recent", mask_rate=0.15, objective="masked")


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


def test_labels_for_unknown_subjects_and_without_history_are_errors_naming_row_and_subject(cohort, tmp_path):
  root, path, ehr = cohort
  good = read_labels(path, {"type": "binary"})
  ids, times = list(good.subject_ids[:4]), list(good.prediction_times[:4])
  with pytest.raises(ValueError, match="1 of 4 rows name subjects .* first: row 2, subject_id 424242"):
    LabeledEHRData(ehr, _labels_for(cohort, tmp_path, ids[:2] + [424242] + ids[3:], times))
  early = times[:1] + [np.datetime64("1900-01-01", "us")] + times[2:]
  with pytest.raises(ValueError, match=f"prediction_time at or before the subject's first event.*row 1, subject_id "
                                       f"{ids[1]}"):
    LabeledEHRData(ehr, _labels_for(cohort, tmp_path, ids, early))
  no_time = write_labels(tmp_path / "nt.parquet", ids, times, boolean_value=[True] * 4)
  table = pq.read_table(no_time).drop_columns(["prediction_time"])
  pq.write_table(table, tmp_path / "nt.parquet")
  with pytest.raises(ValueError, match="EHR labels need a prediction_time; row 0"):
    LabeledEHRData(ehr, read_labels(tmp_path / "nt.parquet", {"type": "binary"}))


def test_a_class_without_training_rows_is_an_error(cohort, tmp_path):
  root, path, ehr = cohort
  labels = read_labels(path, {"type": "binary"})
  data = LabeledEHRData(ehr, labels)
  held_out = set(data.split_labels("held_out").subject_ids.tolist())
  names = np.where(np.isin(labels.subject_ids, list(held_out)) & (np.arange(len(labels)) % 7 == 0), "rare",
                   np.where(labels.targets[B.TASK_LABEL] > 0, "high", "low"))
  multi = write_labels(tmp_path / "multi.parquet", labels.subject_ids, labels.prediction_times,
                       categorical_value=names.tolist())
  with pytest.raises(ValueError, match="classes \\['rare'\\] have no row in the training split"):
    LabeledEHRData(ehr, read_labels(multi, {"type": "multiclass"}))


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


def test_events_at_or_after_the_prediction_time_never_reach_the_model(cohort, tmp_path):
  root, path, ehr = cohort
  labels = read_labels(path, {"type": "binary"})
  before = LabeledEHRData(ehr, labels)
  split = "train"
  source = before.source(split)
  row = 3
  subject, cutoff = int(source.labels.subject_ids[row]), source.labels.prediction_times[row]
  future = [(cutoff, "MEDS_DEATH", np.nan), (cutoff + np.timedelta64(1, "D"), "DX//HEART_FAILURE", np.nan),
            (cutoff + np.timedelta64(30, "D"), "LAB//BNP", 9999.0)]
  after = LabeledEHRData(ehr_data_with_vocab(ehr, _with_extra_events(root, tmp_path / "future", subject, future)),
                         labels)
  tokenize = before.transforms(train=True)[0]
  expected = tokenize.map(source[row])
  got = tokenize.map(after.source(split)[row])
  for name in expected["ehr"]:
    np.testing.assert_array_equal(got["ehr"][name], expected["ehr"][name], err_msg=name)
  assert len(after.source(split)[row]["codes"]) == len(source[row]["codes"])
  # The check can fail: the same kind of event just before the prediction time does change the input.
  past = [(cutoff - np.timedelta64(1, "m"), "DX//HEART_FAILURE", np.nan)]
  changed = LabeledEHRData(ehr_data_with_vocab(ehr, _with_extra_events(root, tmp_path / "past", subject, past)),
                           labels)
  assert len(changed.source(split)[row]["codes"]) == len(source[row]["codes"]) + 1
  assert not np.array_equal(tokenize.map(changed.source(split)[row])["ehr"][B.EHR_TIME], expected["ehr"][B.EHR_TIME])


def ehr_data_with_vocab(ehr: EHRData, root) -> EHRData:
  return EHRData(MEDSDataset(root), ehr.vocab, max_len=ehr.max_len, window=ehr.window, mask_rate=ehr.mask_rate,
                 objective=ehr.objective)


def test_labeled_examples_carry_targets_splits_and_covariates(cohort):
  _, path, ehr = cohort
  data = LabeledEHRData(ehr, read_labels(path, {"type": "binary"}))
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
