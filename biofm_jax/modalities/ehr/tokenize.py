"""EHR tokenisation: one MEDS subject record -> the fixed-shape arrays named in `batch.py`
(CLS first, a window of at most `max_len - 1` events, padding with an explicit mask, and the
optional inputs a run asks for), and BERT-style masking of its event tokens.

`data.py` (the data module) builds these transforms and re-exports them.
"""
from __future__ import annotations

from typing import Any, Mapping

import grain
import numpy as np

from biofm_jax.data import batch
from biofm_jax.data.masking import bert_masking, check_masking_args
from biofm_jax.modalities.ehr.meds import US_PER_DAY
from biofm_jax.modalities.ehr.vocab import EHRVocab
from biofm_jax.modalities.ehr.windows import birth_time, static_room

WINDOWS = ("recent", "earliest")
# What a token sees of its value (`data.ehr.value_inputs`): its code's quantile bin, or also
# its quantile within the code's training values as a continuous input.
VALUE_INPUTS = {"bins": (), "bins+quantile": (batch.EHR_VALUE_QUANTILE,)}
# What a token sees of time (`data.ehr.time_inputs`): the age and the days since the window's
# first event, or also the days since the previous event.
TIME_INPUTS = {"age+offset": (), "age+offset+gap": (batch.EHR_GAP, batch.EHR_GAP_KNOWN)}
_RECORD_FIELDS = ("codes", "times", "numeric_values")


# ================================================================ tokenisation
def window_stats(event_counts: np.ndarray, max_len: int) -> dict[str, int]:
  """What windowing to `max_len - 1` events (CLS takes one slot) drops, as counts."""
  counts = np.asarray(event_counts, dtype=np.int64)
  dropped = np.maximum(counts - (max_len - 1), 0)
  return {"subjects": int(len(counts)), "events": int(counts.sum()),
          "subjects_truncated": int((dropped > 0).sum()), "events_dropped": int(dropped.sum())}


def input_fields(cfg: Any) -> tuple[str, ...]:
  """The optional input fields (`batch.EHR_OPTIONAL_INPUTS`) that `cfg` (= config.data.ehr,
  or its saved dict) asks for; runs saved before the options existed ask for none."""
  values, times = str(cfg.get("value_inputs", "bins")), str(cfg.get("time_inputs", "age+offset"))
  if values not in VALUE_INPUTS:
    raise ValueError(f"config.data.ehr.value_inputs is {values!r}, expected one of {sorted(VALUE_INPUTS)}")
  if times not in TIME_INPUTS:
    raise ValueError(f"config.data.ehr.time_inputs is {times!r}, expected one of {sorted(TIME_INPUTS)}")
  return VALUE_INPUTS[values] + TIME_INPUTS[times]


def _check_record(record: Mapping[str, Any]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  where = f"EHR record (subject_id {record.get('subject_id', '?')})"
  missing = [f for f in _RECORD_FIELDS if f not in record]
  if missing:
    raise ValueError(f"{where}: missing fields {missing}, expected {list(_RECORD_FIELDS)}")
  codes = np.asarray(record["codes"], dtype=object)
  times = np.asarray(record["times"]).astype("datetime64[us]")
  values = np.asarray(record["numeric_values"], dtype=np.float32)
  if not len(codes) == len(times) == len(values):
    raise ValueError(f"{where}: codes/times/numeric_values lengths {len(codes)}/"
                     f"{len(times)}/{len(values)} differ")
  return codes, times, values


def _window(times: np.ndarray, keep: int, window: str) -> np.ndarray:
  """Indices of the rows kept: static rows (demographics), at most half the window
  (`windows.static_room`), then the most recent (or the earliest) timed events that fit."""
  static = np.flatnonzero(np.isnat(times))[:static_room(keep + 1)]
  timed = np.flatnonzero(~np.isnat(times))
  room = keep - len(static)
  timed = timed[max(len(timed) - room, 0):] if window == "recent" else timed[:room]
  return np.concatenate([static, timed])


class TokenizeEHR(grain.transforms.Map):
  """Record -> `batch.EHR_INPUT_FIELDS`, each of shape (max_len,)."""

  def __init__(self, vocab: EHRVocab, max_len: int, window: str = "recent", inputs: tuple[str, ...] = ()):
    if max_len < 2:
      raise ValueError(f"TokenizeEHR: max_len {max_len} must be >= 2 (CLS plus one event)")
    if window not in WINDOWS:
      raise ValueError(f"TokenizeEHR: window {window!r}, expected one of {WINDOWS}")
    batch.ehr_example_spec(max_len, False, tuple(inputs))  # checks the names
    self.vocab, self.max_len, self.window, self.inputs = vocab, max_len, window, tuple(inputs)

  def map(self, record: Mapping[str, Any]) -> dict[str, np.ndarray]:
    return self.encode(record)[0]

  def encode(self, record: Mapping[str, Any]) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """(the example, the times of its events in token order: token i + 1 is event i)."""
    codes, times, values = _check_record(record)
    # From the whole record (a training window carries its record's): the window may cut it.
    birth = record.get("birth_time", birth_time(codes, times))
    birth = None if birth is None or np.isnat(birth) else birth
    kept = _window(times, self.max_len - 1, self.window)
    codes, times, values = codes[kept], times[kept], values[kept]
    out = {name: np.zeros(shape, dtype)
           for name, (shape, dtype) in batch.ehr_example_spec(self.max_len, False, self.inputs).items()}
    n, events = len(codes), slice(1, 1 + len(codes))
    out[batch.EHR_CODES][0] = batch.CLS_ID
    out[batch.EHR_MASK][: 1 + n] = True
    out[batch.EHR_CODES][events] = self.vocab.code_ids(codes)
    out[batch.EHR_VALUE_BINS][events] = self.vocab.value_bins(codes, values)
    if batch.EHR_VALUE_QUANTILE in out:
      out[batch.EHR_VALUE_QUANTILE][events] = np.where(out[batch.EHR_VALUE_BINS][events] != batch.NO_VALUE_BIN,
                                                       self.vocab.value_quantiles(codes, values), 0.0)
    timed = ~np.isnat(times)
    if batch.EHR_GAP in out and timed.sum() > 1:
      # Timed rows are in time order (static rows come first): each one's gap to the one before.
      at = 1 + np.flatnonzero(timed)[1:]
      out[batch.EHR_GAP][at] = np.diff(times[timed]).astype(np.int64) / US_PER_DAY
      out[batch.EHR_GAP_KNOWN][at] = True
    if timed.any():
      # From the window's first event, never its last: a position's input must not tell a
      # causal model how much history follows it.
      first = times[timed].min()
      offsets = (times[timed] - first).astype(np.int64) / US_PER_DAY
      out[batch.EHR_TIME][events][timed] = offsets
      out[batch.EHR_TIME_KNOWN][events] = timed
      if birth is not None:
        ages = (times[timed] - birth).astype(np.int64) / (US_PER_DAY * batch.DAYS_PER_YEAR)
        out[batch.EHR_AGE][events][timed] = ages
        out[batch.EHR_AGE_KNOWN][events] = timed
    return out, times


# ================================================================ masking
class MaskEHR(grain.transforms.RandomMap):
  """BERT-style masking of event tokens; adds `batch.EHR_TARGET_FIELDS`."""

  def __init__(self, vocab_size: int, mask_rate: float = 0.15):
    check_masking_args("MaskEHR", vocab_size, mask_rate)
    self.vocab_size, self.mask_rate = vocab_size, mask_rate

  def random_map(self, example: Mapping[str, np.ndarray],
                 rng: np.random.Generator) -> dict[str, np.ndarray]:
    codes = example[batch.EHR_CODES]
    # [UNK] is never a target: predicting "some rare code" teaches nothing and flatters accuracy.
    events = example[batch.EHR_MASK] & (codes != batch.CLS_ID) & (codes != batch.UNK_ID)
    selected, new_codes = bert_masking(codes, events, rng, mask_rate=self.mask_rate, vocab_size=self.vocab_size)
    new_bins = example[batch.EHR_VALUE_BINS].copy()
    new_bins[selected] = batch.NO_VALUE_BIN
    out = dict(example)
    if batch.EHR_VALUE_QUANTILE in example:  # a masked token's value is a target: hidden like its bin
      out[batch.EHR_VALUE_QUANTILE] = np.where(selected, 0.0, example[batch.EHR_VALUE_QUANTILE]).astype(np.float32)
    out[batch.EHR_CODES], out[batch.EHR_VALUE_BINS] = new_codes, new_bins
    out[batch.EHR_TARGET_CODES] = codes.copy()
    out[batch.EHR_TARGET_VALUE_BINS] = example[batch.EHR_VALUE_BINS].copy()
    out[batch.EHR_TARGET_MASK] = selected
    return out
