"""The join index of a multimodal dataset: which records of which modality belong to
each subject of each split.

`join_subjects` is a pure function of each modality's subject ids per split (no record is
read; ids compare as str, so MEDS 42 is "42"). A split holds the union of its
modalities' subjects (or only those with every `require`d modality); a subject keeps all
its records of a modality (several images, several cells). It counts what a user should
know (subjects per modality and availability pattern, subjects in one source only, with
several records, dropped by `require`) and refuses a subject placed in different splits
by different modalities, which would leak between training and evaluation.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Sequence

import numpy as np

from biofm_jax.data.sources.splits import STANDARD_SPLITS

TRAIN_SPLIT = STANDARD_SPLITS[0]


def normalize_ids(ids: Any, where: str) -> np.ndarray:
  """str [n] subject ids: integers in decimal (MEDS 42 -> "42"), others as str()."""
  array = np.asarray(ids)
  if array.dtype.kind in "US":
    return array.astype(str)
  if array.dtype.kind == "f":
    if not np.all(np.isfinite(array) & (array == np.round(array))):
      raise ValueError(f"{where}: subject ids are non-integer floats; expected integer or "
                       "string ids")
    array = array.astype(np.int64)
  if array.dtype.kind in "iu":
    return array.astype(str)
  return np.array([str(int(x)) if isinstance(x, (int, np.integer)) else str(x)
                   for x in array.reshape(-1)], dtype=str)


@dataclasses.dataclass(frozen=True)
class SplitJoin:
  """The joined subjects of one split, sorted by id. Subject i's records of modality m are
  `records[m][offsets[m][i]:offsets[m][i + 1]]` (source order; empty = absent)."""
  subject_ids: np.ndarray  # str [S]
  offsets: dict[str, np.ndarray]  # int64 [S + 1] per modality
  records: dict[str, np.ndarray]  # int64 record indices into that modality's source

  def __len__(self) -> int:
    return len(self.subject_ids)

  def record_counts(self, modality: str) -> np.ndarray:
    return np.diff(self.offsets[modality])

  def patterns(self) -> np.ndarray:
    """int64 [S] bitmask of present modalities, bit j = j-th modality in sorted order."""
    out = np.zeros(len(self), np.int64)
    for bit, m in enumerate(sorted(self.offsets)):
      out |= (self.record_counts(m) > 0).astype(np.int64) << bit
    return out


@dataclasses.dataclass(frozen=True)
class JoinIndex:
  modalities: tuple[str, ...]
  splits: dict[str, SplitJoin]
  counts: dict[str, int]  # flat, "<split>_<count>": for summary() and the logs


def _group(ids: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
  """Sorted unique ids, where each starts in `order` and its count, and `order` (stable)."""
  order = np.argsort(ids, kind="stable")
  unique, starts, counts = np.unique(ids[order], return_index=True, return_counts=True)
  return unique, starts, counts, order


def _records_of(subjects: np.ndarray, grouped: tuple) -> tuple[np.ndarray, np.ndarray]:
  """offsets [S + 1] and record indices of `subjects` in one modality's grouped ids."""
  unique, starts, counts, order = grouped
  if not len(unique):
    return np.zeros(len(subjects) + 1, np.int64), np.zeros(0, np.int64)
  pos = np.minimum(np.searchsorted(unique, subjects), len(unique) - 1)
  has = unique[pos] == subjects
  n = np.where(has, counts[pos], 0).astype(np.int64)
  offsets = np.concatenate([[0], np.cumsum(n)]).astype(np.int64)
  take = np.repeat(np.where(has, starts[pos], 0) - offsets[:-1], n) + np.arange(offsets[-1])
  return offsets, order[take].astype(np.int64)


def _check_split_conflicts(grouped: Mapping[str, Mapping[str, tuple]]) -> None:
  """A subject in two splits (in one modality or across two) leaks into evaluation."""
  by_split: dict[str, dict[str, np.ndarray]] = {}
  for m, splits in grouped.items():
    for s, g in splits.items():
      by_split.setdefault(s, {})[m] = g[0]
  unions = {s: np.unique(np.concatenate(list(by_m.values()))) for s, by_m in by_split.items()}
  names, problems = list(by_split), []
  for i, s in enumerate(names):
    for t in names[i + 1:]:
      common = np.intersect1d(unions[s], unions[t], assume_unique=True)
      if len(common):
        in_s = [m for m, ids in by_split[s].items() if np.isin(common, ids).any()]
        in_t = [m for m, ids in by_split[t].items() if np.isin(common, ids).any()]
        problems.append(f"{len(common)} subject(s) in split {s!r} (in {', '.join(in_s)}) and "
                        f"in split {t!r} (in {', '.join(in_t)}), e.g. subject {str(common[0])!r}")
  if problems:
    raise ValueError("multimodal join: " + "; ".join(problems) + "; a subject must stay in one "
                     "split in every modality (fix the split columns or files)")


def _split_counts(split: str, join: SplitJoin, dropped: int) -> dict[str, int]:
  modalities = sorted(join.offsets)
  patterns = join.patterns()
  present = np.stack([join.record_counts(m) > 0 for m in modalities]) if len(join) else None
  out = {f"{split}_subjects": len(join), f"{split}_dropped_by_require": int(dropped),
         f"{split}_only_one_modality": int((present.sum(0) == 1).sum()) if len(join) else 0}
  for m in modalities:
    counts = join.record_counts(m)
    out[f"{split}_subjects_{m}"] = int((counts > 0).sum())
    out[f"{split}_records_{m}"] = int(counts.sum())
    out[f"{split}_several_records_{m}"] = int((counts > 1).sum())
  for mask, n in zip(*np.unique(patterns, return_counts=True)):
    name = "+".join(m for bit, m in enumerate(modalities) if int(mask) >> bit & 1)
    out[f"{split}_pattern_{name}"] = int(n)
  return out


def join_subjects(ids: Mapping[str, Mapping[str, Any]], *, require: Sequence[str] = (),
                  withhold: Sequence[str] = (), train_split: str = TRAIN_SPLIT) -> JoinIndex:
  """The join of `ids[modality][split]` (subject id per record, in source order).

  `withhold`: modalities joined as if no subject had them (an ablation: the model is given
  the others only); a subject left with none of the rest is not joined.

  Errors: a modality without training records, an unknown `require`d or withheld modality,
  a modality both required and withheld, every modality withheld, a subject in different
  splits, or no training subject left by `require`.
  """
  modalities = tuple(sorted(ids))
  if not modalities:
    raise ValueError("multimodal join: no modalities to join")
  for name, names in (("require", require), ("withhold", withhold)):
    unknown = sorted(set(names) - set(modalities))
    if unknown:
      raise ValueError(f"multimodal join: {name} names {unknown}, expected modalities among "
                       f"{list(modalities)}")
  if set(require) & set(withhold) or set(withhold) == set(modalities):
    raise ValueError(f"multimodal join: withhold {sorted(withhold)} with require {sorted(require)}; "
                     f"a modality cannot be both, and at least one of {list(modalities)} must be given")
  grouped = {m: {s: _group(normalize_ids([] if m in withhold else v, f"multimodal join: {m} split {s!r}"))
                 for s, v in ids[m].items()} for m in modalities}
  for m in (m for m in modalities if m not in withhold):
    if train_split not in grouped[m] or not len(grouped[m][train_split][0]):
      raise ValueError(f"multimodal join: modality {m!r} has no records in the {train_split!r} "
                       "split; every configured modality needs training data (check its path "
                       "and split column, or remove it from the config)")
  _check_split_conflicts(grouped)
  split_names = list(dict.fromkeys(s for m in modalities for s in ids[m]))
  splits, counts = {}, {}
  for s in split_names:
    here = {m: grouped[m][s] for m in modalities if s in grouped[m]}
    union = np.unique(np.concatenate([g[0] for g in here.values()]))
    keep = np.ones(len(union), bool)
    for r in require:
      keep &= np.isin(union, here[r][0]) if r in here else False
    subjects = union[keep]
    empty = (np.zeros(0, str),) + (np.zeros(0, np.int64),) * 3
    parts = {m: _records_of(subjects, here.get(m, empty)) for m in modalities}
    splits[s] = SplitJoin(subjects, {m: p[0] for m, p in parts.items()},
                          {m: p[1] for m, p in parts.items()})
    counts.update(_split_counts(s, splits[s], int((~keep).sum())))
  if not len(splits[train_split]):
    raise ValueError(f"multimodal join: no subject of the {train_split!r} split has every "
                     f"required modality {list(require)}")
  return JoinIndex(modalities, splits, counts)
