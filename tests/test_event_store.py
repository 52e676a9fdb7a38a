"""The out-of-core MEDS event store: the same records, counts and errors as the in-memory
reader, duplicates counted and dropped, changes refused, value quantiles within their bound."""
from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import meds
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from biofm_jax.modalities.ehr import data as ehr
from biofm_jax.modalities.ehr import event_indexing as I
from biofm_jax.modalities.ehr import event_store as E
from biofm_jax.modalities.ehr.meds import MEDSDataset
from biofm_jax.modalities.ehr.synthetic import write_synthetic_meds

REPO = pathlib.Path(__file__).resolve().parents[1]


def assert_same_records(a_source, b_source):
  assert (a_source.subject_ids == b_source.subject_ids).all()
  assert (a_source.event_counts() == b_source.event_counts()).all()
  assert (a_source.static_counts() == b_source.static_counts()).all()
  fa, fb = a_source.first_event_times(), b_source.first_event_times()
  assert ((fa == fb) | (np.isnat(fa) & np.isnat(fb))).all()
  for i in range(len(a_source)):
    a, b = a_source[i], b_source[i]
    assert a["subject_id"] == b["subject_id"] and (a["codes"] == b["codes"]).all()
    assert np.array_equal(a["times"].view(np.int64), b["times"].view(np.int64)) and np.array_equal(a["numeric_values"], b["numeric_values"],
                                                                      equal_nan=True)


def write_meds(root: pathlib.Path, files: dict[str, pa.Table], splits: pa.Table | None = None) -> pathlib.Path:
  (root / "data").mkdir(parents=True)
  for name, table in files.items():
    pq.write_table(table, root / "data" / name, row_group_size=7)  # small row groups: subjects straddle them
  if splits is not None:
    (root / "metadata").mkdir()
    pq.write_table(splits, root / meds.subject_splits_filepath)
  return root


def events(subjects, times, codes, values=None):
  t = pa.array(np.asarray(times, "datetime64[us]"), pa.timestamp("us"))
  return pa.table({"subject_id": pa.array(subjects, pa.int64()), "time": t, "code": pa.array(codes, pa.string()),
                   "numeric_value": pa.array(values if values is not None else [None] * len(subjects), pa.float32())})


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
  return write_synthetic_meds(tmp_path_factory.mktemp("store") / "cohort", num_subjects=300, seed=0)


def test_the_store_reads_what_the_in_memory_reader_reads(cohort, tmp_path):
  I.build_event_store(cohort, tmp_path / "store", workers=2, drop_duplicates=False)
  memory, store = MEDSDataset(cohort, drop_duplicates=False), E.EventStore(tmp_path / "store")
  assert store.stats == memory.stats and memory.stats["duplicate_rows"] > 0
  assert store.splits.keys() == memory.splits.keys()
  for split in memory.splits:
    assert_same_records(memory.source(split), store.source(split))
  assert_same_records(memory.all_subjects(), store.all_subjects())
  # The prediction-time cut of fine-tuning: the same on both paths.
  times = memory.source("train")[5]["times"]
  cut = times[len(times) // 2]
  a, b = memory.source("train").record_until(5, cut), store.source("train").record_until(5, cut)
  assert np.array_equal(a["times"].view(np.int64), b["times"].view(np.int64)) and (a["codes"] == b["codes"]).all()
  # The vocabulary from the store's counts and value samples equals the one from records.
  train = memory.source("train")
  from_records = ehr.EHRVocab.build((train[i] for i in range(len(train))), min_count=2, num_value_bins=5)
  from_store = ehr.EHRVocab.from_counts(store.training_code_counts, store.training_values(), min_count=2,
                                        num_value_bins=5)
  assert from_store == from_records


def test_duplicates_are_counted_and_dropped(cohort, tmp_path):
  I.build_event_store(cohort, tmp_path / "store", drop_duplicates=True)
  store, memory = E.EventStore(tmp_path / "store"), MEDSDataset(cohort, drop_duplicates=False)
  assert store.stats["duplicate_rows"] > 0
  assert store.stats["rows"] == memory.stats["rows"] - store.stats["duplicate_rows"]
  # The in-memory reader applies the same rule by default: the same rows, counts and records.
  deduplicated = MEDSDataset(cohort)
  assert deduplicated.stats == store.stats
  assert_same_records(deduplicated.all_subjects(), store.all_subjects())
  source, raw = store.source("train"), memory.source("train")
  for i in range(0, len(source), 17):
    record, full = source[i], raw[i]
    keep = ~I.duplicate_rows(np.zeros(len(full["codes"]), np.int64), full["times"].view(np.int64),
                             np.unique(full["codes"], return_inverse=True)[1].astype(np.int32),
                             full["numeric_values"])
    assert (record["codes"] == full["codes"][keep]).all() and np.array_equal(record["times"].view(np.int64), full["times"][keep].view(np.int64))


def test_unsorted_files_and_a_subject_in_two_files(tmp_path):
  rng = np.random.default_rng(0)
  n = 60
  subjects = np.repeat([3, 1, 2, 5], n // 4)
  times = np.datetime64("2020-01-01T00:00", "us") + rng.integers(0, 10**9, n).astype("timedelta64[s]")
  codes = [f"C{c}" for c in rng.integers(0, 6, n)]
  values = rng.normal(size=n).astype(np.float32)
  order = rng.permutation(n)  # rows in no order at all
  a = events(subjects[order], times[order], [codes[i] for i in order], values[order])
  b = events([2, 2, 9], np.sort(times[:3]), ["X", "Y", "Z"], [1.0, None, 2.0])  # subject 2 again, in another file
  root = write_meds(tmp_path / "meds", {"a.parquet": a, "b.parquet": b})
  I.build_event_store(root, tmp_path / "store", drop_duplicates=False)
  memory, store = MEDSDataset(root), E.EventStore(tmp_path / "store")
  assert store.stats["unsorted_files"] == memory.stats["unsorted_files"] == 1
  assert store.stats["subjects_in_multiple_files"] == memory.stats["subjects_in_multiple_files"] == 1
  assert_same_records(memory.all_subjects(), store.all_subjects())


def test_bad_input_gets_the_in_memory_readers_errors(tmp_path):
  good = events([1, 1], ["2020-01-01", "2020-01-02"], ["A", "B"])
  cases = {
      "missing": good.drop(["code"]),
      "nulls": good.set_column(2, "code", pa.array([None, "B"], pa.string())),
      "types": good.set_column(2, "code", pa.array([1, 2], pa.int64())),
  }
  for name, table in cases.items():
    root = write_meds(tmp_path / name, {"0.parquet": table})
    with pytest.raises(ValueError) as memory_error:
      MEDSDataset(root)
    with pytest.raises(ValueError) as store_error:
      I.build_event_store(root, tmp_path / f"{name}_store")
    assert str(store_error.value) == str(memory_error.value), name
    assert not (tmp_path / f"{name}_store").exists()  # nothing half-written
  # A split file naming none of the data's subjects: an error saying so, on both paths.
  splits = pa.table({"subject_id": pa.array([77], pa.int64()), "split": pa.array(["train"])})
  root = write_meds(tmp_path / "other_splits", {"0.parquet": good}, splits)
  for build in (lambda: MEDSDataset(root), lambda: I.build_event_store(root, tmp_path / "s")):
    with pytest.raises(ValueError, match=r"subject_splits.parquet: names none of the data's 1 subjects"):
      build()


def test_a_changed_or_added_file_is_refused_and_a_killed_build_leaves_nothing(tmp_path, monkeypatch):
  root = write_meds(tmp_path / "meds", {"0.parquet": events([1, 2], ["2020-01-01", "2020-01-02"], ["A", "B"])})
  I.build_event_store(root, tmp_path / "store")
  with pytest.raises(FileExistsError, match="an event store is there already"):
    I.build_event_store(root, tmp_path / "store")
  pq.write_table(events([1, 2, 3], ["2020-01-01"] * 3, ["A", "B", "C"]), root / "data" / "0.parquet")
  with pytest.raises(ValueError, match=r"0\.parquet: changed after the event store .* rebuild the store"):
    E.EventStore(tmp_path / "store")
  pq.write_table(events([4], ["2020-01-01"], ["A"]), root / "data" / "1.parquet")
  I.build_event_store(root, tmp_path / "store2")
  pq.write_table(events([5], ["2020-01-01"], ["A"]), root / "data" / "2.parquet")
  with pytest.raises(ValueError, match=r"1 data file\(s\) added after the event store .* \(e\.g\. 2\.parquet\)"):
    E.EventStore(tmp_path / "store2")

  def dies(*args):
    raise KeyboardInterrupt  # a kill while the second file is indexed
  real = I.index_file
  monkeypatch.setattr(I, "index_file", lambda file, *rest: real(file, *rest) if file == 0 else dies())
  with pytest.raises(KeyboardInterrupt):
    I.build_event_store(root, tmp_path / "killed")
  assert not (tmp_path / "killed").exists() and not list(tmp_path.glob(".killed*"))
  with pytest.raises(ValueError, match="not an event store"):
    E.EventStore(tmp_path / "killed")


def test_value_quantiles_are_exact_for_small_codes_and_within_the_bound_for_large_ones(tmp_path):
  rng = np.random.default_rng(3)
  big = 4 * E.SKETCH_SIZE
  values = np.concatenate([rng.lognormal(0.0, 1.0, big), rng.normal(5.0, 2.0, 500)]).astype(np.float32)
  codes = ["BIG"] * big + ["SMALL"] * 500
  subjects = np.repeat(np.arange(1, 101), len(codes) // 100 + 1)[: len(codes)]
  times = np.datetime64("2020-01-01", "us") + np.arange(len(codes)).astype("timedelta64[s]")
  root = write_meds(tmp_path / "meds", {"0.parquet": events(subjects, times, codes, values)},
                    pa.table({"subject_id": pa.array(np.arange(1, 101), pa.int64()), "split": ["train"] * 100}))
  I.build_event_store(root, tmp_path / "store", workers=1)
  samples = E.EventStore(tmp_path / "store").training_values()
  assert len(samples["BIG"]) == E.SKETCH_SIZE and len(samples["SMALL"]) == 500
  assert sorted(samples["SMALL"].tolist()) == sorted(values[big:].tolist())  # every value: exact quantiles
  qs = np.linspace(0, 1, 11)[1:-1]
  full = np.sort(values[:big])
  ranks = np.searchsorted(full, np.quantile(samples["BIG"].astype(np.float64), qs)) / big
  assert np.abs(ranks - qs).max() <= E.ERROR_BOUND
  assert E.ERROR_BOUND == pytest.approx(0.0138, abs=1e-4)


def test_ehr_data_reads_an_event_store_and_the_command_builds_one(cohort, tmp_path):
  import ml_collections
  out = tmp_path / "events"
  result = subprocess.run([sys.executable, str(REPO / "experiments" / "index_meds.py"), f"--meds={cohort}",
                           f"--out={out}", "--workers=2"], capture_output=True, text=True,
                          env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert result.returncode == 0, result.stderr
  assert "indexed" in result.stdout and "duplicate_rows" in result.stdout
  again = subprocess.run([sys.executable, str(REPO / "experiments" / "index_meds.py"), f"--meds={cohort}",
                          f"--out={out}"], capture_output=True, text=True)
  assert again.returncode == 2 and "error: " in again.stderr and "an event store is there already" in again.stderr
  cfg = ml_collections.ConfigDict(dict(path=str(cohort), event_store=str(out), max_len=32, window="recent",
                                       train_windows="cover", window_overlap=0.25, min_code_count=2,
                                       num_value_bins=4, mask_rate=0.15, pack=True))
  data = ehr.EHRData.from_config(cfg, targets="masked", artifacts_dir=tmp_path / "artifacts")
  assert isinstance(data.dataset, E.EventStore)
  summary = data.summary()
  assert summary["train_event_coverage"] == 1.0 and summary["meds_duplicate_rows"] > 0
  assert json.loads((tmp_path / "artifacts" / ehr.VOCAB_FILENAME).read_text())["codes"]
  example = data.transforms(train=True)[0].map(data.training_source()[0])
  assert example["mask"].sum() >= 2
  with pytest.raises(ValueError, match="indexes .* but config.data.ehr.path is"):
    ehr.EHRData.from_config(ml_collections.ConfigDict({**cfg.to_dict(), "path": str(tmp_path)}),
                            targets="masked", artifacts_dir=tmp_path / "other")


def test_the_beam_engine_writes_the_same_store(cohort, tmp_path):
  pytest.importorskip("apache_beam")
  I.build_event_store(cohort, tmp_path / "processes", workers=2)
  I.build_event_store(cohort, tmp_path / "beam", workers=2, engine="beam")  # DirectRunner, 2 processes
  a, b = tmp_path / "processes", tmp_path / "beam"
  columns = sorted(p.relative_to(a) for p in (a / "shards").iterdir() if not p.name.endswith(".summary.npz"))
  assert columns and columns == sorted(p.relative_to(b) for p in (b / "shards").iterdir()
                                       if not p.name.endswith(".summary.npz"))
  for name in columns + [pathlib.Path("training_codes.json"), pathlib.Path("value_sketch/values.npy")]:
    assert (a / name).read_bytes() == (b / name).read_bytes(), name
  assert pq.read_table(a / "index.parquet").equals(pq.read_table(b / "index.parquet"))
  stats = lambda p: json.loads((p / E.SOURCE_FILE).read_text())["stats"]  # noqa: E731
  assert stats(a) == stats(b)
  with pytest.raises(ValueError, match="engine 'spark', expected one of"):
    I.build_event_store(cohort, tmp_path / "x", engine="spark")


# ---------------------------------------------------------------- file descriptors
def _open_fds(folder: pathlib.Path) -> int:
  """Descriptors this process holds on files under `folder`. Only those: other tests' threads
  in the same worker (a pipeline's, a subprocess pipe's) open and close their own meanwhile,
  which made a count of every descriptor off by one under the parallel runner."""
  count = 0
  for fd in os.listdir("/proc/self/fd"):
    try:
      target = os.readlink(f"/proc/self/fd/{fd}")
    except OSError:  # closed since it was listed
      continue
    count += target.startswith(str(folder))
  return count


def _many_files(root: pathlib.Path, files: int) -> pathlib.Path:
  """`files` data files of 4 subjects each; the first 3 of every file in train, the last in tuning."""
  tables, split_ids, split_names = {}, [], []
  for f in range(files):
    ids = np.arange(4) + 4 * f + 1
    subjects = np.repeat(ids, 3)
    times = np.datetime64("2020-01-01", "us") + np.arange(len(subjects)).astype("timedelta64[D]")
    tables[f"{f:03d}.parquet"] = events(subjects, times, [f"C{i % 5}" for i in range(len(subjects))])
    split_ids += ids.tolist()
    split_names += ["train"] * 3 + ["tuning"]
  return write_meds(root, tables, pa.table({"subject_id": pa.array(split_ids, pa.int64()), "split": split_names}))


def test_evaluations_that_open_new_sources_do_not_leak_file_descriptors(tmp_path, monkeypatch):
  root = _many_files(tmp_path / "meds", 12)
  I.build_event_store(root, tmp_path / "store")
  store_dir = tmp_path / "store"
  store = E.EventStore(store_dir)
  # Only the shards' descriptors: pyarrow's I/O threads close the index file they read a
  # moment after `read_table` returns, which counted one descriptor too many under load.
  store_dir = store_dir / "shards"
  before = _open_fds(store_dir)

  def evaluate():  # what the loop does each evaluation: a new source of the split, read through
    source = store.source("tuning")
    return sum(len(source[i]["codes"]) for i in range(len(source)))

  assert evaluate() == 36
  after_first = _open_fds(store_dir)
  assert after_first - before == 36  # 12 files x 3 columns
  for _ in range(30):
    evaluate()
    store.source("train")[0]
  assert _open_fds(store_dir) == after_first
  store.close()
  assert _open_fds(store_dir) == before
  # A store of more shard files than MAX_OPEN_FILES keeps at most that many open.
  monkeypatch.setattr(E, "MAX_OPEN_FILES", 7)
  source = store.all_subjects()
  assert [len(source[i]["codes"]) for i in range(len(source))] == [3] * 48
  assert _open_fds(store_dir) - before == 7
  store.close()
  assert _open_fds(store_dir) == before


# ---------------------------------------------------------------- one duplicate rule, across files
def test_a_copied_data_file_is_deduplicated_the_same_way_by_both_readers(cohort, tmp_path, caplog):
  import shutil
  root = tmp_path / "doubled"
  shutil.copytree(cohort, root)
  first = sorted((root / "data").rglob("*.parquet"))[0]
  shutil.copy(first, first.with_name("copy_" + first.name))  # every row of that file twice
  copied_rows = pq.read_metadata(first).num_rows
  original = MEDSDataset(cohort)
  I.build_event_store(root, tmp_path / "store")
  with caplog.at_level("WARNING"):
    memory, store = MEDSDataset(root), E.EventStore(tmp_path / "store")
  for dataset in (memory, store):
    assert dataset.stats["rows"] == original.stats["rows"]
    assert dataset.stats["duplicate_rows"] == original.stats["duplicate_rows"] + copied_rows
    for split in original.splits:
      assert_same_records(original.source(split), dataset.source(split))
  assert {k: v for k, v in store.stats.items() if k != "files"} == {k: v for k, v in memory.stats.items() if k != "files"}
  # Training counts and value samples leave out what is dropped: the same vocabulary.
  train = original.source("train")
  want = ehr.EHRVocab.build((train[i] for i in range(len(train))), min_count=2, num_value_bins=5)
  assert ehr.EHRVocab.from_counts(store.training_code_counts, store.training_values(), min_count=2,
                                  num_value_bins=5) == want
  # One counted line per reader, with the file that holds the copies.
  lines = [r.getMessage() for r in caplog.records if "duplicate MEDS rows" in r.getMessage()
           and str(cohort) not in r.getMessage()]
  assert len(lines) == 2 and all(f"copy_{first.name}: {copied_rows}" in line and "train=" in line for line in lines)
  kept = MEDSDataset(root, drop_duplicates=False)
  assert kept.stats["rows"] == original.stats["rows"] + original.stats["duplicate_rows"] + copied_rows


# ---------------------------------------------------------------- corrupt store files
def test_a_store_file_written_over_or_cut_is_refused_naming_it(tmp_path):
  root = write_meds(tmp_path / "meds", {"0.parquet": events([1, 1, 2], ["2020-01-01", "2020-01-02", "2020-01-03"],
                                                           ["A", "B", "C"], [1.0, 2.0, 3.0])})
  I.build_event_store(root, tmp_path / "store")
  values = tmp_path / "store" / "shards" / "0.values"
  data = bytearray(values.read_bytes())
  data[0:4] = np.float32(123.0).tobytes()  # garbage over subject 1's first value, same size
  values.write_bytes(bytes(data))
  source = E.EventStore(tmp_path / "store").all_subjects()
  assert source[1]["codes"].tolist() == ["C"]  # subject 2's rows are intact
  with pytest.raises(ValueError, match=r"shards/0\.values: rows 0\.\.2 do not match the checksum .* rebuild"):
    source[0]
  values.write_bytes(bytes(data[:-4]))  # cut short: refused when the store opens
  with pytest.raises(ValueError, match=r"shards/0\.values: 8 bytes, expected 12 bytes"):
    E.EventStore(tmp_path / "store")
