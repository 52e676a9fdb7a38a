"""The EHR reference losses a pre-trained model must beat, computed from the data alone
(the EHR registry row's `reference_losses`, logged by the training loop).

The unigram reference predicts every target code by its frequency among the training
split's events, ignoring context. A masked-code or next-event loss well below it shows
the model learned structure from context, not just code frequencies.

For time-to-event pre-training the reference is the marginal hazards: one constant hazard
per (time bin, task), the maximum-likelihood rate (events / days at risk) over the
training split's prediction points, the same for every patient. A loss below it shows the
model times codes from a patient's history, not only from how common they are.
"""
from __future__ import annotations

import itertools
from typing import Iterable, Mapping

import numpy as np

from biofm_jax.data import batch as B
from biofm_jax.data.module import MASKED, TIME_TO_EVENT
from biofm_jax.data import pipeline
from biofm_jax.objectives.motor import check_bin_starts, dense_targets, piecewise_exponential_nll

# Prior of the marginal rates: one pseudo-event per pseudo-year at risk (rare bins stay finite).
_PRIOR_DAYS = 365.0


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
                          targets: str) -> float:
  """Mean -log p_unigram(target) over the eval `targets` (masked tokens, or each next
  token; add-one smoothed)."""
  counts = code_counts(train_batches, vocab_size) + 1
  log_probs = np.log(counts / counts.sum())
  total, n = 0.0, 0
  for batch in eval_batches:
    ehr = batch["ehr"]
    if targets == MASKED:
      codes = ehr[B.EHR_TARGET_CODES][ehr[B.EHR_TARGET_MASK]]
    else:  # next event: every real token after position 0
      codes = ehr[B.EHR_CODES][:, 1:][ehr[B.EHR_MASK][:, 1:]]
    total -= log_probs[codes].sum()
    n += codes.size
  return total / max(n, 1)


def _bin_exposure(days: np.ndarray, event: np.ndarray, valid: np.ndarray, starts) -> tuple[np.ndarray, np.ndarray]:
  """(days at risk, events) per (bin, task), over the valid prediction points."""
  starts = np.asarray(starts, np.float64)
  ends = np.append(starts[1:], np.inf)
  days, event = days[valid], event[valid]  # [points, K]
  t = days[:, None, :]
  exposure = np.clip(t - starts[:, None], 0.0, (ends - starts)[:, None]).sum(0)
  in_bin = (event[:, None, :] & (t >= starts[:, None]) & (t < ends[:, None])).sum(0)
  return exposure, in_bin


def marginal_hazard_nll(train_batches: Iterable[Mapping], eval_batches: Iterable[Mapping], *, points: int,
                        num_tasks: int, bin_starts) -> float:
  """Mean time-to-event loss per (point, task) of the eval batches under the training
  split's marginal hazards."""
  exposure = np.zeros((len(bin_starts), num_tasks))
  events = np.zeros((len(bin_starts), num_tasks))
  for batch in train_batches:
    days, event, valid = (np.asarray(x) for x in dense_targets(batch["ehr"], points, num_tasks))
    more_exposure, more_events = _bin_exposure(days, event, valid, bin_starts)
    exposure += more_exposure
    events += more_events
  log_hazard = np.log((events + 1.0) / (exposure + _PRIOR_DAYS)).astype(np.float32)
  total, n = 0.0, 0
  for batch in eval_batches:
    days, event, valid = dense_targets(batch["ehr"], points, num_tasks)
    nll = np.asarray(piecewise_exponential_nll(np.broadcast_to(log_hazard, days.shape[:2] + log_hazard.shape),
                                               days, event, bin_starts))
    total += float(nll[np.asarray(valid)].sum())
    n += int(np.asarray(valid).sum()) * num_tasks
  return total / max(n, 1)


def take(iterator, max_batches: int):
  """At most `max_batches` batches (all of them when max_batches is 0)."""
  return itertools.islice(iterator, max_batches or None)


def reference_losses(data_module, config, *, train_split: str, eval_split: str,
                     max_train_batches: int = 50) -> dict[str, float]:
  """The unigram reference loss over the same eval batches as training's evaluation."""

  def batches(split):
    dataset = pipeline.make_eval_dataset(
        data_module.source(split), data_module.transforms(train=False),
        global_batch_size=config.data.batch_size, seed=config.seed, example_spec=data_module.example_spec())
    return pipeline.make_iterator(dataset)

  info = data_module.model_info()[data_module.name]
  if data_module.targets == TIME_TO_EVENT:
    loss = marginal_hazard_nll(take(batches(train_split), max_train_batches),
                               take(batches(eval_split), config.train.eval_batches), points=info["tte_points"],
                               num_tasks=info["tte_tasks"],
                               bin_starts=check_bin_starts(config.objective.time_bins_days))
    return {"reference/marginal_hazard_tte_loss": float(loss)}
  loss = unigram_cross_entropy(take(batches(train_split), max_train_batches),
                               take(batches(eval_split), config.train.eval_batches),
                               info["vocab_size"], data_module.targets)
  return {"reference/unigram_code_loss": float(loss)}
