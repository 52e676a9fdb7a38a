"""The EHR reference loss a pre-trained model must beat, computed from the data alone
(the EHR registry row's `reference_losses`, logged by the training loop).

The unigram baseline predicts every target code by its frequency among the training
split's events, ignoring context. A masked-code or next-event loss well below it shows
the model learned structure from context, not just code frequencies.
"""
from __future__ import annotations

import itertools
from typing import Iterable, Mapping

import numpy as np

from biofm_jax.data import batch as B
from biofm_jax.data import pipeline


def code_counts(batches: Iterable[Mapping], vocab_size: int) -> np.ndarray:
  """How often each code id occurs as a real event (not CLS, not padding)."""
  counts = np.zeros(vocab_size, np.int64)
  for batch in batches:
    ehr = batch["ehr"]
    codes = ehr.get(B.EHR_TARGET_CODES, ehr[B.EHR_CODES])  # unmasked codes when masking ran
    events = ehr[B.EHR_MASK] & (codes != B.CLS_ID)
    counts += np.bincount(codes[events], minlength=vocab_size)
  return counts


def unigram_cross_entropy(train_batches: Iterable[Mapping], eval_batches: Iterable[Mapping], vocab_size: int,
                          objective: str) -> float:
  """Mean -log p_unigram(target) over the eval targets of `objective` (add-one smoothed)."""
  counts = code_counts(train_batches, vocab_size) + 1
  log_probs = np.log(counts / counts.sum())
  total, n = 0.0, 0
  for batch in eval_batches:
    ehr = batch["ehr"]
    if objective == "masked":
      targets = ehr[B.EHR_TARGET_CODES][ehr[B.EHR_TARGET_MASK]]
    else:  # next event: every real token after position 0
      targets = ehr[B.EHR_CODES][:, 1:][ehr[B.EHR_MASK][:, 1:]]
    total -= log_probs[targets].sum()
    n += targets.size
  return total / max(n, 1)


def take(iterator, max_batches: int):
  """At most `max_batches` batches (all of them when max_batches is 0)."""
  return itertools.islice(iterator, max_batches or None)


def reference_losses(data_module, config, *, train_split: str, eval_split: str,
                     max_train_batches: int = 50) -> dict[str, float]:
  """The unigram baseline over the same eval batches as training's evaluation."""

  def batches(split):
    dataset = pipeline.make_eval_dataset(
        data_module.source(split), data_module.transforms(train=False),
        global_batch_size=config.data.batch_size, seed=config.seed, example_spec=data_module.example_spec())
    return pipeline.make_iterator(dataset)

  loss = unigram_cross_entropy(take(batches(train_split), max_train_batches),
                               take(batches(eval_split), config.train.eval_batches),
                               data_module.model_info()[data_module.name]["vocab_size"], config.objective.name)
  return {"baseline/unigram_code_loss": float(loss)}
