"""The raw-feature baseline for sequence probes: k-mer composition.

Per record: the frequencies of every k-mer of its alphabet (DNA: 4-mers, 256 of them, the
composition that k-mer logistic regression and gkm-SVM baselines read; proteins:
dipeptides, 400, the classical dipeptide-composition features), plus the log of its length.
k-mers holding a letter outside the standard alphabet (N, X, ambiguity codes) are not
counted. A logistic regression on these sits beside the probe in record-label reports
(`eval/record_tasks.py`): a sequence model's embedding should beat composition alone.
"""
from __future__ import annotations

import itertools

import numpy as np

LETTERS = {"dna": "ACGT", "protein": "ACDEFGHIKLMNPQRSTVWY"}
K = {"dna": 4, "protein": 2}


def kmer_index(alphabet: str) -> dict[str, int]:
  letters, k = LETTERS[alphabet], K[alphabet]
  return {"".join(kmer): i for i, kmer in enumerate(itertools.product(letters, repeat=k))}


def kmer_frequencies(sequence: str, index: dict[str, int], k: int) -> np.ndarray:
  counts = np.zeros(len(index) + 1)
  sequence = sequence.upper()
  for start in range(len(sequence) - k + 1):
    column = index.get(sequence[start:start + k])
    if column is not None:
      counts[column] += 1
  total = counts[:-1].sum()
  counts[:-1] /= max(total, 1.0)
  counts[-1] = np.log1p(len(sequence))
  return counts


def kmer_features(train_source, source) -> np.ndarray:
  """[records, k-mers + 1] features of every record of `source` (needs no training statistics)."""
  del train_source
  alphabet = source.alphabet
  if alphabet not in LETTERS:
    raise ValueError(f"k-mer baseline: alphabet {alphabet!r}, expected one of {sorted(LETTERS)}")
  index = kmer_index(alphabet)
  return np.stack([kmer_frequencies(source[i]["sequence"], index, K[alphabet]) for i in range(len(source))])
