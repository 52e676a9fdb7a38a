"""BERT-style token masking shared by every token-sequence modality (EHR, expression, DNA/protein).

One function draws the random numbers in a fixed order and count, whatever the content,
so the stream of numbers per record position, and therefore the masking, is stable.
"""
from __future__ import annotations

import numpy as np

from biofm_jax.data import batch

NUM_SPECIAL = len(batch.SPECIAL_TOKENS)


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
