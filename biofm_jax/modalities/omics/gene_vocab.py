"""The gene vocabulary and the expression-value arithmetic the omics modality shares.

This module owns `GeneVocab` (gene id -> token id, each gene's median normalised
expression over the training split, its JSON file and panel mapping), the value
arithmetic (`normalize_counts`: library-size normalisation and log1p; `quantile_bins`:
scGPT's per-cell value bins) and the vocabulary file constants (`VOCAB_*`).
Tokenisation, masking and `OmicsData` live in `omics.py`.
"""
from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any, Sequence

import numpy as np

from biofm_jax.data import artifacts, batch, object_state
from biofm_jax.modalities.omics import hvg

VOCAB_FORMAT = "biofm_jax.gene_vocab"
VOCAB_FORMAT_VERSION = 1
_VOCAB_HEADER = {"format": VOCAB_FORMAT, "format_version": VOCAB_FORMAT_VERSION,
                 "special_tokens": list(batch.SPECIAL_TOKENS)}
VOCAB_FILENAME = "gene_vocab.json"
# Training cells the vocabulary scans at most (evenly spaced): gene lists and medians are
# stable long before this, and it bounds start-up time and memory on atlas-sized files.
VOCAB_MAX_CELLS = 50_000


# ================================================================ normalisation
def normalize_counts(counts: np.ndarray, normalize_total: float | None,
                     log1p: bool) -> np.ndarray:
  """float64 values: counts scaled to sum to `normalize_total` (when set), then log1p.

  `counts` are all the cell's expressed genes, so their sum is its library size.
  """
  values = np.asarray(counts, dtype=np.float64)
  if normalize_total:
    total = values.sum()
    values = values * (normalize_total / total) if total > 0 else values
  return np.log1p(values) if log1p else values


def quantile_bins(values: np.ndarray, num_bins: int) -> np.ndarray:
  """int32 bins 1..num_bins of `values` by their own quantiles (scGPT's per-cell binning).

  Values tied across several edges (common: many genes with one count) take the middle
  of the bins they span, a deterministic stand-in for scGPT's random tie-breaking.
  """
  values = np.asarray(values, dtype=np.float64)
  if not len(values):
    return np.zeros(0, np.int32)
  edges = np.quantile(values, np.linspace(0.0, 1.0, num_bins + 1)[1:-1])
  low = np.searchsorted(edges, values, side="left")
  high = np.searchsorted(edges, values, side="right")
  return (1 + (low + high) // 2).astype(np.int32)


# ================================================================ vocabulary
@object_state.storable
@dataclasses.dataclass(frozen=True)
class GeneVocab:
  """Genes expressed in the training split, and their median normalised expression."""
  genes: tuple[str, ...]  # token id = len(batch.SPECIAL_TOKENS) + index
  gene_medians: tuple[float, ...]  # median over training cells expressing the gene (> 0)
  num_value_bins: int
  normalize_total: float | None  # the normalisation the medians were computed under
  log1p: bool
  num_training_cells: int = 0  # cells the medians were computed from
  # The genes the model reads, most variable first (Seurat v3 on the training cells' raw
  # counts); () = every vocabulary gene. Kept in the vocabulary so resumes and fine-tuning
  # read the same genes.
  highly_variable: tuple[str, ...] = ()

  @classmethod
  def build(cls, train_source: Any, *, num_value_bins: int, normalize_total: float | None,
            log1p: bool, gene_names: Sequence[str] | None = None,
            max_cells: int | None = None, highly_variable_genes: int = 0) -> GeneVocab:
    """Scans `train_source` (the training split; evenly spaced `max_cells` of its cells
    when given, to bound memory). Genes: those expressed in a scanned cell, in panel order.
    `highly_variable_genes` > 0 also picks that many HVGs (`hvg.seurat_v3`) from the same cells."""
    if num_value_bins < 1:
      raise ValueError(f"GeneVocab.build: num_value_bins {num_value_bins} must be >= 1")
    names = tuple(gene_names if gene_names is not None else train_source.gene_names)
    positions = np.arange(len(train_source))
    if max_cells is not None and len(positions) > max_cells:
      positions = np.unique(np.linspace(0, len(positions) - 1, max_cells).astype(np.int64))
    gene_chunks, value_chunks = [], []
    for i in positions.tolist():
      record = train_source[i]
      # int32 / float32: the values of up to VOCAB_MAX_CELLS cells are held at once.
      gene_chunks.append(np.asarray(record["genes"], np.int32))
      value_chunks.append(normalize_counts(record["counts"], normalize_total, log1p
                                           ).astype(np.float32))
    genes, medians = _gene_medians(gene_chunks, value_chunks)
    chosen = ()
    if highly_variable_genes:
      stats = hvg.seurat_v3(train_source, len(names), positions, where="GeneVocab.build")
      varying = int((stats.variances > 0).sum())
      if varying < highly_variable_genes:
        raise ValueError(f"GeneVocab.build: highly_variable_genes={highly_variable_genes}, but only "
                         f"{varying} genes vary over the {len(positions)} training cells scanned")
      # Only genes expressed in a scanned cell vary, so every HVG is a vocabulary gene.
      chosen = tuple(names[g] for g in stats.top(highly_variable_genes).tolist())
    return cls(genes=tuple(names[g] for g in genes.tolist()),
               gene_medians=tuple(float(m) for m in medians), num_value_bins=num_value_bins,
               normalize_total=float(normalize_total) if normalize_total else None,
               log1p=bool(log1p), num_training_cells=len(positions), highly_variable=chosen)

  @property
  def size(self) -> int:
    return batch.NUM_SPECIAL + len(self.genes)

  @functools.cached_property
  def _ids(self) -> dict[str, int]:
    return {gene: batch.NUM_SPECIAL + i for i, gene in enumerate(self.genes)}

  @functools.cached_property
  def medians_by_token(self) -> np.ndarray:
    """float64 [size]: each token's median (1 for special tokens, never used)."""
    return np.concatenate([np.ones(batch.NUM_SPECIAL), np.asarray(self.gene_medians, np.float64)])

  def map_panel(self, gene_names: Sequence[str], *, read_only: bool = False) -> np.ndarray:
    """int32 token id of each of another dataset's genes; UNK_ID where this vocab lacks it
    (and, with `read_only`, where it is not one of the genes the model reads)."""
    ids = self._ids
    if read_only and self.highly_variable:
      ids = {gene: ids[gene] for gene in self.highly_variable}
    return np.fromiter((ids.get(str(g), batch.UNK_ID) for g in gene_names), dtype=np.int32,
                       count=len(gene_names))

  def panel_overlap(self, gene_names: Sequence[str]) -> int:
    """How many of `gene_names` this vocabulary knows."""
    return int((self.map_panel(gene_names) != batch.UNK_ID).sum())

  def save(self, path: str | os.PathLike) -> None:
    """Writes human-readable JSON atomically (`data/artifacts.py`)."""
    artifacts.write_json(path, _VOCAB_HEADER, {
        "num_value_bins": self.num_value_bins, "normalize_total": self.normalize_total, "log1p": self.log1p,
        "num_training_cells": self.num_training_cells, "highly_variable": list(self.highly_variable),
        "genes": list(self.genes), "gene_medians": list(self.gene_medians)})

  @classmethod
  def load(cls, path: str | os.PathLike) -> GeneVocab:
    payload = artifacts.read_json(path, _VOCAB_HEADER, "gene vocabulary")
    try:
      total = payload["normalize_total"]
      vocab = cls(genes=tuple(str(g) for g in payload["genes"]),
                  gene_medians=tuple(float(m) for m in payload["gene_medians"]),
                  num_value_bins=int(payload["num_value_bins"]),
                  normalize_total=float(total) if total else None,
                  log1p=bool(payload["log1p"]),
                  num_training_cells=int(payload.get("num_training_cells", 0)),
                  highly_variable=tuple(str(g) for g in payload.get("highly_variable", ())))
    except (KeyError, TypeError, ValueError) as e:
      raise ValueError(f"gene vocabulary {path}: missing or malformed field ({e!r})") from e
    if len(vocab.genes) != len(vocab.gene_medians):
      raise ValueError(f"gene vocabulary {path}: {len(vocab.genes)} genes but "
                       f"{len(vocab.gene_medians)} gene_medians; expected one median per gene")
    unknown = set(vocab.highly_variable) - set(vocab.genes)
    if unknown:
      raise ValueError(f"gene vocabulary {path}: highly_variable names {len(unknown)} genes that are "
                       f"not in genes (e.g. {sorted(unknown)[:3]})")
    return vocab


def _gene_medians(gene_chunks: list[np.ndarray],
                  value_chunks: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
  """Ascending gene indices seen, and the median of each one's values."""
  if not gene_chunks:
    return np.zeros(0, np.int32), np.zeros(0, np.float64)
  genes, values = np.concatenate(gene_chunks), np.concatenate(value_chunks)
  # One sort by (gene, value) groups every gene's values in order: medians by indexing.
  order = np.lexsort((values, genes))
  genes, values = genes[order], values[order]
  starts = np.flatnonzero(np.r_[True, genes[1:] != genes[:-1]])
  ends = np.r_[starts[1:], len(genes)]
  lower, upper = starts + (ends - starts - 1) // 2, starts + (ends - starts) // 2
  return genes[starts], (values[lower].astype(np.float64) + values[upper]) / 2
