"""Prepared datasets: a modality's records after its deterministic transforms, written once
as a TFDS dataset in ArrayRecord format and read back through `tfds.data_source`.

At pod scale, parsing raw files (MEDS parquet, .h5ad, DICOM, tables) and tokenising them on
every host is the input bottleneck. `prepare` does that work once: it opens the configured
data module as training would, applies the leading transforms that do not draw random
numbers (tokenisation, value binning, resampling, standardisation), and writes each split's
examples, in source order, as ArrayRecord files that any host reads by index. It writes
beside them the module itself with its raw dataset detached (vocabularies, statistics,
settings: everything its remaining transforms and the model need), the module's summary,
and a manifest with the data config it was prepared from.

`open_prepared` gives a data module that reads those files: its `source(split)` is the
prepared split, and its transforms are the original list with the applied prefix replaced
by placeholders, so every random transform keeps its position and with it its seed
(`pipeline.derive_seed`): training on the prepared dataset yields exactly the batches of
training on the raw source. The config's data section must equal the one prepared from.

The module is stored as JSON and arrays (`object_state.py`), never pickled: opening a
prepared dataset rebuilds only the allow-listed classes of `object_state` from their saved
attributes and runs no stored code. A prepared folder may come from someone else, so it is
opened as untrusted: a folder holding a symbolic link is refused, its stored TFDS path must
stay inside it, and only its top-level JSON artifacts (vocabularies, statistics) are copied
into the run, never data it may hold beside them (an event store, a generated cohort).
"""
from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import pathlib
import pickle
from typing import Any, Callable, Iterator, Mapping

import grain
import numpy as np

from biofm_jax.data import object_state, pipeline
from biofm_jax.data.artifacts import check_no_links, copy_regular_files, path_inside
from biofm_jax.data.module import DataModuleDefaults, KeyByModality

MANIFEST_FILE, ARTIFACTS_DIR, TFDS_DIR = "prepared.json", "artifacts", "tfds"
MODULE_FILES = ("data_module.json", "data_module.npz")  # the module's state: its tree, its arrays
BUILDER_NAME, BUILDER_VERSION = "biofm_prepared", "1.0.0"
FORMAT_VERSION = 3  # 1 stored the module with pickle; 2 its objective name (now the targets it makes)

log = logging.getLogger(__name__)


# ================================================================ what is applied once
def deterministic_prefix(module: Any) -> int:
  """How many leading transforms draw no random numbers and are the same for training,
  evaluation and embedding (unmasked) streams: those are applied once, at preparation."""
  lists = [module.transforms(train=True), module.transforms(train=False)]
  try:
    lists.append(module.transforms(train=False, mask=False))
  except TypeError:  # a module without the mask switch
    pass
  count = 0
  while all(count < len(t) for t in lists):
    first = lists[0][count]
    if isinstance(first, (grain.transforms.RandomMap, KeyByModality)):  # prepared records stay flat
      break
    if any(_fingerprint(t[count]) != _fingerprint(first) for t in lists[1:]):
      break
    count += 1
  return count


def _fingerprint(value: Any) -> str:
  """Equal for transforms of equal class and state (hashed in memory, never read back)."""
  return hashlib.sha256(pickle.dumps(value)).hexdigest()


class AlreadyApplied(grain.transforms.Map):
  """Stands where a transform applied at preparation was: keeps later transforms'
  positions (their random seeds derive from them) and says what was applied."""

  def __init__(self, name: str):
    self.name = name

  def map(self, example):
    return example

  def __repr__(self) -> str:
    return f"AlreadyApplied({self.name})"


# ================================================================ writing
@object_state.storable
class _DetachedDataset:
  """Takes the raw dataset's place in a prepared module: any use names what happened."""

  def __init__(self, directory: str):
    self.directory = directory

  def __getattr__(self, name: str):
    if name.startswith("__"):
      raise AttributeError(name)
    raise RuntimeError(f"data module prepared at {self.directory} has no raw dataset (it was "
                       f"detached at preparation); {name!r} needs the raw data: open it from its "
                       f"source, without config.data.prepared")


def _features(example: Mapping[str, Any], where: str):
  """A TFDS feature per field, from the first example; any shape may vary between examples."""
  import tensorflow_datasets as tfds  # loads TensorFlow (seconds): only prepared datasets need it
  features = {}
  for name, value in example.items():
    if isinstance(value, (str, bytes)):
      features[name] = tfds.features.Text()
      continue
    array = np.asarray(value)
    if array.dtype.kind not in "biuf":
      raise ValueError(f"{where}: field {name!r} has dtype {array.dtype}; a prepared dataset "
                       f"stores numeric, boolean or string fields")
    shape = (None,) * array.ndim
    encoding = "bytes" if array.ndim > 1 else "none"  # TFDS needs it for several unknown dims
    features[name] = tfds.features.Tensor(shape=shape, dtype=array.dtype, encoding=encoding)
  return tfds.features.FeaturesDict(features)


def _field_spec(example: Mapping[str, Any]) -> dict[str, dict]:
  return {name: ({"dtype": "str"} if isinstance(value, (str, bytes)) else
                 {"dtype": np.asarray(value).dtype.name, "ndim": int(np.asarray(value).ndim)})
          for name, value in example.items()}


@functools.cache
def _builder_class():
  """The TFDS builder class, made once (tensorflow_datasets loads only when preparing or
  reading); unregistered: it is opened by directory, never by name."""
  import tensorflow_datasets as tfds  # loads TensorFlow (seconds): only prepared datasets need it

  class BiofmPrepared(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """One modality's records after its deterministic transforms (written by biofm_jax)."""
    name = BUILDER_NAME
    VERSION = tfds.core.Version(BUILDER_VERSION)

    def __init__(self, *, features, split_examples: Mapping[str, Callable[[], Iterator]], **kwargs):
      self._features, self._split_examples = features, dict(split_examples)
      super().__init__(**kwargs)

    def _info(self):
      # disable_shuffling keeps source order: record i of a split is source record i.
      return tfds.core.DatasetInfo(builder=self, features=self._features, disable_shuffling=True)

    def _split_generators(self, dl_manager):
      del dl_manager
      return {split: self._generate_examples(split) for split in self._split_examples}

    def _generate_examples(self, split):
      for index, example in enumerate(self._split_examples[split]()):
        yield index, example

  return BiofmPrepared


def _make_builder(directory: pathlib.Path, features, split_examples: Mapping[str, Callable[[], Iterator]]):
  return _builder_class()(features=features, split_examples=split_examples, data_dir=str(directory),
                          file_format="array_record")


def _examples(module: Any, split: str, prefix: list, where: str) -> Iterator[dict]:
  source = module.source(split)
  for index in range(len(source)):
    example = source[index]
    for transform in prefix:
      example = transform.map(example)
    if not isinstance(example, Mapping) or any(isinstance(v, Mapping) for v in example.values()):
      raise ValueError(f"{where}: record {index} of split {split!r} is not a flat dict of "
                       f"arrays after the deterministic transforms; it cannot be prepared")
    yield dict(example)


def prepare(module: Any, out: str | os.PathLike, *, data_config: Mapping[str, Any],
            objective: str, splits: list[str] | None = None) -> dict:
  """Writes `module`'s splits, after its deterministic transforms, as a prepared dataset at
  `out` (which must not hold one yet); returns the manifest. The module's artifacts
  (vocabulary, statistics) should already sit in `out/artifacts`."""
  import tensorflow_datasets as tfds  # loads TensorFlow (seconds): only prepared datasets need it
  out = pathlib.Path(out)
  if (out / MANIFEST_FILE).exists():
    raise FileExistsError(f"{out}: a prepared dataset is there already; choose a new --out")
  windows = getattr(module, "train_windows", "one")
  if windows != "one":
    raise ValueError(f"prepare: the {module.name} data trains on windows over whole records (train_windows="
                     f"{windows!r}); a prepared dataset holds one window per record for now: prepare with "
                     f"--config.data.{module.name}.train_windows=one")
  if getattr(module, "pack", False):
    raise ValueError(f"prepare: the {module.name} data packs several windows per row (pack=True), which a "
                     f"prepared dataset does not hold yet: prepare with --config.data.{module.name}.pack=false")
  if len(module.model_info()) != 1:
    raise ValueError("prepare: multimodal data modules are not supported; prepare each modality")
  splits = splits or [s for s in ("train", "tuning", "held_out") if pipeline.has_split(module, s)]
  if not splits:
    raise ValueError(f"prepare: the {module.name} data module has no records in any split")
  count = deterministic_prefix(module)
  prefix = module.transforms(train=True)[:count]
  first = next(_examples(module, splits[0], prefix, str(out)))
  summary = module.summary()  # while the raw dataset is still there
  tfds.disable_progress_bar()
  builder = _make_builder(out / TFDS_DIR, _features(first, str(out)),
                          {s: (lambda s=s: _examples(module, s, prefix, str(out))) for s in splits})
  builder.download_and_prepare()
  raw = module.dataset
  module.dataset = _DetachedDataset(str(out))
  try:
    tree, arrays = object_state.encode(module, f"{out}: the {module.name} data module")
  finally:
    module.dataset = raw
  module_bytes = (json.dumps(tree).encode(), object_state.to_npz_bytes(arrays))
  for name, data in zip(MODULE_FILES, module_bytes):
    (out / name).write_bytes(data)
  manifest = {
      "format_version": FORMAT_VERSION, "modality": module.name, "objective": objective,
      "data_config": json.loads(json.dumps(dict(data_config), default=str)),
      "applied_transforms": [type(t).__name__ for t in prefix],
      "fields": _field_spec(first),
      "records": {s: int(builder.info.splits[s].num_examples) for s in splits},
      "summary": {k: (v.item() if isinstance(v, np.generic) else v) for k, v in summary.items()},
      "module_sha256": {name: hashlib.sha256(data).hexdigest() for name, data in zip(MODULE_FILES, module_bytes)},
      "tfds_dir": os.path.relpath(builder.data_dir, out)}
  tmp = out / (MANIFEST_FILE + ".tmp")
  tmp.write_text(json.dumps(manifest, indent=2, sort_keys=True))
  tmp.replace(out / MANIFEST_FILE)  # the manifest last: its presence means complete
  return manifest


# ================================================================ reading
class PreparedSource:
  """A prepared split as a random-access source: examples with their original dtypes."""

  def __init__(self, data_source: Any, fields: Mapping[str, Mapping[str, Any]]):
    self._source, self._fields = data_source, dict(fields)

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, index: int) -> dict:
    raw = self._source[index]
    return {name: (raw[name].decode() if isinstance(raw[name], bytes) else raw[name])
            if spec["dtype"] == "str" else np.asarray(raw[name], spec["dtype"])
            for name, spec in self._fields.items()}


class PreparedData(DataModuleDefaults):
  """A data module whose records come from a prepared dataset; every other question (the
  example spec, model info, the transforms after the prepared ones) goes to the module
  stored at preparation."""

  # Prepared records are one per source item: training reads them as they are (the default
  # stream, not the raw module's training windows), and their coverage is the preparation's
  # (no train_metrics). Shapes and device work are the stored module's.

  def __init__(self, directory: pathlib.Path, manifest: dict, module: Any):
    self.directory, self.manifest, self._module = directory, manifest, module
    self.name = module.name
    self._applied = len(manifest["applied_transforms"])

  def source(self, split: str) -> PreparedSource:
    if split not in self.manifest["records"]:
      raise ValueError(f"{self.directory}: no prepared split {split!r}; it has "
                       f"{sorted(self.manifest['records'])}")
    return PreparedSource(self._builder.as_data_source(split=split), self.manifest["fields"])

  @functools.cached_property
  def _builder(self):
    """The TFDS builder, read from its directory once (every split's source comes from it)."""
    import tensorflow_datasets as tfds  # loads TensorFlow (seconds): only prepared datasets need it
    return tfds.builder_from_directory(str(tfds_path(self.directory, self.manifest)))

  def transforms(self, train: bool, mask: bool = True) -> list:
    full = self._module.transforms(train=train, mask=mask)
    applied = [type(t).__name__ for t in full[:self._applied]]
    if applied != self.manifest["applied_transforms"]:
      raise ValueError(f"{self.directory}: prepared with {self.manifest['applied_transforms']} "
                       f"but this stream starts with {applied}")
    return [AlreadyApplied(name) for name in applied] + full[self._applied:]

  def summary(self) -> dict:
    return dict(self.manifest["summary"])

  def train_example_spec(self) -> dict:
    return self._module.train_example_spec()

  def device_transform(self):
    return self._module.device_transform()

  def __getattr__(self, name: str):  # example_spec, model_info, vocab, ...
    return getattr(self._module, name)


def tfds_path(directory: pathlib.Path, manifest: Mapping[str, Any]) -> pathlib.Path:
  """The TFDS dataset's folder the manifest names, which must lie inside `directory`."""
  return path_inside(directory, str(manifest.get("tfds_dir", "")), f"{directory / MANIFEST_FILE}: field tfds_dir")


def model_artifacts(artifacts: pathlib.Path) -> list[str]:
  """The top-level JSON files of a prepared folder's artifacts: the versioned vocabularies and
  statistics (`data/artifacts.py`) a model is trained with; folders beside them (an event
  store, a generated cohort) are data and stay where they are."""
  if not artifacts.is_dir():
    return []
  return sorted(p.name for p in artifacts.iterdir() if p.suffix == ".json" and p.is_file() and not p.is_symlink())


def _differences(prepared: Mapping[str, Any], current: Mapping[str, Any], prefix: str) -> list[str]:
  keys = sorted(set(prepared) | set(current))
  return [f"{prefix}.{k}: prepared {prepared.get(k)!r}, config {current.get(k)!r}"
          for k in keys if prepared.get(k) != current.get(k)]


def open_prepared(directory: str | os.PathLike, *, modality: str, data_config: Mapping[str, Any],
                  objective: str, artifacts_dir: str | os.PathLike | None = None) -> PreparedData:
  """The prepared dataset at `directory`, checked against the config that reads it; its
  artifacts (vocabularies, statistics) are copied to `artifacts_dir` for exports and
  fine-tuning, as training from the raw source would have written them."""
  directory = pathlib.Path(directory)
  manifest_path = directory / MANIFEST_FILE
  if not manifest_path.exists():
    raise FileNotFoundError(f"{directory}: not a prepared dataset (no {MANIFEST_FILE}; an "
                            f"interrupted experiments/prepare.py leaves none)")
  check_no_links(directory, f"prepared dataset {directory}")
  manifest = json.loads(manifest_path.read_text())
  if manifest.get("format_version") != FORMAT_VERSION:
    raise ValueError(f"{manifest_path}: format {manifest.get('format_version')}, this library "
                     f"reads {FORMAT_VERSION}; prepare it again")
  problems = []
  if manifest["modality"] != modality:
    problems.append(f"modality: prepared {manifest['modality']!r}, config {modality!r}")
  if manifest["objective"] != objective:
    problems.append(f"objective: prepared {manifest['objective']!r}, config {objective!r}")
  current = json.loads(json.dumps(dict(data_config), default=str))
  problems += _differences(manifest["data_config"], current, f"config.data.{modality}")
  if problems:
    raise ValueError(f"{directory}: prepared from other settings than this config's; prepare "
                     f"again or match them: " + "; ".join(problems))
  stored = {}
  for name in MODULE_FILES:
    stored[name] = (directory / name).read_bytes()
    if hashlib.sha256(stored[name]).hexdigest() != manifest["module_sha256"][name]:
      raise ValueError(f"{directory / name}: does not match its manifest (changed or truncated "
                       f"since preparation); prepare again")
  tfds_path(directory, manifest)  # checked before anything else is read
  tree_file, arrays_file = MODULE_FILES
  module = object_state.decode(json.loads(stored[tree_file]), object_state.from_npz_bytes(stored[arrays_file]))
  if artifacts_dir is not None:
    pathlib.Path(artifacts_dir).mkdir(parents=True, exist_ok=True)
    copy_regular_files(directory / ARTIFACTS_DIR, artifacts_dir, model_artifacts(directory / ARTIFACTS_DIR),
                       f"prepared dataset {directory}")
  log.info("prepared %s data at %s: %s", modality, directory,
           ", ".join(f"{s}={n}" for s, n in manifest["records"].items()))
  return PreparedData(directory, manifest, module)
