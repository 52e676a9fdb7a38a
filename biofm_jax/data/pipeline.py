"""The Grain input pipeline, modality-agnostic.

This module owns the order of operations from a random-access source to per-process
batches: shard the record index by process, shuffle, repeat, apply a modality's
transforms, wrap each example under its modality name and batch. It also owns the
registry of modality data modules and the iterator whose state is checkpointed.

Batches are built on the `MapDataset` (before `to_iter_dataset`), so which records form
batch k depends only on the seed and the process, never on the number of workers.
"""
from __future__ import annotations

import logging
import math
from typing import Any, Callable, Mapping, Sequence

import grain
import numpy as np

from biofm_jax.data import ehr, imaging, omics, sequence, tabular

# Modality name -> `from_config(cfg, *, objective, artifacts_dir)` of its data module.
DATA_MODULES: dict[str, Callable[..., Any]] = {
    "ehr": ehr.EHRData.from_config,
    "imaging": imaging.ImagingData.from_config,
    "tabular": tabular.TabularData.from_config,
    "sequence": sequence.SequenceData.from_config,
    "omics": omics.OmicsData.from_config,
}

# Streams of randomness derived from the one config seed; distinct per use and process.
_TRAIN_STREAM, _EVAL_STREAM = 1, 2
# Per-process batches read ahead by threads: enough to hide source I/O, bounded memory.
DEFAULT_READ_OPTIONS = grain.ReadOptions(num_threads=4, prefetch_buffer_size=8)

log = logging.getLogger(__name__)


class _WrapModality(grain.transforms.Map):
  """example -> {modality: example}; a class (not a lambda) so workers can pickle it."""

  def __init__(self, modality: str):
    self.modality = modality

  def map(self, example):
    return {self.modality: example}


class _PaddingExample(grain.transforms.Map):
  """Any index -> one all-padding example: zeros and False carry zero loss weight."""

  def __init__(self, modality: str, example_spec: Mapping[str, tuple[tuple[int, ...], Any]]):
    self.modality, self.example_spec = modality, dict(example_spec)

  def map(self, _):
    return {self.modality: {name: np.zeros(shape, dtype)
                            for name, (shape, dtype) in self.example_spec.items()}}


def _process_layout(process_index: int | None, process_count: int | None) -> tuple[int, int]:
  if process_index is None or process_count is None:
    import jax  # only when the caller leaves the layout to the runtime
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
  if not 0 <= process_index < process_count:
    raise ValueError(f"pipeline: process_index {process_index} not in [0, {process_count})")
  return process_index, process_count


def _per_process_batch(global_batch_size: int, process_count: int) -> int:
  if global_batch_size < 1 or global_batch_size % process_count:
    raise ValueError(f"pipeline: global_batch_size {global_batch_size} must be a positive "
                     f"multiple of the process count {process_count}")
  return global_batch_size // process_count


def derive_seed(seed: int, stream: int, process_index: int, position: int) -> int:
  """A 32-bit seed for one random transform, independent across streams and processes."""
  entropy = [seed % 2**64, stream, process_index, position]  # SeedSequence wants >= 0
  state = np.random.SeedSequence(entropy).generate_state(1)
  return int(state[0])


def _apply_transforms(ds: grain.MapDataset, transforms: Sequence[Any], *, seed: int,
                      stream: int, process_index: int) -> grain.MapDataset:
  for position, transform in enumerate(transforms):
    if isinstance(transform, grain.transforms.RandomMap):
      ds = ds.random_map(transform,
                         seed=derive_seed(seed, stream, process_index, position))
    elif isinstance(transform, grain.transforms.Map) or callable(transform):
      ds = ds.map(transform)
    else:
      raise TypeError(f"pipeline: transform {position} ({type(transform).__name__}) is "
                      f"neither a grain Map, a grain RandomMap nor a callable")
  return ds


def _shard(source: Any, process_index: int, process_count: int) -> grain.MapDataset:
  ds = grain.MapDataset.source(source)
  return ds[process_index::process_count] if process_count > 1 else ds


def make_train_dataset(source: Any, transforms: Sequence[Any], *, modality: str,
                       global_batch_size: int, seed: int, process_index: int | None = None,
                       process_count: int | None = None,
                       read_options: grain.ReadOptions | None = None) -> grain.IterDataset:
  """An endless stream of per-process batches, reshuffled every epoch."""
  index, count = _process_layout(process_index, process_count)
  batch_size = _per_process_batch(global_batch_size, count)
  ds = _shard(source, index, count)
  num_records = len(ds)
  if num_records == 0:
    raise ValueError(f"pipeline: the {modality} training source has no records for "
                     f"process {index} of {count} ({len(source)} records in all)")
  # Shuffle before repeat: grain folds the epoch into the shuffle seed.
  ds = ds.shuffle(seed=seed % 2**32).repeat(None)
  ds = _apply_transforms(ds, transforms, seed=seed, stream=_TRAIN_STREAM,
                         process_index=index)
  ds = ds.map(_WrapModality(modality)).batch(batch_size, drop_remainder=True)
  log.info("pipeline: %s train, %d records on process %d of %d, batches of %d",
           modality, num_records, index, count, batch_size)
  return ds.to_iter_dataset(read_options or DEFAULT_READ_OPTIONS)


def make_eval_dataset(source: Any, transforms: Sequence[Any], *, modality: str,
                      global_batch_size: int, seed: int,
                      example_spec: Mapping[str, tuple[tuple[int, ...], Any]],
                      process_index: int | None = None, process_count: int | None = None,
                      read_options: grain.ReadOptions | None = None) -> grain.IterDataset:
  """One unshuffled pass; the last batch is filled with all-padding examples.

  Every process yields the same number of batches (collectives in the eval step need
  it), so shorter shards get one more padding example where the split does not divide.
  Random transforms use a fixed seed per record position: each evaluation masks the same
  positions.
  """
  index, count = _process_layout(process_index, process_count)
  batch_size = _per_process_batch(global_batch_size, count)
  ds = _shard(source, index, count)
  ds = _apply_transforms(ds, transforms, seed=seed, stream=_EVAL_STREAM,
                         process_index=index)
  ds = ds.map(_WrapModality(modality))
  num_records = len(ds)
  largest_shard = math.ceil(len(source) / count)
  num_batches = math.ceil(largest_shard / batch_size)
  num_padding = num_batches * batch_size - num_records
  if num_padding:
    padding = grain.MapDataset.range(num_padding).map(_PaddingExample(modality, example_spec))
    ds = grain.MapDataset.concatenate([ds, padding]) if num_records else padding
  log.info("pipeline: %s eval, %d records and %d padding examples on process %d of %d",
           modality, num_records, num_padding, index, count)
  return ds.batch(batch_size, drop_remainder=False).to_iter_dataset(
      read_options or DEFAULT_READ_OPTIONS)


def make_iterator(dataset: grain.IterDataset, num_workers: int = 0) -> grain.DatasetIterator:
  """An iterator with get_state()/set_state(); worker processes when num_workers > 0."""
  if num_workers < 0:
    raise ValueError(f"pipeline: num_workers {num_workers} must be >= 0")
  if num_workers:
    _ensure_absl_flags_parsed()
    dataset = dataset.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers))
  return iter(dataset)


def _ensure_absl_flags_parsed() -> None:
  """Grain's worker processes read absl flags; notebooks and tests never parse them.

  Marking them parsed keeps every flag at its default; a script under `app.run` has
  parsed them already and is left alone.
  """
  from absl import flags
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()
