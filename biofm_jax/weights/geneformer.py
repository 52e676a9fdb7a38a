"""Geneformer (`transformers.BertForMaskedLM` over rank-value gene tokens, Theodoris et al.
2023; its V2 models, whose dictionaries hold <cls>): its folder as a biofm_jax expression
masked-language model over the same genes, medians and rank tokenisation.

The architecture, in the options of our shared block: BERT's post-LayerNorm blocks (eps
1e-12) with biases and its activation (ReLU for Geneformer), learned absolute positions,
an embedding LayerNorm, no final norm, and the MLM head dense -> activation -> LayerNorm
-> decoder + bias. BERT's token-type row 0 (every Geneformer input is of type 0) is added
into the position table, which then gives the same sums.

The data: the folder's token dictionary (gene id -> token id) and gene median dictionary
(pickles, read as plain values only: `pickles.py`) become our gene vocabulary artifact, with
Geneformer's recipe in our rank tokenisation: counts scaled to 10,000 per cell, divided by the
gene's median, genes ranked by that value, CLS first. Our ids are PAD UNK MASK CLS then the
genes in Geneformer's order; our UNK (genes outside the vocabulary, which the tokenisation
drops) has no Geneformer row. Geneformer's <eos> is left out, as ESM-2's is.
"""
from __future__ import annotations

import pathlib
from typing import Any

import ml_collections
import numpy as np

from biofm_jax.configs import omics_expression
from biofm_jax.data import batch as B
from biofm_jax.modalities.omics.gene_vocab import GeneVocab
from biofm_jax.weights.conversion import UNSEEN_LOGIT, Rule, layer_norm, layer_rules, linear, put_rows, take_rows
from biofm_jax.weights.pickles import read_plain_dict

NAME = "geneformer"
TOKEN_DICTIONARY = ("token_dictionary.pkl", "token_dictionary_gc104M.pkl", "token_dictionary_gc30M.pkl")
MEDIAN_DICTIONARY = ("gene_median_dictionary.pkl", "gene_median_dictionary_gc104M.pkl",
                     "gene_median_dictionary_gc30M.pkl")
TARGET_SUM = 10_000.0  # Geneformer's per-cell normalisation before dividing by the medians
SPECIALS = {B.PAD_ID: "<pad>", B.MASK_ID: "<mask>", B.CLS_ID: "<cls>"}  # our UNK has no row
ACTIVATIONS = {"relu": "relu", "gelu": "gelu"}  # BERT's hidden_act -> ours
# Position ids, a pooler BertForMaskedLM does not use, and the decoder's bias (the same tensor as
# cls.predictions.bias, which is read).
IGNORED = (r".*position_ids", r"bert\.pooler\..*", r"cls\.predictions\.decoder\.bias")


def _first(folder: pathlib.Path, names: tuple[str, ...], what: str) -> pathlib.Path:
  for name in names:
    if (folder / name).exists():
      return folder / name
  raise ValueError(f"{folder}: no {what} ({' or '.join(names)}); Geneformer's dictionaries sit beside the "
                   f"weights")


def dictionaries(folder: pathlib.Path) -> tuple[dict[str, int], dict[str, float]]:
  """(token dictionary, gene median dictionary) of a Geneformer folder, as plain values."""
  tokens = read_plain_dict(_first(folder, TOKEN_DICTIONARY, "token dictionary"), str, (int,))
  medians = read_plain_dict(_first(folder, MEDIAN_DICTIONARY, "gene median dictionary"), str, (int, float))
  return tokens, {k: float(v) for k, v in medians.items()}


def check_config(hf: dict[str, Any], where: str) -> None:
  if hf.get("model_type", "bert") != "bert":
    raise ValueError(f"{where}: model_type {hf.get('model_type')!r}; Geneformer is a 'bert' model")
  if hf.get("position_embedding_type", "absolute") != "absolute":
    raise ValueError(f"{where}: position_embedding_type={hf['position_embedding_type']!r}; Geneformer import "
                     f"supports 'absolute' only")
  if hf.get("hidden_act", "gelu") not in ACTIVATIONS:
    raise ValueError(f"{where}: hidden_act={hf['hidden_act']!r}; Geneformer import supports "
                     f"{sorted(ACTIVATIONS)}")
  for field in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size",
                "max_position_embeddings"):
    if not isinstance(hf.get(field), int):
      raise ValueError(f"{where}: field {field!r} is missing or not an integer")
  if hf["hidden_size"] % hf["num_attention_heads"]:
    raise ValueError(f"{where}: hidden_size {hf['hidden_size']} is not divisible by num_attention_heads "
                     f"{hf['num_attention_heads']}")


def gene_vocab(tokens: dict[str, int], medians: dict[str, float], hf: dict[str, Any], where: str,
               num_value_bins: int) -> tuple[GeneVocab, np.ndarray]:
  """Our gene vocabulary of Geneformer's genes (in its id order, with its medians) and the
  public id of each of our token ids (-1: no public row)."""
  missing = [name for name in SPECIALS.values() if name not in tokens]
  if missing:
    raise ValueError(f"{where}: the token dictionary lacks {missing}; Geneformer V1 dictionaries (no <cls>) "
                     f"are not supported yet, our cells start with CLS")
  if sorted(tokens.values()) != list(range(len(tokens))) or len(tokens) != hf["vocab_size"]:
    raise ValueError(f"{where}: token ids are not 0..{hf['vocab_size'] - 1}, one per token (vocab_size "
                     f"{hf['vocab_size']}, {len(tokens)} tokens)")
  genes = [name for name, _ in sorted(tokens.items(), key=lambda item: item[1]) if not name.startswith("<")]
  no_median = [g for g in genes if not medians.get(g, 0) > 0]
  if no_median:
    raise ValueError(f"{where}: {len(no_median)} genes have no positive median in the gene median dictionary "
                     f"(e.g. {no_median[:3]})")
  vocab = GeneVocab(genes=tuple(genes), gene_medians=tuple(medians[g] for g in genes), num_value_bins=num_value_bins,
                    normalize_total=TARGET_SUM, log1p=False)
  ids = np.full(vocab.size, -1, np.int64)
  for ours, name in SPECIALS.items():
    ids[ours] = tokens[name]
  ids[B.NUM_SPECIAL:] = [tokens[g] for g in genes]
  return vocab, ids


def base_config(hf: dict[str, Any], max_len: int) -> ml_collections.ConfigDict:
  """An expression masked-LM config (configs/omics_expression.py:tiny_rank) with the
  architecture of `hf` and Geneformer's tokenisation, cells of up to `max_len` tokens."""
  config = omics_expression.get_config("tiny_rank")
  config.model.update(num_layers=hf["num_hidden_layers"], embed_dim=hf["hidden_size"],
                      num_heads=hf["num_attention_heads"], head_dim=0, mlp_dim=hf["intermediate_size"],
                      position="learned", norm="layernorm", bias=True, activation=ACTIVATIONS[hf.get("hidden_act", "gelu")],
                      norm_eps=float(hf.get("layer_norm_eps", 1e-12)), norm_position="post", final_norm=False,
                      token_dropout=0.0, embedding_norm=True, mlm_head="transform")
  config.data.omics.update(tokenization="rank", normalize_total=TARGET_SUM, log1p=False,
                           max_len=min(max_len, hf["max_position_embeddings"]), highly_variable_genes=0,
                           label_columns=())  # the user's cells name their own (--config.data.omics.label_columns)
  return config


def rules(hf: dict[str, Any], ids: np.ndarray, max_len: int, modality: str = "omics") -> list[Rule]:
  d, f, v = hf["hidden_size"], hf["intermediate_size"], hf["vocab_size"]
  h, positions = hf["num_attention_heads"], hf["max_position_embeddings"]
  layer = "bert.encoder.layer.{layer}."
  encoder = (f"{modality}_encoder",)

  def norm(path, source):
    return layer_norm(path, source, d)

  out = [Rule(encoder + ("code_embedding", "embedding"), "bert.embeddings.word_embeddings.weight", (v, d),
              lambda x: take_rows(x, ids), inverse=lambda x: put_rows(x, ids, v)),
         # Token type 0 is added to every position: folded into the table (see the module docstring).
         # Publishing writes a table of exactly our rows (max_position_embeddings = max_len).
         Rule(encoder + ("position_embedding",), "bert.embeddings.position_embeddings.weight", (positions, d),
              lambda x: x[:max_len]),
         Rule(("_token_type",), "bert.embeddings.token_type_embeddings.weight", (hf.get("type_vocab_size", 2), d))]
  out += norm(encoder + ("embedding_norm",), "bert.embeddings.LayerNorm")
  out += layer_rules({"query": layer + "attention.self.query", "key": layer + "attention.self.key",
                      "value": layer + "attention.self.value", "out": layer + "attention.output.dense",
                      "attention_norm": layer + "attention.output.LayerNorm", "wi": layer + "intermediate.dense",
                      "wo": layer + "output.dense", "mlp_norm": layer + "output.LayerNorm"}, d, f, h)
  head = ("code_head",)
  out += [linear(head + ("transform", "kernel"), "cls.predictions.transform.dense.weight", (d, d)),
          Rule(head + ("transform", "bias"), "cls.predictions.transform.dense.bias", (d,))]
  out += norm(head + ("transform_norm",), "cls.predictions.transform.LayerNorm")
  out += [Rule(head + ("dense", "kernel"), "cls.predictions.decoder.weight", (v, d),
               lambda x: np.ascontiguousarray(take_rows(x, ids).T), tied_to="bert.embeddings.word_embeddings.weight",
               inverse=lambda x: put_rows(np.ascontiguousarray(x.T), ids, v)),
          Rule(head + ("dense", "bias"), "cls.predictions.bias", (v,), lambda x: take_rows(x, ids),
               inverse=lambda x: put_rows(x, ids, v, UNSEEN_LOGIT))]
  return out


def fold_token_type(params: dict, modality: str = "omics") -> dict:
  """Adds token type 0's row into every position's (and drops the token-type table)."""
  params = dict(params)
  token_type = params.pop(("_token_type",))
  params[(f"{modality}_encoder", "position_embedding")] = params[(f"{modality}_encoder", "position_embedding")] + token_type[0]
  return params
