"""ESM-2 (`transformers.EsmForMaskedLM`, `facebook/esm2_t6_8M_UR50D` ... `esm2_t48_15B_UR50D`,
MIT licence): its Hugging Face folder as a biofm_jax protein masked-language model; and the
same class over DNA 6-mers with learned positions, the Nucleotide Transformer's first
release (`InstaDeepAI/nucleotide-transformer-500m-human-ref` ..., CC-BY-NC-SA).

The architecture, in the options of our shared block: pre-LayerNorm blocks (eps 1e-5) with
biases, exact GELU, rotary positions, a final LayerNorm (`emb_layer_norm_after`), token
dropout (MASK embeds as zero, embeddings scaled by 0.88 / (1 - the row's MASK share)), and
the MLM head dense -> GELU -> LayerNorm -> decoder (tied to the embeddings) + bias.

The vocabulary: ESM's 33 tokens hold our protein tokenizer's 29 (`SequenceTokenizer`
"amino_acid": PAD UNK MASK CLS, then the 25 amino-acid letters), so the embedding rows, the
decoder rows and its bias are taken in our ids' order (`public_ids`); ESM's <eos>, ".",
"-" and <null_1> have no id of ours and are left out. Our sequences start with CLS as
ESM's do, and carry no <eos>. A DNA vocabulary (the Nucleotide Transformer's: 6-mers of
ACGT, then A T C G N) is matched to our nucleotide tokenizer of the same k by token text.

Learned ("absolute") positions: ESM numbers a row's tokens from its padding id + 1 (the pad
id's own row is padding's), so our position p reads the public table's row p + pad + 1.
"""
from __future__ import annotations

from typing import Any

import ml_collections
import numpy as np

from biofm_jax.configs import omics_sequence
from biofm_jax.data import batch as B
from biofm_jax.weights.conversion import UNSEEN_LOGIT, Rule, layer_norm, layer_rules, linear, put_rows, take_rows

NAME = "esm2"
NUCLEOTIDE_NAME = "nucleotide_transformer"
POSITIONS = {"rotary": "rope", "absolute": "learned"}  # ESM's position_embedding_type -> ours
# ESM-2's vocabulary (its tokenizer's vocab.txt), in id order.
ESM_TOKENS = ("<cls>", "<pad>", "<eos>", "<unk>", *"LAGVSERTIDPKQNFYMHWCXBUZO", ".", "-", "<null_1>", "<mask>")
OUR_SPECIALS = {B.PAD_ID: "<pad>", B.UNK_ID: "<unk>", B.MASK_ID: "<mask>", B.CLS_ID: "<cls>"}
_BASES = set("ACGT")
TOKEN_DROPOUT_RATE = 0.15 * 0.8  # ESM-2's mask_ratio_train: the MASK share of its training inputs
# Tensors an ESM-2 folder may hold that the masked LM does not use: the contact-prediction
# head, rotary frequency buffers (recomputed: the same 1 / 10000^(2i/d)), position ids.
IGNORED = (r"esm\.contact_head\..*", r".*rotary_embeddings\.inv_freq", r".*position_ids")


def check_config(hf: dict[str, Any], where: str) -> None:
  """One error naming the field of an ESM folder's config.json that we cannot represent."""
  if hf.get("position_embedding_type", "absolute") not in POSITIONS:
    raise ValueError(f"{where}: position_embedding_type={hf['position_embedding_type']!r}; ESM import supports "
                     f"{sorted(POSITIONS)}")
  if hf.get("hidden_act", "gelu") != "gelu":
    raise ValueError(f"{where}: hidden_act={hf['hidden_act']!r}; ESM import supports 'gelu' only")
  if "auto_map" in hf or hf.get("add_bias_fnn") is False or hf.get("use_glu"):
    raise ValueError(f"{where}: a remote-code ESM variant (the Nucleotide Transformer v2's gated MLP without "
                     f"biases); this version imports the transformers EsmForMaskedLM architecture only")
  if hf.get("is_folding_model"):
    raise ValueError(f"{where}: is_folding_model=true (ESMFold) is not an ESM-2 masked language model")
  if hf.get("hidden_size", 0) % max(hf.get("num_attention_heads", 1), 1):
    raise ValueError(f"{where}: hidden_size {hf.get('hidden_size')} is not divisible by "
                     f"num_attention_heads {hf.get('num_attention_heads')}")
  for field in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size"):
    if not isinstance(hf.get(field), int):
      raise ValueError(f"{where}: field {field!r} is missing or not an integer")


def vocabulary(folder_tokens: tuple[str, ...] | None, hf: dict[str, Any], where: str) -> tuple[str, ...]:
  """The folder's vocabulary (its vocab.txt, or ESM-2's own when it has none), checked."""
  tokens = folder_tokens or ESM_TOKENS
  if len(tokens) != hf["vocab_size"]:
    raise ValueError(f"{where}: vocab_size {hf['vocab_size']} but the vocabulary holds {len(tokens)} tokens")
  return tokens


def tokenizer_kind(tokens: tuple[str, ...]) -> tuple[str, int]:
  """(our tokenizer kind, k) whose tokens a public vocabulary holds: DNA k-mers, or amino acids."""
  kmers = [t for t in tokens if len(t) > 1 and set(t) <= _BASES]
  return ("nucleotide", max(map(len, kmers))) if kmers else ("amino_acid", 1)


def public_ids(tokens: tuple[str, ...], ours: tuple[str, ...], where: str) -> np.ndarray:
  """int64 [our vocabulary]: the public id of each of our token ids."""
  index = {t: i for i, t in enumerate(tokens)}
  names = [OUR_SPECIALS.get(i, token) for i, token in enumerate(ours)]
  missing = [n for n in names if n not in index]
  if missing:
    raise ValueError(f"{where}: the vocabulary lacks {missing[:5]} ({len(missing)} tokens our tokenizer "
                     f"holds)")
  return np.array([index[n] for n in names], np.int64)


def model_config(hf: dict[str, Any]) -> dict[str, Any]:
  """config.model fields of the ESM-2 architecture `hf` (its config.json) describes."""
  return dict(num_layers=hf["num_hidden_layers"], embed_dim=hf["hidden_size"], num_heads=hf["num_attention_heads"],
              head_dim=0, mlp_dim=hf["intermediate_size"],
              position=POSITIONS[hf.get("position_embedding_type", "absolute")], norm="layernorm", bias=True,
              activation="gelu", norm_eps=float(hf.get("layer_norm_eps", 1e-5)), norm_position="pre",
              final_norm=True, token_dropout=TOKEN_DROPOUT_RATE if hf.get("token_dropout", True) else 0.0,
              embedding_norm=bool(hf.get("emb_layer_norm_before", False)), mlm_head="transform")


def base_config(hf: dict[str, Any], max_len: int, kind: str = "amino_acid", k: int = 1) -> ml_collections.ConfigDict:
  """A sequence masked-LM pre-training config (configs/omics_sequence.py: protein, or DNA
  k-mers) with the architecture of `hf` and sequences of up to `max_len` tokens (CLS
  included; with learned positions, no more than the public table holds)."""
  config = omics_sequence.get_config("protein" if kind == "amino_acid" else "tiny")
  config.model.update(model_config(hf))
  if config.model.position == "learned":
    max_len = min(max_len, hf.get("max_position_embeddings", max_len) - hf.get("pad_token_id", 1) - 1)
  config.data.sequence.update(max_len=max_len, kmer=k)
  return config


def rules(hf: dict[str, Any], ids: np.ndarray, modality: str = "sequence", max_len: int = 0) -> list[Rule]:
  """Our parameter paths <- ESM-2's tensor names, with the public shapes config.json implies,
  the hooks that turn ESM-2's values into ours and their inverses (publishing)."""
  d, f, v = hf["hidden_size"], hf["intermediate_size"], hf["vocab_size"]
  h = hf["num_attention_heads"]
  layer = "esm.encoder.layer.{layer}."

  def rows(x):  # vocabulary rows in our ids' order
    return take_rows(x, ids)

  def rows_back(x, fill=0.0):  # our rows at their public ids; the public tokens we lack hold `fill`
    return put_rows(x, ids, v, fill)

  def norm(path, source):
    return layer_norm(path, source, d)

  out = [Rule((f"{modality}_encoder", "code_embedding", "embedding"), "esm.embeddings.word_embeddings.weight",
              (v, d), rows, inverse=rows_back)]
  if POSITIONS[hf.get("position_embedding_type", "absolute")] == "learned":  # see the module docstring
    first = hf.get("pad_token_id", 1) + 1
    out.append(Rule((f"{modality}_encoder", "position_embedding"), "esm.embeddings.position_embeddings.weight",
                    (hf["max_position_embeddings"], d), lambda x: np.ascontiguousarray(x[first:first + max_len]),
                    inverse=None))
  if hf.get("emb_layer_norm_before"):
    out += norm((f"{modality}_encoder", "embedding_norm"), "esm.embeddings.layer_norm")
  out += layer_rules({"query": layer + "attention.self.query", "key": layer + "attention.self.key",
                      "value": layer + "attention.self.value", "out": layer + "attention.output.dense",
                      "attention_norm": layer + "attention.LayerNorm", "wi": layer + "intermediate.dense",
                      "wo": layer + "output.dense", "mlp_norm": layer + "LayerNorm"}, d, f, h)
  out += norm(("transformer", "final_norm"), "esm.encoder.emb_layer_norm_after")
  head = ("code_head",)
  out += [linear(head + ("transform", "kernel"), "lm_head.dense.weight", (d, d)),
          Rule(head + ("transform", "bias"), "lm_head.dense.bias", (d,))]
  out += norm(head + ("transform_norm",), "lm_head.layer_norm")
  # Published, a token we have no row for is never predicted: its bias is far below any logit.
  out += [Rule(head + ("dense", "kernel"), "lm_head.decoder.weight", (v, d), lambda x: np.ascontiguousarray(rows(x).T),
               tied_to="esm.embeddings.word_embeddings.weight", inverse=lambda x: rows_back(np.ascontiguousarray(x.T))),
          Rule(head + ("dense", "bias"), "lm_head.bias", (v,), rows, inverse=lambda x: rows_back(x, UNSEEN_LOGIT))]
  return out
