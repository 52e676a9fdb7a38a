"""The batch contract between data and models.

A batch is a dict keyed by modality name ("ehr", later "imaging", "omics", ...); each
value is a dict of fixed-shape numpy arrays whose leading axis is the batch. Variable
length is expressed by padding plus an explicit boolean mask, never by ragged arrays,
so every shape is static inside `jax.jit`.

This module names the fields modalities share (a modality added in its own folder names its
own there, e.g. `modalities/ecg/data.py`), so data modules and model encoders agree without
importing each other.
"""
from __future__ import annotations

from typing import Mapping

import numpy as np

# Every example that can be padding (images, table rows, task targets, ECGs) says so here.
VALID = "valid"  # bool []: a real example; False for the eval pipeline's padding examples

# ---------------------------------------------------------------- EHR token ids
# Special tokens occupy the first ids of every EHR vocabulary.
PAD_ID = 0
UNK_ID = 1
MASK_ID = 2
CLS_ID = 3
SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[MASK]", "[CLS]")
NUM_SPECIAL = len(SPECIAL_TOKENS)  # the first real token's id in every token vocabulary

# Value-bin ids: 0 means "this event has no numeric value"; 1..num_bins are quantile bins.
NO_VALUE_BIN = 0

# ---------------------------------------------------------------- EHR fields
# Inputs, [batch, length] each.
EHR_CODES = "codes"  # int32 token ids; PAD_ID past the end, MASK_ID where masked
EHR_VALUE_BINS = "value_bins"  # int32 quantile-bin ids, NO_VALUE_BIN where no value
EHR_AGE = "age_years"  # float32 age at the event; 0 where unknown (see EHR_AGE_KNOWN)
DAYS_PER_YEAR = 365.25  # the year of EHR_AGE (and of every days -> years conversion)
EHR_AGE_KNOWN = "age_known"  # bool: the subject has a birth event and the event a time
EHR_TIME = "time_days"  # float32 days since the window's first timed event (>= 0)
EHR_TIME_KNOWN = "time_known"  # bool: False for static events (null time) and padding
EHR_MASK = "mask"  # bool: a real token (CLS or event), False for padding
# Optional inputs, present only in runs that ask for them (`data.ehr.value_inputs` and
# `data.ehr.time_inputs`, `modalities/ehr/data.py`):
EHR_VALUE_QUANTILE = "value_quantile"  # float32: the value's quantile among its code's training values, in [0, 1]
#                                        (0 where the event has no value bin: no value, or masked)
EHR_GAP = "gap_days"  # float32: days since the example's previous timed event; 0 where unknown
EHR_GAP_KNOWN = "gap_known"  # bool: the event and an earlier one of the example have times
EHR_OPTIONAL_INPUTS = (EHR_VALUE_QUANTILE, EHR_GAP, EHR_GAP_KNOWN)
# Packed rows (`data/packing.py`): several examples share one row of max_len tokens.
# int32 [length]: 1, 2, ... for the row's examples in order, 0 for padding. Attention never
# crosses a segment, positions restart at each, and next-event targets never cross a
# boundary. Present only when packing is on (then unpacked examples carry one segment).
SEGMENT_IDS = "segment_ids"
# Masked-modelling targets, added by the masking transform, [batch, length] each.
EHR_TARGET_CODES = "target_codes"  # int32 original code ids
EHR_TARGET_VALUE_BINS = "target_value_bins"  # int32 original value bins
EHR_TARGET_MASK = "target_mask"  # bool: positions that were masked and enter the loss

# Time-to-event targets (`objectives/motor.py`), added by the EHR time-to-event
# transform. Per token, [length]:
TTE_PREDICT = "tte_predict"  # bool: the token is a prediction point
TTE_FOLLOWUP_DAYS = "tte_followup_days"  # float32: days a point's follow-up lasts (every task
#                                          without an event is censored there)
# A list of first occurrences, [tte_events] (`packing.TTE_EVENTS` packs it by its mask):
TTE_EVENT_POS = "tte_event_pos"  # int32: the prediction point's token position
TTE_EVENT_TASK = "tte_event_task"  # int32: the task (0..K-1)
TTE_EVENT_DAYS = "tte_event_days"  # float32: days from the point to the task's first occurrence (> 0)
TTE_EVENT_MASK = "tte_event_mask"  # bool: a real entry

EHR_INPUT_FIELDS = (EHR_CODES, EHR_VALUE_BINS, EHR_AGE, EHR_AGE_KNOWN, EHR_TIME,
                    EHR_TIME_KNOWN, EHR_MASK)
EHR_TARGET_FIELDS = (EHR_TARGET_CODES, EHR_TARGET_VALUE_BINS, EHR_TARGET_MASK)

EHR_DTYPES = {
    EHR_CODES: np.int32, EHR_VALUE_BINS: np.int32, EHR_AGE: np.float32,
    EHR_AGE_KNOWN: np.bool_, EHR_TIME: np.float32, EHR_TIME_KNOWN: np.bool_,
    EHR_MASK: np.bool_, EHR_TARGET_CODES: np.int32, EHR_TARGET_VALUE_BINS: np.int32,
    EHR_TARGET_MASK: np.bool_, EHR_VALUE_QUANTILE: np.float32, EHR_GAP: np.float32, EHR_GAP_KNOWN: np.bool_,
}


def ehr_example_spec(max_len: int, with_targets: bool,
                     inputs: tuple[str, ...] = ()) -> dict[str, tuple[tuple[int, ...], type]]:
  """Shape and dtype of one EHR example (no batch axis); `inputs`: the optional inputs it
  carries (of EHR_OPTIONAL_INPUTS)."""
  unknown = sorted(set(inputs) - set(EHR_OPTIONAL_INPUTS))
  if unknown:
    raise ValueError(f"EHR example: unknown optional inputs {unknown}, expected some of {EHR_OPTIONAL_INPUTS}")
  fields = EHR_INPUT_FIELDS + tuple(inputs) + (EHR_TARGET_FIELDS if with_targets else ())
  return {name: ((max_len,), EHR_DTYPES[name]) for name in fields}


def tte_example_spec(max_len: int, events: int) -> dict[str, tuple[tuple[int, ...], type]]:
  """The time-to-event target fields of one example: per token, and `events` list entries."""
  return {TTE_PREDICT: ((max_len,), np.bool_), TTE_FOLLOWUP_DAYS: ((max_len,), np.float32),
          TTE_EVENT_POS: ((events,), np.int32), TTE_EVENT_TASK: ((events,), np.int32),
          TTE_EVENT_DAYS: ((events,), np.float32), TTE_EVENT_MASK: ((events,), np.bool_)}


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


# ---------------------------------------------------------------- imaging fields
# Images are channels-last float32 arrays of a fixed spatial shape from the config:
# [H, W, C] for 2D, [D, H, W, C] for 3D (D = slices). Masked-autoencoder pre-training
# splits the spatial shape into patches numbered in row-major order over the patch grid.
IMAGE = "image"  # float32 [*spatial, channels], normalised intensities
IMAGE_VISIBLE = "visible_patches"  # int32 [num_visible]: patch ids the encoder sees (MAE)
IMAGE_MASKED = "masked_patches"  # int32 [num_masked]: patch ids to reconstruct (MAE)


def num_patches(image_shape: tuple[int, ...], patch_shape: tuple[int, ...]) -> int:
  """Patches in the grid; every spatial size must be a multiple of the patch size."""
  if len(image_shape) != len(patch_shape):
    raise ValueError(f"image shape {image_shape} and patch shape {patch_shape} differ in rank")
  for size, patch in zip(image_shape, patch_shape):
    if size % patch:
      raise ValueError(f"image size {size} is not a multiple of the patch size {patch} "
                       f"(image {image_shape}, patch {patch_shape})")
  return int(np.prod([s // p for s, p in zip(image_shape, patch_shape)]))


def num_visible_patches(total: int, mask_ratio: float) -> int:
  """Patches left visible by MAE masking: at least one, and at least one masked."""
  return int(min(max(round(total * (1.0 - mask_ratio)), 1), total - 1))


def imaging_example_spec(image_shape: tuple[int, ...], channels: int, patch_shape: tuple[int, ...],
                         mask_ratio: float | None) -> dict[str, tuple[tuple[int, ...], type]]:
  """Shape and dtype of one imaging example; MAE patch ids when `mask_ratio` is given."""
  spec = {IMAGE: (tuple(image_shape) + (channels,), np.float32), VALID: ((), np.bool_)}
  if mask_ratio is not None:
    total = num_patches(tuple(image_shape), tuple(patch_shape))
    visible = num_visible_patches(total, mask_ratio)
    spec[IMAGE_VISIBLE] = ((visible,), np.int32)
    spec[IMAGE_MASKED] = ((total - visible,), np.int32)
  return spec


# ---------------------------------------------------------------- tabular fields
# Imaging-derived features (radiomics, cell morphology) and other tables: one token per
# column. Numeric columns are standardised with training-split statistics; categorical
# columns hold ids into one shared category vocabulary (0 = missing or unseen).
TABULAR_VALUES = "values"  # float32 [num_numeric]: standardised values, 0 where missing or masked
TABULAR_MISSING = "missing"  # bool [num_numeric]: the value is missing (NaN or empty) in the source
TABULAR_CATEGORIES = "categories"  # int32 [num_categorical]: category ids, 0 where missing or masked
# Masked-feature modelling, added by the masking transform.
TABULAR_VALUE_MASK = "value_mask"  # bool [num_numeric]: hidden from the model, to reconstruct
TABULAR_TARGET_VALUES = "target_values"  # float32 [num_numeric]: the standardised values hidden
TABULAR_CATEGORY_MASK = "category_mask"  # bool [num_categorical]
TABULAR_TARGET_CATEGORIES = "target_categories"  # int32 [num_categorical]


def tabular_example_spec(num_numeric: int, num_categorical: int,
                         with_targets: bool) -> dict[str, tuple[tuple[int, ...], type]]:
  spec = {VALID: ((), np.bool_), TABULAR_VALUES: ((num_numeric,), np.float32),
          TABULAR_MISSING: ((num_numeric,), np.bool_), TABULAR_CATEGORIES: ((num_categorical,), np.int32)}
  if with_targets:
    spec.update({TABULAR_VALUE_MASK: ((num_numeric,), np.bool_),
                 TABULAR_TARGET_VALUES: ((num_numeric,), np.float32),
                 TABULAR_CATEGORY_MASK: ((num_categorical,), np.bool_),
                 TABULAR_TARGET_CATEGORIES: ((num_categorical,), np.int32)})
  return spec


# ---------------------------------------------------------------- token sequences
# Gene-expression profiles and biological sequences are token sequences like EHR
# timelines and share their field names (and special token ids), so one masked objective
# serves all of them. Expression in scGPT style carries a value bin per gene token;
# rank-ordered expression (Geneformer) and DNA / protein sequences carry tokens only.
TOKENS, TOKEN_VALUE_BINS, TOKEN_MASK = EHR_CODES, EHR_VALUE_BINS, EHR_MASK
TARGET_TOKENS, TARGET_VALUE_BINS, TARGET_MASK = EHR_TARGET_CODES, EHR_TARGET_VALUE_BINS, EHR_TARGET_MASK


def token_sequence_spec(max_len: int, *, with_values: bool,
                        with_targets: bool) -> dict[str, tuple[tuple[int, ...], type]]:
  """One example of a non-EHR token sequence; values and targets only when asked for."""
  fields = [TOKENS, TOKEN_MASK] + ([TOKEN_VALUE_BINS] if with_values else [])
  if with_targets:
    fields += [TARGET_TOKENS, TARGET_MASK] + ([TARGET_VALUE_BINS] if with_values else [])
  return {name: ((max_len,), EHR_DTYPES[name]) for name in fields}


def token_slots(host_batch: Mapping[str, Mapping[str, np.ndarray]]) -> tuple[int, int]:
  """(real tokens, token slots) of a batch's token sequences (modalities with TOKEN_MASK):
  what padding costs. Modalities without a token mask (images, tables) are not counted."""
  real = slots = 0
  for fields in host_batch.values():
    mask = fields.get(TOKEN_MASK) if isinstance(fields, Mapping) else None
    if mask is not None:
      real, slots = real + int(np.count_nonzero(mask)), slots + int(np.size(mask))
  return real, slots


# ---------------------------------------------------------------- multimodal examples
# A multimodal batch holds one sub-dict per configured modality, each with that
# modality's fields (above) plus PRESENT. A subject without a modality (or whose modality
# was dropped by modality dropout) carries that modality's all-padding example: zeros and
# False everywhere, so its per-modality loss counts are zero, and PRESENT False, so no
# model reads it.
PRESENT = "present"  # bool []: this subject has this modality in this example


def with_presence(spec: Mapping[str, tuple[tuple[int, ...], type]]) -> dict[str, tuple[tuple[int, ...], type]]:
  """A modality's example spec plus its PRESENT flag, as it appears in a multimodal batch."""
  return {**spec, PRESENT: ((), np.bool_)}


def padding_example(spec: Mapping[str, tuple[tuple[int, ...], type]]) -> dict[str, np.ndarray]:
  """The all-padding example of `spec`: zeros and False, which carry no loss weight."""
  return {name: np.zeros(shape, dtype) for name, (shape, dtype) in spec.items()}


# ---------------------------------------------------------------- downstream task targets
# Fine-tuning batches carry one more sub-dict, TASK, beside the modalities: the label of
# each example (see `data/labels.py`). Padding examples have VALID False.
TASK = "task"
TASK_LABEL = "label"  # binary, regression: float32 []; multiclass: int32 []; multilabel: float32 [K]
TASK_TIME = "time"  # survival: float32 [] days from the prediction time to the event or censoring
TASK_EVENT = "event"  # survival: bool [] the event was observed (False: censored at TASK_TIME)
TASK_TYPES = ("binary", "multiclass", "multilabel", "regression", "survival")


def task_example_spec(task_type: str, num_labels: int = 1) -> dict[str, tuple[tuple[int, ...], type]]:
  """Shape and dtype of one example's targets; `num_labels` is K for multilabel tasks."""
  spec: dict[str, tuple[tuple[int, ...], type]] = {VALID: ((), np.bool_)}
  if task_type == "survival":
    spec.update({TASK_TIME: ((), np.float32), TASK_EVENT: ((), np.bool_)})
  elif task_type == "multiclass":
    spec[TASK_LABEL] = ((), np.int32)
  elif task_type == "multilabel":
    spec[TASK_LABEL] = ((num_labels,), np.float32)
  elif task_type in TASK_TYPES:
    spec[TASK_LABEL] = ((), np.float32)
  else:
    raise ValueError(f"task type {task_type!r} is not one of {TASK_TYPES}")
  return spec
