"""The expression modality's data module: tokenisation, masking, `OmicsData`.

This module owns how one cell record (see `anndata.py`: the cell's expressed
genes and their counts) becomes the token-sequence fields named in `batch.py`:

* `GeneVocab` (in `gene_vocab.py`, re-exported here): gene id -> token id, plus each
  gene's median normalised expression over the training split (for rank values), built
  once and saved as JSON beside the checkpoint. `map_panel` maps another dataset's genes
  onto it (UNK where it lacks one), so a model trained on one gene panel reads another
  that overlaps.
* `TokenizeExpression`: a Grain `Map`, after optional library-size normalisation and
  log1p, in one of two modes:
    "binned" (scGPT): the top expressed genes, ordered by token id, each with its value's
      quantile bin among the cell's own expressed values (1..num_value_bins);
    "rank" (Geneformer): genes ordered by value / training median, descending; tokens only.
  Genes outside the vocabulary are dropped (they carry no identity and no median), and so
  are genes outside its highly-variable set when it has one (`hvg.py`).
* `MaskExpression`: a Grain `RandomMap` adding masked-modelling targets: hidden value bins
  ("binned") or BERT-style hidden gene tokens ("rank").
* `OmicsData`: what the pipeline and the training loop use (source, transforms, spec).
"""
from __future__ import annotations

import dataclasses
import functools
import logging
import os
from pathlib import Path
from typing import Any, Mapping

import grain
import numpy as np
import pyarrow.csv as pacsv

from biofm_jax.data import batch, object_state, pipeline
from biofm_jax.data.module import MASKED, DataModuleDefaults, check_targets, KeyByModality
from biofm_jax.data.config_fields import config_field, require
from biofm_jax.data.masking import bert_masking, check_masking_args
from biofm_jax.data.masking import prediction_slots
from biofm_jax.modalities.omics.gene_vocab import (  # noqa: F401  (re-exported: omics.GeneVocab etc.)
    VOCAB_FILENAME, VOCAB_FORMAT, VOCAB_FORMAT_VERSION, VOCAB_MAX_CELLS,
    GeneVocab, normalize_counts, quantile_bins)
from biofm_jax.modalities.omics.synthetic import write_synthetic_anndata
from biofm_jax.modalities.omics import anndata as anndata_source
from biofm_jax.modalities.omics import soma

SYNTHETIC_FILENAME = "synthetic_omics.h5ad"
MODES = ("binned", "rank")
TARGETS = (MASKED,)  # what its examples can carry for an objective (data/module.py)
_CONFIG_PREFIX = "config.data.omics"

log = logging.getLogger(__name__)


# ================================================================ tokenisation
def _check_mode(mode: str, where: str) -> None:
  if mode not in MODES:
    raise ValueError(f"{where}: tokenization {mode!r}, expected one of {MODES}")


def _top_by_value(values: np.ndarray, tokens: np.ndarray, keep: int) -> np.ndarray:
  """Positions of the `keep` largest values, ties broken by the smaller token id."""
  return np.lexsort((tokens, -values))[:keep]


class TokenizeExpression(grain.transforms.Map):
  """Cell record -> token_sequence_spec fields without targets (values in "binned" mode)."""

  def __init__(self, vocab: GeneVocab, panel_map: np.ndarray, max_len: int, mode: str = "binned",
               normalize_total: float | None = None, log1p: bool = False,
               num_value_bins: int | None = None):
    _check_mode(mode, "TokenizeExpression")
    if max_len < 2:
      raise ValueError(f"TokenizeExpression: max_len {max_len} must be >= 2 (CLS plus one gene)")
    normalize_total = float(normalize_total) if normalize_total else None
    if mode == "rank" and (normalize_total, bool(log1p)) != (vocab.normalize_total, vocab.log1p):
      # value / median only ranks genes fairly when both sides are normalised alike.
      raise ValueError(f"TokenizeExpression: rank mode with normalize_total={normalize_total}, "
                       f"log1p={log1p}, but the vocabulary's medians were computed with "
                       f"normalize_total={vocab.normalize_total}, log1p={vocab.log1p}")
    self.vocab, self.panel_map = vocab, np.asarray(panel_map, np.int32)
    self.max_len, self.mode = max_len, mode
    self.normalize_total, self.log1p = normalize_total, bool(log1p)
    self.num_value_bins = int(num_value_bins or vocab.num_value_bins)

  def map(self, record: Mapping[str, Any]) -> dict[str, np.ndarray]:
    genes = np.asarray(record["genes"], np.int64)
    counts = np.asarray(record["counts"], np.float32)
    if genes.shape != counts.shape or (len(genes) and genes.max() >= len(self.panel_map)):
      raise ValueError(f"cell {record.get('cell_id', '?')!r}: 'genes' {genes.shape} and "
                       f"'counts' {counts.shape} must match and index a panel of "
                       f"{len(self.panel_map)} genes")
    values = normalize_counts(counts, self.normalize_total, self.log1p)
    tokens = self.panel_map[genes]
    bins = quantile_bins(values, self.num_value_bins) if self.mode == "binned" else None
    known = tokens != batch.UNK_ID
    tokens, values = tokens[known], values[known]
    spec = batch.token_sequence_spec(self.max_len, with_values=self.mode == "binned",
                                     with_targets=False)
    out = {name: np.zeros(shape, dtype) for name, (shape, dtype) in spec.items()}
    keep = self.max_len - 1
    if self.mode == "binned":
      chosen = _top_by_value(values, tokens, keep)
      chosen = chosen[np.argsort(tokens[chosen], kind="stable")]  # gene order, not value order
      out[batch.TOKEN_VALUE_BINS][1: 1 + len(chosen)] = bins[known][chosen]
    else:
      chosen = _top_by_value(values / self.vocab.medians_by_token[tokens], tokens, keep)
    out[batch.TOKENS][0] = batch.CLS_ID
    out[batch.TOKENS][1: 1 + len(chosen)] = tokens[chosen]
    out[batch.TOKEN_MASK][: 1 + len(chosen)] = True
    return out


# ================================================================ masking
class MaskExpression(grain.transforms.RandomMap):
  """Adds masked-modelling targets; "binned" hides values, "rank" hides gene tokens."""

  def __init__(self, mode: str, vocab_size: int, mask_rate: float = 0.15):
    _check_mode(mode, "MaskExpression")
    check_masking_args("MaskExpression", vocab_size, mask_rate)
    self.mode, self.vocab_size, self.mask_rate = mode, vocab_size, mask_rate

  def random_map(self, example: Mapping[str, np.ndarray],
                 rng: np.random.Generator) -> dict[str, np.ndarray]:
    tokens = example[batch.TOKENS]
    genes = (example[batch.TOKEN_MASK] & (tokens != batch.CLS_ID) & (tokens != batch.UNK_ID)
             & (tokens != batch.PAD_ID))
    # The same draws in both modes, so the stream per index is stable.
    selected, new_tokens = bert_masking(tokens, genes, rng, mask_rate=self.mask_rate, vocab_size=self.vocab_size)
    out = dict(example)
    out[batch.TARGET_TOKENS] = tokens.copy()
    out[batch.TARGET_MASK] = selected
    if self.mode == "binned":
      # The gene stays visible; the model predicts its hidden expression bin.
      bins = example[batch.TOKEN_VALUE_BINS]
      out[batch.TARGET_VALUE_BINS] = bins.copy()
      out[batch.TOKEN_VALUE_BINS] = np.where(selected, batch.NO_VALUE_BIN, bins).astype(np.int32)
      return out
    out[batch.TOKENS] = new_tokens
    return out


# ================================================================ data module
@object_state.storable
@dataclasses.dataclass(frozen=True)
class OmicsSettings:
  """`config.data.omics`, checked once; every error names the config field."""
  path: str
  backed: bool
  layer: str | None
  gene_column: str | None
  gene_id_map: str  # a CSV mapping the file's gene ids (first column) to the vocabulary's (second)
  min_vocab_coverage: float  # share of the file's counts whose genes the vocabulary must know
  highly_variable_genes: int  # > 0: the model reads only this many HVGs (Seurat v3); 0 = all
  measurement: str  # a SOMA experiment's measurement (its X layer is `layer`, "data" by default)
  shuffle_buffer_blocks: int  # SOMA: blocks of cells whose cells are shuffled together
  label_columns: tuple[str, ...]
  tokenization: str
  max_len: int
  num_value_bins: int
  normalize_total: float | None
  log1p: bool
  mask_rate: float
  synthetic_cells: int
  synthetic_seed: int

  @classmethod
  def from_config(cls, cfg: Any) -> OmicsSettings:
    get = lambda name: _field(cfg, name)  # noqa: E731
    labels = get("label_columns")
    settings = cls(
        path=str(get("path") or ""), backed=bool(get("backed")), layer=get("layer") or None,
        gene_column=get("gene_column") or None, gene_id_map=str(cfg.get("gene_id_map", "") or ""),
        min_vocab_coverage=float(cfg.get("min_vocab_coverage", 0.5)),
        highly_variable_genes=int(cfg.get("highly_variable_genes", 0)),
        measurement=str(cfg.get("measurement", "RNA")),
        shuffle_buffer_blocks=int(cfg.get("shuffle_buffer_blocks", 8)),
        label_columns=(labels,) if isinstance(labels, str) else tuple(labels or ()),
        tokenization=str(get("tokenization")), max_len=int(get("max_len")),
        num_value_bins=int(get("num_value_bins")),
        normalize_total=float(get("normalize_total")) or None, log1p=bool(get("log1p")),
        mask_rate=float(get("mask_rate")), synthetic_cells=int(get("synthetic_cells")),
        synthetic_seed=int(get("synthetic_seed")))
    _require(settings.tokenization in MODES, "tokenization", settings.tokenization,
             f"one of {MODES}")
    _require(settings.max_len >= 2, "max_len", settings.max_len, ">= 2 (CLS plus one gene)")
    _require(settings.num_value_bins >= 1, "num_value_bins", settings.num_value_bins, ">= 1")
    _require((settings.normalize_total or 0) >= 0, "normalize_total", settings.normalize_total,
             ">= 0 (0 = off)")
    _require(0 < settings.mask_rate <= 1, "mask_rate", settings.mask_rate, "in (0, 1]")
    _require(settings.synthetic_cells >= 1, "synthetic_cells", settings.synthetic_cells, ">= 1")
    _require(settings.shuffle_buffer_blocks >= 1, "shuffle_buffer_blocks", settings.shuffle_buffer_blocks, ">= 1")
    _require(settings.highly_variable_genes >= 0, "highly_variable_genes", settings.highly_variable_genes,
             ">= 0 (0 = every gene)")
    _require(0.0 <= settings.min_vocab_coverage <= 1.0, "min_vocab_coverage", settings.min_vocab_coverage,
             "a fraction in [0, 1]")
    return settings


_field = functools.partial(config_field, prefix=_CONFIG_PREFIX)

_require = functools.partial(require, prefix=_CONFIG_PREFIX)


@object_state.storable
class OmicsData(DataModuleDefaults):
  """Single-cell expression as the pipeline and training loop see it."""
  name = "omics"

  def __init__(self, dataset: Any, vocab: GeneVocab, settings: OmicsSettings, *,
               targets: str = MASKED):
    check_targets("OmicsData", targets, TARGETS)
    self.dataset, self.vocab, self.settings, self.targets = dataset, vocab, settings, targets
    self.mode = settings.tokenization
    names = map_gene_ids(dataset.gene_names, settings.gene_id_map)
    self.panel_map = vocab.map_panel(names)
    self.read_map = vocab.map_panel(names, read_only=True)  # what the tokeniser keeps
    self.panel_overlap = int((self.panel_map != batch.UNK_ID).sum())
    self.coverage = vocab_coverage(self.panel_map, getattr(dataset, "gene_totals", None))
    log.info("omics %s: the vocabulary knows %d of %d genes (%.1f%%) holding %.1f%% of the counts",
             dataset.path, self.panel_overlap, len(names), 100 * self.coverage["genes"],
             100 * self.coverage["counts"])
    if not self.panel_overlap or self.coverage["counts"] < settings.min_vocab_coverage:
      missing = top_missing_genes(names, self.panel_map, getattr(dataset, "gene_totals", None))
      raise ValueError(f"{dataset.path}: the gene vocabulary ({len(vocab.genes)} genes) knows {self.panel_overlap} "
                       f"of its {len(names)} genes, {100 * self.coverage['counts']:.1f}% of its counts (below "
                       f"{_CONFIG_PREFIX}.min_vocab_coverage={settings.min_vocab_coverage}); most expressed "
                       f"unknown: {missing}. Match the gene ids: gene_column (a var column) or gene_id_map "
                       f"(a CSV from these ids to the vocabulary's)")

  @classmethod
  def from_config(cls, cfg: Any, *, targets: str,
                  artifacts_dir: str | os.PathLike) -> OmicsData:
    """Opens the .h5ad named by `cfg` (= config.data.omics); synthetic when path is ""."""
    check_targets("OmicsData", targets, TARGETS)  # before any data is generated or read
    settings = OmicsSettings.from_config(cfg)
    artifacts_dir = Path(artifacts_dir)
    artifacts_dir.mkdir(parents=True, exist_ok=True)
    path = Path(settings.path) if settings.path else _synthetic_file(settings, artifacts_dir)
    if soma.is_soma_experiment(path):
      dataset = soma.SomaExpressionDataset(path, measurement=settings.measurement, layer=settings.layer,
                                           gene_column=settings.gene_column, label_columns=settings.label_columns)
    else:
      dataset = anndata_source.ExpressionDataset(
          path, backed=settings.backed, layer=settings.layer, gene_column=settings.gene_column,
          label_columns=settings.label_columns)
    vocab = _load_or_build_vocab(dataset, artifacts_dir / VOCAB_FILENAME, settings)
    return cls(dataset, vocab, settings, targets=targets)

  def source(self, split: str):
    return self.dataset.source(split)

  def make_train_dataset(self, *, global_batch_size: int, seed: int, **layout):
    """The training stream (the loop's hook, `data/module.py`): a SOMA experiment is read in
    block-buffered order (`soma.py`), a file in a global shuffle."""
    order = ((soma.BLOCK_CELLS, self.settings.shuffle_buffer_blocks)
             if isinstance(self.dataset, soma.SomaExpressionDataset) else None)
    return pipeline.make_train_dataset(self.source("train"), self.transforms(train=True),
                                       global_batch_size=global_batch_size, seed=seed, name=self.name,
                                       block_shuffle=order, **layout)

  def transforms(self, train: bool, mask: bool = True) -> list:
    """The same for train and eval (eval masking is repeatable by its fixed seed);
    `mask=False` leaves out masking, as embedding extraction needs."""
    del train
    s = self.settings
    tokenize = TokenizeExpression(self.vocab, self.read_map, s.max_len, self.mode,
                                  s.normalize_total, s.log1p, s.num_value_bins)
    masking = [MaskExpression(self.mode, self.vocab.size, s.mask_rate)] if mask else []
    return [tokenize, *masking, KeyByModality(self.name)]

  def example_spec(self) -> dict:
    return {self.name: batch.token_sequence_spec(self.settings.max_len, with_values=self.mode == "binned",
                                                 with_targets=True)}

  def embedding_spec(self) -> dict:
    return {self.name: batch.token_sequence_spec(self.settings.max_len, with_values=self.mode == "binned",
                                                 with_targets=False)}

  def model_info(self) -> dict[str, dict[str, int]]:
    return {self.name: {"vocab_size": self.vocab.size,
                        "num_value_bins": self.settings.num_value_bins if self.mode == "binned" else 0,
                        "max_len": self.settings.max_len,
                        "prediction_slots": prediction_slots(self.settings.max_len, self.settings.mask_rate)}}

  def summary(self) -> dict[str, int]:
    """Counts for the logs: cells per split, the file's stats, vocabulary and truncation."""
    out = {f"cells_{split}": int(len(rows)) for split, rows in self.dataset.splits.items()}
    out.update({f"anndata_{k}": v for k, v in dict(self.dataset.stats).items()})
    out["vocab_size"] = self.vocab.size
    out["vocab_genes"] = len(self.vocab.genes)
    out["panel_genes"] = len(self.panel_map)
    out["panel_overlap"] = self.panel_overlap
    out["highly_variable_genes"] = int((self.read_map != batch.UNK_ID).sum()) if self.vocab.highly_variable else 0
    out["vocab_gene_coverage"] = round(self.coverage["genes"], 6)
    out["vocab_count_coverage"] = round(self.coverage["counts"], 6)
    out["labels"] = len(self.dataset.label_names)
    train_rows = self.dataset.splits.get("train", np.zeros(0, np.int64))
    expressed = self.dataset.genes_per_cell[train_rows].astype(np.int64)
    dropped = np.maximum(expressed - (self.settings.max_len - 1), 0)
    out["train_cells_truncated"] = int((dropped > 0).sum())
    out["train_genes_dropped"] = int(dropped.sum())  # expressed genes beyond max_len - 1
    return out

  def labels(self, split: str) -> tuple[np.ndarray, tuple[str, ...]]:
    """float32 [cells, len(label_names)] of `split` in source order (reads no expression)."""
    return np.asarray(self.source(split).labels, np.float32), tuple(self.dataset.label_names)


def _synthetic_file(settings: OmicsSettings, artifacts_dir: Path) -> Path:
  """The synthetic file under artifacts_dir, written once (reused on resume)."""
  path = artifacts_dir / SYNTHETIC_FILENAME
  if not path.exists():  # written by rename: if it is there, it is whole
    log.info("omics: writing a synthetic AnnData file of %d cells", settings.synthetic_cells)
    write_synthetic_anndata(path, num_cells=settings.synthetic_cells, seed=settings.synthetic_seed)
  return path


def map_gene_ids(gene_names, map_path: str) -> tuple[str, ...]:
  """`gene_names` through a two-column CSV (the file's id, the vocabulary's id; e.g. Ensembl
  to symbol); ids the table does not list stay as they are."""
  if not map_path:
    return tuple(gene_names)
  table = pacsv.read_csv(map_path, convert_options=pacsv.ConvertOptions(strings_can_be_null=False))
  if table.num_columns < 2:
    raise ValueError(f"{map_path}: gene_id_map needs two columns (the file's gene id, the vocabulary's); "
                     f"it has {table.schema.names}")
  sources, targets = (table.column(i).cast("string").to_pylist() for i in (0, 1))
  mapping = dict(zip(sources, targets))
  return tuple(mapping.get(str(g), str(g)) for g in gene_names)


def vocab_coverage(panel_map: np.ndarray, gene_totals: np.ndarray | None) -> dict[str, float]:
  """The share of a file's genes the vocabulary knows, and of its counts (1.0 without totals)."""
  known = panel_map != batch.UNK_ID
  counts = 1.0
  if gene_totals is not None and float(np.sum(gene_totals)) > 0:
    counts = float(np.sum(gene_totals[known]) / np.sum(gene_totals))
  return {"genes": float(known.mean()) if len(known) else 0.0, "counts": counts}


def top_missing_genes(gene_names, panel_map: np.ndarray, gene_totals: np.ndarray | None, k: int = 5) -> list[str]:
  """The `k` most expressed genes the vocabulary lacks (file order without totals)."""
  unknown = np.flatnonzero(panel_map == batch.UNK_ID)
  if gene_totals is not None:
    unknown = unknown[np.argsort(-np.asarray(gene_totals)[unknown], kind="stable")]
  return [str(gene_names[i]) for i in unknown[:k]]


def _load_or_build_vocab(dataset: Any, path: Path, settings: OmicsSettings) -> GeneVocab:
  """A resumed run must reuse the exact vocabulary (and medians) it was trained with."""
  wanted = (settings.num_value_bins, settings.normalize_total, settings.log1p,
            settings.highly_variable_genes)
  if path.exists():
    vocab = GeneVocab.load(path)
    found = (vocab.num_value_bins, vocab.normalize_total, vocab.log1p, len(vocab.highly_variable))
    if found != wanted:
      raise ValueError(f"gene vocabulary {path}: built with num_value_bins, normalize_total, "
                       f"log1p, highly_variable_genes = {found}, but {_CONFIG_PREFIX} asks for "
                       f"{wanted}; use a new workdir or match the config")
    log.info("omics: loaded a vocabulary of %d genes", len(vocab.genes))
    return vocab
  if "train" not in dataset.splits or not len(dataset.splits["train"]):
    raise ValueError(f"{dataset.path}: no cells in the 'train' split to build the gene "
                     f"vocabulary from; splits: {list(dataset.splits)}")
  vocab = GeneVocab.build(dataset.source("train"), num_value_bins=settings.num_value_bins,
                          normalize_total=settings.normalize_total, log1p=settings.log1p,
                          max_cells=VOCAB_MAX_CELLS,
                          highly_variable_genes=settings.highly_variable_genes)
  vocab.save(path)
  log.info("omics: built a vocabulary of %d genes from %d training cells%s", len(vocab.genes),
           vocab.num_training_cells,
           f"; the model reads its {len(vocab.highly_variable)} most variable (Seurat v3)"
           if vocab.highly_variable else "")
  return vocab
