"""The Grain input pipeline, modality-agnostic.

This module owns the order of operations from a random-access source to per-process
batches. Training: shuffle, repeat, apply a data module's transforms, all on the one
global stream; then each process takes every P-th example of it and batches them.
Evaluation: shard the records by process, transform, batch, pad. It also owns the
iterator whose state is checkpointed. Which data module a modality has is the modality
registry's (`modalities/registry.py`).

Every data module's transforms end in examples keyed by modality (`data/module.py`), so
the eval padding is built from the keyed spec (every PRESENT False in a multimodal one).
`make_mixed_train_dataset` mixes streams by weight (the multimodal module's multi-task
pre-training).

"Process" here means a data shard: the training loop passes `parallel.data_shard`, so
processes whose devices hold the same batch rows (a tensor axis across hosts) share one.

Batches are built on the `MapDataset` (before `to_iter_dataset`), so which records form
global batch k depends only on the seed: not on the number of workers, nor on the number
of processes (each holds a fixed share of it), so a run may change either on restart.
"""
from __future__ import annotations

import dataclasses
import logging
import math
from typing import Any, Mapping, Protocol, Sequence

import grain
import numpy as np

from biofm_jax.data import batch
from biofm_jax.data.sources import read_skips
from absl import flags

# Streams of randomness derived from the one config seed; distinct per use and process.
_TRAIN_STREAM, _EVAL_STREAM = 1, 2
# Records read ahead by one background thread, 8 batches deep (bounded memory). The
# transforms are Python and hold the GIL, so more threads contend rather than overlap: on a
# 2-core host one thread delivered 1.8-2.2x the examples/s of four for EHR, expression and
# 2D/3D images (benchmarks/RESULTS.md). More cores: `data.num_workers` processes.
DEFAULT_READ_OPTIONS = grain.ReadOptions(num_threads=1, prefetch_buffer_size=8)

log = logging.getLogger(__name__)


class _PaddingExample(grain.transforms.Map):
  """Any index -> one all-padding example {modality: zeros and False}: zero loss weight,
  and PRESENT False where the spec has it (multimodal examples)."""

  def __init__(self, spec_by_modality: Mapping[str, Mapping[str, tuple[tuple[int, ...], Any]]]):
    self.spec_by_modality = {m: dict(spec) for m, spec in spec_by_modality.items()}

  def map(self, _):
    return {m: batch.padding_example(spec) for m, spec in self.spec_by_modality.items()}


def has_split(data_module: Any, split: str) -> bool:
  """Whether the module's `split` exists and holds records."""
  try:
    return len(data_module.source(split)) > 0
  except (KeyError, ValueError):  # the dataset has no such split
    return False


def _keyed_spec(example_spec: Mapping[str, Any]) -> dict[str, dict]:
  """The spec as `{modality: {field: (shape, dtype)}}`, checked."""
  flat = [name for name, value in example_spec.items() if not isinstance(value, Mapping)]
  if flat:
    raise ValueError(f"pipeline: the example_spec must be keyed by modality "
                     f"({{modality: {{field: (shape, dtype)}}}}); {flat} are not")
  return {m: dict(spec) for m, spec in example_spec.items()}


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


def derive_seed(seed: int, stream: int, position: int) -> int:
  """A 32-bit seed for the random transform at `position`, independent across streams (the
  same for every process: transforms run over global datasets)."""
  # The 0 once stood for a process index; kept so every stream draws as it always has.
  entropy = [seed % 2**64, stream, 0, position]  # SeedSequence wants >= 0
  state = np.random.SeedSequence(entropy).generate_state(1)
  return int(state[0])


def _apply_transforms(ds: grain.MapDataset, transforms: Sequence[Any], *, seed: int,
                      stream: int) -> grain.MapDataset:
  """`transforms` over a global (never a per-process) dataset: a random one draws by the
  record's position there, so every process count sees the same examples."""
  for position, transform in enumerate(transforms):
    if isinstance(transform, grain.transforms.RandomMap):
      ds = ds.random_map(transform, seed=derive_seed(seed, stream, position))
    elif isinstance(transform, grain.transforms.Map) or callable(transform):
      ds = ds.map(transform)
    else:
      raise TypeError(f"pipeline: transform {position} ({type(transform).__name__}) is "
                      f"neither a grain Map, a grain RandomMap nor a callable")
  return ds


def _process_view(ds: grain.MapDataset, process_index: int, process_count: int) -> grain.MapDataset:
  """Process p's examples of the global stream: p, p + P, p + 2P, ... So global batch k is
  the same set of examples whatever the number of processes (only their row order in the
  global array differs), and a run can change its process count between restarts."""
  return ds[process_index::process_count] if process_count > 1 else ds


class _ReadAtStep(grain.transforms.MapWithIndex):
  """Reads record `index` at global stream `position`, telling read-time skips
  (`sources/read_skips.py`) the training step whose batch holds it."""

  def __init__(self, source: Any, global_batch_size: int | None):
    self.source, self.global_batch_size = source, global_batch_size

  def map_with_index(self, position: int, index: int):
    # Global batch k (positions k*B .. k*B + B - 1) is trained at step k + 1.
    step = position // self.global_batch_size + 1 if self.global_batch_size else None
    with read_skips.at_step(step):
      return self.source[int(index)]


def block_buffered_order(num_records: int, block: int, buffer_blocks: int, seed: int, epoch: int) -> np.ndarray:
  """A permutation of range(num_records) for one epoch that stays local: blocks of `block`
  consecutive records in random order, the records of every `buffer_blocks` consecutive
  blocks shuffled together (a shuffle buffer over contiguous reads)."""
  rng = np.random.default_rng([seed % 2**63, epoch])
  blocks = rng.permutation(-(-num_records // block))
  groups = []
  for first in range(0, len(blocks), buffer_blocks):
    chosen = blocks[first: first + buffer_blocks]
    records = (chosen[:, None] * block + np.arange(block)[None]).ravel()
    groups.append(rng.permutation(records[records < num_records]))
  return np.concatenate(groups) if groups else np.zeros(0, np.int64)


class EpochOrder(Protocol):
  """Which record each position of a training epoch reads: `order(epoch)` is an int array of
  `epoch_length` record indices, a pure function of the epoch (and the order's own seed),
  so a run resumes from its stream position alone. Records may repeat within an epoch."""
  epoch_length: int

  def __call__(self, epoch: int) -> np.ndarray: ...


@dataclasses.dataclass(frozen=True)
class BlockBufferedOrder:
  """`block_buffered_order` as an `EpochOrder`, for sources read by blocks."""
  num_records: int
  block: int
  buffer_blocks: int
  seed: int

  @property
  def epoch_length(self) -> int:
    return self.num_records

  def __call__(self, epoch: int) -> np.ndarray:
    return block_buffered_order(self.num_records, self.block, self.buffer_blocks, self.seed, epoch)


class _ReadInEpochOrder(_ReadAtStep):
  """Reads global stream `position` as record `order(epoch)[position % order.epoch_length]`."""

  def __init__(self, source: Any, global_batch_size: int | None, order: EpochOrder):
    super().__init__(source, global_batch_size)
    self.order = order
    self._orders: dict[int, np.ndarray] = {}

  def map_with_index(self, position: int, index: int):
    del index  # the position alone decides the record
    epoch, at = divmod(int(position), self.order.epoch_length)
    orders = self._orders  # replaced whole, never mutated: prefetch threads may straddle epochs
    order = orders.get(epoch)
    if order is None:
      order = self.order(epoch)
      if len(order) != self.order.epoch_length:
        raise ValueError(f"pipeline: {type(self.order).__name__} gave {len(order)} records for epoch {epoch}, "
                         f"expected its epoch_length {self.order.epoch_length}")
      self._orders = {e: o for e, o in orders.items() if e >= epoch - 1} | {epoch: order}
    return super().map_with_index(position, int(order[at]))


def _endless_train(source: Any, transforms: Sequence[Any], *, name: str, seed: int,
                   global_batch_size: int | None = None, block_shuffle: tuple[int, int] | None = None,
                   order: EpochOrder | None = None) -> tuple[grain.MapDataset, int]:
  """The global training stream of `source`: shuffled every epoch, repeated, transformed
  (random transforms seeded by position in this global stream, never by process); and the
  number of records. `global_batch_size` (when the stream alone fills the batches) dates
  read-time skips by step. `block_shuffle=(block, buffer_blocks)` reads in
  `block_buffered_order` instead of a global shuffle, for sources read by blocks; `order`
  (an `EpochOrder`) reads in any other order of the caller's."""
  num_records = len(source)
  if num_records == 0:
    raise ValueError(f"pipeline: the {name} training source has no records")
  if block_shuffle and order is not None:
    raise ValueError(f"pipeline: the {name} training stream was given both block_shuffle and an order")
  if block_shuffle:
    order = BlockBufferedOrder(num_records, *block_shuffle, seed=seed)
  if order is not None:
    ds = grain.MapDataset.range(order.epoch_length).repeat(None)
    ds = ds.map_with_index(_ReadInEpochOrder(source, global_batch_size, order))
  else:
    # Shuffle before repeat: grain folds the epoch into the shuffle seed. Indices are shuffled
    # and the source read at each position (the same order as shuffling the source itself).
    ds = grain.MapDataset.range(num_records).shuffle(seed=seed % 2**32).repeat(None)
    ds = ds.map_with_index(_ReadAtStep(source, global_batch_size))
  ds = _apply_transforms(ds, transforms, seed=seed, stream=_TRAIN_STREAM)
  return ds, num_records


def make_train_dataset(source: Any, transforms: Sequence[Any], *, global_batch_size: int, seed: int,
                       process_index: int | None = None, process_count: int | None = None,
                       read_options: grain.ReadOptions | None = None, name: str = "",
                       block_shuffle: tuple[int, int] | None = None,
                       order: EpochOrder | None = None) -> grain.IterDataset:
  """An endless stream of per-process batches, reshuffled every epoch; `name` (the data
  module's) is for messages; `block_shuffle` and `order` as in `_endless_train`."""
  index, count = _process_layout(process_index, process_count)
  batch_size = _per_process_batch(global_batch_size, count)
  name = name or type(source).__name__
  ds, num_records = _endless_train(source, transforms, name=name, seed=seed,
                                   global_batch_size=global_batch_size, block_shuffle=block_shuffle, order=order)
  log.info("pipeline: %s train, %d records, process %d of %d, batches of %d",
           name, num_records, index, count, batch_size)
  return _process_view(ds, index, count).batch(batch_size, drop_remainder=True).to_iter_dataset(
      read_options or DEFAULT_READ_OPTIONS)


def make_mixed_train_dataset(streams: Mapping[str, tuple[Any, Sequence[Any], int]], weights: Mapping[str, float], *,
                             global_batch_size: int,
                             process_index: int | None = None, process_count: int | None = None,
                             read_options: grain.ReadOptions | None = None) -> grain.IterDataset:
  """Training streams mixed by weight into one stream of batches.

  `streams` is {name: (source, transforms, seed)}: each goes its own way (shuffle, repeat,
  its transforms, its seed, so adding a stream never changes another), and its transforms
  end in the examples the mixed batches hold (the multimodal module's: every modality
  keyed, only the stream's own present; `multimodal.py`). Grain's `MapDataset.mix`
  interleaves the global streams deterministically in proportion to the weights before
  each process takes its share, so global batch k depends only on the seeds, and the
  iterator resumes.
  """
  names = sorted(streams)
  bad = {m: w for m, w in weights.items() if not (math.isfinite(float(w)) and float(w) > 0)}
  if set(weights) != set(names) or bad:
    raise ValueError(f"pipeline: mixing weights {dict(weights)} must give every module "
                     f"{names} a finite weight > 0 (and name no other)")
  index, count = _process_layout(process_index, process_count)
  batch_size = _per_process_batch(global_batch_size, count)
  mixed = [_endless_train(source, transforms, name=m, seed=seed)[0]
           for m, (source, transforms, seed) in ((m, streams[m]) for m in names)]
  ds = grain.MapDataset.mix(mixed, [float(weights[m]) for m in names])
  log.info("pipeline: mixed train of %s, weights %s, process %d of %d, batches of %d",
           "+".join(names), [float(weights[m]) for m in names], index, count, batch_size)
  return _process_view(ds, index, count).batch(batch_size, drop_remainder=True).to_iter_dataset(
      read_options or DEFAULT_READ_OPTIONS)


def make_eval_dataset(source: Any, transforms: Sequence[Any], *, global_batch_size: int, seed: int,
                      example_spec: Mapping[str, Any],
                      process_index: int | None = None, process_count: int | None = None,
                      read_options: grain.ReadOptions | None = None) -> grain.IterDataset:
  """One unshuffled pass; the last batch is filled with all-padding examples.

  Every process yields the same number of batches (collectives in the eval step need
  it), so shorter shards get one more padding example where the split does not divide.
  Random transforms draw by the record's index in the split: each evaluation, with any
  number of processes, masks the same positions. `example_spec` is the module's,
  `{modality: spec}`; padding examples are zeros and False (every PRESENT False in a
  multimodal one).
  """
  spec_by_modality = _keyed_spec(example_spec)
  index, count = _process_layout(process_index, process_count)
  batch_size = _per_process_batch(global_batch_size, count)
  ds = _apply_transforms(grain.MapDataset.source(source), transforms, seed=seed, stream=_EVAL_STREAM)
  ds = _process_view(ds, index, count)
  num_records = len(ds)
  largest_shard = math.ceil(len(source) / count)
  num_batches = math.ceil(largest_shard / batch_size)
  num_padding = num_batches * batch_size - num_records
  if num_padding:
    padding = grain.MapDataset.range(num_padding).map(_PaddingExample(spec_by_modality))
    ds = grain.MapDataset.concatenate([ds, padding]) if num_records else padding
  log.info("pipeline: %s eval, %d records and %d padding examples on process %d of %d",
           "+".join(spec_by_modality), num_records, num_padding, index, count)
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
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()
