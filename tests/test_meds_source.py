"""Tests for the MEDS reader (modalities/ehr/meds.py) and the synthetic cohort (modalities/ehr/synthetic.py).

Three kinds: our own synthetic cohort round-trips; a MEDS directory written by hand in the
shapes other tools produce; and bad input, which must fail with errors that name the file,
the column and what was expected.
"""
from __future__ import annotations

import datetime
import json
import pickle
import re

import meds
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from biofm_jax.modalities.ehr import synthetic as synthetic
from biofm_jax.modalities.ehr.meds import MEDSDataset, STAT_KEYS, hash_splits

NUM_SUBJECTS = 200


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
  return synthetic.write_synthetic_meds(tmp_path_factory.mktemp("flat") / "meds",
                                        num_subjects=NUM_SUBJECTS, seed=3)


def _rows_by_subject(root) -> dict[int, dict[str, np.ndarray]]:
  """The rows as written, grouped by subject in file order (our generator writes sorted)."""
  tables = [pq.read_table(f) for f in sorted((root / "data").rglob("*.parquet"))]
  table = pa.concat_tables(tables)
  subjects = table.column("subject_id").to_numpy()
  times = table.column("time").to_numpy(zero_copy_only=False)
  codes = np.array(table.column("code").to_pylist(), dtype=object)
  values = table.column("numeric_value").to_numpy(zero_copy_only=False)
  return {int(s): {"times": times[subjects == s], "codes": codes[subjects == s],
                   "numeric_values": values[subjects == s].astype(np.float32)}
          for s in np.unique(subjects)}


def _all_records(dataset: MEDSDataset) -> dict[int, dict]:
  records = {}
  for split in dataset.splits:
    source = dataset.source(split)
    records.update({int(source[i]["subject_id"]): source[i] for i in range(len(source))})
  return records


def _assert_same_record(got: dict, want: dict) -> None:
  np.testing.assert_array_equal(got["codes"], want["codes"])
  np.testing.assert_array_equal(got["times"], want["times"])
  np.testing.assert_array_equal(got["numeric_values"], want["numeric_values"])  # NaN == NaN


def _assert_meds_order(times: np.ndarray) -> None:
  static = np.isnat(times)
  num_static = int(static.sum())
  assert static[:num_static].all(), "static rows must come first"
  timed = times[num_static:]
  assert np.all(timed[1:] >= timed[:-1])


# ---------------------------------------------------------------- synthetic cohort
def test_synthetic_cohort_is_valid_meds(cohort):
  data_files = sorted((cohort / "data").glob("*.parquet"))
  assert len(data_files) == 2
  for path in data_files:
    table = pq.read_table(path)
    assert table.schema.equals(meds.DataSchema.schema())
    meds.DataSchema.validate(table)
  meds.SubjectSplitSchema.validate(pq.read_table(cohort / meds.subject_splits_filepath))
  code_table = pq.read_table(cohort / meds.code_metadata_filepath)
  meds.CodeMetadataSchema.validate(code_table)
  with open(cohort / meds.dataset_metadata_filepath) as f:
    meds.DatasetMetadataSchema.validate(json.load(f))
  written_codes = {c for path in data_files for c in pq.read_table(path)["code"].to_pylist()}
  assert written_codes <= set(code_table["code"].to_pylist())


def test_synthetic_cohort_reads_back_exactly(cohort):
  dataset = MEDSDataset(cohort, drop_duplicates=False)  # every row as written (duplicates: tests/test_event_store.py)
  written = _rows_by_subject(cohort)
  assert set(dataset.stats) == set(STAT_KEYS)
  assert dataset.stats["files"] == 2 and dataset.stats["fallback_split"] == 0
  assert dataset.stats["subjects"] == NUM_SUBJECTS == len(written)
  assert dataset.stats["rows"] == sum(len(r["codes"]) for r in written.values())
  assert dataset.stats["static_rows"] == NUM_SUBJECTS  # one gender row each
  assert dataset.stats["unsorted_files"] == 0
  split_table = pq.read_table(cohort / meds.subject_splits_filepath).to_pydict()
  assert {k: len(v) for k, v in dataset.splits.items()} == {
      meds.train_split: 160, meds.tuning_split: 20, meds.held_out_split: 20}
  for name, ids in dataset.splits.items():
    want = sorted(s for s, n in zip(split_table["subject_id"], split_table["split"]) if n == name)
    np.testing.assert_array_equal(ids, want)
    assert ids.dtype == np.int64
  for subject_id, record in _all_records(dataset).items():
    assert record["codes"].dtype == object and record["times"].dtype == "datetime64[us]"
    assert record["numeric_values"].dtype == np.float32
    _assert_meds_order(record["times"])
    _assert_same_record(record, written[subject_id])


def test_synthetic_cohort_is_deterministic(cohort, tmp_path):
  again = synthetic.write_synthetic_meds(tmp_path / "again", num_subjects=NUM_SUBJECTS, seed=3)
  other = synthetic.write_synthetic_meds(tmp_path / "other", num_subjects=NUM_SUBJECTS, seed=4)
  for relative in ["data/0.parquet", "data/1.parquet", meds.subject_splits_filepath,
                   synthetic.LATENTS_FILEPATH]:
    assert pq.read_table(cohort / relative).equals(pq.read_table(again / relative))
  assert not pq.read_table(cohort / "data/0.parquet").equals(
      pq.read_table(other / "data/0.parquet"))
  assert (cohort / meds.dataset_metadata_filepath).read_text() == (
      again / meds.dataset_metadata_filepath).read_text()


def test_nested_layout_reads_the_same_records(cohort, tmp_path):
  nested = synthetic.write_synthetic_meds(tmp_path / "nested", num_subjects=NUM_SUBJECTS,
                                          seed=3, nested=True)
  assert (nested / "data" / meds.train_split / "0.parquet").exists()
  assert (nested / "data" / meds.held_out_split / "1.parquet").exists()
  flat_dataset, nested_dataset = MEDSDataset(cohort), MEDSDataset(nested)
  assert nested_dataset.stats["files"] == 6
  for name in flat_dataset.splits:
    np.testing.assert_array_equal(flat_dataset.splits[name], nested_dataset.splits[name])
  flat_records, nested_records = _all_records(flat_dataset), _all_records(nested_dataset)
  assert flat_records.keys() == nested_records.keys()
  for subject_id, record in flat_records.items():
    _assert_same_record(nested_records[subject_id], record)


def test_synthetic_cohort_has_planted_structure(cohort):
  dataset = MEDSDataset(cohort)
  latents = pq.read_table(cohort / synthetic.LATENTS_FILEPATH).to_pydict()
  risk = dict(zip(latents["subject_id"], latents["risk"]))
  records = _all_records(dataset)
  lengths = np.array([len(r["codes"]) for r in records.values()])
  assert lengths.min() >= 10 and lengths.max() <= 400 and (lengths > 256).sum() >= 3
  assert 1 <= dataset.stats["subjects_without_birth"] <= 0.1 * NUM_SUBJECTS
  assert dataset.stats["subjects_with_death"] >= 5
  assert 0.05 < np.mean(latents["outcome"]) < 0.5

  def has(record, code):
    return code in set(record["codes"])
  high = [r for s, r in records.items() if risk[s] > 0.5]
  low = [r for s, r in records.items() if risk[s] < -0.5]
  for code in ["ICD10CM//E11.9", "ICD10CM//I50.9", "RXNORM//4603", "VISIT//INPATIENT"]:
    assert np.mean([has(r, code) for r in high]) > 2 * np.mean([has(r, code) for r in low])
  assert np.mean([has(r, "ICD10CM//J45.909") for r in low]) > 2 * np.mean(
      [has(r, "ICD10CM//J45.909") for r in high])
  # Co-occurrence: diabetes makes heart failure (and its diuretic) more likely.
  diabetic = [has(r, "ICD10CM//E11.9") for r in records.values()]
  failing = [has(r, "RXNORM//4603") for r in records.values()]
  assert np.mean(np.array(failing)[diabetic]) > 1.5 * np.mean(failing)
  # Lab values follow the codes: HbA1c is higher in subjects with diabetes.
  def hba1c(rs):
    return np.concatenate([r["numeric_values"][r["codes"] == "LOINC//4548-4"] for r in rs])
  with_dm = [r for r in records.values() if has(r, "ICD10CM//E11.9")]
  without_dm = [r for r in records.values() if not has(r, "ICD10CM//E11.9")]
  assert np.nanmean(hba1c(with_dm)) > np.nanmean(hba1c(without_dm)) + 1.0


def test_cli_writes_and_summarises(tmp_path, capsys):
  synthetic.main(["--out", str(tmp_path / "cli"), "--num_subjects", "12", "--seed", "1",
                  "--num_shards", "3"])
  out = capsys.readouterr().out
  assert "12 subjects" in out and "3 data files" in out
  with pytest.raises(ValueError, match="not an empty directory"):
    synthetic.write_synthetic_meds(tmp_path / "cli", num_subjects=12)


def test_source_is_picklable_and_grain_compatible(cohort):
  import grain
  source = MEDSDataset(cohort).source(meds.tuning_split)
  clone = pickle.loads(pickle.dumps(source))
  _assert_same_record(clone[3], source[3])
  _assert_same_record(source[-1], source[len(source) - 1])
  with pytest.raises(IndexError, match=f"MEDSSource: index {len(source)} out of range for {len(source)} subjects"):
    source[len(source)]
  with pytest.raises(IndexError, match=f"index {-len(source) - 1} out of range"):
    source[-len(source) - 1]
  with pytest.raises(TypeError):
    source[1.5]
  dataset = grain.MapDataset.source(source).shuffle(seed=0)
  assert {int(dataset[i]["subject_id"]) for i in range(len(source))} == set(
      source.subject_ids.tolist())


# ---------------------------------------------------------------- other tools' shapes
def _write(path, columns: dict, schema: pa.Schema | None = None) -> None:
  path.parent.mkdir(parents=True, exist_ok=True)
  pq.write_table(pa.table(columns, schema=schema), path)


def _foreign_subject(s: int) -> list[tuple]:
  """Rows (subject_id, time, code, value) of subject `s`, in reverse time order as an
  unsorted export might give them. Subject 0 has only static rows, subjects 0 and 1 no
  birth event."""
  subject_id = 5_000 + 3 * s
  events = [(None, "GENDER//F", None)]
  if s > 1:
    events.append((datetime.datetime(1950, 1, 1), meds.birth_code, None))
  if s != 0:
    events += [(datetime.datetime(2020, 1, 1 + s % 28, 9), code, value) for code, value in
               [("LOINC//4548-4", 6.25 + s % 3), ("ICD10CM//E11.9", None),
                ("RXNORM//6809", None)]]
    events.append((datetime.datetime(2019, 5, 5, 8, 30), "VISIT//OUTPATIENT", None))
  return [(subject_id, *event) for event in reversed(events)]


def _write_foreign(root, num_subjects: int, num_files: int, seed: int) -> None:
  """Flat data/ of `part-*.parquet` files with int32 ids, ns or tz-aware ms times,
  float64 values, a dictionary-encoded code column, text_value and an extra column."""
  groups = np.array_split(np.random.default_rng(seed).permutation(num_subjects), num_files)
  for k, group in enumerate(groups):
    subject_ids, times, codes, values = zip(*[row for s in group for row in _foreign_subject(s)])
    time_type = pa.timestamp("ns") if k % 2 == 0 else pa.timestamp("ms", tz="Europe/Paris")
    _write(root / "data" / f"part-{k:05d}.parquet", {
        "subject_id": pa.array(subject_ids, pa.int32()),
        "time": pa.array(times, time_type),
        "code": pa.array(codes).dictionary_encode() if k == 1 else pa.array(codes),
        "numeric_value": pa.array(values, pa.float64()),
        "text_value": pa.array(["note"] * len(codes), pa.string()),
        "unit": pa.array(["%"] * len(codes), pa.string()),
    })


def test_reads_shapes_other_tools_write(tmp_path):
  _write_foreign(tmp_path / "a", num_subjects=1000, num_files=3, seed=0)
  dataset = MEDSDataset(tmp_path / "a")
  stats = dataset.stats
  assert stats["files"] == 3 and stats["subjects"] == 1000 and stats["fallback_split"] == 1
  assert stats["unsorted_files"] == 3 and stats["static_only_subjects"] == 1
  assert stats["subjects_without_birth"] == 2 and stats["numeric_values"] == 999
  records = _all_records(dataset)
  static_only = records[5_000]
  assert list(static_only["codes"]) == ["GENDER//F"] and np.isnat(static_only["times"]).all()
  assert meds.birth_code not in set(records[5_003]["codes"])
  record = records[5_006]  # subject 2
  # Equal times keep file order: the three rows of the 2020 visit were written in reverse.
  assert list(record["codes"]) == ["GENDER//F", meds.birth_code, "VISIT//OUTPATIENT",
                                   "RXNORM//6809", "ICD10CM//E11.9", "LOINC//4548-4"]
  assert record["times"][5] == np.datetime64("2020-01-03T09:00", "us")
  np.testing.assert_array_equal(record["numeric_values"][5:], np.float32(8.25))
  for r in records.values():
    _assert_meds_order(r["times"])

  fractions = {name: len(ids) / 1000 for name, ids in dataset.splits.items()}
  assert list(fractions) == [meds.train_split, meds.tuning_split, meds.held_out_split]
  assert abs(fractions[meds.train_split] - 0.8) < 0.04
  assert all(abs(fractions[n] - 0.1) < 0.03 for n in (meds.tuning_split, meds.held_out_split))
  # The same subjects in other files, in another order: the same splits.
  _write_foreign(tmp_path / "b", num_subjects=1000, num_files=5, seed=1)
  reshuffled = MEDSDataset(tmp_path / "b")
  for name, ids in dataset.splits.items():
    np.testing.assert_array_equal(reshuffled.splits[name], ids)
  # A subject's split depends on its id and the seed only, not on who else is there.
  ids = np.concatenate(list(dataset.splits.values()))
  subset = hash_splits(ids[::7])
  for name, subset_ids in subset.items():
    assert set(subset_ids.tolist()) <= set(dataset.splits[name].tolist())
  other_seed = MEDSDataset(tmp_path / "a", fallback_seed=1).splits[meds.train_split]
  assert not np.array_equal(other_seed, dataset.splits[meds.train_split])
  with pytest.raises(ValueError, match="fallback_fractions"):
    MEDSDataset(tmp_path / "a", fallback_fractions=(0.5, 0.1, 0.1))


def test_missing_numeric_value_column_means_no_values(tmp_path):
  # meds.DataSchema marks numeric_value optional; hidden and `_` files are not data.
  _write(tmp_path / "data/0.parquet", {"subject_id": [1, 1], "code": ["A", "B"],
                                       "time": pa.array([None, 10], pa.timestamp("s"))})
  (tmp_path / "data/._0.parquet").write_bytes(b"AppleDouble")
  (tmp_path / "data/_SUCCESS.parquet").write_bytes(b"")
  dataset = MEDSDataset(tmp_path)
  assert dataset.stats["files"] == 1 and dataset.stats["numeric_values"] == 0
  record = _all_records(dataset)[1]
  assert np.isnan(record["numeric_values"]).all()
  assert record["times"][1] == np.datetime64(10, "s")


# ---------------------------------------------------------------- bad input
GOOD = {"subject_id": [1, 1, 2], "time": pa.array([None, 1, 2], pa.timestamp("us")),
        "code": ["A", "B", "C"], "numeric_value": pa.array([None, 1.0, 2.0], pa.float32())}


def test_missing_column_names_file_and_column(tmp_path):
  _write(tmp_path / "data/shard_7.parquet", {k: v for k, v in GOOD.items() if k != "code"})
  with pytest.raises(ValueError, match=r"shard_7\.parquet.*'code'"):
    MEDSDataset(tmp_path)


@pytest.mark.parametrize("column, bad, found", [
    ("code", pa.array([1, 2, 3], pa.int64()), "int64"),
    ("subject_id", pa.array(["1", "1", "2"]), "string"),
    ("time", pa.array(["2020-01-01", None, "2020-01-02"]), "string"),
    ("numeric_value", pa.array(["1", None, "2"]), "string"),
])
def test_uncastable_type_names_file_column_and_types(tmp_path, column, bad, found):
  _write(tmp_path / "data/0.parquet", {**GOOD, column: bad})
  expected = str(meds.DataSchema.schema().field(column).type)
  with pytest.raises(ValueError, match=rf"0\.parquet: column '{column}' has type {found}, "
                                       rf"expected {re.escape(expected)}"):
    MEDSDataset(tmp_path)


def test_unsafe_cast_is_refused(tmp_path):
  _write(tmp_path / "data/0.parquet", {**GOOD, "subject_id": pa.array([1, 1, 2**63], pa.uint64())})
  with pytest.raises(ValueError, match=r"0\.parquet: column 'subject_id' of type uint64"):
    MEDSDataset(tmp_path)


@pytest.mark.parametrize("column", ["subject_id", "code"])
def test_null_ids_or_codes_are_refused_with_a_count(tmp_path, column):
  _write(tmp_path / "data/0.parquet", {**GOOD, column: pa.array(
      [None, None, GOOD[column][2]], pa.int64() if column == "subject_id" else pa.string())})
  with pytest.raises(ValueError, match=rf"0\.parquet: column '{column}' has 2 null"):
    MEDSDataset(tmp_path)


def test_empty_file_is_skipped_and_counted(tmp_path):
  _write(tmp_path / "data/0.parquet", GOOD)
  pq.write_table(pa.table(GOOD).slice(0, 0), tmp_path / "data/1.parquet")
  dataset = MEDSDataset(tmp_path)
  assert dataset.stats["files"] == 2 and dataset.stats["empty_files"] == 1
  assert dataset.stats["rows"] == 3
  pq.write_table(pa.table(GOOD).slice(0, 0), tmp_path / "data/0.parquet")
  with pytest.raises(ValueError, match="0 rows"):
    MEDSDataset(tmp_path)


@pytest.mark.parametrize("content", [b"", b"PAR1 this is not parquet"])
def test_unreadable_file_is_named(tmp_path, content):
  _write(tmp_path / "data/0.parquet", GOOD)
  (tmp_path / "data/nested").mkdir()
  (tmp_path / "data/nested/broken.parquet").write_bytes(content)
  with pytest.raises(ValueError, match=r"broken\.parquet: not a readable parquet file"):
    MEDSDataset(tmp_path)


def test_missing_or_empty_data_directory_is_named(tmp_path):
  with pytest.raises(ValueError, match=rf"{tmp_path}/data: MEDS data directory not found"):
    MEDSDataset(tmp_path)
  (tmp_path / "data/sub").mkdir(parents=True)
  (tmp_path / "data/sub/notes.csv").write_text("x")
  with pytest.raises(ValueError, match=rf"{tmp_path}/data: no \*\.parquet files"):
    MEDSDataset(tmp_path)


def test_nan_values_are_counted_and_returned_as_nan(tmp_path):
  _write(tmp_path / "data/0.parquet", {
      **GOOD, "numeric_value": pa.array([np.nan, None, 2.0], pa.float64())})
  dataset = MEDSDataset(tmp_path)
  assert dataset.stats["nan_values"] == 1 and dataset.stats["numeric_values"] == 1
  values = _all_records(dataset)[1]["numeric_values"]
  assert values.dtype == np.float32 and np.isnan(values).all()


def test_split_file_subjects_are_reconciled_with_the_data(tmp_path):
  _write(tmp_path / "data/0.parquet", {**GOOD, "subject_id": [1, 2, 3]})
  _write(tmp_path / meds.subject_splits_filepath,
         {"subject_id": pa.array([1, 2, 99], pa.int32()),
          "split": [meds.train_split, "custom", meds.train_split]})
  dataset = MEDSDataset(tmp_path)
  assert list(dataset.splits) == [meds.train_split, "custom"]
  np.testing.assert_array_equal(dataset.splits[meds.train_split], [1])
  np.testing.assert_array_equal(dataset.splits["custom"], [2])
  assert dataset.stats["split_subjects_without_events"] == 1  # subject 99
  assert dataset.stats["subjects_without_split"] == 1  # subject 3
  assert int(dataset.source("custom")[0]["subject_id"]) == 2
  with pytest.raises(ValueError, match=r"unknown split 'test'; available splits: "
                                       r"\['train', 'custom'\]"):
    dataset.source("test")


def test_subject_in_two_splits_is_refused(tmp_path):
  _write(tmp_path / "data/0.parquet", GOOD)
  _write(tmp_path / meds.subject_splits_filepath,
         {"subject_id": [1, 1, 2], "split": [meds.train_split, meds.held_out_split,
                                             meds.train_split]})
  with pytest.raises(ValueError, match=r"subject_splits\.parquet: 1 subject\(s\) appear in "
                                       "more than one split"):
    MEDSDataset(tmp_path)

