"""Joins single-modality data modules by subject into multimodal examples.

This module owns the multimodal data module, whose examples are
`{modality: {<that modality's fields>, batch.PRESENT: bool[]}}` for every configured
modality; a subject without a modality (the normal case in real cohorts) carries that
modality's `batch.padding_example`, PRESENT False.

* `join.join_subjects` (join.py): the join index, which records of each modality belong
  to each subject of each split.
* `join_examples.py`: how one joined subject becomes one example (`MultimodalSource`,
  `JoinModalities`, `ModalityDropout`), and its randomness.
* `MultimodalData`: the data module, from its config section.

  train: JoinModalities -> ModalityDropout        eval: JoinModalities

Balanced sampling (training split only): every availability pattern ("ehr+imaging",
"imaging", ...) is equally frequent. The source has `patterns * largest pattern` items;
item k takes pattern k % patterns and that pattern's subjects cyclically in a seeded
permutation: each epoch shows every subject at least once, rare patterns' repeatedly.

Batching by pattern (`batching="by_pattern"`, training only; `pattern_batches.py`): each
global batch holds subjects of one availability pattern (or, for the few left over, of
similar ones) and carries only their modalities, so the model computes nothing for the
absent ones. Each set of modalities is one more compiled step. Modality dropout still
hides a modality from single examples (PRESENT False): that share of the slots is
computed and masked, as in mixed batches.
"""
from __future__ import annotations

import dataclasses
import functools
import logging
import os
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import grain
import numpy as np

from biofm_jax.data import batch, pipeline
from biofm_jax.data.join import TRAIN_SPLIT, join_subjects
from biofm_jax.data.join_examples import (JoinModalities, ModalityDropout, MultimodalSource, OnlyModality,
                                          modality_seed)
from biofm_jax.data.module import DataModuleDefaults, only, unmasked_train_spec
from biofm_jax.data.pattern_batches import PatternBatches, PatternBatchItems
from biofm_jax.data.sources.splits import STANDARD_SPLITS
SAMPLING = ("uniform", "balanced")
BATCHING = ("mixed", "by_pattern")

log = logging.getLogger(__name__)


def mixed_train_dataset(modules: Mapping[str, Any], weights: Mapping[str, float], *, global_batch_size: int,
                        seed: int, **layout) -> grain.IterDataset:
  """Each module's own training examples (seeded by `modality_seed(seed, name)`) as
  multimodal examples with only that modality present, mixed by weight (`pipeline`)."""
  specs = {m: only(modules[m].train_example_spec(), m, f"the {m} data module") for m in modules}
  streams = {m: (modules[m].source(TRAIN_SPLIT), [*modules[m].transforms(train=True), OnlyModality(m, specs)],
                 modality_seed(seed, m)) for m in modules}
  return pipeline.make_mixed_train_dataset(streams, weights, global_batch_size=global_batch_size, **layout)


# ================================================================ data module
@dataclasses.dataclass(frozen=True)
class JoinSettings:
  """How modalities are joined; `check` names the setting and what was expected."""
  require: tuple[str, ...] = ()
  dropout: tuple[tuple[str, float], ...] = ()  # (modality, rate), sorted
  sampling: str = "uniform"
  seed: int = 0
  batching: str = "mixed"
  withhold: tuple[str, ...] = ()  # given to no subject: an ablation (join.join_subjects)

  def check(self, modalities: Sequence[str]) -> None:
    names = set(self.require) | {m for m, _ in self.dropout} | set(self.withhold)
    for ok, name, value, expected in (
        (names <= set(modalities), "require/dropout/withhold", sorted(names),
         f"modalities among {list(modalities)}"),
        (all(0.0 <= r <= 1.0 for _, r in self.dropout), "dropout", dict(self.dropout),
         "rates in [0, 1]"),
        (self.sampling in SAMPLING, "sampling", self.sampling, f"one of {SAMPLING}"),
        (self.batching in BATCHING, "batching", self.batching, f"one of {BATCHING}")):
      if not ok:
        raise ValueError(f"multimodal {name} is {value!r}, expected {expected}")


def _open_sources(modules: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
  """split -> modality -> source, for the splits each module has (`dataset.splits` when it
  says; else the standard splits whose `source` does not raise ValueError, as the loop's
  has_split reads it)."""
  out: dict[str, dict[str, Any]] = {}
  for m, module in modules.items():
    declared = getattr(getattr(module, "dataset", None), "splits", None)
    for s in declared if isinstance(declared, Mapping) else STANDARD_SPLITS:
      try:
        source = module.source(s)
      except ValueError:
        if isinstance(declared, Mapping):
          raise
        continue
      if not hasattr(source, "subject_ids"):
        raise ValueError(f"multimodal: the {m} source of split {s!r} "
                         f"({type(source).__name__}) has no subject_ids; a join needs them")
      out.setdefault(s, {})[m] = source
  return out


class MultimodalData(DataModuleDefaults):
  """Several data modules joined by subject, as the pipeline and training loop see them."""
  name = "multimodal"

  def __init__(self, modules: Mapping[str, Any], *, require: Sequence[str] = (),
               dropout: Mapping[str, float] | None = None, sampling: str = "uniform",
               seed: int = 0, mix_weights: Mapping[str, float] | None = None, batching: str = "mixed",
               withhold: Sequence[str] = ()):
    """`mix_weights`: training mixes single-modality examples by these weights instead of
    joining subjects (evaluation still joins). `batching` "by_pattern": every training
    batch holds one availability pattern and only its modalities (module docstring).
    `withhold`: modalities no subject is given, in every split (what the others carry
    without them); the model keeps their parts."""
    self.modules = {m: modules[m] for m in sorted(modules)}
    self.mix_weights = dict(mix_weights) if mix_weights else None
    self.modalities = tuple(self.modules)
    for name, names in (("require", require), ("withhold", withhold)):
      if isinstance(names, (str, bytes)):
        raise ValueError(f"multimodal {name} is {names!r}, expected a tuple of modality names")
    self.settings = JoinSettings(tuple(str(m) for m in require), tuple(sorted(
        (str(m), float(r)) for m, r in (dropout or {}).items())), str(sampling), int(seed), str(batching),
        tuple(sorted(str(m) for m in withhold)))
    self.settings.check(self.modalities)
    if self.mix_weights and self.settings.batching != "mixed":
      raise ValueError(f"data.multimodal.batching is {batching!r} while mix_weights mixes single-modality "
                       f"examples; batching by pattern is for the join by subject: leave it 'mixed'")
    self._sources = _open_sources(self.modules)
    ids = {m: {s: by_m[m].subject_ids for s, by_m in self._sources.items() if m in by_m}
           for m in self.modalities}
    self.join = join_subjects(ids, require=self.settings.require, withhold=self.settings.withhold)
    for s, join in self.join.splits.items():
      c = self.join.counts
      log.info("multimodal %s: %d subjects, %s; %d with one modality only, %d dropped by "
               "require", s, len(join), ", ".join(
                   f"{m} {c[f'{s}_subjects_{m}']}" for m in self.modalities),
               c[f"{s}_only_one_modality"], c[f"{s}_dropped_by_require"])

  @classmethod
  def from_config(cls, data_cfg: Any, *, objectives: Any, artifacts_dir: str | os.PathLike,
                  open_modality: Callable[..., Any], registered: Sequence[str], seed: int = 0,
                  check_objectives: Callable[..., None] = lambda *a, **k: None,
                  synthetic_paths: Callable[..., dict[str, str]] | None = None) -> MultimodalData:
    """Opens each modality in `data_cfg.multimodal.modalities` from its own section of
    `data_cfg` (= config.data) with its objective's name (config.objective.<modality>.name),
    through `open_modality(name, section, objective=, artifacts_dir=)` (the modality
    registry's, which also gives the `registered` names). `check_objectives(objectives,
    modalities, mixing=, sampling=)` refuses objectives the join cannot serve (the registry's
    contrastive check), before any data is read.

    With every path empty, `synthetic_paths(data_cfg, artifacts_dir, modalities)` gives
    the paths of a generated cohort (the registry's, written once under artifacts_dir and
    reused on resume); a mix of given and empty paths is an error, since the generated
    subjects would never match the given ones.
    """
    settings = data_cfg.multimodal
    modalities = tuple(settings.modalities)
    unknown = sorted(set(modalities) - set(registered))
    if unknown or len(modalities) < 2:
      raise ValueError(f"data.multimodal.modalities is {modalities}, expected two or more of "
                       f"{sorted(registered)}")
    for m in modalities:
      if m not in data_cfg or m not in objectives:
        raise ValueError(f"data.multimodal.modalities names {m!r}, but config.data.{m} or "
                         f"config.objective.{m} is missing")
    mix_weights = parse_mix_weights(settings.mix_weights, modalities)
    check_objectives(objectives, modalities, mixing=mix_weights is not None, sampling=settings.sampling)
    paths = {m: str(data_cfg[m].path) for m in modalities}
    if not any(paths.values()):
      if synthetic_paths is None:
        raise ValueError(f"data.{{{','.join(modalities)}}}.path are all empty; give each listed modality's path")
      paths = synthetic_paths(data_cfg, Path(artifacts_dir), modalities)
    elif not all(paths.values()):
      empty = sorted(m for m, path in paths.items() if not path)
      raise ValueError(f"data.multimodal: data.{{{','.join(empty)}}}.path is empty while other modalities "
                       f"have paths; set it, or leave {empty} out of data.multimodal.modalities")
    modules = {}
    for m in modalities:
      section = data_cfg[m].copy_and_resolve_references()
      with section.unlocked():
        section.path = paths[m]
      modules[m] = open_modality(m, section, objective=objectives[m].name, artifacts_dir=Path(artifacts_dir) / m)
    rate = float(settings.modality_dropout)
    return cls(modules, require=tuple(settings.require), dropout={m: rate for m in modalities},
               sampling=settings.sampling, seed=seed, mix_weights=mix_weights,
               batching=settings.get("batching", "mixed"), withhold=tuple(settings.get("withhold", ())))

  def make_train_dataset(self, *, global_batch_size: int, seed: int, **layout) -> grain.IterDataset:
    """The training stream: joined subjects, or with `mix_weights` a weighted mixture of
    each modality's own examples (multi-task pre-training)."""
    if self.mix_weights:
      return mixed_train_dataset(self.modules, self.mix_weights, global_batch_size=global_batch_size, seed=seed,
                                 **layout)
    if self.settings.batching == "by_pattern":
      join = self.join.splits[TRAIN_SPLIT]
      order = PatternBatches(join.patterns(), global_batch_size, modality_seed(seed, "by_pattern"),
                             balanced=self.settings.sampling == "balanced")
      source = PatternBatchItems(MultimodalSource(TRAIN_SPLIT, join), self.modalities)
    else:
      source, order = self.source(TRAIN_SPLIT), None
    return pipeline.make_train_dataset(source, self.transforms(train=True), name=self.name,
                                       global_batch_size=global_batch_size, seed=seed, order=order, **layout)

  def source(self, split: str) -> MultimodalSource:
    """The joined subjects of `split`; the training split balanced if so configured."""
    if split not in self.join.splits:
      raise ValueError(f"multimodal: unknown split {split!r}; available splits: "
                       f"{list(self.join.splits)}")
    balanced = split == TRAIN_SPLIT and self.settings.sampling == "balanced"
    return MultimodalSource(split, self.join.splits[split],
                            modality_seed(self.settings.seed, "balanced") if balanced else None)

  def transforms(self, train: bool, mask: bool = True) -> list:
    """JoinModalities over each module's own transforms; ModalityDropout when training.
    Training examples are as each module's pipeline yields them (`train_example_spec()`:
    canvas-size images with `augment="device"`), absent ones padded to the same shapes."""
    def spec_of(module):
      if not mask:  # fine-tuning trains without masking: as training yields it, less masking's fields
        return unmasked_train_spec(module) if train else module.embedding_spec()
      return module.train_example_spec() if train else module.example_spec()
    specs = {m: only(spec_of(module), m, f"the {m} data module") for m, module in self.modules.items()}
    join = JoinModalities(self._sources, {m: module.transforms(train, mask=mask)
                                          for m, module in self.modules.items()},
                          specs, train=train)
    rates = {m: r for m, r in self.settings.dropout if r > 0}
    return [join] + ([ModalityDropout(rates)] if train and rates else [])

  def example_spec(self) -> dict:
    return {m: batch.with_presence(spec) for module in self.modules.values()
            for m, spec in module.example_spec().items()}

  def train_example_spec(self) -> dict:
    return {m: batch.with_presence(spec) for module in self.modules.values()
            for m, spec in module.train_example_spec().items()}

  def device_transform(self) -> Callable[[Any], Any] | None:
    """Each module's device transform in turn (each acts on its own modality's part of the
    batch, and on a batch without that modality not at all), or None if none has one."""
    transforms = [t for t in (module.device_transform() for module in self.modules.values()) if t is not None]
    return functools.partial(_apply_in_turn, tuple(transforms)) if transforms else None

  def embedding_spec(self) -> dict:
    return {m: batch.with_presence(spec) for module in self.modules.values()
            for m, spec in module.embedding_spec().items()}

  def model_info(self) -> dict[str, Any]:
    return {m: info for module in self.modules.values() for m, info in module.model_info().items()}

  def summary(self) -> dict[str, int]:
    """Each module's summary prefixed by its name, then the join's counts per split."""
    out: dict[str, Any] = {"modalities": len(self.modalities)}
    for m, module in self.modules.items():
      out.update({f"{m}_{k}": v for k, v in module.summary().items()})
    out.update(self.join.counts)
    if self.settings.sampling == "balanced":
      out["train_balanced_items"] = len(self.source(TRAIN_SPLIT))
    return out


def _apply_in_turn(transforms: Sequence[Callable[[Any], Any]], batch_: Any) -> Any:
  for transform in transforms:
    batch_ = transform(batch_)
  return batch_


def parse_mix_weights(text: str, modalities: Sequence[str]) -> dict[str, float] | None:
  """"ehr=2,imaging=1" -> {"ehr": 2.0, "imaging": 1.0}; "" -> None (join by subject)."""
  if not text:
    return None
  weights = {}
  for part in text.split(","):
    name, sep, value = part.partition("=")
    try:
      weights[name.strip()] = float(value) if sep else float("nan")
    except ValueError:
      weights[name.strip()] = float("nan")
  if set(weights) != set(modalities) or not all(w > 0 for w in weights.values()):
    raise ValueError(f"data.multimodal.mix_weights is {text!r}, expected 'name=weight,...' with a positive "
                     f"weight for each of {list(modalities)}")
  return weights
