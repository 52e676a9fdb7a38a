"""How one joined subject becomes one multimodal example (the data module that uses these
is `multimodal.py`; the join index, which records belong to which subject, is `join.py`).

* `MultimodalSource`: the joined subjects of one split; an item is the subject and its
  record indices per present modality (small, picklable), read by `JoinModalities`.
* `JoinModalities`: per present modality one record (training: at random among the
  subject's; evaluation: the first) through that modality's own transforms; padding for
  the absent. A labelled item may carry a prediction time (`subject_labels.py`): each timed
  modality's record (EHR's) is then cut there, as EHR fine-tuning cuts it.
* `ModalityDropout`: hides present modalities at random (training only).
* `OnlyModality`: one modality's own example as a multimodal one (mixed streams).

Randomness: JoinModalities draws one root from the example's generator (seeded by Grain
per stream position); modality m's record choice and its k-th random transform use
`default_rng([root, name_key(m), k])`, so adding a modality or a transform elsewhere
never shifts another modality's numbers. Balanced sampling: `multimodal.py`'s docstring.
"""
from __future__ import annotations

import hashlib
from typing import Any, Mapping, Sequence

import grain
import numpy as np

from biofm_jax.data import batch
from biofm_jax.data.join import SplitJoin
from biofm_jax.data.module import only
from biofm_jax.data.sources.indexing import checked_index
from biofm_jax.data.sources.read_skips import REPLACED

# What a labelled item may add (`subject_labels.TimedItems`): the row's prediction time, at
# which each timed modality's record (one whose source has `record_until`: EHR) is cut, and
# whether events at that time are kept.
PREDICTION_TIME, INCLUSIVE = "prediction_time", "inclusive"


def name_key(name: str) -> int:
  """A stable 32-bit key of a modality name (Python's hash() is salted per process)."""
  return int.from_bytes(hashlib.blake2b(name.encode("utf-8"), digest_size=4).digest(), "little")


def modality_seed(seed: int, name: str) -> int:
  """A 32-bit seed for one modality's stream, independent of the other modalities."""
  return int(np.random.SeedSequence([seed % 2**64, name_key(name)]).generate_state(1)[0])


# ================================================================ source
class MultimodalSource:
  """The joined subjects of one split: item i -> {"subject_id", "split", "records"}.

  `records` maps each present modality to the subject's record indices in that
  modality's source of the split. With `balanced_seed` set, the order is resampled so
  every availability pattern is equally frequent (see the module docstring).
  """

  def __init__(self, split: str, join: SplitJoin, balanced_seed: int | None = None):
    self.split, self.join = split, join
    self._members = self._pattern_offsets = None
    self._length = len(join)
    if balanced_seed is not None and len(join):
      patterns = join.patterns()
      rng = np.random.default_rng(balanced_seed)
      groups = [rng.permutation(np.flatnonzero(patterns == p)) for p in np.unique(patterns)]
      self._members = np.concatenate(groups)
      self._pattern_offsets = np.concatenate([[0], np.cumsum([len(g) for g in groups])])
      self._length = len(groups) * max(len(g) for g in groups)

  def __len__(self) -> int:
    return self._length

  def subject_index(self, i: int) -> int:
    """Position in `join` of item i."""
    if self._members is None:
      return i
    num_patterns = len(self._pattern_offsets) - 1
    p, j = i % num_patterns, i // num_patterns
    lo, hi = self._pattern_offsets[p], self._pattern_offsets[p + 1]
    return int(self._members[lo + j % (hi - lo)])

  @property
  def subject_ids(self) -> list[str]:
    return [str(self.join.subject_ids[self.subject_index(i)]) for i in range(len(self))]

  def __getitem__(self, index: int) -> dict:
    i = checked_index(index, len(self), "MultimodalSource ... items")
    s, join = self.subject_index(i), self.join
    records = {m: tuple(int(r) for r in join.records[m][o[s]:o[s + 1]])
               for m, o in join.offsets.items() if o[s + 1] > o[s]}
    return {"subject_id": str(join.subject_ids[s]), "split": self.split, "records": records}

  def __repr__(self) -> str:
    return f"MultimodalSource(split={self.split!r}, items={len(self)}, subjects={len(self.join)})"


# ================================================================ transforms
def present_example(example: Mapping[str, Any], spec: Mapping[str, Any], where: str) -> dict:
  """A modality's transformed example, checked against its spec, with PRESENT True."""
  extra = sorted(set(example) - set(spec))
  if extra:
    raise ValueError(f"{where}: fields {extra} are not in the modality's example spec")
  batch.check_example(example, spec, where)
  return {**{name: example[name] for name in spec}, batch.PRESENT: np.asarray(True)}


def absent_example(spec: Mapping[str, Any]) -> dict:
  return batch.padding_example(batch.with_presence(spec))


class OnlyModality(grain.transforms.Map):
  """{modality: example} -> {modality: example + PRESENT True, every other modality: padding}."""

  def __init__(self, modality: str, specs: Mapping[str, Mapping[str, Any]]):
    self.modality, self.specs = modality, {m: dict(spec) for m, spec in specs.items()}

  def map(self, keyed):
    where = f"{self.modality} example in a mixed multimodal stream"
    example = only(keyed, self.modality, where)
    return {m: present_example(example, spec, where) if m == self.modality
            else absent_example(spec) for m, spec in self.specs.items()}


class JoinModalities(grain.transforms.RandomMap):
  """Item of a `MultimodalSource` -> a multimodal example (see the module docstring).

  The example holds every configured modality, or those the item's "modalities" names
  (batching by pattern, `pattern_batches.py`: the modalities its batch carries).
  """

  def __init__(self, sources: Mapping[str, Mapping[str, Any]],
               transforms: Mapping[str, Sequence[Any]], specs: Mapping[str, Mapping],
               *, train: bool):
    self.sources = {s: dict(by_m) for s, by_m in sources.items()}  # split -> modality -> source
    self.transforms = {m: list(t) for m, t in transforms.items()}
    self.specs = {m: dict(spec) for m, spec in specs.items()}
    self.modalities, self.train = tuple(sorted(self.specs)), bool(train)

  def random_map(self, item: Mapping[str, Any], rng: np.random.Generator) -> dict:
    root = int(rng.integers(2**63))
    records = item["records"]
    return {m: self._read(m, item, records[m], root) if records.get(m)
            else absent_example(self.specs[m]) for m in item.get("modalities", self.modalities)}

  def _read(self, m: str, item: Mapping[str, Any], records: Sequence[int], root: int) -> dict:
    generator = lambda k: np.random.default_rng([root, name_key(m), k])  # noqa: E731
    pick = int(generator(0).integers(len(records))) if self.train and len(records) > 1 else 0
    where = (f"multimodal example (subject {item['subject_id']!r}), {m} record "
             f"{records[pick]} of split {item['split']!r}")
    source = self.sources[item["split"]][m]
    time = item.get(PREDICTION_TIME)
    if time is not None and hasattr(source, "record_until"):  # what a label row at that time may use
      x = source.record_until(int(records[pick]), time, inclusive=bool(item.get(INCLUSIVE, True)))
    else:
      x = source[int(records[pick])]
    if isinstance(x, Mapping) and x.get(REPLACED):  # another subject's record stands in: absent here
      return absent_example(self.specs[m])
    for position, transform in enumerate(self.transforms[m]):
      if isinstance(transform, grain.transforms.RandomMap):
        x = transform.random_map(x, generator(position + 1))
      elif isinstance(transform, grain.transforms.Map):
        x = transform.map(x)
      elif callable(transform):
        x = transform(x)
      else:
        raise TypeError(f"{where}: transform {position} ({type(transform).__name__}) is "
                        "neither a grain Map, a grain RandomMap nor a callable")
    return present_example(only(x, m, where), self.specs[m], where)


class ModalityDropout(grain.transforms.RandomMap):
  """Drops each present modality with its rate (padding, PRESENT False), never all.

  One uniform draw per rated modality (sorted names) and one more, whatever the example
  holds, so the stream is stable. When every present modality would drop, the extra draw
  keeps one of them: the realised rate is a little below `rate` for subjects with few.
  An example may hold only some of the rated modalities (batches by availability pattern).
  """

  def __init__(self, rates: Mapping[str, float]):
    bad = {m: r for m, r in rates.items() if not 0.0 <= float(r) <= 1.0}
    if bad:
      raise ValueError(f"ModalityDropout: rates {bad} must be in [0, 1]")
    self.rates = {m: float(rates[m]) for m in sorted(rates)}

  def random_map(self, example: Mapping[str, Any], rng: np.random.Generator) -> dict:
    draws = rng.random(len(self.rates) + 1)
    present = [m for m in example if bool(example[m][batch.PRESENT])]
    drop = [m for m, u in zip(self.rates, draws) if m in present and u < self.rates[m]]
    if drop and len(drop) == len(present):
      drop.pop(int(draws[-1] * len(drop)))
    out = dict(example)
    for m in drop:
      out[m] = {name: np.zeros_like(value) for name, value in example[m].items()}
    return out
