"""Packing: several examples' tokens share one row of `max_len` slots, so short timelines
stop paying for padding.

A packed row is the concatenation of whole tokenised examples (each starting with its own
CLS), then padding, with `batch.SEGMENT_IDS` saying which tokens belong together (1, 2, ...;
0 for padding). The model keeps them apart: attention never crosses a segment, positions
restart at each (`models/encoders/tokens.py`), time features are each example's own (the
tokeniser computes them per example), masked-modelling targets are per token, and
next-event targets never cross a boundary (`objectives/autoregressive.py`). So a packed
row gives every example the loss and gradient it would have alone.

Which examples share a row is a plan fixed before training (`plan_rows`), a pure function
of the examples' token lengths: best-fit decreasing, which wastes almost nothing when most
examples are short. Rows are then what the pipeline shuffles every epoch and shards across
processes, so global batch k still depends only on the seed, an epoch still holds every
example exactly once, and resume stays exact. `batch_size` then counts rows (a fixed
token budget of batch_size * max_len), not examples.
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import grain
import numpy as np

from biofm_jax.data import batch
from biofm_jax.data.sources.indexing import checked_index

SEGMENTS = "segments"  # a packed row's records, before tokenisation


def plan_rows(lengths: np.ndarray, max_len: int) -> tuple[np.ndarray, np.ndarray]:
  """Rows as CSR (`items`, `row_starts`): row r holds examples items[row_starts[r]:row_starts[r+1]].

  Best-fit decreasing: examples by decreasing length (ties by index), each into the row
  whose free room fits it most tightly, else a new row. Deterministic; O(n * max_len / 64).
  """
  lengths = np.asarray(lengths, np.int64)
  if len(lengths) and (lengths.min() < 1 or lengths.max() > max_len):
    bad = int(np.flatnonzero((lengths < 1) | (lengths > max_len))[0])
    raise ValueError(f"plan_rows: example {bad} has {lengths[bad]} tokens, expected 1..{max_len}")
  order = np.lexsort((np.arange(len(lengths)), -lengths))
  row_of = np.empty(len(lengths), np.int64)
  free: list[int] = []  # per row: slots left
  rows_with_free: list[list[int]] = [[] for _ in range(max_len + 1)]  # room -> rows with exactly that room
  has_room = np.zeros(max_len + 1, bool)
  for item in order.tolist():
    need = int(lengths[item])
    fits = np.flatnonzero(has_room[need:])
    if len(fits):
      room = need + int(fits[0])
      row = rows_with_free[room].pop()
      has_room[room] = bool(rows_with_free[room])
    else:
      row, room = len(free), max_len
      free.append(max_len)
    row_of[item] = row
    free[row] = room - need
    if free[row]:
      rows_with_free[free[row]].append(row)
      has_room[free[row]] = True
  # Within a row, examples in the order they were placed (longest first).
  items = order[np.argsort(row_of[order], kind="stable")]
  row_starts = np.searchsorted(row_of[items], np.arange(len(free) + 1))
  return items, row_starts


class PackedSource:
  """Rows of a per-example source under a plan: row r is {SEGMENTS: [records...]}."""

  def __init__(self, source: Any, lengths: np.ndarray, max_len: int):
    self.source, self.max_len = source, max_len
    self.lengths = np.asarray(lengths, np.int64)
    if len(self.lengths) != len(source):
      raise ValueError(f"PackedSource: {len(self.lengths)} lengths for {len(source)} examples")
    self.items, self.row_starts = plan_rows(self.lengths, max_len)

  def __len__(self) -> int:
    return len(self.row_starts) - 1

  def __getitem__(self, index: int) -> dict:
    r = checked_index(index, len(self), "PackedSource ... rows")
    members = self.items[self.row_starts[r]: self.row_starts[r + 1]]
    return {SEGMENTS: [self.source[int(i)] for i in members]}

  def padding_fraction(self) -> float:
    """Share of the plan's token slots left as padding."""
    slots = len(self) * self.max_len
    return 1.0 - float(self.lengths.sum()) / slots if slots else 0.0

  def __repr__(self) -> str:
    return f"PackedSource(rows={len(self)}, examples={len(self.lengths)}, max_len={self.max_len})"


# Per-example lists that are not per token (their own length): the mask field that marks
# real entries -> (the list's fields, those of them holding token positions). A packed row
# holds its examples' real entries end to end, positions moved to the example's place in
# the row; examples size their lists so that a full row's fit (`tte_events`).
LISTS = {batch.TTE_EVENT_MASK: ((batch.TTE_EVENT_POS, batch.TTE_EVENT_TASK, batch.TTE_EVENT_DAYS),
                                (batch.TTE_EVENT_POS,))}


def pack_examples(examples: Sequence[Mapping[str, np.ndarray]], max_len: int,
                  mask_field: str = batch.TOKEN_MASK) -> dict[str, np.ndarray]:
  """Tokenised examples (every field [max_len], real tokens first as `mask_field` says, plus
  any `LISTS`) -> one row: their real tokens end to end, then zeros, plus SEGMENT_IDS."""
  if not examples:
    raise ValueError("pack_examples: no examples to pack")
  counts = [int(np.count_nonzero(e[mask_field])) for e in examples]
  if sum(counts) > max_len:
    raise ValueError(f"pack_examples: {sum(counts)} tokens do not fit a row of {max_len}")
  out = {name: np.zeros_like(value) for name, value in examples[0].items()}
  listed = {f for mask, (fields, _) in LISTS.items() if mask in out for f in (mask, *fields)}
  segments = np.zeros(max_len, np.int32)
  at = 0
  for segment, (example, n) in enumerate(zip(examples, counts), start=1):
    for name, value in example.items():
      if name not in listed:
        out[name][at: at + n] = value[:n]
    segments[at: at + n] = segment
    at += n
  out[batch.SEGMENT_IDS] = segments
  for mask, (fields, positions) in LISTS.items():
    if mask in out:
      _pack_list(out, examples, counts, mask, fields, positions)
  return out


def _pack_list(out, examples, counts, mask, fields, positions) -> None:
  capacity, filled, start = len(out[mask]), 0, 0
  for example, n in zip(examples, counts):
    real = np.flatnonzero(example[mask])
    if filled + len(real) > capacity:
      raise ValueError(f"pack_examples: {mask} entries of the row exceed its {capacity} slots")
    for name in fields:
      out[name][filled: filled + len(real)] = example[name][real] + (start if name in positions else 0)
    out[mask][filled: filled + len(real)] = True
    filled, start = filled + len(real), start + n


class PackTokenized(grain.transforms.Map):
  """A packed row of records -> one example: each record through `tokenize` (a Map giving
  fields of [max_len]), then `pack_examples`."""

  def __init__(self, tokenize: grain.transforms.Map, max_len: int):
    self.tokenize, self.max_len = tokenize, max_len

  def map(self, row: Mapping[str, Any]) -> dict[str, np.ndarray]:
    return pack_examples([self.tokenize.map(record) for record in row[SEGMENTS]], self.max_len)


class OneSegment(grain.transforms.Map):
  """An unpacked example as a one-segment row, so packed and unpacked batches share a spec
  (evaluation and embeddings read one example per row)."""

  def map(self, example: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {**example, batch.SEGMENT_IDS: np.asarray(example[batch.TOKEN_MASK], np.int32)}
