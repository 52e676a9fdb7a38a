"""The batch contract between data and models.

A batch is a dict keyed by modality name ("ehr", later "imaging", "omics", ...); each
value is a dict of fixed-shape numpy arrays whose leading axis is the batch. Variable
length is expressed by padding plus an explicit boolean mask, never by ragged arrays,
so every shape is static inside `jax.jit`.

This module is the only place that names the fields, so data modules and model encoders
agree without importing each other.
"""
from __future__ import annotations

from typing import Mapping

import numpy as np

# ---------------------------------------------------------------- EHR token ids
# Special tokens occupy the first ids of every EHR vocabulary.
PAD_ID = 0
UNK_ID = 1
MASK_ID = 2
CLS_ID = 3
SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[MASK]", "[CLS]")

# Value-bin ids: 0 means "this event has no numeric value"; 1..num_bins are quantile bins.
NO_VALUE_BIN = 0

# ---------------------------------------------------------------- EHR fields
# Inputs, [batch, length] each.
EHR_CODES = "codes"  # int32 token ids; PAD_ID past the end, MASK_ID where masked
EHR_VALUE_BINS = "value_bins"  # int32 quantile-bin ids, NO_VALUE_BIN where no value
EHR_AGE = "age_years"  # float32 age at the event; 0 where unknown (see EHR_AGE_KNOWN)
EHR_AGE_KNOWN = "age_known"  # bool: the subject has a birth event and the event a time
EHR_TIME = "time_days"  # float32 days from the window's last timed event (<= 0)
EHR_TIME_KNOWN = "time_known"  # bool: False for static events (null time) and padding
EHR_MASK = "mask"  # bool: a real token (CLS or event), False for padding
# Masked-modelling targets, added by the masking transform, [batch, length] each.
EHR_TARGET_CODES = "target_codes"  # int32 original code ids
EHR_TARGET_VALUE_BINS = "target_value_bins"  # int32 original value bins
EHR_TARGET_MASK = "target_mask"  # bool: positions that were masked and enter the loss

EHR_INPUT_FIELDS = (EHR_CODES, EHR_VALUE_BINS, EHR_AGE, EHR_AGE_KNOWN, EHR_TIME,
                    EHR_TIME_KNOWN, EHR_MASK)
EHR_TARGET_FIELDS = (EHR_TARGET_CODES, EHR_TARGET_VALUE_BINS, EHR_TARGET_MASK)

EHR_DTYPES = {
    EHR_CODES: np.int32, EHR_VALUE_BINS: np.int32, EHR_AGE: np.float32,
    EHR_AGE_KNOWN: np.bool_, EHR_TIME: np.float32, EHR_TIME_KNOWN: np.bool_,
    EHR_MASK: np.bool_, EHR_TARGET_CODES: np.int32, EHR_TARGET_VALUE_BINS: np.int32,
    EHR_TARGET_MASK: np.bool_,
}


def ehr_example_spec(max_len: int, with_targets: bool) -> dict[str, tuple[tuple[int, ...], type]]:
  """Shape and dtype of one EHR example (no batch axis)."""
  fields = EHR_INPUT_FIELDS + (EHR_TARGET_FIELDS if with_targets else ())
  return {name: ((max_len,), EHR_DTYPES[name]) for name in fields}


def check_example(example: Mapping[str, np.ndarray],
                  spec: Mapping[str, tuple[tuple[int, ...], type]], where: str) -> None:
  """Raises ValueError naming the field when `example` does not match `spec`."""
  missing = sorted(set(spec) - set(example))
  if missing:
    raise ValueError(f"{where}: missing fields {missing}")
  for name, (shape, dtype) in spec.items():
    value = np.asarray(example[name])
    if value.shape != shape or value.dtype != np.dtype(dtype):
      raise ValueError(f"{where}: field {name!r} is {value.dtype}{list(value.shape)}, "
                       f"expected {np.dtype(dtype)}{list(shape)}")
