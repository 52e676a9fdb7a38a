"""Cross-modal retrieval: from one modality's embedding of a subject, find the same
subject's embedding in another modality (recall@k), among the subjects that have both.

The embeddings are the multimodal model's contrastive projections of each modality's
tower (`outputs["contrastive"][modality]`), computed before any fusion, so the query
never sees the modality it is searching. `CrossModalRetrieval` is contrastive alignment's
final evaluation (`objectives/base.py`: `Evaluation`); the loop runs it on the tuning split.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import numpy as np

from biofm_jax.objectives.base import EmbedOutputs


def recall_at_k(queries: np.ndarray, candidates: np.ndarray, ks=(1, 5, 10)) -> dict[int, float]:
  """Row i of `queries` matches row i of `candidates`; cosine similarity ranks them."""
  if queries.shape != candidates.shape or not len(queries):
    raise ValueError(f"recall_at_k: queries {queries.shape} and candidates {candidates.shape} must be "
                     "equal, non-empty [N, D] arrays")
  normalise = lambda x: x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)  # noqa: E731
  similarity = normalise(queries) @ normalise(candidates).T
  # Rank of the true match: other candidates scoring higher or equal, so a collapsed model
  # (every similarity tied) ranks each match last, not first.
  true = np.diag(similarity)[:, None]
  rank = (similarity > true).sum(axis=1) + (similarity == true).sum(axis=1) - 1
  return {k: float((rank < k).mean()) for k in ks}


def subjects_with(data_module, split: str, modalities) -> np.ndarray:
  """bool [subjects of `split`]: the subject has every one of `modalities`."""
  source = data_module.source(split)
  return np.array([all(m in source[i]["records"] for m in modalities) for i in range(len(source))], bool)


@dataclasses.dataclass(frozen=True)
class CrossModalRetrieval:
  """recall@k for each (query, target) pair over a split's subjects that have both, with
  the number of those subjects and chance (k / N). Keys: "ehr->imaging/recall@10", ..."""
  pairs: tuple[tuple[str, str], ...]
  ks: tuple[int, ...] = (1, 10)
  name: str = "retrieval"

  def __call__(self, embed: EmbedOutputs, data_module: Any, split: str) -> dict[str, float]:
    modalities = sorted({m for pair in self.pairs for m in pair})
    embeddings = embed({m: ("contrastive", m) for m in modalities})
    out: dict[str, float] = {}
    for query, target in self.pairs:
      both = subjects_with(data_module, split, (query, target))
      n, name = int(both.sum()), f"{query}->{target}"
      out[f"{name}/subjects"] = n
      if n < 2:
        continue
      for k, value in recall_at_k(embeddings[query][both], embeddings[target][both], self.ks).items():
        out[f"{name}/recall@{k}"] = value
        out[f"{name}/chance@{k}"] = min(k / n, 1.0)
    return out

  def summary_lines(self, summary: Mapping[str, Any]) -> list[str]:
    lines = []
    for query, target in self.pairs:
      recall = summary.get(f"{self.name}/{query}->{target}/recall@10")
      chance = summary.get(f"{self.name}/{query}->{target}/chance@10")
      if recall is not None and chance:
        lines.append(f"cross-modal retrieval {query}->{target}: recall@10 {recall:.2f} vs {chance:.2f} by chance "
                     f"({recall / chance:.1f}x), tuning-split subjects not seen in training")
    return lines
