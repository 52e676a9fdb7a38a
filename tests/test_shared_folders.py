"""What a shared folder can and cannot do: a prepared dataset, a run's artifacts or an
export received from someone else is read as data. Crafted folders must not rebuild a
class off the allow-list, follow a link out of the folder, or carry patient rows."""
from __future__ import annotations

import gc
import hashlib
import json
import os
import re

import ml_collections
import numpy as np
import pyarrow.parquet as pq
import pytest

import helpers
from biofm_jax.data import artifacts, object_state, prepared
from biofm_jax.export import export_embedding_model
from biofm_jax.modalities import registry
from biofm_jax.modalities.ehr import data as ehr

# Found in review: each names a class reachable as an attribute of a biofm_jax module.
CRAFTED_CLASSES = ["biofm_jax.eval.report.tempfile._TemporaryFileCloser", "biofm_jax.config.subprocess.Popen",
                   "biofm_jax.data.object_state.np.ndarray", "os.system"]


def _crafted_prepared_folder(folder, module_tree, *, tfds_dir="tfds"):
  """A prepared dataset's files as a sender would write them: the manifest's hashes match."""
  folder.mkdir(parents=True)
  module_bytes = (json.dumps(module_tree).encode(), object_state.to_npz_bytes({}))
  for name, data in zip(prepared.MODULE_FILES, module_bytes):
    (folder / name).write_bytes(data)
  manifest = {"format_version": prepared.FORMAT_VERSION, "modality": "tabular", "objective": "masked_features",
              "data_config": {}, "applied_transforms": [], "fields": {}, "records": {"train": 1}, "summary": {},
              "module_sha256": {n: hashlib.sha256(d).hexdigest() for n, d in zip(prepared.MODULE_FILES, module_bytes)},
              "tfds_dir": tfds_dir}
  (folder / prepared.MANIFEST_FILE).write_text(json.dumps(manifest))
  return folder


def _open(folder, artifacts_dir=None):
  return prepared.open_prepared(folder, modality="tabular", data_config={}, objective="masked_features",
                                artifacts_dir=artifacts_dir)


@pytest.mark.parametrize("path", CRAFTED_CLASSES)
def test_a_crafted_module_state_cannot_delete_a_file(path, tmp_path):
  victim = tmp_path / "victim.txt"
  victim.write_text("the user's file")
  tree = {"__state__": "object", "class": path, "ref": 0,
          "state": {"file": 0, "name": str(victim), "delete": True, "args": ["rm", str(victim)]}}
  folder = _crafted_prepared_folder(tmp_path / "shared", tree)
  with pytest.raises(ValueError, match="is not on the allow-list of storable classes"):
    _open(folder)
  gc.collect()  # a rebuilt _TemporaryFileCloser deleted its file when collected
  assert victim.read_text() == "the user's file"


def test_only_marked_classes_are_stored_and_their_attributes_are_plain_names():
  assert object_state.storable_classes()["biofm_jax.data.prepared._DetachedDataset"] is prepared._DetachedDataset
  # A class reachable from a storable one's module, but not marked itself, is refused both ways.
  with pytest.raises(ValueError, match="pathlib.PosixPath cannot be stored"):
    object_state.encode({"path": prepared.pathlib.Path("/x")})
  tree = {"__state__": "object", "class": "biofm_jax.data.prepared._DetachedDataset", "ref": 0,
          "state": {"__class__": 1}}
  with pytest.raises(ValueError, match="attribute named '__class__'"):
    object_state.decode(tree, {})
  tree["state"] = {"directory": "/prepared"}
  assert object_state.decode(tree, {}).directory == "/prepared"


@pytest.mark.parametrize("name", sorted(registry.MODALITIES))
def test_every_registered_data_module_stores_with_the_allow_list(name, tmp_path):
  """A prepared dataset stores its data module: every class in any registered module must be
  marked storable, or preparing it fails."""
  spec = {"ehr": "ehr_bert", "imaging": "imaging_mae", "omics": "omics_expression", "sequence": "omics_sequence",
          "tabular": "tabular_features", "ecg": "ecg_mae"}[name]
  config = helpers.config_for(f"configs/{spec}.py:tiny")
  module = registry.open_data_module(name, config.data[name], objective=config.objective.name,
                                     artifacts_dir=tmp_path / "artifacts")
  module.dataset = prepared._DetachedDataset(str(tmp_path))  # as `prepare` stores it
  tree, arrays = object_state.encode(module)
  back = object_state.decode(json.loads(json.dumps(tree)), arrays)
  assert type(back) is type(module) and back.example_spec() == module.example_spec()


def test_a_link_anywhere_in_a_prepared_folder_is_refused_and_nothing_is_copied(tmp_path):
  secret = tmp_path / "id_rsa"
  secret.write_text("private key")
  folder = _crafted_prepared_folder(tmp_path / "shared", {"__state__": "dict", "items": []})
  (folder / prepared.ARTIFACTS_DIR).mkdir()
  (folder / prepared.ARTIFACTS_DIR / "vocab.json").write_text("{}")
  os.symlink(secret, folder / prepared.ARTIFACTS_DIR / "x.json")
  run_artifacts = tmp_path / "run" / "artifacts"
  with pytest.raises(ValueError, match=r"artifacts/x.json is a symbolic link"):
    _open(folder, run_artifacts)
  assert not run_artifacts.exists()


@pytest.mark.parametrize("tfds_dir", ["../elsewhere", "/etc"])
def test_the_manifests_tfds_path_stays_inside_the_folder(tfds_dir, tmp_path):
  folder = _crafted_prepared_folder(tmp_path / "shared", {"__state__": "dict", "items": []}, tfds_dir=tfds_dir)
  with pytest.raises(ValueError, match="field tfds_dir"):
    _open(folder)


def test_copies_take_named_regular_files_only(tmp_path):
  src, dst, elsewhere = tmp_path / "src", tmp_path / "dst", tmp_path / "elsewhere"
  (src / "sub").mkdir(parents=True)
  elsewhere.mkdir()
  (src / "sub" / "a.json").write_text("a")
  (elsewhere / "b.json").write_text("secret")
  os.symlink(elsewhere, src / "up")
  os.symlink(elsewhere / "b.json", src / "b.json")
  assert artifacts.copy_regular_files(src, dst, ["sub/a.json"], "test") == ["sub/a.json"]
  assert (dst / "sub" / "a.json").read_text() == "a"
  for name, problem in [("up/b.json", "leads out of"), ("../elsewhere/b.json", "leads out of"),
                        ("/etc/hostname", "absolute path"), ("b.json", "leads out of"), ("sub", "not a regular file")]:
    with pytest.raises(ValueError, match=problem):
      artifacts.copy_regular_files(src, tmp_path / "other", [name], "test")
  assert not (tmp_path / "other").exists()
  # A link that stays inside is still not followed by a copy.
  os.symlink(src / "sub" / "a.json", src / "inner.json")
  with pytest.raises(ValueError, match="is a symbolic link"):
    artifacts.copy_regular_files(src, tmp_path / "other", ["inner.json"], "test")
  # Every name is checked before any is copied: a refused second name leaves nothing behind.
  with pytest.raises(ValueError, match="is a symbolic link"):
    artifacts.copy_regular_files(src, tmp_path / "other", ["sub/a.json", "inner.json"], "test")
  assert not (tmp_path / "other").exists()


@pytest.fixture(scope="module")
def store_run(tmp_path_factory):
  """An EHR run whose event store (patient rows) was built under its artifacts."""
  workdir = tmp_path_factory.mktemp("store_run") / "run"
  run = helpers.pretrain_and_restore("configs/ehr_bert.py:tiny", workdir, train__num_steps=2, train__eval_every=0,
                                     data__ehr__event_store="auto")
  return workdir, run


def test_an_export_carries_the_vocabulary_and_no_subject_of_the_event_store(store_run, tmp_path):
  workdir, (_, data, setup, params, _) = store_run
  store = workdir / "artifacts" / ehr.EVENT_STORE_DIR
  subjects = pq.read_table(store / "index.parquet", columns=["subject_id"]).column("subject_id").to_numpy()
  assert len(subjects) > 100
  out = export_embedding_model(setup.model, params, data.embedding_spec(), tmp_path / "export", output="ehr",
                               artifacts_dir=workdir / "artifacts",
                               artifact_files=registry.model_artifact_files(workdir / "artifacts"))
  assert sorted(p.name for p in (out / "artifacts").iterdir()) == [ehr.VOCAB_FILENAME]
  files = {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}
  assert sorted(files) == ["artifacts/ehr_vocab.json", "export.json", "loader.py", "model.jax_export", "params.npz"]
  assert not [name for name, data in files.items() if b"PAR1" in data]  # no parquet table anywhere
  with np.load(out / "params.npz", allow_pickle=False) as arrays:  # parameters only: floating-point arrays
    assert {arrays[name].dtype.kind for name in arrays.files} == {"f"}
  # Every text the export holds, searched for every subject id of the store (the two binary files
  # hold floats and StableHLO, where a 5-digit string occurs by chance).
  text = b"".join(data for name, data in files.items() if name not in ("params.npz", "model.jax_export"))
  ids = [str(int(s)) for s in np.unique(subjects)]
  assert min(len(i) for i in ids) >= 4
  numbers = set(re.findall(rb"(?<![\d.])\d+(?![\d.])", text))  # whole numbers, not digits inside codes or floats
  found = [i for i in ids if i.encode() in numbers]
  assert not found, f"{len(found)} subject ids in the export"


def test_an_export_refuses_a_linked_artifact(store_run, tmp_path):
  workdir, (_, data, setup, params, _) = store_run
  secret = tmp_path / "id_rsa"
  secret.write_text("private key")
  link = workdir / "artifacts" / "tte_tasks.json"
  os.symlink(secret, link)
  try:
    with pytest.raises(ValueError, match="'tte_tasks.json' leads out of"):
      export_embedding_model(setup.model, params, data.embedding_spec(), tmp_path / "export", output="ehr",
                             artifacts_dir=workdir / "artifacts",
                             artifact_files=registry.model_artifact_files(workdir / "artifacts"))
  finally:
    link.unlink()
  assert not list((tmp_path / "export").rglob("tte_tasks.json"))


def test_fine_tuning_does_not_copy_a_linked_vocabulary_from_the_pretrained_run(tmp_path):
  from biofm_jax.train.finetune import open_labeled_data
  secret = tmp_path / "id_rsa"
  secret.write_text("private key")
  (tmp_path / "pretrained" / "artifacts").mkdir(parents=True)
  os.symlink(secret, tmp_path / "pretrained" / "artifacts" / ehr.VOCAB_FILENAME)
  config = ml_collections.ConfigDict({"data": {"ehr": {"path": ""}}, "objective": {"name": "masked"},
                                      "finetune": {"pretrained": str(tmp_path / "pretrained")}})
  with pytest.raises(ValueError, match=f"'{ehr.VOCAB_FILENAME}' leads out of"):
    open_labeled_data(config, tmp_path / "ft" / "artifacts")
  assert not (tmp_path / "ft" / "artifacts" / ehr.VOCAB_FILENAME).exists()


def test_record_fine_tuning_does_not_copy_a_linked_artifact_from_the_pretrained_run(tmp_path):
  from biofm_jax.modalities.tabular import data as tabular
  from biofm_jax.train.finetune import open_labeled_data
  secret = tmp_path / "id_rsa"
  secret.write_text("private key")
  (tmp_path / "pretrained" / "artifacts").mkdir(parents=True)
  os.symlink(secret, tmp_path / "pretrained" / "artifacts" / tabular.STATS_FILENAME)
  config = ml_collections.ConfigDict({"data": {"tabular": {"path": ""}}, "objective": {"name": "masked_features"},
                                      "task": {"label_column": "malignant", "type": "binary"},
                                      "finetune": {"pretrained": str(tmp_path / "pretrained"),
                                                   "train_labels_per_class": 0}})
  with pytest.raises(ValueError, match=f"'{tabular.STATS_FILENAME}' leads out of"):
    open_labeled_data(config, tmp_path / "ft" / "artifacts")
  assert not (tmp_path / "ft" / "artifacts" / tabular.STATS_FILENAME).exists()


def test_fused_fine_tuning_does_not_copy_through_a_linked_modality_folder(tmp_path):
  from biofm_jax.train.finetune import open_labeled_data
  outside = tmp_path / "outside"
  outside.mkdir()
  (outside / ehr.VOCAB_FILENAME).write_text("someone else's vocabulary")
  (tmp_path / "pretrained" / "artifacts").mkdir(parents=True)
  os.symlink(outside, tmp_path / "pretrained" / "artifacts" / "ehr")  # the folder, not the file, is the link
  config = ml_collections.ConfigDict({"data": {"multimodal": {}, "ehr": {"path": ""}}, "objective": {},
                                      "task": {"labels": str(tmp_path / "labels.parquet")}, "seed": 0,
                                      "finetune": {"pretrained": str(tmp_path / "pretrained"),
                                                   "train_labels_per_class": 0}})
  with pytest.raises(ValueError, match=f"'ehr/{ehr.VOCAB_FILENAME}' leads out of"):
    open_labeled_data(config, tmp_path / "ft" / "artifacts")
  assert not list((tmp_path / "ft" / "artifacts").rglob(ehr.VOCAB_FILENAME))
