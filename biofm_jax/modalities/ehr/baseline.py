"""The EHR modality's raw-feature baseline: EHRSHOT's count-of-codes features.

`CodeCountFeaturizer` counts each code of the training vocabulary per record (times and
values ignored); EHR label reports fit it on the training rows' records cut at their
prediction times (`eval/downstream.py`), and the fused model's HAIM baseline takes
`code_count_features` of each subject's record (`eval/raw_baselines.py`).
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np
import scipy.sparse as sp


class CodeCountFeaturizer:
  """Per-record counts of each code of the training vocabulary (times and values ignored)."""

  def __init__(self, min_count: int = 1):
    self.min_count = min_count
    self._vocab: np.ndarray | None = None

  @property
  def feature_names(self) -> list[str]:
    return list(self._fitted_vocab())

  def fit(self, records: Sequence[Mapping]) -> CodeCountFeaturizer:
    """Learn the sorted codes seen at least `min_count` times over all `records`."""
    codes, counts = np.unique(_all_codes(records), return_counts=True)
    self._vocab = codes[counts >= self.min_count]
    return self

  def transform(self, records: Sequence[Mapping]) -> sp.csr_matrix:
    """[N, V] float32 code counts; codes outside the vocabulary are ignored."""
    vocab = self._fitted_vocab()
    codes = _all_codes(records)
    rows = np.repeat(np.arange(len(records)), [len(r["codes"]) for r in records])
    cols = np.searchsorted(vocab, codes)
    known = cols < len(vocab)
    known[known] = vocab[cols[known]] == codes[known]
    counts = sp.coo_matrix((np.ones(known.sum(), np.float32), (rows[known], cols[known])),
                           shape=(len(records), len(vocab)))
    return counts.tocsr()  # sums the duplicate (record, code) entries into counts

  def fit_transform(self, records: Sequence[Mapping]) -> sp.csr_matrix:
    return self.fit(records).transform(records)

  def _fitted_vocab(self) -> np.ndarray:
    if self._vocab is None:
      raise ValueError("CodeCountFeaturizer is not fitted; call fit(records) first")
    return self._vocab


def _all_codes(records: Sequence[Mapping]) -> np.ndarray:
  """Every code of every record, as a fixed-width string array (fast sort and search)."""
  parts = [np.asarray(r["codes"], dtype=str) for r in records]
  return np.concatenate(parts) if parts else np.array([], dtype=str)


def code_count_features(train_source: Any, source: Any) -> np.ndarray:
  """[records, codes] counts of `source`'s records over the codes of `train_source`'s."""
  train = [train_source[i] for i in range(len(train_source))]
  records = [source[i] for i in range(len(source))]
  return CodeCountFeaturizer().fit(train).transform(records).toarray()
