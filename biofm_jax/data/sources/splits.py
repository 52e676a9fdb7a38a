"""Deterministic train/tuning/held_out assignment of subjects, shared by every modality.

This module owns the one hash that decides a subject's split when a dataset does not say
it: a subject's split depends only on its id and the seed, never on file order, sharding
or which other subjects are present. Every source (EHR, imaging, ...) uses it, so one
subject lands in the same split in every modality and a multimodal model never trains on
a subject that another modality holds out.

Ids may be integers or strings. A string that spells an int64 in canonical decimal form
("42", "-7", not "042" or "+42") hashes as that integer, so subject "42" of an imaging
manifest and subject 42 of a MEDS dataset share a split. Other strings are hashed with
blake2b of their UTF-8 bytes (never Python's per-process salted `hash()`).
"""
from __future__ import annotations

import hashlib
from typing import Sequence

import meds
import numpy as np

STANDARD_SPLITS = (meds.train_split, meds.tuning_split, meds.held_out_split)

_INT64_MIN, _INT64_MAX = -2**63, 2**63 - 1


def ordered(names) -> list[str]:
  """Split names in the one order every source lists them: the standard splits first, in
  their order, then any others alphabetically."""
  names = set(names)
  return [s for s in STANDARD_SPLITS if s in names] + sorted(names - set(STANDARD_SPLITS))


def splitmix64(x: np.ndarray) -> np.ndarray:
  """The splitmix64 finaliser: a fixed, well-mixed hash of uint64 values."""
  x = x + np.uint64(0x9E3779B97F4A7C15)
  x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
  x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
  return x ^ (x >> np.uint64(31))


def _canonical_int(text: str) -> int | None:
  """The int64 that `text` spells in canonical decimal form, else None."""
  body = text[1:] if text.startswith("-") else text
  if not body.isascii() or not body.isdigit() or (len(body) > 1 and body[0] == "0"):
    return None
  value = int(text)
  if value == 0 and text.startswith("-"):  # "-0" is not how 0 is written
    return None
  return value if _INT64_MIN <= value <= _INT64_MAX else None


def _string_key(text: str) -> int:
  """A uint64 key for a string id: its integer value when it spells one, else blake2b."""
  value = _canonical_int(text)
  if value is not None:
    return value % 2**64  # two's complement, as int64.view(uint64) gives for integer ids
  digest = hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest()
  return int.from_bytes(digest, "little")


def subject_keys(subject_ids: Sequence | np.ndarray) -> np.ndarray:
  """uint64 keys of integer or string ids (see the module docstring for strings)."""
  ids = np.asarray(subject_ids)
  if ids.size == 0:
    return np.zeros(ids.shape, np.uint64)
  if ids.dtype.kind in "iu":
    return np.ascontiguousarray(ids, np.int64).view(np.uint64)
  keys = np.empty(ids.shape, np.uint64)
  for position, value in enumerate(ids.ravel().tolist()):
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
      keys.flat[position] = int(value) % 2**64
    elif isinstance(value, str):
      keys.flat[position] = _string_key(value)
    else:
      raise ValueError(f"subject id {value!r} at position {position} has type "
                       f"{type(value).__name__}; expected an int or a str")
  return keys


def _check_fractions(fractions: Sequence[float]) -> tuple[float, float, float]:
  fractions = tuple(float(f) for f in fractions)
  if len(fractions) != 3 or min(fractions) < 0 or abs(sum(fractions) - 1) > 1e-6:
    raise ValueError(f"fallback_fractions {fractions}: expected 3 non-negative fractions "
                     f"for {list(STANDARD_SPLITS)} summing to 1")
  return fractions  # type: ignore[return-value]


def hash_split_buckets(subject_ids: Sequence | np.ndarray,
                       fractions: Sequence[float] = (0.8, 0.1, 0.1),
                       seed: int = 0) -> np.ndarray:
  """Per id, the index into STANDARD_SPLITS of its split (int64, same shape as the ids).

  u = (splitmix64(key XOR splitmix64(uint64(seed))) >> 11) / 2**53 is a uniform number in
  [0, 1) per subject; the subject goes to train if u < f_train, to tuning if
  u < f_train + f_tuning, else to held_out.
  """
  fractions = _check_fractions(fractions)
  keys = subject_keys(subject_ids)
  seed_hash = splitmix64(np.array([seed % 2**64], np.uint64))[0]
  unit = (splitmix64(keys ^ seed_hash) >> np.uint64(11)) * 2.0**-53
  return np.searchsorted(np.cumsum(fractions[:2]), unit, side="right").astype(np.int64)


def hash_splits(subject_ids: Sequence | np.ndarray, fractions: Sequence[float] = (0.8, 0.1, 0.1),
                seed: int = 0) -> dict[str, np.ndarray]:
  """Split name -> the sorted ids assigned to it by `hash_split_buckets`.

  Integer ids come back as int64, string ids as an object array of str.
  """
  ids = np.asarray(subject_ids)
  buckets = hash_split_buckets(ids, fractions, seed)
  if ids.dtype.kind in "iu" or ids.size == 0:
    ids = np.ascontiguousarray(ids, np.int64)
  else:
    ids = ids.astype(object)
  return {name: np.sort(ids[buckets == i]) for i, name in enumerate(STANDARD_SPLITS)}
