"""The EHR vocabulary: code -> token id, and per-code quantile edges for numeric values.

Built once from the training split (its records, or an event store's exact code counts
and value samples: `event_store.py`) and saved as human-readable JSON beside the
checkpoint, so a resumed or fine-tuned run maps codes exactly as pre-training did.
Codes below `min_count` become [UNK]; values become 1..num_value_bins, 0 for none, and,
for runs that feed it (`data.ehr.value_inputs`), their quantile among the code's training
values, read off `VALUE_QUANTILE_POINTS` stored quantiles per code by linear interpolation.
"""
from __future__ import annotations

import collections
import dataclasses
import functools
import os
from typing import Any, Iterable, Mapping

import numpy as np

from biofm_jax.data import artifacts, batch, object_state

VOCAB_FORMAT = "biofm_jax.ehr_vocab"
VOCAB_FORMAT_VERSION = 1
VOCAB_FILENAME = "ehr_vocab.json"
VALUE_QUANTILE_POINTS = 33  # the 0%, 3.125%, ..., 100% quantiles of each code's training values
_VOCAB_HEADER = {"format": VOCAB_FORMAT, "format_version": VOCAB_FORMAT_VERSION,
                 "special_tokens": list(batch.SPECIAL_TOKENS)}


# ================================================================ vocabulary
@object_state.storable
@dataclasses.dataclass(frozen=True)
class EHRVocab:
  """Codes seen at least `min_count` times in training, and their value-bin edges."""
  codes: tuple[str, ...]  # token id = len(batch.SPECIAL_TOKENS) + index
  value_bin_edges: dict[str, tuple[float, ...]]  # only codes with training values
  num_value_bins: int
  min_count: int
  num_rare_codes: int = 0  # distinct training codes below min_count (they map to UNK)
  # Per code with training values: VALUE_QUANTILE_POINTS quantiles, min to max (vocabularies
  # saved before they existed have none: `value_quantiles` then refuses).
  value_quantile_points: dict[str, tuple[float, ...]] = dataclasses.field(default_factory=dict)

  @classmethod
  def build(cls, records: Iterable[Mapping[str, Any]], *, min_count: int,
            num_value_bins: int) -> EHRVocab:
    """Counts codes and collects numeric values over `records` (the training split)."""
    if min_count < 1 or num_value_bins < 1:
      raise ValueError(f"EHRVocab.build: min_count ({min_count}) and num_value_bins "
                       f"({num_value_bins}) must be >= 1")
    counts: collections.Counter[str] = collections.Counter()
    valued_codes, valued_values = [], []
    for record in records:
      codes = np.asarray(record["codes"], dtype=object)
      values = np.asarray(record["numeric_values"], dtype=np.float32)
      unique, n = np.unique(codes, return_counts=True)
      counts.update(dict(zip(unique.tolist(), n.tolist())))
      has_value = np.isfinite(values)  # NaN means "no value"; inf would break quantiles
      valued_codes.append(codes[has_value])
      valued_values.append(values[has_value])
    return cls.from_counts(counts, _values_by_code(valued_codes, valued_values), min_count=min_count,
                           num_value_bins=num_value_bins)

  @classmethod
  def from_counts(cls, counts: Mapping[str, int], values: Mapping[str, np.ndarray], *, min_count: int,
                  num_value_bins: int) -> EHRVocab:
    """From training code counts and each code's finite training values (all of them, or a
    uniform sample: an event store's, `event_store.py`)."""
    if min_count < 1 or num_value_bins < 1:
      raise ValueError(f"EHRVocab.build: min_count ({min_count}) and num_value_bins "
                       f"({num_value_bins}) must be >= 1")
    counts = {c: n for c, n in counts.items() if n > 0}
    kept = sorted((c for c, n in counts.items() if n >= min_count), key=lambda c: (-counts[c], c))
    qs = np.linspace(0.0, 1.0, num_value_bins + 1)[1:-1]
    valued = [c for c in sorted(set(kept) & set(values)) if len(values[c])]
    edges = {c: tuple(float(x) for x in np.quantile(np.asarray(values[c], np.float64), qs)) for c in valued}
    grid = np.linspace(0.0, 1.0, VALUE_QUANTILE_POINTS)
    points = {c: tuple(float(x) for x in np.quantile(np.asarray(values[c], np.float64), grid)) for c in valued}
    return cls(codes=tuple(kept), value_bin_edges=edges, num_value_bins=num_value_bins,
               min_count=min_count, num_rare_codes=len(counts) - len(kept), value_quantile_points=points)

  @property
  def size(self) -> int:
    return batch.NUM_SPECIAL + len(self.codes)

  @functools.cached_property
  def _ids(self) -> dict[str, int]:
    return {code: batch.NUM_SPECIAL + i for i, code in enumerate(self.codes)}

  @functools.cached_property
  def _edge_arrays(self) -> dict[str, np.ndarray]:
    return {c: np.asarray(e, dtype=np.float64) for c, e in self.value_bin_edges.items()}

  def code_ids(self, codes: np.ndarray) -> np.ndarray:
    """int32 token ids; UNK_ID for codes not in the vocabulary."""
    ids = self._ids
    return np.fromiter((ids.get(c, batch.UNK_ID) for c in codes), dtype=np.int32,
                       count=len(codes))

  def value_bins(self, codes: np.ndarray, values: np.ndarray) -> np.ndarray:
    """int32 bins 1..num_value_bins; NO_VALUE_BIN where NaN or the code has no edges."""
    values = np.asarray(values, dtype=np.float64)
    bins = np.full(len(values), batch.NO_VALUE_BIN, dtype=np.int32)
    has_value = ~np.isnan(values)
    if not has_value.any():
      return bins
    codes = np.asarray(codes, dtype=object)
    for code in np.unique(codes[has_value]).tolist():
      edges = self._edge_arrays.get(code)
      if edges is None:
        continue
      at = has_value & (codes == code)
      bins[at] = 1 + np.searchsorted(edges, values[at], side="right")
    return bins

  def value_quantiles(self, codes: np.ndarray, values: np.ndarray) -> np.ndarray:
    """float32 in [0, 1]: each value's quantile among its code's training values (linear
    between the stored quantiles, clipped at the ends); 0 where NaN or the code has none."""
    if self.value_bin_edges and not self.value_quantile_points:
      raise ValueError("EHR vocabulary: saved before value quantiles were stored, so it cannot give them "
                       "(data.ehr.value_inputs); pre-train a new run")
    values = np.asarray(values, dtype=np.float64)
    out = np.zeros(len(values), np.float32)
    has_value = ~np.isnan(values)
    codes = np.asarray(codes, dtype=object)
    grid = np.linspace(0.0, 1.0, VALUE_QUANTILE_POINTS)
    for code in np.unique(codes[has_value]).tolist():
      points = self._quantile_arrays.get(code)
      if points is None:
        continue
      at = has_value & (codes == code)
      # Tied quantiles (a value repeated across many rows) take their middle rank.
      from_below = np.interp(values[at], points, grid)
      from_above = 1.0 - np.interp(-values[at], -points[::-1], grid)
      out[at] = 0.5 * (from_below + from_above)
    return out

  @functools.cached_property
  def _quantile_arrays(self) -> dict[str, np.ndarray]:
    return {c: np.asarray(p, dtype=np.float64) for c, p in self.value_quantile_points.items()}

  def save(self, path: str | os.PathLike) -> None:
    """Writes human-readable JSON atomically (`data/artifacts.py`)."""
    artifacts.write_json(path, _VOCAB_HEADER, {
        "min_count": self.min_count, "num_value_bins": self.num_value_bins, "num_rare_codes": self.num_rare_codes,
        "codes": list(self.codes), "value_bin_edges": {c: list(e) for c, e in self.value_bin_edges.items()},
        "value_quantile_points": {c: list(p) for c, p in self.value_quantile_points.items()}})

  @classmethod
  def load(cls, path: str | os.PathLike) -> EHRVocab:
    payload = artifacts.read_json(path, _VOCAB_HEADER, "EHR vocabulary")
    try:
      return cls(codes=tuple(payload["codes"]),
                 value_bin_edges={c: tuple(float(x) for x in e)
                                  for c, e in payload["value_bin_edges"].items()},
                 num_value_bins=int(payload["num_value_bins"]),
                 min_count=int(payload["min_count"]),
                 num_rare_codes=int(payload.get("num_rare_codes", 0)),
                 value_quantile_points={c: tuple(float(x) for x in p)
                                        for c, p in payload.get("value_quantile_points", {}).items()})
    except (KeyError, TypeError, ValueError) as e:
      raise ValueError(f"EHR vocabulary {path}: missing or malformed field ({e!r})") from e


def _values_by_code(code_chunks: list[np.ndarray], value_chunks: list[np.ndarray]) -> dict[str, np.ndarray]:
  """Each code's values, grouped with one sort instead of a Python dict of lists."""
  codes = np.concatenate(code_chunks) if code_chunks else np.empty(0, object)
  if not len(codes):
    return {}
  values = np.concatenate(value_chunks).astype(np.float64)
  order = np.argsort(codes, kind="stable")
  codes, values = codes[order], values[order]
  starts = np.flatnonzero(np.r_[True, codes[1:] != codes[:-1]])
  ends = np.r_[starts[1:], len(codes)]
  return {codes[s]: values[s:e] for s, e in zip(starts.tolist(), ends.tolist())}
