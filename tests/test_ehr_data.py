"""Tests of the EHR data module (vocab, tokenisation, masking) and the Grain pipeline."""
from __future__ import annotations

import json

import grain
import numpy as np
import pytest

from biofm_jax.data import batch, pipeline
from biofm_jax.data.module import KeyByModality
from biofm_jax.modalities.ehr import data as ehr
from biofm_jax.modalities.ehr import meds as meds_reader
from biofm_jax.modalities.ehr import windows

NAT = np.datetime64("NaT", "us")
T0 = np.datetime64("2000-01-01T00:00:00", "us")
DAY = np.timedelta64(1, "D")


def make_record(subject_id, events, static=(), birth=None):
  """events: (code, days after T0, value or None); static: codes with no time."""
  rows = [(code, NAT, None) for code in static]
  if birth is not None:
    rows.append(("MEDS_BIRTH", T0 + birth * DAY, None))
  rows += [(code, T0 + day * DAY, value) for code, day, value in events]
  return {"subject_id": np.int64(subject_id),
          "codes": np.array([r[0] for r in rows], dtype=object),
          "times": np.array([r[1] for r in rows], dtype="datetime64[us]"),
          "numeric_values": np.array([np.nan if r[2] is None else r[2] for r in rows],
                                     dtype=np.float32)}


def random_records(num, seed=0, max_events=30):
  rng = np.random.default_rng(seed)
  records = []
  for i in range(num):
    n = int(rng.integers(1, max_events))
    codes = rng.choice([f"DX{k}" for k in range(12)] + ["LAB//A", "LAB//B"], size=n)
    days = np.sort(rng.integers(0, 3000, size=n))
    values = [float(rng.normal(5, 2)) if c.startswith("LAB") else None for c in codes]
    records.append(make_record(i, list(zip(codes, days.tolist(), values)),
                               static=("SEX//F",), birth=-10_000 if i % 3 else None))
  return records


@pytest.fixture(scope="module")
def records():
  return random_records(60)


@pytest.fixture(scope="module")
def vocab(records):
  return ehr.EHRVocab.build(records, min_count=2, num_value_bins=4)


# ================================================================ vocabulary
def test_vocab_min_count_order_and_unk():
  counts = {"B": 5, "A": 5, "C": 3, "D": 1}
  recs = [make_record(i, [(code, 0, None)] * n) for i, (code, n) in enumerate(counts.items())]
  vocab = ehr.EHRVocab.build(recs, min_count=2, num_value_bins=3)
  assert vocab.codes == ("A", "B", "C")  # ties broken by code
  assert vocab.num_rare_codes == 1 and vocab.size == len(batch.SPECIAL_TOKENS) + 3
  assert ehr.EHRVocab.build(recs[::-1], min_count=2, num_value_bins=3) == vocab
  ids = vocab.code_ids(np.array(["A", "B", "C", "D", "never-seen"], dtype=object))
  assert ids.dtype == np.int32
  assert ids.tolist() == [4, 5, 6, batch.UNK_ID, batch.UNK_ID]


def test_vocab_quantile_edges_match_numpy(records, vocab):
  values = np.concatenate([r["numeric_values"][r["codes"] == "LAB//A"] for r in records])
  expected = np.quantile(values.astype(np.float64), [0.25, 0.5, 0.75])
  np.testing.assert_allclose(vocab.value_bin_edges["LAB//A"], expected, rtol=1e-12)
  assert "DX0" not in vocab.value_bin_edges  # a code without values has no edges


def test_value_bins_edge_cases():
  vocab = ehr.EHRVocab(codes=("LAB", "DX"), value_bin_edges={"LAB": (1.0, 2.0, 3.0)},
                       num_value_bins=4, min_count=1)
  codes = np.array(["LAB", "LAB", "LAB", "LAB", "LAB", "DX", "UNSEEN"], dtype=object)
  values = np.array([np.nan, -5.0, 1.0, 2.5, 99.0, 7.0, 7.0], dtype=np.float32)
  bins = vocab.value_bins(codes, values)
  assert bins.dtype == np.int32
  # NaN -> none; below all -> 1; on an edge -> above it (side='right'); above all -> K.
  assert bins.tolist() == [batch.NO_VALUE_BIN, 1, 2, 3, 4, batch.NO_VALUE_BIN,
                           batch.NO_VALUE_BIN]


def test_vocab_json_round_trip_and_load_errors(vocab, tmp_path):
  path = tmp_path / "ehr_vocab.json"
  vocab.save(path)
  payload = json.loads(path.read_text())
  assert payload["format_version"] == ehr.VOCAB_FORMAT_VERSION
  assert ehr.EHRVocab.load(path) == vocab
  assert list(tmp_path.iterdir()) == [path]  # no temporary file left behind
  payload["format_version"] = 99
  path.write_text(json.dumps(payload))
  with pytest.raises(ValueError, match="ehr_vocab.json.*format_version"):
    ehr.EHRVocab.load(path)
  path.write_text("{not json")
  with pytest.raises(ValueError, match="ehr_vocab.json"):
    ehr.EHRVocab.load(path)


# ================================================================ tokenisation
def test_tokenize_fields_cls_padding_and_recent_window(vocab):
  record = make_record(0, [("DX0", d, None) for d in range(3)] + [("DX1", 10, None)],
                       static=("SEX//F",), birth=0)
  out = ehr.TokenizeEHR(vocab, max_len=10).map(record)
  batch.check_example(out, batch.ehr_example_spec(10, with_targets=False), "test")
  assert set(out) == set(batch.EHR_INPUT_FIELDS)
  n_events = len(record["codes"])  # 6: static, birth, 4 events
  assert out["codes"][0] == batch.CLS_ID and not out["time_known"][0]
  assert not out["age_known"][0] and out["value_bins"][0] == batch.NO_VALUE_BIN
  assert out["mask"].tolist() == [True] * (1 + n_events) + [False] * (9 - n_events)
  assert (out["codes"][1 + n_events:] == batch.PAD_ID).all()
  assert out["codes"][1:1 + n_events].tolist() == vocab.code_ids(record["codes"]).tolist()
  assert not out["time_known"][1] and not out["age_known"][1]  # the static row

  short = ehr.TokenizeEHR(vocab, max_len=4)
  recent, earliest = short.map(record), ehr.TokenizeEHR(vocab, 4, "earliest").map(record)
  # The static row (demographics) is always kept; the rest of the window is the most recent events.
  assert recent["codes"][1:].tolist() == vocab.code_ids(
      np.concatenate([record["codes"][:1], record["codes"][-2:]])).tolist()
  assert not recent["time_known"][1] and recent["time_known"][2:].all()
  assert earliest["codes"][1:].tolist() == vocab.code_ids(record["codes"][:3]).tolist()
  assert recent["mask"].all() and earliest["mask"].all()


def test_tokenize_time_and_age(vocab):
  birth_day = -3652  # 1990-01-01: ten years (of 365.25 days, less rounding) before T0
  record = make_record(0, [("DX0", 0, None), ("DX1", 100, None), ("DX2", 365, None)],
                       static=("SEX//F",), birth=birth_day)
  out = ehr.TokenizeEHR(vocab, max_len=8).map(record)
  real = slice(1, 1 + len(record["codes"]))
  known = out["time_known"][real]
  assert known.tolist() == [False, True, True, True, True]
  np.testing.assert_allclose(out["time_days"][real][known], [0, 3652, 3752, 4017])
  assert (out["time_days"] >= 0).all() and out["time_days"][real][known][0] == 0
  days_since_birth = np.array([0, 3652, 3752, 4017])
  np.testing.assert_allclose(out["age_years"][real][known], days_since_birth / 365.25,
                             rtol=1e-6)
  assert out["age_known"][real].tolist() == known.tolist()

  no_birth = make_record(1, [("DX0", 0, None), ("DX1", 5, None)])
  out = ehr.TokenizeEHR(vocab, max_len=8).map(no_birth)
  assert not out["age_known"].any() and (out["age_years"] == 0).all()
  assert out["time_known"][1:3].all()  # time is still known without a birth date


def test_tokenize_time_is_relative_to_the_window(vocab):
  record = make_record(0, [("DX0", d, None) for d in (0, 10, 20, 30)])
  earliest = ehr.TokenizeEHR(vocab, max_len=3, window="earliest").map(record)
  assert earliest["time_days"][1:].tolist() == [0, 10]
  recent = ehr.TokenizeEHR(vocab, max_len=3, window="recent").map(record)
  assert recent["time_days"][1:].tolist() == [0, 10]  # days 20 and 30, from the window's start


def test_tokenize_errors_name_the_record(vocab):
  bad = make_record(7, [("DX0", 0, None)])
  del bad["times"]
  with pytest.raises(ValueError, match="subject_id 7.*times"):
    ehr.TokenizeEHR(vocab, 8).map(bad)
  with pytest.raises(ValueError, match="window"):
    ehr.TokenizeEHR(vocab, 8, window="middle")


def test_window_stats():
  stats = ehr.window_stats(np.array([0, 3, 4, 5, 10]), max_len=5)  # keeps 4 events
  assert stats == {"subjects": 5, "events": 22, "subjects_truncated": 2,
                   "events_dropped": 1 + 6}


# ================================================================ masking
@pytest.fixture(scope="module")
def tokenized(records, vocab):
  tokenize = ehr.TokenizeEHR(vocab, max_len=24)
  return [tokenize.map(r) for r in records]


def test_mask_deterministic_per_rng(tokenized, vocab):
  mask = ehr.MaskEHR(vocab.size, mask_rate=0.3)
  a = mask.random_map(tokenized[0], np.random.default_rng(1))
  b = mask.random_map(tokenized[0], np.random.default_rng(1))
  assert all(np.array_equal(a[k], b[k]) for k in a)
  differs = [not np.array_equal(a["target_mask"],
                                mask.random_map(tokenized[0], np.random.default_rng(s))
                                ["target_mask"]) for s in range(2, 6)]
  assert any(differs)


def test_mask_statistics_and_targets(tokenized, vocab):
  rate = 0.15
  mask = ehr.MaskEHR(vocab.size, mask_rate=rate)
  rng = np.random.default_rng(0)
  selected = events = masked = swapped = kept = 0
  for i in range(2000):
    example = tokenized[i % len(tokenized)]
    out = mask.random_map(example, rng)
    batch.check_example(out, batch.ehr_example_spec(24, with_targets=True), "masked")
    sel = out["target_mask"]
    real = example["mask"] & (example["codes"] != batch.CLS_ID) & (example["codes"] != batch.UNK_ID)
    assert not (sel & ~real).any()  # never CLS, [UNK] or padding
    assert sel.sum() >= 1
    assert np.array_equal(out["target_codes"], example["codes"])
    assert np.array_equal(out["target_value_bins"], example["value_bins"])
    assert (out["value_bins"][sel] == batch.NO_VALUE_BIN).all()
    assert np.array_equal(out["codes"][~sel], example["codes"][~sel])
    selected += sel.sum()
    events += real.sum()
    masked += (out["codes"][sel] == batch.MASK_ID).sum()
    changed = sel & (out["codes"] != batch.MASK_ID) & (out["codes"] != example["codes"])
    swapped += changed.sum()
    kept += (sel & (out["codes"] == example["codes"])).sum()
    assert (out["codes"][changed] >= len(batch.SPECIAL_TOKENS)).all()
    assert (out["codes"] < vocab.size).all()
  # At least one per example lifts the rate a little for short timelines.
  assert rate - 0.01 < selected / events < rate + 0.04
  assert abs(masked / selected - 0.8) < 0.03
  # A random swap may land on the original id: it then counts as kept.
  assert abs(swapped / selected - 0.1) < 0.03 and abs(kept / selected - 0.1) < 0.03


# ================================================================ pipeline
def batch_equal(a, b):
  return all(np.array_equal(a["ehr"][k], b["ehr"][k]) for k in a["ehr"])


def ehr_train(records, vocab, **kw):
  transforms = [ehr.TokenizeEHR(vocab, 16), ehr.MaskEHR(vocab.size), KeyByModality("ehr")]
  args = dict(global_batch_size=8, seed=3, process_index=0, process_count=1)
  return pipeline.make_train_dataset(records, transforms, **{**args, **kw})


def test_train_batches_match_spec(records, vocab):
  spec = batch.ehr_example_spec(16, with_targets=True)
  first = next(pipeline.make_iterator(ehr_train(records, vocab)))
  assert set(first) == {"ehr"}
  for name, (shape, dtype) in spec.items():
    assert first["ehr"][name].shape == (8,) + shape
    assert first["ehr"][name].dtype == np.dtype(dtype)
  with pytest.raises(ValueError, match="multiple of the process count"):
    ehr_train(records, vocab, global_batch_size=9, process_count=2)


@pytest.mark.parametrize("num_workers", [0, 1])
def test_train_iterator_resumes_exactly(records, vocab, num_workers):
  ds = ehr_train(records, vocab)
  it = pipeline.make_iterator(ds, num_workers=num_workers)
  for _ in range(9):  # past the first epoch of 60 records
    next(it)
  state = it.get_state()
  expected = [next(it) for _ in range(3)]
  resumed = pipeline.make_iterator(ds, num_workers=num_workers)
  resumed.set_state(state)
  assert all(batch_equal(e, next(resumed)) for e in expected)
  if num_workers:
    it.close()
    resumed.close()


class ToyExample(grain.transforms.Map):
  """Record -> an example whose id survives batching (ids start at 1; padding is 0)."""

  def map(self, record):
    return {"id": np.int64(record["subject_id"]) + 1, "mask": np.ones(3, bool)}


TOY_SPEC = {"id": ((), np.int64), "mask": ((3,), np.bool_)}


def toy_ids(batches):
  return np.concatenate([b["toy"]["id"] for b in batches])


def test_process_sharding_is_disjoint_and_covers(records):
  seen = []
  for index in (0, 1):
    ds = pipeline.make_train_dataset(records, [ToyExample(), KeyByModality("toy")],
                                     global_batch_size=10, seed=0, process_index=index,
                                     process_count=2)
    it = pipeline.make_iterator(ds)
    seen.append(set(toy_ids([next(it) for _ in range(6)]).tolist()))  # one epoch
  assert not seen[0] & seen[1]
  assert seen[0] | seen[1] == set(range(1, len(records) + 1))


class ToyNoise(grain.transforms.RandomMap):
  def random_map(self, example, rng):
    return {**example, "noise": rng.random()}


def test_global_batches_are_the_same_for_any_number_of_processes(records):
  """Global batch k holds the same examples, with the same random transforms, whether one
  process reads it or each of 2 or 3 reads its share: runs may change process count."""
  def global_batches(count, steps=8):
    iterators = [pipeline.make_iterator(pipeline.make_train_dataset(
        records, [ToyExample(), ToyNoise(), KeyByModality("toy")], global_batch_size=12, seed=3, process_index=i,
        process_count=count)) for i in range(count)]
    out = []
    for _ in range(steps):
      parts = [next(it)["toy"] for it in iterators]
      out.append({int(i): float(n) for p in parts for i, n in zip(p["id"], p["noise"])})
    return out
  single = global_batches(1)
  assert len(single[0]) == 12 and len({frozenset(b) for b in single}) == len(single)
  for count in (2, 3):
    assert global_batches(count) == single


def test_train_reshuffles_every_epoch(records):
  ds = pipeline.make_train_dataset(records, [ToyExample(), KeyByModality("toy")],
                                   global_batch_size=len(records), seed=0,
                                   process_index=0, process_count=1)
  it = pipeline.make_iterator(ds)
  epochs = [toy_ids([next(it)]) for _ in range(2)]
  assert all(sorted(e.tolist()) == list(range(1, len(records) + 1)) for e in epochs)
  assert not np.array_equal(epochs[0], epochs[1])


@pytest.mark.parametrize("index", [0, 1])
def test_eval_covers_once_and_pads_with_zero_weight(records, index):
  records = records[:59]  # shards of 30 and 29: both processes still yield 5 batches
  ds = pipeline.make_eval_dataset(records, [ToyExample(), KeyByModality("toy")],
                                  global_batch_size=14, seed=0, example_spec={"toy": TOY_SPEC},
                                  process_index=index, process_count=2)
  batches = list(ds)
  assert len(batches) == 5 and all(b["toy"]["id"].shape == (7,) for b in batches)
  ids, weights = toy_ids(batches), np.concatenate([b["toy"]["mask"] for b in batches])
  real = ids > 0
  assert ids[real].tolist() == list(range(1 + index, len(records) + 1, 2))  # in order
  assert real.sum() == 30 - index and not weights[~real].any() and weights[real].all()


def test_eval_masks_the_same_positions_every_time(records, vocab):
  transforms = [ehr.TokenizeEHR(vocab, 16), ehr.MaskEHR(vocab.size), KeyByModality("ehr")]
  spec = {"ehr": batch.ehr_example_spec(16, with_targets=True)}
  make = lambda: list(pipeline.make_eval_dataset(
      records[:13], transforms, global_batch_size=8, seed=5,
      example_spec=spec, process_index=0, process_count=1))
  first, second = make(), make()
  assert len(first) == 2 and all(batch_equal(a, b) for a, b in zip(first, second))
  padding = first[1]["ehr"]
  assert not padding["mask"][5:].any() and not padding["target_mask"][5:].any()


def test_eval_masks_each_record_the_same_with_any_number_of_processes(records, vocab):
  """Two processes' evaluation batches hold the one-process examples, masked alike, so a
  run's eval loss does not depend on how many hosts computed it."""
  transforms = [ehr.TokenizeEHR(vocab, 16), ehr.MaskEHR(vocab.size), KeyByModality("ehr")]
  spec = {"ehr": batch.ehr_example_spec(16, with_targets=True)}

  def examples(index, count):
    batches = pipeline.make_eval_dataset(records[:13], transforms, global_batch_size=8, seed=5, example_spec=spec,
                                         process_index=index, process_count=count)
    rows = [{k: v[i] for k, v in b["ehr"].items()} for b in batches for i in range(len(b["ehr"]["mask"]))]
    return [row for row in rows if row["mask"].any()]  # the padding examples aside

  single = examples(0, 1)
  shards = [examples(index, 2) for index in (0, 1)]
  assert len(single) == 13 and [len(s) for s in shards] == [7, 6]
  interleaved = [row for pair in zip(*[s + [None] for s in shards]) for row in pair if row is not None]
  assert any(row["target_mask"].any() for row in single)
  for one, two in zip(single, interleaved, strict=True):
    assert all(np.array_equal(one[k], two[k]) for k in one)


# ================================================================ EHRData on a MEDS cohort
def ehr_config(**overrides):
  import ml_collections
  cfg = ml_collections.ConfigDict(dict(
      path="", synthetic_subjects=200, synthetic_seed=0, max_len=32, min_code_count=5,
      num_value_bins=8, window="recent", mask_rate=0.15))
  cfg.update(overrides)
  return cfg


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
  return tmp_path_factory.mktemp("ehr_artifacts")


def write_meds_dir(root, records):
  """A minimal MEDS directory of `records`, every fifth subject in tuning."""
  import meds
  import pyarrow as pa
  import pyarrow.parquet as pq
  (root / "data").mkdir(parents=True)
  (root / "metadata").mkdir()
  columns = {"subject_id": [], "time": [], "code": [], "numeric_value": [], "text_value": []}
  for r in records:
    n = len(r["codes"])
    columns["subject_id"] += [int(r["subject_id"])] * n
    columns["time"] += [None if np.isnat(t) else t.astype(object) for t in r["times"]]
    columns["code"] += r["codes"].tolist()
    columns["numeric_value"] += [None if np.isnan(v) else float(v)
                                 for v in r["numeric_values"]]
    columns["text_value"] += [None] * n
  pq.write_table(pa.Table.from_pydict(columns, schema=meds.DataSchema.schema()),
                 root / "data" / "0.parquet")
  ids = [int(r["subject_id"]) for r in records]
  splits = ["tuning" if i % 5 == 0 else "train" for i in ids]
  pq.write_table(pa.table({"subject_id": pa.array(ids, pa.int64()), "split": splits}),
                 root / "metadata" / "subject_splits.parquet")
  return root


def test_ehr_data_on_a_meds_directory(records, tmp_path):
  root = write_meds_dir(tmp_path / "meds", records)
  cfg = ehr_config(path=str(root), max_len=12, min_code_count=2, num_value_bins=4)
  data = ehr.EHRData.from_config(cfg, targets="masked", artifacts_dir=tmp_path / "art")
  train_records = [r for r in records if int(r["subject_id"]) % 5]
  assert data.vocab == ehr.EHRVocab.build(train_records, min_count=2, num_value_bins=4)
  summary = data.summary()
  counts = np.array([len(r["codes"]) for r in train_records])
  expected = ehr.window_stats(counts, 12)
  assert {k: summary[f"train_{k}"] for k in expected} == expected
  assert summary["subjects_train"] == len(train_records) and summary["subjects_tuning"] == 12
  assert summary["meds_subjects"] == len(records)
  tokenize = data.transforms(train=True)[0]
  via_meds = tokenize.map(data.source("train")[0])
  direct = tokenize.map(train_records[0])
  assert all(np.array_equal(via_meds[k], direct[k]) for k in direct)


def test_ehr_data_from_synthetic_cohort(artifacts):
  pytest.importorskip("biofm_jax.modalities.ehr.synthetic")
  data = ehr.EHRData.from_config(ehr_config(), targets="masked", artifacts_dir=artifacts)
  vocab_path = artifacts / ehr.VOCAB_FILENAME
  assert vocab_path.exists() and ehr.EHRVocab.load(vocab_path) == data.vocab
  assert data.model_info() == {"ehr": {"vocab_size": data.vocab.size, "num_value_bins": 8, "max_len": 32,
                                          "prediction_slots": 24}}  # prediction_slots(32, 0.15)
  assert [type(t) for t in data.transforms(train=True)] == [ehr.TokenizeEHR, ehr.MaskEHR, KeyByModality]

  summary = data.summary()
  train = data.source("train")
  counts = np.array([len(train[i]["codes"]) for i in range(len(train))])
  stats = ehr.window_stats(counts, 32)
  assert summary["train_subjects_truncated"] == stats["subjects_truncated"] > 0
  assert summary["train_events_dropped"] == stats["events_dropped"]
  assert summary["subjects_train"] == len(train)
  assert summary["vocab_size"] == data.vocab.size
  assert 0.0 <= summary["tuning_unk_rate"] <= 1.0
  assert all(isinstance(v, (int, float)) for v in summary.values())

  it = pipeline.make_iterator(pipeline.make_train_dataset(
      train, data.transforms(train=True), global_batch_size=4,
      seed=0, process_index=0, process_count=1))
  example = {k: v[0] for k, v in next(it)["ehr"].items()}
  batch.check_example(example, data.example_spec()["ehr"], "synthetic batch")


def test_ehr_data_reuses_vocab_and_checks_config(artifacts):
  pytest.importorskip("biofm_jax.modalities.ehr.synthetic")
  vocab_path = artifacts / ehr.VOCAB_FILENAME
  if not vocab_path.exists():
    ehr.EHRData.from_config(ehr_config(), targets="masked", artifacts_dir=artifacts)
  before = vocab_path.stat().st_mtime_ns
  data = ehr.EHRData.from_config(ehr_config(), targets="next",
                                 artifacts_dir=artifacts)
  assert vocab_path.stat().st_mtime_ns == before  # loaded, not rebuilt
  assert [type(t) for t in data.transforms(train=False)] == [ehr.TokenizeEHR, KeyByModality]
  assert "target_mask" not in data.example_spec()["ehr"]
  with pytest.raises(ValueError, match="min_count=5.*min_code_count=3"):
    ehr.EHRData.from_config(ehr_config(min_code_count=3), targets="masked",
                            artifacts_dir=artifacts)


def test_an_events_inputs_do_not_depend_on_later_events(vocab):
  """What a causal model reads at a position must not change when the future does."""
  base = make_record(0, [("DX0", 0, 1.0), ("DX1", 10, None), ("DX0", 20, 2.0)], birth=-5000)
  later = make_record(0, [("DX0", 0, 1.0), ("DX1", 10, None), ("DX0", 900, 2.0)], birth=-5000)
  a, b = (ehr.TokenizeEHR(vocab, max_len=8).map(r) for r in (base, later))
  # Positions: CLS, birth, DX0, DX1, then the event that moved.
  for field in batch.EHR_INPUT_FIELDS:
    np.testing.assert_array_equal(a[field][:4], b[field][:4], err_msg=field)
  assert a["time_days"][4] != b["time_days"][4]


# ================================================================ training windows
def test_cover_windows_hold_every_event_with_the_configured_overlap():
  rng = np.random.default_rng(0)
  static = rng.integers(0, 4, 200)
  events = static + np.maximum(rng.lognormal(4, 1.2, 200).astype(np.int64), 1)
  max_len, overlap = 32, 0.25
  subjects, starts, lengths = windows.cover_windows(static, events, max_len, overlap)
  for s in range(200):  # brute force: the set of events each subject's windows hold
    mine = subjects == s
    held = set()
    for start, length in zip(starts[mine], lengths[mine]):
      held |= set(range(start, start + length))
    room = max(max_len - 1 - static[s], 1)
    assert held == set(range(events[s] - static[s])), s
    assert (lengths[mine] <= room).all() and lengths[mine].max() == min(room, events[s] - static[s])
    stride = np.diff(starts[mine])
    assert (stride[:-1] == room - int(overlap * room)).all() if len(stride) > 1 else True
  assert windows.event_coverage(events, static, starts, lengths, subjects) == 1.0
  one = windows.event_coverage(events, static, np.maximum(events - static - (max_len - 1 - static), 0),
                               np.minimum(max_len - 1 - static, events - static), np.arange(200))
  assert one < 0.6  # one recent window per subject leaves most of a heavy tail untrained
  with pytest.raises(ValueError, match="window_overlap 1.0"):
    windows.cover_windows(static, events, max_len, 1.0)


def test_a_window_keeps_static_rows_and_its_records_birth_for_ages(synthetic_meds):
  dataset = meds_reader.MEDSDataset(synthetic_meds)
  records = dataset.source("train")
  static, events = records.static_counts(), records.event_counts()
  long = int(np.argmax(events))
  for i in (long, 0):
    record = records[i]
    assert static[i] == np.isnat(record["times"]).sum() and events[i] == len(record["codes"])
  subjects, starts, lengths = windows.cover_windows(static, events, 16, 0.0)
  source = windows.WindowSource(records, static, subjects, starts, lengths, 16)
  last = np.flatnonzero(subjects == long)[-1]
  window, full = source[last], records[long]
  s = static[long]
  assert list(window["codes"][:s]) == list(full["codes"][:s])  # demographics stay
  assert list(window["codes"][s:]) == list(full["codes"][s + starts[last]:s + starts[last] + lengths[last]])
  assert not (window["codes"] == "MEDS_BIRTH").any() and not np.isnat(window["birth_time"])
  vocab = ehr.EHRVocab.build([full], min_count=1, num_value_bins=2)
  tokenized, whole = ehr.TokenizeEHR(vocab, 16).map(window), ehr.TokenizeEHR(vocab, 1 + len(full["codes"])).map(full)
  n = len(window["codes"])
  np.testing.assert_allclose(tokenized[batch.EHR_AGE][1 + s:1 + n],
                             whole[batch.EHR_AGE][1 + s + starts[last]:1 + s + starts[last] + lengths[last]], rtol=1e-6)
  assert tokenized[batch.EHR_AGE_KNOWN][1 + s:1 + n].all()


def test_ehr_training_covers_every_event_and_logs_padding_and_coverage(tmp_path):
  """A packed run (`data/packing.py`): every event trained on, almost no padding."""
  from tests.helpers import config_for, train
  from biofm_jax.train.metric_writer import read_metrics
  config = config_for("configs/ehr_bert.py:tiny", data__ehr__pack=True, train__num_steps=4, train__log_every=2,
                      train__eval_every=4)
  data = ehr.EHRData.from_config(config.data.ehr, targets="masked", artifacts_dir=tmp_path / "run" / "artifacts")
  summary = data.summary()
  assert summary["train_event_coverage"] == 1.0 and summary["train_windows"] > summary["subjects_train"]
  assert summary["train_subjects_truncated"] > 0  # the tiny preset's timelines do not fit one window
  train(config, tmp_path / "run")
  rows = [r for r in read_metrics(tmp_path / "run") if "train/loss" in r]
  assert [r["step"] for r in rows] == [2, 4]
  assert all(0.0 <= r["train/padding_fraction"] < 0.05 and r["data/train_event_coverage"] == 1.0 for r in rows)
  assert all(np.isfinite(r["train/loss"]) for r in rows)
  evals = [r for r in read_metrics(tmp_path / "run") if "eval/loss" in r]
  assert evals and np.isfinite(evals[-1]["eval/loss"])  # evaluation reads one-segment rows
  assert all(r["perf/real_tokens_per_s"] <= r["perf/tokens_per_s"] for r in rows)
  # What a (re)start costs, once: data, model, first compiled step.
  assert rows[0]["perf/time_to_first_step_s"] > 0 and "perf/time_to_first_step_s" not in rows[1]


# ================================================================ static rows that fill the window
def test_subjects_whose_static_rows_fill_the_window_still_train_on_timed_events(tmp_path, caplog):
  import ml_collections
  import pyarrow as pa
  import pyarrow.parquet as pq
  day = lambda d: np.datetime64("2020-01-01", "us") + np.timedelta64(d, "D")  # noqa: E731
  rows = []  # subject 1: 36 static rows and 40 timed events; subjects 2..4: 1 static row and 5 events
  rows += [(1, None, f"STATIC//{k}") for k in range(36)] + [(1, day(d), f"DX{d % 3}") for d in range(40)]
  for s in (2, 3, 4):
    rows += [(s, None, "STATIC//0")] + [(s, day(d), f"DX{d % 3}") for d in range(5)]
  (tmp_path / "meds" / "data").mkdir(parents=True)
  (tmp_path / "meds" / "metadata").mkdir()
  pq.write_table(pa.table({"subject_id": pa.array([r[0] for r in rows], pa.int64()),
                           "time": pa.array([r[1] for r in rows], pa.timestamp("us")), "code": [r[2] for r in rows],
                           "numeric_value": pa.array([None] * len(rows), pa.float32())}),
                 tmp_path / "meds" / "data" / "0.parquet")
  pq.write_table(pa.table({"subject_id": pa.array([1, 2, 3, 4], pa.int64()), "split": ["train"] * 4}),
                 tmp_path / "meds" / "metadata" / "subject_splits.parquet")
  cfg = ml_collections.ConfigDict(dict(path=str(tmp_path / "meds"), max_len=32, window="recent", train_windows="cover",
                                       window_overlap=0.0, min_code_count=1, num_value_bins=2, mask_rate=0.15))
  data = ehr.EHRData.from_config(cfg, targets="masked", artifacts_dir=tmp_path / "artifacts")
  with caplog.at_level("WARNING"):
    source = data.training_source()
  tokenize = data._tokenize()
  timed_tokens = [int(tokenize.map(source[w])[batch.EHR_TIME_KNOWN].sum()) for w in range(len(source))]
  # 15 static rows (half of 31 slots) and 16 timed events per window: 3 windows cover subject 1's 40 events,
  # not one static-only window per event.
  assert windows.static_room(32) == 15
  assert len(source) == 3 + 3 and min(timed_tokens) >= 5
  assert sum(timed_tokens[:3]) >= 40 and data.train_event_coverage() == 1.0
  warning = [r.getMessage() for r in caplog.records if "static (null-time) rows" in r.getMessage()]
  assert len(warning) == 1 and "1 subjects" in warning[0] and "their 21 static rows" in warning[0]
  assert data.summary()["train_static_rows_left_out"] == 21
  # Evaluation's one window keeps the same static rows and the most recent timed events.
  example = tokenize.map(data.source("train")[0])
  assert int(example[batch.EHR_TIME_KNOWN].sum()) == 16 and int(example[batch.EHR_MASK].sum()) == 32
