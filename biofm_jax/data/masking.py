"""Masking shared by modalities: BERT-style token masking for every token sequence (EHR,
expression, DNA/protein) and MAE patch masking for every patch modality (images, ECG).

Each draws its random numbers in a fixed order and count, whatever the content, so the
stream of numbers per record position, and therefore the masking, is stable.
"""
from __future__ import annotations

from typing import Mapping

import math

import grain
import jax
import jax.numpy as jnp
import numpy as np

from biofm_jax.data import batch

NUM_SPECIAL = batch.NUM_SPECIAL


def check_masking_args(owner: str, vocab_size: int, mask_rate: float) -> None:
  if vocab_size <= NUM_SPECIAL:
    raise ValueError(f"{owner}: vocab_size {vocab_size} has no tokens beyond the {NUM_SPECIAL} special tokens")
  if not 0.0 < mask_rate <= 1.0:
    raise ValueError(f"{owner}: mask_rate {mask_rate} must be in (0, 1]")


def bert_masking(tokens: np.ndarray, candidates: np.ndarray, rng: np.random.Generator, *, mask_rate: float,
                 vocab_size: int) -> tuple[np.ndarray, np.ndarray]:
  """(selected, masked tokens): each candidate selected with probability `mask_rate`, at
  least one when any exists; selected tokens become [MASK] (80%), a random non-special
  token (10%) or stay (10%)."""
  length = len(tokens)
  select_u, action_u = rng.random(length), rng.random(length)
  random_ids = rng.integers(NUM_SPECIAL, vocab_size, size=length, dtype=np.int32)
  fallback = rng.integers(0, max(int(candidates.sum()), 1))
  selected = candidates & (select_u < mask_rate)
  if candidates.any() and not selected.any():
    selected[np.flatnonzero(candidates)[fallback]] = True  # every example teaches something
  new_tokens = tokens.copy()
  new_tokens[selected & (action_u < 0.8)] = batch.MASK_ID
  swap = selected & (action_u >= 0.8) & (action_u < 0.9)
  new_tokens[swap] = random_ids[swap]
  return selected, new_tokens


class MaskPatches(grain.transforms.RandomMap):
  """MAE masking: a random split of patch ids into sorted visible and masked sets."""

  def __init__(self, num_patches: int, mask_ratio: float = 0.75):
    if num_patches < 2:
      raise ValueError(f"MaskPatches: num_patches {num_patches} must be >= 2 (one visible, "
                       f"one masked)")
    if not 0.0 < mask_ratio < 1.0:
      raise ValueError(f"MaskPatches: mask_ratio {mask_ratio} must be in (0, 1)")
    self.num_patches, self.mask_ratio = int(num_patches), float(mask_ratio)
    self.num_visible = batch.num_visible_patches(self.num_patches, self.mask_ratio)

  def random_map(self, example: Mapping[str, np.ndarray],
                 rng: np.random.Generator) -> dict[str, np.ndarray]:
    order = rng.permutation(self.num_patches).astype(np.int32)
    out = dict(example)
    out[batch.IMAGE_VISIBLE] = np.sort(order[: self.num_visible])
    out[batch.IMAGE_MASKED] = np.sort(order[self.num_visible:])
    return out


# ---------------------------------------------------------------- prediction slots
# Masked modelling's heads run only at P gathered positions per row (`objectives/masked.py`).
def prediction_slots(max_len: int, mask_rate: float) -> int:
  """P: positions per row at which the heads run under masked modelling (a multiple of 8, at
  most `max_len`): the expected masked count plus six standard deviations plus two (the
  masking transform's at-least-one rule)."""
  if not (max_len >= 1 and 0.0 < mask_rate <= 1.0):  # NaN fails too
    raise ValueError(f"prediction_slots: max_len must be a positive integer and mask_rate a fraction in (0, 1]; "
                     f"got max_len={max_len!r}, mask_rate={mask_rate!r}")
  mean, spread = mask_rate * max_len, math.sqrt(max_len * mask_rate * (1.0 - mask_rate))
  return min(max_len, 8 * math.ceil((math.ceil(mean + 6.0 * spread) + 2) / 8))


def gathers(slots: int, length: int) -> bool:
  """Whether P slots replace a row of `length` positions (P = 0 or P >= length: no gather)."""
  return 0 < slots < length


def masked_slots(target_mask: jax.Array, slots: int) -> tuple[jax.Array, jax.Array]:
  """bool [B, L] -> (int32 [B, P] positions: the masked ones in order, then the others;
  bool [B, P]: which slots hold a masked position)."""
  order = jnp.argsort(jnp.logical_not(target_mask).astype(jnp.int32), axis=-1, stable=True)[:, :slots]
  return order.astype(jnp.int32), jnp.take_along_axis(target_mask, order, axis=-1)
