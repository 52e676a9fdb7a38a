"""What every data module provides: the contract the loop, the pipelines and the
evaluators read, as `objectives/base.py`'s `Objective` is the objectives' contract.

Every data module, single-modality or joined, yields examples keyed by modality:
`{modality: {field: array}}` (fine-tuning modules add `batch.TASK` beside the
modalities). A single-modality module's transforms end in `KeyByModality(name)`; its
specs and model info come keyed the same way, so one shape serves every run:

    module.example_spec()  -> {"ehr": {"codes": ((L,), int32), ...}}
    module.model_info()    -> {"ehr": {"vocab_size": V, ...}}

Besides its records and specs a module brings its own behaviour, so the loop never asks
what kind of module it holds (`DataModuleDefaults` gives each part its usual form):
  make_train_dataset   its training stream (the train split through its transforms, or
                       its own: the multimodal module's weighted mix, EHR's packed windows)
  device_transform     None, or a function of a training batch that the train step
                       applies first, inside the compiled program (imaging's
                       `augment="device"`); training examples are then what it expects
                       (`train_example_spec`) and `example_spec` what it returns
  train_metrics        figures about the training data the loop writes with its first
                       metrics row (EHR: the share of events the training windows hold)

`SizedData` is the part ahead-of-time sizing (`train/aot.py`) needs: a module that reads
nothing (`ShapesOnly`, or a modality's own opened without data) answers it from a config.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, Protocol

import grain

from biofm_jax.data import object_state, pipeline

Spec = Mapping[str, Mapping[str, tuple[tuple[int, ...], Any]]]  # {modality: {field: (shape, dtype)}}
DeviceTransform = Callable[[Any], Any]  # a training batch -> the batch the model sees
TRAIN_SPLIT = "train"

# What an objective needs the data to add to each example (`ObjectiveKind.targets` in the
# registry): a data module is opened with one of these, makes what it can and refuses the
# rest (`check_targets`), so it never asks which objective it serves.
MASKED = "masked"  # BERT masking of tokens, with the original tokens as targets
NEXT = "next"  # the tokens themselves: each predicts the one after it
TIME_TO_EVENT = "time_to_event"  # prediction points with each task's time to its next event
MASKED_PATCHES = "masked_patches"  # MAE: patches hidden from the encoder, to reconstruct
MASKED_FEATURES = "masked_features"  # table cells hidden, to predict


def check_targets(owner: str, targets: str, makes: tuple[str, ...]) -> None:
  """One-line refusal of targets a module cannot make (the registry names the objective first)."""
  if targets not in makes:
    raise ValueError(f"{owner}: cannot make {targets!r} targets; it makes {list(makes)}")


class RecordSource(Protocol):
  """Random access to a split's records, as Grain reads them."""

  def __len__(self) -> int:
    ...

  def __getitem__(self, index: int) -> Any:
    ...


class SizedData(Protocol):
  """What a compiled train step needs to know about its data: shapes and model info."""

  @property
  def name(self) -> str:
    """The modality's name, or e.g. "multimodal" for a join."""
    ...

  def example_spec(self) -> Spec:
    """`{modality: {field: (shape, dtype)}}` of one example (no batch axis)."""
    ...

  def embedding_spec(self) -> Spec:
    """The same for an example of `transforms(train=False, mask=False)`."""
    ...

  def model_info(self) -> dict[str, dict[str, Any]]:
    """`{modality: what its model description needs}` (vocabulary size, shapes, ...)."""
    ...

  def train_example_spec(self) -> Spec:
    """A training example as the pipeline yields it (before `device_transform`)."""
    ...

  def device_transform(self) -> DeviceTransform | None:
    ...


class DataModule(SizedData, Protocol):
  """A module that reads records: everything the loop, the pipelines and evaluators use."""

  def source(self, split: str) -> RecordSource:
    """The random-access records of `split`; ValueError or KeyError when it has none."""
    ...

  def transforms(self, train: bool, mask: bool = True) -> list[Any]:
    """Grain transforms from a record to `{modality: example}`; `mask=False` leaves out the
    pre-training masking (embeddings, probes)."""
    ...

  def summary(self) -> dict[str, Any]:
    """Counts worth logging (records per split, vocabulary, truncation)."""
    ...

  def make_train_dataset(self, *, global_batch_size: int, seed: int, process_index: int | None = None,
                         process_count: int | None = None) -> grain.IterDataset:
    """The endless, checkpointable stream of this process's training batches."""
    ...

  def train_metrics(self) -> dict[str, float]:
    """Figures about the training data, written once with the first metrics row."""
    ...


def unmasked_train_spec(module: SizedData) -> dict[str, dict[str, Any]]:
  """A module's training examples without pre-training masking: `train_example_spec()` (e.g.
  canvas images and augmentation seeds, for a device transform) less the fields only the
  masking adds (those in `example_spec()` but not in `embedding_spec()`)."""
  masked, unmasked, train = module.example_spec(), module.embedding_spec(), module.train_example_spec()
  return {m: {k: v for k, v in fields.items() if k in unmasked[m] or k not in masked[m]}
          for m, fields in train.items()}


class DataModuleDefaults:
  """The usual form of `DataModule`'s behaviour, for a module to inherit and override."""

  def make_train_dataset(self: DataModule, *, global_batch_size: int, seed: int, process_index: int | None = None,
                         process_count: int | None = None) -> grain.IterDataset:
    """The training split's records through `transforms(train=True)`, reshuffled each epoch."""
    return pipeline.make_train_dataset(self.source(TRAIN_SPLIT), self.transforms(train=True),
                                       global_batch_size=global_batch_size, seed=seed, name=self.name,
                                       process_index=process_index, process_count=process_count)

  def train_example_spec(self: SizedData) -> Spec:
    return self.example_spec()

  def device_transform(self) -> DeviceTransform | None:
    return None

  def train_metrics(self) -> dict[str, float]:
    return {}


@object_state.storable
class KeyByModality(grain.transforms.Map):
  """example -> {modality: example}: the last transform of a single-modality module (a
  class, not a lambda, so Grain's worker processes can pickle it)."""

  def __init__(self, modality: str):
    self.modality = modality

  def map(self, example: Any) -> dict[str, Any]:
    return {self.modality: example}


@dataclasses.dataclass(frozen=True)
class ShapesOnly:
  """A data module that reads nothing: the specs and model info a config implies, for
  ahead-of-time sizing (`train/aot.py`)."""
  name: str
  spec: Mapping[str, Any]
  embedding: Mapping[str, Any]
  info: Mapping[str, Any]

  def example_spec(self) -> Spec:
    return {self.name: dict(self.spec)}

  def embedding_spec(self) -> Spec:
    return {self.name: dict(self.embedding)}

  def model_info(self) -> dict[str, dict[str, Any]]:
    return {self.name: dict(self.info)}

  def train_example_spec(self) -> Spec:
    return self.example_spec()

  def device_transform(self) -> DeviceTransform | None:
    return None


def only(keyed: Mapping[str, Any], modality: str, where: str) -> Any:
  """The one modality's entry of a keyed example, spec or model info."""
  if set(keyed) != {modality}:
    raise ValueError(f"{where}: expected only {modality!r} in {sorted(keyed)}")
  return keyed[modality]
