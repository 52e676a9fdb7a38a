"""Tests of the tabular source (CSV/parquet), `TabularStats`, the transforms and `TabularData`."""
from __future__ import annotations

import pickle

import ml_collections
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from biofm_jax.data import batch, pipeline
from biofm_jax.data.module import KeyByModality
from biofm_jax.modalities.tabular import data as tabular
from biofm_jax.data.sources import splits as splits_lib
from biofm_jax.modalities.tabular import synthetic as synthetic_tabular
from biofm_jax.modalities.tabular.source import TabularDataset
from tests.helpers import REPO
from biofm_jax.config import load_config

# A hand-written table: "n/a" and "?" are junk in numeric columns, empty cells are
# missing, "Canon" appears only outside the training split, "const" is constant.
HEADER = "subject_id,diameter,volume,texture,const,vendor,site,malignant,split"
ROWS = [
    "s01,1.5,10,0.1,3,GE,lung,1,train",
    "s02,2.5,n/a,0.2,3,Siemens,liver,0,train",
    "s03,,12,?,3,GE,,1,train",
    "s04,4.0,13,0.4,3,Philips,lung,,train",
    "s05,5.0,14,0.5,3,GE,lung,0,tuning",
    "s06,6.0,15,0.6,3,Canon,kidney,1,tuning",
    "s07,7.0,16,0.7,3,GE,lung,0,held_out",
    "s08,8.0,17,0.8,3,Siemens,liver,1,held_out",
]
NUMERIC = ("diameter", "volume", "texture", "const")
CATEGORICAL = ("vendor", "site")
NAN = float("nan")
EXPECTED_NUMERIC = np.array([
    [1.5, 10, 0.1, 3], [2.5, NAN, 0.2, 3], [NAN, 12, NAN, 3], [4.0, 13, 0.4, 3],
    [5.0, 14, 0.5, 3], [6.0, 15, 0.6, 3], [7.0, 16, 0.7, 3], [8.0, 17, 0.8, 3]])


def write_csv(path, header=HEADER, rows=ROWS):
  path.write_text("\n".join([header, *rows]) + "\n")
  return path


def table_columns(rows=ROWS, header=HEADER):
  names = header.split(",")
  cells = [row.split(",") for row in rows]
  return {name: [row[j] for row in cells] for j, name in enumerate(names)}


def write_parquet(path, rows=ROWS):
  """Typed columns where the cells are clean; junk columns stay strings, as in pandas."""
  columns = table_columns(rows)

  def number(cells):
    return pa.array([float(c) if c else None for c in cells], pa.float64())

  def text(cells):
    return pa.array([c or None for c in cells], pa.string())
  table = pa.table({
      "subject_id": text(columns["subject_id"]), "diameter": number(columns["diameter"]),
      "volume": text(columns["volume"]), "texture": text(columns["texture"]),
      "const": pa.array([int(c) for c in columns["const"]], pa.int64()),
      "vendor": text(columns["vendor"]), "site": text(columns["site"]),
      "malignant": number(columns["malignant"]), "split": text(columns["split"])})
  pq.write_table(table, path)
  return table


def tabular_cfg(**overrides):
  cfg = dict(path="", id_column="subject_id", label_columns=(), categorical_columns=(),
             exclude_columns=(), min_category_count=1, mask_rate=0.3, synthetic_rows=60,
             synthetic_seed=0)
  cfg.update(overrides)
  return ml_collections.ConfigDict(cfg)


@pytest.fixture
def hand_csv(tmp_path):
  return write_csv(tmp_path / "features.csv")


@pytest.fixture
def hand_dataset(hand_csv):
  return TabularDataset(hand_csv, label_columns=("malignant",))


# ================================================================ reading
def test_csv_reads_kinds_missing_junk_labels_and_splits(hand_dataset):
  d = hand_dataset
  assert d.numeric_columns == NUMERIC and d.categorical_columns == CATEGORICAL
  assert d.label_columns == ("malignant",)
  assert {k: v.tolist() for k, v in d.splits.items()} == {
      "train": [0, 1, 2, 3], "tuning": [4, 5], "held_out": [6, 7]}
  assert d.non_numeric_cells_by_column == {"volume": 1, "texture": 1}
  s = d.stats
  assert (s["rows"], s["non_numeric_cells"], s["non_numeric_columns"]) == (8, 2, 2)
  assert (s["missing_numeric_cells"], s["missing_categorical_cells"]) == (3, 1)
  assert (s["missing_label_cells"], s["constant_columns"], s["fallback_split"]) == (1, 1, 0)
  train = d.source("train")
  np.testing.assert_array_equal(train.numeric, EXPECTED_NUMERIC[:4])
  record = train[2]
  assert record["subject_id"] == "s03" and isinstance(record["subject_id"], str)
  assert record["numeric"].dtype == np.float64 and record["numeric"].shape == (4,)
  assert record["categorical"].dtype == object and record["categorical"].tolist() == ["GE", None]
  assert record["labels"].dtype == np.float64 and record["labels"].tolist() == [1.0]
  np.testing.assert_array_equal(train.labels[:, 0], [1, 0, 1, NAN])
  assert train.subject_ids == ["s01", "s02", "s03", "s04"]
  record["numeric"][:] = -1  # records are copies: the table stays intact
  assert train[2]["numeric"][1] == 12
  restored = pickle.loads(pickle.dumps(train))
  np.testing.assert_array_equal(restored[0]["numeric"], train[0]["numeric"])


def test_parquet_file_and_folder_read_like_the_csv(tmp_path, hand_dataset):
  write_parquet(tmp_path / "one.parquet")
  folder = tmp_path / "parts"
  folder.mkdir()
  write_parquet(folder / "part-0.parquet", ROWS[:5])
  write_parquet(folder / "part-1.parquet", ROWS[5:])
  for path in (tmp_path / "one.parquet", folder):
    d = TabularDataset(path, label_columns=("malignant",))
    assert (d.numeric_columns, d.categorical_columns) == (NUMERIC, CATEGORICAL)
    assert d.stats["non_numeric_cells"] == 2 and d.subject_ids == hand_dataset.subject_ids
    for split in ("train", "tuning", "held_out"):
      ours, csv = d.source(split), hand_dataset.source(split)
      np.testing.assert_array_equal(ours.numeric, csv.numeric)
      np.testing.assert_array_equal(ours.labels, csv.labels)
      assert ours.categorical.tolist() == csv.categorical.tolist()


def test_missing_id_column_names_file_and_column(tmp_path):
  path = write_csv(tmp_path / "t.csv", header=HEADER.replace("subject_id", "patient"))
  with pytest.raises(ValueError, match=r"t\.csv.*id column 'subject_id'"):
    TabularDataset(path)


def test_duplicate_ids_are_counted_not_named(tmp_path):
  rows = ROWS + [ROWS[0], ROWS[1].replace("train", "tuning")]
  with pytest.raises(ValueError, match=r"t\.csv.*'subject_id'.*2 id\(s\) appear in more than "
                                       r"one row \(4 rows\)") as e:
    TabularDataset(write_csv(tmp_path / "t.csv", rows=rows))
  assert "s01" not in str(e.value)


def test_errors_name_file_row_and_column(tmp_path):
  bad_label = [ROWS[0], ROWS[1].replace(",0,train", ",benign,train")]
  with pytest.raises(ValueError, match=r"t\.csv, row 2 \(line 3\), column 'malignant'"):
    TabularDataset(write_csv(tmp_path / "t.csv", rows=bad_label), label_columns=("malignant",))
  empty_id = [ROWS[0], "," + ROWS[1].split(",", 1)[1]]
  with pytest.raises(ValueError, match=r"u\.csv, row 2 \(line 3\), column 'subject_id'"):
    TabularDataset(write_csv(tmp_path / "u.csv", rows=empty_id))
  with pytest.raises(ValueError, match=r"v\.csv.*label_columns names \['grade'\]"):
    TabularDataset(write_csv(tmp_path / "v.csv"), label_columns=("grade",))
  with pytest.raises(ValueError, match=r"r\.csv, line 3: 8 fields, expected 9"):
    TabularDataset(write_csv(tmp_path / "r.csv", rows=[ROWS[0], ROWS[1].rsplit(",", 1)[0]]))
  # Explicit categorical columns: an unlisted column of words cannot be numeric.
  with pytest.raises(ValueError, match=r"w\.csv, column 'site'.*not numbers"):
    TabularDataset(write_csv(tmp_path / "w.csv"), categorical_columns=("vendor",))


def test_explicit_categorical_may_be_numeric_coded_and_exclusions_drop(hand_csv):
  d = TabularDataset(hand_csv, categorical_columns=("vendor", "site", "const"),
                     exclude_columns=("texture",), label_columns=("malignant",))
  assert d.numeric_columns == ("diameter", "volume")
  assert d.categorical_columns == ("const", "vendor", "site")  # file order
  assert d.source("train")[0]["categorical"].tolist() == ["3", "GE", "lung"]
  assert d.stats["excluded_columns"] == 1


def test_hash_split_without_a_split_column(tmp_path):
  rows = [f"id{i},{i}.5,cat{i % 3}" for i in range(50)]
  d = TabularDataset(write_csv(tmp_path / "t.csv", header="subject_id,x,c", rows=rows))
  buckets = splits_lib.hash_split_buckets([f"id{i}" for i in range(50)])
  for i, name in enumerate(splits_lib.STANDARD_SPLITS):
    assert d.splits[name].tolist() == np.flatnonzero(buckets == i).tolist()
  assert d.stats["fallback_split"] == 1 and len(d.splits["train"]) > 30
  assert (d.numeric_columns, d.categorical_columns) == (("x",), ("c",))


# ================================================================ statistics
def test_stats_come_from_the_training_split_only(hand_dataset):
  stats = tabular.TabularStats.build(hand_dataset.source("train"), min_category_count=1)
  train = EXPECTED_NUMERIC[:4]
  np.testing.assert_allclose(stats.means[:3], np.nanmean(train, axis=0)[:3], rtol=1e-12)
  np.testing.assert_allclose(stats.stds[:3], np.nanstd(train, axis=0)[:3], rtol=1e-12)
  assert (stats.means[3], stats.stds[3], stats.num_constant_columns) == (3.0, 1.0, 1)
  assert stats.categories == (("GE", "Philips", "Siemens"), ("liver", "lung"))
  assert stats.num_categories == 1 + 3 + 2
  # One shared vocabulary: column 0 takes ids 1..3, column 1 ids 4..5; 0 = missing/unseen.
  assert stats.category_ids(["Siemens", "lung"]).tolist() == [3, 5]
  assert stats.category_ids(["Canon", None]).tolist() == [0, 0]
  rare = tabular.TabularStats.build(hand_dataset.source("train"), min_category_count=2)
  assert rare.categories == (("GE",), ("lung",)) and rare.num_rare_categories == 2 + 1


def test_stats_json_round_trip_and_column_check(tmp_path, hand_dataset):
  stats = tabular.TabularStats.build(hand_dataset.source("train"))
  path = tmp_path / "tabular_stats.json"
  stats.save(path)
  assert tabular.TabularStats.load(path) == stats
  assert not list(tmp_path.glob(".*tmp*"))  # the atomic write leaves no temporary file
  stats.check_columns(hand_dataset)
  other = TabularDataset(hand_dataset.path, label_columns=("malignant",),
                         exclude_columns=("volume",), categorical_columns=("vendor", "site",
                                                                           "const"))
  with pytest.raises(ValueError, match=r"stats\.json.*missing from the data \['volume', "
                                       r"'const'\].*not in the stats \['const'\]"):
    stats.check_columns(other, where=f"tabular stats {path}")
  path.write_text('{"format": "something else"}')
  with pytest.raises(ValueError, match=r"tabular_stats\.json: format 'something else', expected 'biofm_jax.tabular_stats'"):
    tabular.TabularStats.load(path)


# ================================================================ transforms
def test_standardize_row_values_missing_and_unseen_categories(hand_dataset):
  stats = tabular.TabularStats.build(hand_dataset.source("train"))
  tuning, standardize = hand_dataset.source("tuning"), tabular.StandardizeRow(stats)
  out = standardize.map(hand_dataset.source("train")[2])
  assert out[batch.TABULAR_MISSING].tolist() == [True, False, True, False]
  expected = (12 - stats.means[1]) / stats.stds[1]
  np.testing.assert_allclose(out[batch.TABULAR_VALUES], [0, expected, 0, 0], rtol=1e-6)
  assert out[batch.TABULAR_CATEGORIES].tolist() == [1, 0]  # GE, missing site
  canon = standardize.map(tuning[1])  # Canon is unseen in training, kidney too
  assert canon[batch.TABULAR_CATEGORIES].tolist() == [0, 0]
  batch.check_example(canon, batch.tabular_example_spec(4, 2, with_targets=False), "row")


def random_examples(num_rows, num_numeric=12, num_categorical=4, seed=0):
  rng = np.random.default_rng(seed)
  for _ in range(num_rows):
    missing = rng.random(num_numeric) < 0.3
    values = np.where(missing, 0, rng.normal(size=num_numeric)).astype(np.float32)
    yield {batch.VALID: np.asarray(True), batch.TABULAR_VALUES: values,
           batch.TABULAR_MISSING: missing,
           batch.TABULAR_CATEGORIES: np.where(rng.random(num_categorical) < 0.3, 0,
                                              rng.integers(1, 9, num_categorical)).astype(np.int32)}


def test_mask_features_hides_present_features_at_the_rate():
  mask = tabular.MaskFeatures(mask_rate=0.3)
  selected = present = 0
  for i, example in enumerate(random_examples(400)):
    out = mask.random_map(example, np.random.default_rng(i))
    value_mask, category_mask = out[batch.TABULAR_VALUE_MASK], out[batch.TABULAR_CATEGORY_MASK]
    assert not (value_mask & example[batch.TABULAR_MISSING]).any()  # never a missing value
    assert not (category_mask & (example[batch.TABULAR_CATEGORIES] == 0)).any()
    assert value_mask.any() or category_mask.any()
    np.testing.assert_array_equal(out[batch.TABULAR_TARGET_VALUES], example[batch.TABULAR_VALUES])
    np.testing.assert_array_equal(out[batch.TABULAR_TARGET_CATEGORIES],
                                  example[batch.TABULAR_CATEGORIES])
    assert not out[batch.TABULAR_VALUES][value_mask].any()
    assert not out[batch.TABULAR_CATEGORIES][category_mask].any()
    kept = ~value_mask
    np.testing.assert_array_equal(out[batch.TABULAR_VALUES][kept],
                                  example[batch.TABULAR_VALUES][kept])
    np.testing.assert_array_equal(out[batch.TABULAR_MISSING], example[batch.TABULAR_MISSING])
    again = mask.random_map(example, np.random.default_rng(i))
    for name in out:
      np.testing.assert_array_equal(again[name], out[name])
    batch.check_example(out, batch.tabular_example_spec(12, 4, with_targets=True), "row")
    selected += int(value_mask.sum() + category_mask.sum())
    present += int((~example[batch.TABULAR_MISSING]).sum()
                   + (example[batch.TABULAR_CATEGORIES] != 0).sum())
  assert 0.27 < selected / present < 0.34  # the at-least-one rule adds a little


def test_mask_features_row_without_present_features_is_untouched():
  example = next(random_examples(1))
  example[batch.TABULAR_MISSING][:] = True
  example[batch.TABULAR_VALUES][:] = 0
  example[batch.TABULAR_CATEGORIES][:] = 0
  out = tabular.MaskFeatures(0.5).random_map(example, np.random.default_rng(0))
  assert not out[batch.TABULAR_VALUE_MASK].any() and not out[batch.TABULAR_CATEGORY_MASK].any()


# ================================================================ data module and pipeline
def take(iterator, n):
  return [next(iterator) for _ in range(n)]


def assert_batches_equal(got, expected):
  assert len(got) == len(expected)
  for a, b in zip(got, expected):
    for name in b["tabular"]:
      np.testing.assert_array_equal(a["tabular"][name], b["tabular"][name])


def test_from_config_writes_synthetic_table_and_reuses_stats(tmp_path):
  data = tabular.TabularData.from_config(tabular_cfg(), targets="masked_features",
                                         artifacts_dir=tmp_path)
  assert (tmp_path / "synthetic_tabular" / "data.parquet").exists()
  assert (tmp_path / "tabular_stats.json").exists()
  assert data.model_info() == {"tabular": {"num_numeric": 24, "num_categorical": 2, "num_categories": 1 + 4 + 4}}
  values, names = data.labels("train")
  assert names == ("malignant",) and values.shape == (48, 1) and values.dtype == np.float32
  summary = data.summary()
  assert (summary["rows_train"], summary["rows_tuning"], summary["rows_held_out"]) == (48, 6, 6)
  assert summary["tabular_missing_numeric_cells"] > 0
  again = tabular.TabularData.from_config(tabular_cfg(), targets="masked_features",
                                          artifacts_dir=tmp_path)
  assert again.stats == data.stats
  with pytest.raises(ValueError, match=r"^TabularData: cannot make 'masked_patches' targets; it makes \['masked_features'\]$"):
    tabular.TabularData.from_config(tabular_cfg(), targets="masked_patches", artifacts_dir=tmp_path)
  with pytest.raises(ValueError, match="differ from the saved statistics"):
    tabular.TabularData.from_config(tabular_cfg(exclude_columns=("shape_flatness",)),
                                    targets="masked_features", artifacts_dir=tmp_path)


def test_synthetic_table_is_deterministic_with_planted_structure():
  table = synthetic_tabular.synthetic_table(num_rows=400, seed=3)
  again = synthetic_tabular.synthetic_table(num_rows=400, seed=3)
  assert table.schema == again.schema
  for name in table.column_names:  # NaN-aware: arrow's equals says NaN != NaN
    np.testing.assert_array_equal(table.column(name).to_numpy(zero_copy_only=False),
                                  again.column(name).to_numpy(zero_copy_only=False))
  numeric = np.stack([table.column(n).to_numpy() for n in synthetic_tabular.FEATURES], axis=1)
  assert 0.07 < np.isnan(numeric).mean() < 0.13
  label = table.column("malignant").to_numpy()
  volume = np.log(table.column("shape_volume_mm3").to_numpy())
  present = ~np.isnan(volume)
  malignant, benign = volume[present & (label == 1)], volume[present & (label == 0)]
  assert malignant.mean() > benign.mean() + 0.8  # size is shifted by 1.5 sd in malignant rows


def test_pipeline_end_to_end_spec_padding_and_resume(tmp_path):
  data = tabular.TabularData.from_config(tabular_cfg(), targets="masked_features",
                                         artifacts_dir=tmp_path)
  spec = data.example_spec()[data.name]
  dataset = pipeline.make_train_dataset(
      data.source("train"), data.transforms(train=True),
      global_batch_size=8, seed=5, process_index=0, process_count=1)
  iterator = pipeline.make_iterator(dataset)
  for host_batch in take(iterator, 2):
    assert set(host_batch) == {"tabular"}
    for i in range(8):
      batch.check_example({k: v[i] for k, v in host_batch["tabular"].items()}, spec, "batch")
  state = iterator.get_state()
  expected = take(iterator, 6)  # crosses the epoch boundary (48 rows, batches of 8)
  resumed = pipeline.make_iterator(dataset)
  resumed.set_state(state)
  assert_batches_equal(take(resumed, 6), expected)

  def eval_batches():
    ds = pipeline.make_eval_dataset(
        data.source("tuning"), data.transforms(train=False),
        global_batch_size=4, seed=5, example_spec={"tabular": spec}, process_index=0, process_count=1)
    return list(pipeline.make_iterator(ds))
  batches = eval_batches()
  valid = np.concatenate([b["tabular"][batch.VALID] for b in batches])
  assert valid.tolist() == [True] * 6 + [False] * 2
  assert not batches[-1]["tabular"][batch.TABULAR_VALUE_MASK][2:].any()
  assert_batches_equal(eval_batches(), batches)
  embed = data.transforms(train=False, mask=False)
  batch.check_example(embed[0].map(data.source("tuning")[0]), data.embedding_spec()["tabular"], "row")
  restored = pickle.loads(pickle.dumps(data.transforms(train=True)))
  assert [type(t) for t in restored] == [tabular.StandardizeRow, tabular.MaskFeatures, KeyByModality]


def test_breast_cancer_table_reads_30_numeric_features(tmp_path):
  from sklearn.datasets import load_breast_cancer
  bunch = load_breast_cancer(as_frame=False)
  names = [n.replace(" ", "_") for n in bunch.feature_names]
  lines = [",".join(["case_id", *names, "diagnosis"])]
  lines += [",".join([f"c{i:03d}", *map(repr, row.tolist()), str(int(y))])
            for i, (row, y) in enumerate(zip(bunch.data, bunch.target))]
  path = tmp_path / "breast_cancer.csv"
  path.write_text("\n".join(lines) + "\n")
  data = tabular.TabularData.from_config(
      tabular_cfg(path=str(path), id_column="case_id", label_columns=("diagnosis",)),
      targets="masked_features", artifacts_dir=tmp_path / "artifacts")
  assert data.model_info() == {"tabular": {"num_numeric": 30, "num_categorical": 0, "num_categories": 1}}
  assert "diagnosis" not in data.dataset.numeric_columns
  assert data.dataset.stats["missing_numeric_cells"] == 0
  rows = sum(len(data.source(s)) for s in data.dataset.splits)
  assert rows == len(bunch.target) and data.dataset.stats["fallback_split"] == 1
  values, _ = data.labels("train")
  order = [int(i[1:]) for i in data.source("train").subject_ids]
  np.testing.assert_array_equal(values[:, 0], bunch.target[order])
  np.testing.assert_allclose(data.source("train").numeric, bunch.data[order])
  example = data.transforms(train=True)[1].random_map(
      data.transforms(train=True)[0].map(data.source("train")[0]), np.random.default_rng(0))
  batch.check_example(example, data.example_spec()["tabular"], "row")


# ================================================================ delimiters and default labels
@pytest.mark.parametrize("delimiter", [";", "\t", "|"])
def test_tables_with_other_delimiters_read_as_the_comma_one(tmp_path, hand_dataset, delimiter):
  rows = [row.replace(",", delimiter) for row in ROWS]
  path = write_csv(tmp_path / "other.csv", header=HEADER.replace(",", delimiter), rows=rows)
  for given in ("", delimiter):  # detected, or named in data.tabular.delimiter
    d = TabularDataset(path, label_columns=("malignant",), delimiter=given)
    assert d.numeric_columns == hand_dataset.numeric_columns
    np.testing.assert_array_equal(d.source("train").numeric, hand_dataset.source("train").numeric)
  with pytest.raises(ValueError, match=r"delimiter is ';;'; expected one character"):
    TabularDataset(path, delimiter=";;")


def test_a_users_table_needs_no_label_override_and_generated_tables_declare_theirs(tmp_path):
  config = load_config(str(REPO / "configs/tabular_features.py:tiny"))
  assert config.data.tabular.label_columns == ()
  own = write_csv(tmp_path / "own.csv", header=HEADER.replace(",malignant", ""),
                  rows=[row.rsplit(",", 2)[0] + "," + row.rsplit(",", 1)[1] for row in ROWS])
  with config.unlocked():
    config.data.tabular.path = str(own)
  data = tabular.TabularData.from_config(config.data.tabular, targets="masked_features",
                                         artifacts_dir=tmp_path / "a")
  assert data.dataset.label_columns == () and "malignant" not in data.dataset.numeric_columns
  generated = synthetic_tabular.write_synthetic_table(tmp_path / "gen", num_rows=60, seed=0)
  declared = TabularDataset(generated)  # no label_columns given: the file's own
  assert declared.label_columns == ("malignant",) and "malignant" not in declared.numeric_columns
