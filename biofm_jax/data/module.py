"""What every data module provides: the contract the loop, the pipelines and the
evaluators read, as `objectives/base.py`'s `Objective` is the objectives' contract.

Every data module, single-modality or joined, yields examples keyed by modality:
`{modality: {field: array}}` (fine-tuning modules add `batch.TASK` beside the
modalities). A single-modality module's transforms end in `KeyByModality(name)`; its
specs and model info come keyed the same way, so one shape serves every run:

    module.example_spec()  -> {"ehr": {"codes": ((L,), int32), ...}}
    module.model_info()    -> {"ehr": {"vocab_size": V, ...}}

A module whose training stream is not one source through its transforms (the multimodal
module's weighted mix) also defines `make_train_dataset(*, global_batch_size, seed,
process_index, process_count)`, which the loop then uses instead. A module may define
`device_transform()`: None, or a function of a training batch that the train step applies
first, inside the compiled program (imaging's `augment="device"`); its training examples
are then what that function expects (`train_example_spec()`, which such a module defines)
and `example_spec` what it returns.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, Protocol, Sequence

import grain

from biofm_jax.data import object_state

Spec = Mapping[str, Mapping[str, tuple[tuple[int, ...], Any]]]  # {modality: {field: (shape, dtype)}}


class DataModule(Protocol):
  name: str  # the modality's name, or e.g. "multimodal" for a join

  def source(self, split: str) -> Sequence[Any]:
    """The random-access records of `split`; ValueError or KeyError when it has none."""

  def transforms(self, train: bool, mask: bool = True) -> list:
    """Grain transforms from a record to `{modality: example}`; `mask=False` leaves out the
    pre-training masking (embeddings, probes)."""

  def example_spec(self) -> Spec:
    """`{modality: {field: (shape, dtype)}}` of one training example (no batch axis)."""

  def embedding_spec(self) -> Spec:
    """The same for an example of `transforms(train=False, mask=False)`."""

  def model_info(self) -> dict[str, dict[str, Any]]:
    """`{modality: what its model description needs}` (vocabulary size, shapes, ...)."""

  def summary(self) -> dict[str, Any]:
    """Counts worth logging (records per split, vocabulary, truncation)."""


@object_state.storable
class KeyByModality(grain.transforms.Map):
  """example -> {modality: example}: the last transform of a single-modality module (a
  class, not a lambda, so Grain's worker processes can pickle it)."""

  def __init__(self, modality: str):
    self.modality = modality

  def map(self, example):
    return {self.modality: example}


@dataclasses.dataclass(frozen=True)
class ShapesOnly:
  """A data module that reads nothing: the specs and model info a config implies, for
  ahead-of-time sizing (`train/aot.py`)."""
  name: str
  spec: Mapping[str, Any]
  embedding: Mapping[str, Any]
  info: Mapping[str, Any]

  def example_spec(self) -> dict:
    return {self.name: dict(self.spec)}

  def embedding_spec(self) -> dict:
    return {self.name: dict(self.embedding)}

  def model_info(self) -> dict:
    return {self.name: dict(self.info)}


def device_transform_of(module: Any) -> Callable[[Any], Any] | None:
  """The module's `device_transform()` (see the module docstring), None if it has none."""
  make = getattr(module, "device_transform", None)
  return make() if make is not None else None


def train_example_spec_of(module: Any) -> Spec:
  """The spec of a training example as the pipeline yields it: the module's
  `train_example_spec()` where it hands work to the step, else its `example_spec()`."""
  spec = getattr(module, "train_example_spec", None)
  return spec() if spec is not None else module.example_spec()


def only(keyed: Mapping[str, Any], modality: str, where: str) -> Any:
  """The one modality's entry of a keyed example, spec or model info."""
  if set(keyed) != {modality}:
    raise ValueError(f"{where}: expected only {modality!r} in {sorted(keyed)}")
  return keyed[modality]
