"""Prepared datasets (TFDS, ArrayRecord): the same batches as the raw source for every
modality, training that reads them, and clear errors for mismatched or damaged ones."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from biofm_jax.data import pipeline, prepared
from biofm_jax.modalities import registry
from biofm_jax.modalities.ehr import data as ehr
from biofm_jax.train.loop import make_train_iterator
from tests.helpers import REPO, config_for, train, train_losses

CONFIGS = ["configs/ehr_bert.py:tiny", "configs/imaging_mae3d.py:tiny", "configs/omics_expression.py:tiny",
           "configs/tabular_features.py:tiny", "configs/omics_sequence.py:tiny"]


def _modality(config) -> str:
  return registry.configured(config.data)[0]


def _prepare(config, out):
  """(raw module, prepared module): what experiments/prepare.py writes, opened as training does."""
  modality = _modality(config)
  section = config.data[modality]
  raw = registry.open_data_module(modality, section, objective=config.objective.name,
                                   artifacts_dir=out / prepared.ARTIFACTS_DIR)
  prepared.prepare(raw, out, data_config=section.to_dict(), objective=config.objective.name)
  opened = prepared.open_prepared(out, modality=modality, data_config=section.to_dict(),
                                  objective=config.objective.name, artifacts_dir=out.parent / "copied")
  return raw, opened


def _assert_batches_equal(a, b, where):
  assert a.keys() == b.keys(), where
  for key in a:
    if isinstance(a[key], dict):
      _assert_batches_equal(a[key], b[key], f"{where}/{key}")
    else:
      np.testing.assert_array_equal(np.asarray(a[key]), np.asarray(b[key]), err_msg=f"{where}/{key}")


def _eval_batches(module, config, count):
  spec = module.example_spec()
  dataset = pipeline.make_eval_dataset(
      module.source("tuning"), module.transforms(train=False), global_batch_size=config.data.batch_size,
      seed=config.seed, example_spec=spec)
  iterator = iter(dataset)
  return [next(iterator) for _ in range(count)]


# Prepared datasets hold one window per record: EHR runs from them train on one window per subject.
ONE_WINDOW = {"data__ehr__train_windows": "one"}


@pytest.mark.parametrize("spec", CONFIGS)
def test_prepared_dataset_yields_the_raw_sources_batches(spec, tmp_path):
  config = config_for(spec, **(ONE_WINDOW if "ehr" in spec else {}))
  raw, opened = _prepare(config, tmp_path / "prepared")
  for split in ("train", "tuning"):
    assert len(opened.source(split)) == len(raw.source(split))
  # Training batches include the random transforms (masking, crops): their seeds must survive.
  raw_iter, prep_iter = make_train_iterator(raw, config), make_train_iterator(opened, config)
  for k in range(3):
    _assert_batches_equal(next(raw_iter), next(prep_iter), f"{spec} train batch {k}")
  for k, (a, b) in enumerate(zip(_eval_batches(raw, config, 1), _eval_batches(opened, config, 1))):
    _assert_batches_equal(a, b, f"{spec} eval batch {k}")
  assert opened.example_spec() == raw.example_spec()
  assert opened.model_info() == raw.model_info()
  assert opened.summary() == json.loads(json.dumps(raw.summary(), default=str))


def test_training_on_a_prepared_dataset_equals_training_on_the_raw_source(tmp_path):
  raw_run = train(config_for("configs/ehr_bert.py:tiny", train__num_steps=10, train__log_every=1, **ONE_WINDOW),
                  tmp_path / "raw")
  out = tmp_path / "prepared"
  result = subprocess.run([sys.executable, str(REPO / "experiments/prepare.py"),
                           "--config=configs/ehr_bert.py:tiny", "--config.data.ehr.train_windows=one", f"--out={out}"],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr
  assert "applied once    TokenizeEHR" in result.stdout
  assert list((out / "tfds").rglob("*.array_record-*")), "ArrayRecord files expected"
  config = config_for("configs/ehr_bert.py:tiny", train__num_steps=10, train__log_every=1,
                      data__prepared=str(out), **ONE_WINDOW)
  prepared_run = train(config, tmp_path / "from_prepared")
  np.testing.assert_allclose(list(train_losses(tmp_path / "from_prepared").values()),
                             list(train_losses(tmp_path / "raw").values()), rtol=1e-6)
  assert prepared_run["eval/code_loss"] == pytest.approx(raw_run["eval/code_loss"], rel=1e-6)
  # The vocabulary reaches the run's artifacts (exports and fine-tuning read it there).
  assert (tmp_path / "from_prepared" / "artifacts" / ehr.VOCAB_FILENAME).read_text() == \
      (out / "artifacts" / ehr.VOCAB_FILENAME).read_text()


def test_mismatched_or_damaged_prepared_datasets_are_refused(tmp_path):
  config = config_for("configs/tabular_features.py:tiny")
  out = tmp_path / "prepared"
  raw, _ = _prepare(config, out)
  section = config.data.tabular.to_dict()
  with pytest.raises(FileExistsError, match="prepared dataset is there already"):
    prepared.prepare(raw, out, data_config=section, objective=config.objective.name)
  changed = {**section, "min_category_count": section["min_category_count"] + 1}
  with pytest.raises(ValueError, match=r"config.data.tabular.min_category_count: prepared 3, config 4"):
    prepared.open_prepared(out, modality="tabular", data_config=changed, objective=config.objective.name)
  with pytest.raises(ValueError, match="modality: prepared 'tabular', config 'ehr'"):
    prepared.open_prepared(out, modality="ehr", data_config=section, objective=config.objective.name)
  with pytest.raises(FileNotFoundError, match="not a prepared dataset"):
    prepared.open_prepared(tmp_path, modality="tabular", data_config=section, objective=config.objective.name)
  for name in prepared.MODULE_FILES:
    module_file = out / name
    intact = module_file.read_bytes()
    module_file.write_bytes(intact[:-10])
    with pytest.raises(ValueError, match=f"{name}: does not match its manifest"):
      prepared.open_prepared(out, modality="tabular", data_config=section, objective=config.objective.name)
    module_file.write_bytes(intact)


def test_the_data_module_is_stored_as_json_and_arrays_not_pickle(tmp_path):
  config = config_for("configs/tabular_features.py:tiny")
  out = tmp_path / "prepared"
  _prepare(config, out)
  assert sorted(p.name for p in out.glob("data_module.*")) == ["data_module.json", "data_module.npz"]
  tree = json.loads((out / "data_module.json").read_text())
  assert tree["class"] == "biofm_jax.modalities.tabular.data.TabularData"
  with np.load(out / "data_module.npz", allow_pickle=False) as arrays:
    assert all(arrays[name].dtype.kind != "O" for name in arrays.files)


def test_training_windows_are_not_prepared_yet(tmp_path):
  config = config_for("configs/ehr_bert.py:tiny")
  assert config.data.ehr.train_windows == "cover"
  with pytest.raises(ValueError, match=r"prepare with --config.data.ehr.train_windows=one"):
    _prepare(config, tmp_path / "prepared")


def test_a_prepared_module_says_when_something_needs_the_raw_data(tmp_path):
  config = config_for("configs/ehr_bert.py:tiny", **ONE_WINDOW)
  _, opened = _prepare(config, tmp_path / "prepared")
  with pytest.raises(RuntimeError, match="has no raw dataset .* needs the raw data"):
    opened.dataset.record_until(0, None)
