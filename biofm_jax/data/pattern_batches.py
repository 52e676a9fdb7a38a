"""Training batches grouped by availability pattern, so absent modalities cost no compute.

A subject with EHR and imaging but no omics has the pattern "ehr+imaging". A batch whose
subjects share a pattern can carry only that pattern's modalities, and the model computes
nothing for the others (their towers, their tokens in the fusion block, their heads):
shapes stay static within the batch, and each set of modalities is one compiled step.

`PatternBatches` is the order of the training stream that does it (an `EpochOrder` of
`data/pipeline.py`), and `PatternBatchItems` the source it indexes. Epoch e, uniform:
  - each pattern's subjects in a seeded permutation, cut into full batches of that pattern;
  - the remainders (fewer than a batch per pattern) pooled, grouped by pattern, cut into
    batches that carry the union of their subjects' modalities (a subject's absent ones
    as padding, PRESENT False, as in mixed batches); the last one filled by cycling;
  - all batches in a seeded random order.
So every subject is seen once per epoch (a few of the remainder twice), the epoch's
length never changes, and global batch k depends only on (seed, k): a run resumes from
its stream position alone. With `balanced`, every pattern gets as many pure batches as
the largest needs, its subjects cycled (rare patterns repeated, as balanced sampling does).

The order's codes name the subject and the modalities its batch carries:
code = subject + subjects * modality bitmask (bit j: the j-th modality in sorted order,
as `SplitJoin.patterns()`).
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Sequence

import numpy as np


@dataclasses.dataclass(frozen=True, eq=False)
class PatternBatches:
  """An `EpochOrder` of codes (module docstring) for a split's subjects."""
  patterns: np.ndarray  # int64 [S], `SplitJoin.patterns()`
  batch_size: int
  seed: int
  balanced: bool = False

  def __post_init__(self):
    if self.batch_size < 1 or not len(self.patterns):
      raise ValueError(f"PatternBatches: needs subjects and a batch size >= 1, got {len(self.patterns)} "
                       f"subjects and batch size {self.batch_size}")

  @functools.cached_property
  def _groups(self) -> list[np.ndarray]:
    # Most modalities first, so that pooled remainders of similar patterns share batches.
    values = sorted(np.unique(self.patterns), key=lambda p: (-bin(int(p)).count("1"), -int(p)))
    return [np.flatnonzero(self.patterns == p) for p in values]

  @functools.cached_property
  def _full_batches(self) -> list[int]:
    if self.balanced:
      return [max(-(-len(g) // self.batch_size) for g in self._groups)] * len(self._groups)
    return [len(g) // self.batch_size for g in self._groups]

  @functools.cached_property
  def _remainder_batches(self) -> int:
    if self.balanced:
      return 0
    remainder = len(self.patterns) - self.batch_size * sum(self._full_batches)
    return -(-remainder // self.batch_size)

  @property
  def epoch_length(self) -> int:
    return self.batch_size * (sum(self._full_batches) + self._remainder_batches)

  def __call__(self, epoch: int) -> np.ndarray:
    rng = np.random.default_rng([self.seed % 2**63, int(epoch)])
    batches, remainders = [], []
    for group, n in zip(self._groups, self._full_batches):
      members = rng.permutation(group)
      take = np.resize(members, n * self.batch_size)  # balanced: cycles through the group
      batches.append(take.reshape(n, self.batch_size))
      if not self.balanced:
        remainders.append(members[n * self.batch_size:])
    if self._remainder_batches:
      pooled = np.concatenate(remainders)
      batches.append(np.resize(pooled, (self._remainder_batches, self.batch_size)))
    subjects = np.concatenate(batches)[rng.permutation(sum(len(b) for b in batches))]
    carried = np.bitwise_or.reduce(self.patterns[subjects], axis=1)
    return (subjects + len(self.patterns) * carried[:, None]).ravel()


class PatternBatchItems:
  """The items `PatternBatches`' codes index: code -> the subject's item of `source` (a
  `MultimodalSource` of the same split, unbalanced), with "modalities": what its batch
  carries. Its length is the split's subjects (what the pipeline counts as records); the
  codes themselves run higher, so read it through a `PatternBatches` order only."""

  def __init__(self, source: Any, modalities: Sequence[str]):
    self.source, self.modalities = source, tuple(sorted(modalities))

  def __len__(self) -> int:
    return len(self.source)

  def __getitem__(self, code: int) -> dict:
    carried, subject = divmod(int(code), len(self.source))
    if not 0 < carried < 2 ** len(self.modalities):
      raise ValueError(f"PatternBatchItems: code {code} names no modality set of {self.modalities}")
    return {**self.source[subject], "modalities": tuple(m for bit, m in enumerate(self.modalities)
                                                        if carried >> bit & 1)}
