"""Tests of the multimodal join (`data/multimodal.py`) and its pipelines: the join index,
presence and padding, require, balanced sampling, modality dropout, bad input, the train
and eval pipelines, weighted mixing, and a join of real tabular and imaging modules."""
from __future__ import annotations

import collections
import csv
import pathlib
import pickle

import grain
import numpy as np
import pytest

from biofm_jax.config import load_config
from biofm_jax.data import batch, join, multimodal, pattern_batches, pipeline
from biofm_jax.data.module import DataModuleDefaults, KeyByModality
from biofm_jax.modalities.imaging.data import ImagingData
from biofm_jax.modalities.tabular.data import TabularData

REPO = pathlib.Path(__file__).resolve().parent.parent


# ================================================================ fake modules
class FakeSource:
  """Records {"subject_id", "value"}; value = 100 * modality number + position + 1."""

  def __init__(self, ids, offset):
    self.subject_ids, self.offset = list(ids), offset

  def __len__(self):
    return len(self.subject_ids)

  def __getitem__(self, i):
    return {"subject_id": self.subject_ids[i], "value": float(self.offset + i + 1)}


class ToVector(grain.transforms.Map):
  def __init__(self, width):
    self.width = width

  def map(self, record):
    return {"x": np.full(self.width, record["value"], np.float32), "valid": np.asarray(True)}


class AddNoise(grain.transforms.RandomMap):
  def random_map(self, example, rng):
    return {**example, "noise": rng.random(2).astype(np.float32)}


class FakeModule(DataModuleDefaults):
  """A data module over given subject ids per split; no `dataset` (splits found by trying)."""

  def __init__(self, name, splits, number, width=3):
    self.name, self.number, self.width = name, number, width
    self.splits = {s: list(ids) for s, ids in splits.items()}

  def source(self, split):
    if split not in self.splits:
      raise ValueError(f"fake: unknown split {split!r}")
    return FakeSource(self.splits[split], 100 * self.number)

  def transforms(self, train, mask=True):
    return [ToVector(self.width)] + ([AddNoise()] if mask else []) + [KeyByModality(self.name)]

  def embedding_spec(self):
    return {self.name: {"x": ((self.width,), np.float32), "valid": ((), np.bool_)}}

  def example_spec(self):
    return {self.name: {**self.embedding_spec()[self.name], "noise": ((2,), np.float32)}}

  def model_info(self):
    return {self.name: {"width": self.width}}

  def summary(self):
    return {f"records_{s}": len(ids) for s, ids in self.splits.items()}


def fake_modules():
  """ehr: int ids; imaging: subject 3 has two images; tabular: 9 only in tabular."""
  ehr = FakeModule("ehr", {"train": np.array([1, 2, 3, 5, 11], np.int64),
                           "tuning": np.array([20, 21], np.int64)}, 1)
  imaging = FakeModule("imaging", {"train": ["2", "3", "3", "7", "1"], "tuning": ["21"]}, 2,
                       width=2)
  tabular = FakeModule("tabular", {"train": ["1", "7", "9"], "tuning": []}, 3, width=4)
  return {"ehr": ehr, "imaging": imaging, "tabular": tabular}


def join_ids(modules):
  return {m: {s: mod.source(s).subject_ids for s in mod.splits} for m, mod in modules.items()}


def apply(transforms, item, seed=0):
  x = item
  for k, t in enumerate(transforms):
    x = t.random_map(x, np.random.default_rng([seed, k])) if isinstance(
        t, grain.transforms.RandomMap) else t.map(x)
  return x


def assert_resumes_exactly(it, make, batches: int = 3):
  """A new iterator from `make()` given `it`'s state yields `it`'s next batches exactly."""
  state = it.get_state()
  expected = [next(it) for _ in range(batches)]
  resumed = make()
  resumed.set_state(state)
  for e in expected:
    got = next(resumed)
    assert sorted(got) == sorted(e) and all(np.array_equal(e[m][k], got[m][k]) for m in e for k in e[m])


def assert_padding(example, spec):
  expected = batch.padding_example(batch.with_presence(spec))
  assert set(example) == set(expected)
  for name, value in expected.items():
    assert example[name].dtype == value.dtype and np.array_equal(example[name], value), name


# ================================================================ join index
def test_join_is_the_union_with_records_and_counts():
  index = join.join_subjects(join_ids(fake_modules()))
  train = index.splits["train"]
  assert train.subject_ids.tolist() == ["1", "11", "2", "3", "5", "7", "9"]  # str order

  def records(m, subject):
    i = train.subject_ids.tolist().index(subject)
    return train.records[m][train.offsets[m][i]:train.offsets[m][i + 1]].tolist()

  assert records("imaging", "3") == [1, 2] and records("imaging", "1") == [4]
  assert records("ehr", "11") == [4] and records("tabular", "11") == []
  c = index.counts
  assert c["train_subjects"] == 7 and c["train_subjects_imaging"] == 4
  assert c["train_records_imaging"] == 5 and c["train_several_records_imaging"] == 1
  assert c["train_pattern_ehr+imaging+tabular"] == 1  # subject 1
  assert c["train_pattern_ehr+imaging"] == 2 and c["train_pattern_imaging+tabular"] == 1
  assert c["train_only_one_modality"] == 3  # 11 and 5 (ehr), 9 (tabular)
  assert c["tuning_subjects"] == 2 and c["tuning_subjects_tabular"] == 0
  assert c["train_dropped_by_require"] == 0


def test_require_keeps_only_subjects_with_every_required_modality():
  index = join.join_subjects(join_ids(fake_modules()), require=("imaging", "ehr"))
  assert index.splits["train"].subject_ids.tolist() == ["1", "2", "3"]
  assert index.counts["train_dropped_by_require"] == 4
  assert index.counts["tuning_subjects"] == 1 and index.counts["tuning_dropped_by_require"] == 1
  with pytest.raises(ValueError, match=r"require names \['omics'\]"):
    join.join_subjects(join_ids(fake_modules()), require=("omics",))


def test_a_withheld_modality_is_given_to_no_subject_and_those_left_with_nothing_leave():
  index = join.join_subjects(join_ids(fake_modules()), withhold=("ehr",))
  train = index.splits["train"]
  assert train.subject_ids.tolist() == ["1", "2", "3", "7", "9"]  # 11 and 5 had EHR only
  assert index.counts["train_subjects_ehr"] == 0 and not len(train.records["ehr"])
  assert index.counts["train_subjects_imaging"] == 4  # the others' records are as without withholding
  data = multimodal.MultimodalData(fake_modules(), withhold=("ehr",))
  example = apply(data.transforms(train=False), data.source("train")[0])  # subject 1 has all three
  assert not example["ehr"][batch.PRESENT] and example["imaging"][batch.PRESENT] and example["tabular"][batch.PRESENT]
  for withhold, require, message in (
      (("omics",), (), r"withhold names \['omics'\]"),
      (("ehr",), ("ehr",), r"withhold \['ehr'\] with require \['ehr'\]"),
      (("ehr", "imaging", "tabular"), (), "at least one of")):
    with pytest.raises(ValueError, match=message):
      join.join_subjects(join_ids(fake_modules()), withhold=withhold, require=require)
  with pytest.raises(ValueError, match="multimodal withhold is 'ehr', expected a tuple"):
    multimodal.MultimodalData(fake_modules(), withhold="ehr")


def test_split_conflicts_are_an_error_naming_modalities_and_splits():
  ids = join_ids(fake_modules())
  ids["imaging"]["tuning"] = ["21", "5", "7"]  # 5 is train in ehr, 7 train in imaging+tabular
  with pytest.raises(ValueError, match=r"2 subject\(s\) in split 'train' \(in ehr, imaging, "
                                       r"tabular\) and in split 'tuning' \(in imaging\), e\.g\. "
                                       r"subject '5'"):
    join.join_subjects(ids)


def test_empty_train_source_is_an_error_naming_it_and_empty_tuning_is_absent():
  ids = join_ids(fake_modules())
  ids["tabular"]["train"] = []
  with pytest.raises(ValueError, match=r"modality 'tabular' has no records in the 'train' split"):
    join.join_subjects(ids)
  modules = fake_modules()
  del modules["tabular"].splits["tuning"]  # a split the module does not have at all
  data = multimodal.MultimodalData(modules)
  item = data.source("tuning")[0]
  assert item["subject_id"] == "20" and set(item["records"]) == {"ehr"}
  example = apply(data.transforms(train=False), item)
  assert_padding(example["tabular"], modules["tabular"].example_spec()["tabular"])
  with pytest.raises(ValueError, match="unknown split 'validation'"):
    data.source("validation")


# ================================================================ examples
def test_examples_carry_presence_padding_and_each_modality_s_own_content():
  modules = fake_modules()
  data = multimodal.MultimodalData(modules)
  source = data.source("train")
  assert len(source) == 7 and pickle.loads(pickle.dumps(source))[3] == source[3]
  transforms = pickle.loads(pickle.dumps(data.transforms(train=False, mask=False)))
  for i in range(len(source)):
    item = source[i]
    example = apply(transforms, item)
    assert set(example) == {"ehr", "imaging", "tabular"}
    for m, module in modules.items():
      spec = module.embedding_spec()[m]
      if m in item["records"]:
        own = ToVector(module.width).map(module.source("train")[item["records"][m][0]])
        assert example[m][batch.PRESENT] and set(example[m]) == set(spec) | {batch.PRESENT}
        assert all(np.array_equal(example[m][k], own[k]) for k in spec)
      else:
        assert_padding(example[m], spec)
  # A modality's randomness depends on its own name and the stream position only.
  item = source[0]
  both = apply(data.transforms(train=True), item, seed=1)
  modules.pop("tabular")
  fewer = apply(multimodal.MultimodalData(modules).transforms(train=True), item, seed=1)
  assert np.array_equal(both["ehr"]["noise"], fewer["ehr"]["noise"])


def test_training_picks_among_a_subject_s_records_and_evaluation_the_first():
  data = multimodal.MultimodalData(fake_modules())
  source = data.source("train")
  item = next(source[i] for i in range(len(source)) if source[i]["subject_id"] == "3")
  values = lambda train, seed: apply(data.transforms(train=train), item, seed)["imaging"]["x"][0]
  assert {values(True, s) for s in range(20)} == {202.0, 203.0}  # records 1 and 2
  assert {values(False, s) for s in range(5)} == {202.0}
  assert values(True, 4) == values(True, 4)


def test_balanced_sampling_makes_every_availability_pattern_equally_frequent():
  data = multimodal.MultimodalData(fake_modules(), sampling="balanced", seed=3)
  source = data.source("train")
  patterns = collections.Counter("+".join(sorted(source[i]["records"])) for i in range(len(source)))
  assert len(patterns) == 5 and set(patterns.values()) == {2} and len(source) == 10
  assert set(source.subject_ids) == set(data.join.splits["train"].subject_ids)
  assert data.summary()["train_balanced_items"] == 10
  assert len(data.source("tuning")) == 2  # evaluation is never resampled
  with pytest.raises(ValueError, match="multimodal sampling is 'often'"):
    multimodal.MultimodalData(fake_modules(), sampling="often")


def test_modality_dropout_rate_is_about_right_never_drops_all_and_is_seeded():
  data = multimodal.MultimodalData(fake_modules(), dropout={"imaging": 0.5, "ehr": 0.3})
  source = data.source("train")
  all_three = next(i for i in range(len(source)) if len(source[i]["records"]) == 3)
  dropped, n = collections.Counter(), 2000
  transforms = data.transforms(train=True)
  for seed in range(n):
    example = apply(transforms, source[all_three], seed)
    assert example["tabular"][batch.PRESENT]  # never rated
    for m in ("ehr", "imaging"):
      if not example[m][batch.PRESENT]:
        dropped[m] += 1
        assert_padding(example[m], fake_modules()[m].example_spec()[m])
  assert abs(dropped["imaging"] / n - 0.5) < 0.05 and abs(dropped["ehr"] / n - 0.3) < 0.05
  ehr_only = next(i for i in range(len(source)) if set(source[i]["records"]) == {"ehr"})
  assert all(apply(transforms, source[ehr_only], s)["ehr"][batch.PRESENT] for s in range(50))
  two = [i for i in range(len(source)) if set(source[i]["records"]) == {"ehr", "imaging"}][0]
  for seed in range(200):
    example = apply(transforms, source[two], seed)
    assert example["ehr"][batch.PRESENT] or example["imaging"][batch.PRESENT]
  first, again = (apply(transforms, source[two], 7) for _ in range(2))
  assert all(np.array_equal(first[m][k], again[m][k]) for m in first for k in first[m])
  assert len(multimodal.MultimodalData(fake_modules(), dropout={"ehr": 0.3}).transforms(False)) == 1
  with pytest.raises(ValueError, match=r"multimodal dropout is \{'ehr': 1.5\}"):
    multimodal.MultimodalData(fake_modules(), dropout={"ehr": 1.5})


# ================================================================ pipelines
def test_train_pipeline_matches_the_spec_and_is_deterministic_eval_pads_absent():
  data = multimodal.MultimodalData(fake_modules(), dropout={"imaging": 0.3})
  make = lambda: pipeline.make_iterator(pipeline.make_train_dataset(
      data.source("train"), data.transforms(train=True), global_batch_size=4,
      seed=5, process_index=0, process_count=1))
  first, second = make(), make()
  for _ in range(3):
    a, b = next(first), next(second)
    for m, spec in data.example_spec().items():
      for name, (shape, dtype) in spec.items():
        assert a[m][name].shape == (4,) + shape and a[m][name].dtype == np.dtype(dtype)
        assert np.array_equal(a[m][name], b[m][name])
  batches = list(pipeline.make_eval_dataset(
      data.source("tuning"), data.transforms(train=False), global_batch_size=4,
      seed=5, example_spec=data.example_spec(), process_index=0, process_count=1))
  assert len(batches) == 1
  present = {m: batches[0][m][batch.PRESENT].tolist() for m in data.modalities}
  assert present == {"ehr": [True, True, False, False], "imaging": [False, True, False, False],
                     "tabular": [False] * 4}
  assert not batches[0]["ehr"]["x"][2:].any()
  with pytest.raises(ValueError, match="must be keyed by modality"):
    pipeline.make_eval_dataset(data.source("tuning"), [], global_batch_size=4,
                               seed=5, example_spec=fake_modules()["ehr"].example_spec()["ehr"],
                               process_index=0, process_count=1)


def test_pattern_batches_group_by_pattern_see_every_subject_once_and_depend_on_seed_and_epoch():
  patterns = np.random.default_rng(0).permutation(np.repeat([7, 3, 1, 4, 6], [50, 30, 12, 7, 1]))
  order = pattern_batches.PatternBatches(patterns, 8, seed=4)
  # Full batches 6 + 3 + 1 of patterns 7, 3, 1; 20 left over pooled into 3 batches.
  assert order.epoch_length == 8 * 13
  epochs = [order(e) for e in range(3)]
  for e, codes in enumerate(epochs):
    carried, subjects = np.divmod(codes, 100)
    carried, subjects = carried.reshape(-1, 8), subjects.reshape(-1, 8)
    assert (carried == carried[:, :1]).all(), e  # one set of modalities per batch
    np.testing.assert_array_equal(carried[:, 0], np.bitwise_or.reduce(patterns[subjects], axis=1))
    counts = collections.Counter(subjects.ravel())
    assert set(counts) == set(range(100)) and sum(n - 1 for n in counts.values()) == 4, e
    pure = collections.Counter(carried[(patterns[subjects] == carried).all(axis=1), 0])
    assert pure[7] >= 6 and pure[3] >= 3 and pure[1] >= 1, pure
  assert not np.array_equal(epochs[0], epochs[1])
  np.testing.assert_array_equal(epochs[1], pattern_batches.PatternBatches(patterns, 8, seed=4)(1))
  assert not np.array_equal(epochs[0], pattern_batches.PatternBatches(patterns, 8, seed=5)(0))
  balanced = pattern_batches.PatternBatches(patterns, 8, seed=4, balanced=True)
  carried, subjects = np.divmod(balanced(0).reshape(-1, 8), 100)
  assert (patterns[subjects] == carried).all() and set(collections.Counter(carried[:, 0]).values()) == {7}
  assert balanced.epoch_length == 8 * 7 * 5
  with pytest.raises(ValueError, match="batch size >= 1"):
    pattern_batches.PatternBatches(patterns, 0, seed=4)


def test_batches_by_pattern_carry_their_subjects_modalities_shard_and_resume():
  modules = fake_modules()
  data = multimodal.MultimodalData(modules, dropout={"imaging": 0.5}, batching="by_pattern")
  train = data.join.splits["train"]
  pattern_of = {str(s): {m for m in data.modalities if train.record_counts(m)[i]}
                for i, s in enumerate(train.subject_ids)}
  ids = {m: [str(s) for s in module.splits["train"]] for m, module in modules.items()}

  def subject(b, j):  # the subject of example j, from a present modality's record value
    m = next(m for m in ("ehr", "tabular", "imaging") if m in b and b[m][batch.PRESENT][j])
    return ids[m][int(b[m]["x"][j, 0]) - 100 * modules[m].number - 1]

  make = lambda index=0, count=1: pipeline.make_iterator(data.make_train_dataset(
      global_batch_size=2, seed=1, process_index=index, process_count=count))
  it = make()
  # 7 subjects: two full batches (ehr+imaging: 2, 3; ehr: 5, 11) and two of the 3 left over.
  batches = [next(it) for _ in range(40)]
  dropped = 0
  for b in batches:
    for m in b:
      spec = batch.with_presence(modules[m].example_spec()[m])
      assert {k: b[m][k].shape for k in spec} == {k: (2,) + shape for k, (shape, _) in spec.items()}
    subjects = [subject(b, j) for j in range(2)]
    assert set(b) == pattern_of[subjects[0]] | pattern_of[subjects[1]]
    for j, s in enumerate(subjects):
      for m in b:
        if m not in pattern_of[s]:
          assert not b[m][batch.PRESENT][j] and not b[m]["x"][j].any()
        elif m != "imaging" or len(pattern_of[s]) == 1:
          assert b[m][batch.PRESENT][j]
        else:
          dropped += not b[m][batch.PRESENT][j]
  epoch = [subject(b, j) for b in batches[:4] for j in range(2)]
  assert set(epoch) == set(pattern_of) and len(epoch) == 8
  assert {frozenset(b) for b in batches} >= {frozenset({"ehr", "imaging"}), frozenset({"ehr"})}
  assert 0 < dropped
  # Two data shards: shard i holds example i of each global batch, with the batch's modalities.
  halves = [make(i, 2) for i in range(2)]
  for b in batches[:6]:
    for i, half in enumerate(halves):
      part = next(half)
      assert sorted(part) == sorted(b)
      for m in b:
        np.testing.assert_array_equal(part[m]["x"][0], b[m]["x"][i])
  assert_resumes_exactly(it, make)
  with pytest.raises(ValueError, match="multimodal batching is 'by_subject'"):
    multimodal.MultimodalData(fake_modules(), batching="by_subject")
  with pytest.raises(ValueError, match="batching is 'by_pattern' while mix_weights"):
    multimodal.MultimodalData(fake_modules(), batching="by_pattern",
                              mix_weights={"ehr": 1.0, "imaging": 1.0, "tabular": 1.0})


def test_mixed_stream_follows_the_weights_and_resumes_exactly():
  modules = fake_modules()
  weights = {"ehr": 0.5, "imaging": 0.3, "tabular": 0.2}
  make = lambda: pipeline.make_iterator(multimodal.mixed_train_dataset(
      modules, weights, global_batch_size=10, seed=2, process_index=0, process_count=1))
  it = make()
  batches = [next(it) for _ in range(30)]
  present = {m: np.concatenate([b[m][batch.PRESENT] for b in batches]) for m in modules}
  assert (sum(present.values()) == 1).all()  # exactly one modality per example
  for m, w in weights.items():
    assert abs(present[m].mean() - w) < 0.02, (m, present[m].mean())
    spec = batch.with_presence(modules[m].example_spec()[m])
    assert {k: batches[0][m][k].shape[1:] for k in spec} == {k: s for k, (s, _) in spec.items()}
    assert not batches[0][m]["x"][~present[m][:10]].any()
  assert_resumes_exactly(it, make)
  with pytest.raises(ValueError, match="finite weight > 0"):
    multimodal.mixed_train_dataset(modules, {"ehr": 1.0}, global_batch_size=10, seed=2,
                                   process_index=0, process_count=1)


# ================================================================ real modules
def write_cohort(root):
  """Imaging s00..s11 (s00, s01 with two images), tabular s04..s15; the same splits."""
  root.mkdir()
  split = lambda k: "tuning" if k in (10, 11, 14, 15) else "train"
  rng = np.random.default_rng(0)
  with open(root / "manifest.csv", "w", newline="") as f:
    writer = csv.writer(f)
    writer.writerow(["subject_id", "path", "split", "modality"])
    for k in range(12):
      for j in range(2 if k < 2 else 1):
        np.save(root / f"img{k}_{j}.npy", rng.normal(0, 200, (20, 24)).astype(np.float32))
        writer.writerow([f"s{k:02d}", f"img{k}_{j}.npy", split(k), "CT"])
  with open(root / "table.csv", "w", newline="") as f:
    writer = csv.writer(f)
    writer.writerow(["subject_id", "split", "size", "density", "site"])
    for k in range(4, 16):
      writer.writerow([f"s{k:02d}", split(k), f"{rng.normal(10, 2):.3f}",
                       "" if k == 6 else f"{rng.normal(0, 1):.3f}", ["lung", "liver"][k % 2]])


def real_modules(tmp_path):
  write_cohort(tmp_path / "cohort")
  tab = load_config(str(REPO / "configs/tabular_features.py:tiny"), {
      "data.tabular.path": str(tmp_path / "cohort" / "table.csv"), "data.tabular.label_columns": (),
      "data.tabular.min_category_count": 1})
  img = load_config(str(REPO / "configs/imaging_mae.py:tiny"), {
      "data.imaging.path": str(tmp_path / "cohort" / "manifest.csv")})
  return {"tabular": TabularData.from_config(tab.data.tabular, targets="masked_features",
                                             artifacts_dir=tmp_path / "tabular"),
          "imaging": ImagingData.from_config(img.data.imaging, targets="masked_patches",
                                             artifacts_dir=tmp_path / "imaging")}


def test_real_tabular_and_imaging_modules_join_by_subject(tmp_path):
  modules = real_modules(tmp_path)
  data = multimodal.MultimodalData(modules, dropout={"imaging": 0.2})
  summary = data.summary()
  assert summary["train_subjects"] == 12 and summary["train_pattern_imaging+tabular"] == 6
  assert summary["train_pattern_imaging"] == 4 and summary["train_pattern_tabular"] == 2
  assert summary["train_several_records_imaging"] == 2 and summary["tuning_subjects"] == 4
  assert summary["tabular_rows_train"] == 8 and summary["imaging_items_train"] == 12
  assert data.model_info()["imaging"] == modules["imaging"].model_info()["imaging"]
  # Deterministic transforms (no masking): the module's own pipeline gives the same arrays.
  source = data.source("tuning")
  for m, module in modules.items():
    own = list(pipeline.make_eval_dataset(
        module.source("tuning"), module.transforms(train=False, mask=False),
        global_batch_size=len(module.source("tuning")), seed=0,
        example_spec=module.embedding_spec(), process_index=0, process_count=1))[0][m]
    for i in range(len(source)):
      example = apply(data.transforms(train=False, mask=False), source[i])
      if m not in source[i]["records"]:
        assert_padding(example[m], module.embedding_spec()[m])
        continue
      row = source[i]["records"][m][0]
      assert all(np.array_equal(example[m][k], own[k][row]) for k in module.embedding_spec()[m])
  first = next(pipeline.make_iterator(pipeline.make_train_dataset(
      data.source("train"), data.transforms(train=True), global_batch_size=6,
      seed=0, process_index=0, process_count=1)))
  for m, spec in data.example_spec().items():
    assert {k: first[m][k].shape for k in spec} == {k: (6,) + s for k, (s, _) in spec.items()}


def test_expression_source_subject_ids_come_from_obs_or_cell_ids(tmp_path):
  anndata = pytest.importorskip("anndata")
  import pandas as pd
  from biofm_jax.modalities.omics.anndata import ExpressionDataset
  x = np.ones((4, 3), np.float32)
  obs = pd.DataFrame({"subject_id": pd.Categorical(["p1", "p1", None, "p2"]),
                      "split": ["train"] * 4},
                     index=[f"cell{i}" for i in range(4)])
  anndata.AnnData(X=x, obs=obs).write_h5ad(tmp_path / "a.h5ad")
  anndata.AnnData(X=x, obs=obs[["split"]]).write_h5ad(tmp_path / "b.h5ad")
  with_column = ExpressionDataset(tmp_path / "a.h5ad").source("train")
  assert list(with_column.subject_ids) == ["p1", "p1", "cell2", "p2"]
  assert list(ExpressionDataset(tmp_path / "b.h5ad").source("train").subject_ids) == [
      f"cell{i}" for i in range(4)]


def test_a_record_standing_in_for_an_unreadable_one_is_absent_from_its_subjects_example():
  from biofm_jax.data.sources.read_skips import REPLACED

  class Replacing(FakeSource):  # as a source with on_error="skip" returns a stand-in record
    def __getitem__(self, i):
      return {**super().__getitem__(i), REPLACED: True}
  modules = fake_modules()
  imaging = modules["imaging"]
  imaging.source = lambda split: Replacing(imaging.splits[split], 200) if split in imaging.splits else \
      FakeModule.source(imaging, split)
  data = multimodal.MultimodalData(modules)
  source = data.source("train")
  with_imaging = [i for i in range(len(source)) if "imaging" in source[i]["records"]]
  assert with_imaging
  for i in with_imaging:
    example = apply(data.transforms(train=False), source[i])
    assert not example["imaging"][batch.PRESENT]  # never paired with another subject's image
    assert_padding(example["imaging"], modules["imaging"].example_spec()["imaging"])


# ================================================================ records dated by acquisition time
class DatedSource(FakeSource):
  def __init__(self, ids, offset, times):
    super().__init__(ids, offset)
    self.times = np.asarray(times, "datetime64[us]")

  def record_times(self):
    return self.times


class DatedModule(FakeModule):
  """Imaging whose records carry acquisition times (as a manifest's acquisition_time gives)."""

  def __init__(self, *args, times, **kwargs):
    super().__init__(*args, **kwargs)
    self.times = times

  def source(self, split):
    super().source(split)  # unknown splits: its error
    return DatedSource(self.splits[split], 100 * self.number, self.times[split])


def test_a_timed_label_row_reads_only_the_images_made_by_its_time_the_latest_first():
  """Subject 3 has two images (March and June), 2 one in May, 7 one in August, 1 one in
  January; the table (subjects 1, 7, 9) has no times and is read whole. At a prediction time
  of 1 June: 3 reads its March image only, 2 its May one, 7 none (so only its table row), 1
  its January one; at 1 July subject 3 reads June before March (evaluation's pick)."""
  from biofm_jax.data.labels import Labels
  from biofm_jax.data.subject_labels import TimedItems, match_subject_labels
  modules = fake_modules()
  day = lambda text: np.datetime64(text, "us")  # noqa: E731
  modules["imaging"] = DatedModule("imaging", modules["imaging"].splits, 2, width=2, times={
      "train": [day("2021-05-01"), day("2021-03-01"), day("2021-06-15"), day("2021-08-01"), day("2021-01-01")],
      "tuning": [day("2021-01-01")]})
  data = multimodal.MultimodalData(modules)
  subjects = np.array([3, 2, 7, 1, 3], np.int64)
  times = np.array([day("2021-06-01")] * 4 + [day("2021-07-01")], "datetime64[us]")
  labels = Labels(pathlib.Path("labels.parquet"), "binary", subjects, times,
                  {batch.TASK_LABEL: np.zeros(5, np.float32)})
  found, counts = match_subject_labels(data, labels, ("train",))
  rows = found["train"]
  assert counts == {"subjects_in_no_split": 0, "rows_with_nothing_before_prediction_time": 0}
  view = TimedItems(data.source("train"), rows)
  by_row = {int(r): view[i] for i, r in enumerate(rows.rows)}
  assert by_row[0]["records"]["imaging"] == [1]  # subject 3 on 1 June: March, not 15 June
  assert by_row[4]["records"]["imaging"] == [2, 1]  # on 1 July: June first, then March
  assert by_row[1]["records"]["imaging"] == [0]
  assert "imaging" not in by_row[2]["records"] and by_row[2]["records"]["tabular"]  # 7: August image absent
  assert by_row[3]["records"]["imaging"] == [4] and "tabular" in by_row[3]["records"]
  transforms = data.transforms(train=False, mask=False)
  assert apply(transforms, by_row[4])["imaging"]["x"][0] == 203.0  # the June image, record 2
  assert not apply(transforms, by_row[2])["imaging"][batch.PRESENT]
  # Strictly before: an image made at the prediction time itself is not read.
  on_time = Labels(pathlib.Path("labels.parquet"), "binary", np.array([2], np.int64),
                   np.array([day("2021-05-01")], "datetime64[us]"), {batch.TASK_LABEL: np.zeros(1, np.float32)})
  assert match_subject_labels(data, on_time, ("train",))[0]["train"].dated_records == ({"imaging": (0,)},)
  strict, _ = match_subject_labels(data, on_time, ("train",), cut="strict")
  assert strict["train"].absent == (("imaging",),) and strict["train"].dated_records == ({},)  # its EHR stays
