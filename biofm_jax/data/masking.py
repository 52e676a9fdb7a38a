"""Masking shared by modalities: BERT-style token masking for every token sequence (EHR,
expression, DNA/protein) and MAE patch masking for every patch modality (images, ECG).

Each draws its random numbers in a fixed order and count, whatever the content, so the
stream of numbers per record position, and therefore the masking, is stable.
"""
from __future__ import annotations

from typing import Mapping

import grain
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
