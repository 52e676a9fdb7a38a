"""Our runs published in a public model's own Hugging Face format, so its users load them
with `transformers` (`experiments/export.py --format=hf`).

A run is published only where the public class computes exactly what our model does; any
option that differs is named in the refusal (`model.norm='rmsnorm': EsmForMaskedLM computes
'layernorm'`). The class follows the run's modality:

* proteins (`data.sequence`, amino-acid tokens) as `EsmForMaskedLM` (ESM-2): `model.safetensors`
  under ESM-2's names, `config.json`, ESM's `vocab.txt`. ESM tokens we have no row for
  (<eos>, ".", "-", <null_1>) get zero rows and a decoder bias of `UNSEEN_LOGIT`, so they are
  never predicted;
* cells (`data.omics`, rank tokenisation) as Geneformer's `BertForMaskedLM`, with its token
  and gene-median dictionaries (pickles of plain dicts, which Geneformer's tokenizer reads):
  <pad> <mask> <cls> <eos>, then our genes in our order; the token-type row is zero (our
  position table already holds it), the position table has our `max_len` rows;
* 2-D images (`data.imaging`) as `ViTMAEModel`, the encoder (what RETFound and ViT-MAE's
  feature users load): a CLS token is required; a fixed sin-cos table is written as the
  position table our model adds, so learned and fixed positions both publish.

Each publisher is a row of `PUBLISHERS`: the modality it reads, the public class, the
`config.model` fields that class computes, the checks beyond those, and the writer.
"""
from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import pickle
from typing import Any, Callable

import ml_collections
import numpy as np

from biofm_jax.config import ARCHITECTURE_DEFAULTS
from biofm_jax.data import batch as B
from biofm_jax.modalities.sequence.data import SequenceTokenizer
from biofm_jax.models.patches import grid_shape, sincos_position_embedding
from biofm_jax.train.runs import open_run
from biofm_jax.weights import esm2, geneformer, vit_mae
from biofm_jax.weights.conversion import publish
from biofm_jax.weights.run_folder import IMPORT_RECORD, check_out, param_paths, written_whole

HF_FORMATS = ("hf",)
ESM_CLASS = "EsmForMaskedLM"
BERT_CLASS = "BertForMaskedLM"
VIT_MAE_CLASS = "ViTMAEModel"
# What each class computes, as our config.model fields.
ESM_ARCHITECTURE = dict(norm="layernorm", norm_position="pre", bias=True, activation="gelu", final_norm=True,
                        position="rope", mlm_head="transform", scan_layers=True)
BERT_ARCHITECTURE = dict(norm="layernorm", norm_position="post", bias=True, final_norm=False, position="learned",
                         mlm_head="transform", embedding_norm=True, token_dropout=0.0, scan_layers=True)
VIT_MAE_ARCHITECTURE = dict(norm="layernorm", norm_position="pre", bias=True, activation="gelu", final_norm=True,
                            cls_token=True, embedding_norm=False, scan_layers=True)
# Geneformer's dictionaries: its specials in its order, then the genes.
GENEFORMER_SPECIALS = ("<pad>", "<mask>", "<cls>", "<eos>")
GENEFORMER_TOKEN_FILE, GENEFORMER_MEDIAN_FILE = "token_dictionary.pkl", "gene_median_dictionary.pkl"
Params = dict[tuple[str, ...], np.ndarray]


@dataclasses.dataclass(frozen=True)
class Publisher:
  modality: str  # the config.data section of the runs it publishes
  public_class: str
  architecture: dict[str, Any]
  differences: Callable[[ml_collections.ConfigDict], list[str]]  # beyond `architecture`
  # (config, data module, {path: array}, import record or None, staging folder) -> files written
  write: Callable[[ml_collections.ConfigDict, Any, Params, dict | None, pathlib.Path], None]


def _architecture_differences(config: ml_collections.ConfigDict, publisher: Publisher) -> list[str]:
  problems = []
  model = config.model
  for field, value in publisher.architecture.items():
    if model.get(field, ARCHITECTURE_DEFAULTS.get(field)) != value:  # a field a run predates: its default
      problems.append(f"model.{field}={model.get(field)!r}: {publisher.public_class} computes {value!r}")
  if model.head_dim and model.head_dim * model.num_heads != model.embed_dim:
    problems.append(f"model.head_dim={model.head_dim}: {publisher.public_class} has embed_dim / num_heads")
  return problems


def differences(config: ml_collections.ConfigDict, publisher: Publisher) -> list[str]:
  """Each way the run differs from what the publisher's class computes, as a readable line."""
  problems = []
  if "task" in config:
    problems.append(f"the run is fine-tuned for the task {config.task.name!r}; {publisher.public_class} is the "
                    f"pre-trained model (publish the pre-training run)")
  if "multimodal" in config.data or publisher.modality not in config.data:
    problems.append(f"the run's data is not one {publisher.modality} modality ({publisher.public_class} reads "
                    f"{publisher.modality} only)")
    return problems
  return problems + publisher.differences(config) + _architecture_differences(config, publisher)


# ESM-2 (proteins) ---------------------------------------------------------------------------

def _esm_checks(config: ml_collections.ConfigDict) -> list[str]:
  problems = []
  if config.data.sequence.tokenizer != "amino_acid":
    problems.append(f"data.sequence.tokenizer={config.data.sequence.tokenizer!r}: {ESM_CLASS} reads 'amino_acid' "
                    f"tokens")
  if config.objective.get("name") != "masked":
    problems.append(f"objective.name={config.objective.get('name')!r}: {ESM_CLASS} is a 'masked' language model")
  if config.model.get("token_dropout", 0.0) not in (0.0, esm2.TOKEN_DROPOUT_RATE):
    problems.append(f"model.token_dropout={config.model.token_dropout!r}: {ESM_CLASS} has 0 or "
                    f"{esm2.TOKEN_DROPOUT_RATE}")
  return problems


def esm_config(config: ml_collections.ConfigDict, imported: dict[str, Any] | None) -> dict[str, Any]:
  """config.json of the EsmForMaskedLM that computes the run's model."""
  model = config.model
  hf = dict((imported or {}).get("public_config") or {})
  hf.update(architectures=[ESM_CLASS], model_type="esm", vocab_size=len(esm2.ESM_TOKENS),
            mask_token_id=esm2.ESM_TOKENS.index("<mask>"), pad_token_id=esm2.ESM_TOKENS.index("<pad>"),
            eos_token_id=esm2.ESM_TOKENS.index("<eos>"), hidden_size=model.embed_dim,
            num_hidden_layers=model.num_layers, num_attention_heads=model.num_heads,
            intermediate_size=model.mlp_dim, hidden_act="gelu", position_embedding_type="rotary",
            max_position_embeddings=max(1026, config.data.sequence.max_len + 2),
            layer_norm_eps=float(model.norm_eps), token_dropout=bool(model.token_dropout),
            emb_layer_norm_before=bool(model.embedding_norm), hidden_dropout_prob=float(model.dropout_rate),
            attention_probs_dropout_prob=float(model.dropout_rate), tie_word_embeddings=False,
            is_folding_model=False, dtype="float32")
  return hf


def _write_esm(config, data, params: Params, imported, staging: pathlib.Path) -> None:
  del data
  hf = esm_config(config, imported)
  ids = esm2.public_ids(esm2.ESM_TOKENS, SequenceTokenizer("amino_acid").tokens, "ESM-2's vocabulary")
  _save(staging, publish(params, esm2.rules(hf, ids), config.model.num_layers), hf)
  (staging / "vocab.txt").write_text("\n".join(esm2.ESM_TOKENS) + "\n")
  (staging / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "EsmTokenizer",
                                                             "model_max_length": config.data.sequence.max_len + 1}))


# Geneformer (cells) --------------------------------------------------------------------------

def _geneformer_checks(config: ml_collections.ConfigDict) -> list[str]:
  omics, problems = config.data.omics, []
  if omics.tokenization != "rank":
    problems.append(f"data.omics.tokenization={omics.tokenization!r}: Geneformer reads 'rank' tokens")
  elif omics.log1p:  # Geneformer ranks count / median; ranks of log1p(count) / median differ
    problems.append("data.omics.log1p=True: Geneformer ranks counts divided by medians, without log1p")
  if config.objective.get("name") != "masked":
    problems.append(f"objective.name={config.objective.get('name')!r}: {BERT_CLASS} is a 'masked' language model")
  if config.model.get("activation") not in geneformer.ACTIVATIONS:
    problems.append(f"model.activation={config.model.get('activation')!r}: {BERT_CLASS} computes one of "
                    f"{sorted(geneformer.ACTIVATIONS)}")
  return problems


def geneformer_dictionaries(vocab) -> tuple[dict[str, int], dict[str, float], np.ndarray]:
  """(token dictionary, gene median dictionary, the public id of each of our token ids) of
  our gene vocabulary, in Geneformer V2's layout."""
  tokens = {name: i for i, name in enumerate(GENEFORMER_SPECIALS + tuple(vocab.genes))}
  ids = np.full(vocab.size, -1, np.int64)  # our UNK has no row: the tokenisation drops unknown genes
  for ours, name in geneformer.SPECIALS.items():
    ids[ours] = tokens[name]
  ids[B.NUM_SPECIAL:] = np.arange(len(vocab.genes)) + len(GENEFORMER_SPECIALS)
  return tokens, {g: float(m) for g, m in zip(vocab.genes, vocab.gene_medians)}, ids


def _write_geneformer(config, data, params: Params, imported, staging: pathlib.Path) -> None:
  model, max_len = config.model, config.data.omics.max_len
  tokens, medians, ids = geneformer_dictionaries(data.vocab)
  hf = {key: value for key, value in ((imported or {}).get("public_config") or {}).items()
        if key in ("_name_or_path", "transformers_version")}
  hf.update(architectures=[BERT_CLASS], model_type="bert", vocab_size=len(tokens), hidden_size=model.embed_dim,
            num_hidden_layers=model.num_layers, num_attention_heads=model.num_heads, intermediate_size=model.mlp_dim,
            hidden_act=geneformer.ACTIVATIONS[model.activation], max_position_embeddings=max_len,
            type_vocab_size=2, layer_norm_eps=float(model.norm_eps), position_embedding_type="absolute",
            pad_token_id=tokens["<pad>"], hidden_dropout_prob=float(model.dropout_rate),
            attention_probs_dropout_prob=float(model.dropout_rate), tie_word_embeddings=False, dtype="float32")
  rules = [r for r in geneformer.rules(hf, ids, max_len) if r.path != ("_token_type",)]
  tensors = publish(params, rules, model.num_layers)
  # Token type 0 is already in our position rows (imports fold it in): its public row is zero.
  tensors["bert.embeddings.token_type_embeddings.weight"] = np.zeros((2, model.embed_dim), np.float32)
  # Untied, transformers reads the decoder's bias under its own name too (tied, the same tensor).
  tensors["cls.predictions.decoder.bias"] = tensors["cls.predictions.bias"].copy()
  _save(staging, tensors, hf)
  # Pickles of plain dicts of str -> int / float: Geneformer's tokenizer reads these files.
  for name, table in ((GENEFORMER_TOKEN_FILE, tokens), (GENEFORMER_MEDIAN_FILE, medians)):
    with open(staging / name, "wb") as f:
      pickle.dump(table, f, protocol=4)


# ViT-MAE (2-D images) ------------------------------------------------------------------------

def _vit_mae_checks(config: ml_collections.ConfigDict) -> list[str]:
  imaging, problems = config.data.imaging, []
  size, patch = tuple(imaging.image_size), tuple(imaging.patch_size)
  if len(size) != 2:
    problems.append(f"data.imaging.image_size={list(size)}: {VIT_MAE_CLASS} reads 2-D images")
  elif size[0] != size[1] or patch[0] != patch[1]:
    problems.append(f"data.imaging.image_size={list(size)}, patch_size={list(patch)}: {VIT_MAE_CLASS} has square "
                    f"images and patches")
  if config.objective.get("name") != "mae":
    problems.append(f"objective.name={config.objective.get('name')!r}: {VIT_MAE_CLASS} is an MAE encoder")
  if config.model.get("position") not in ("learned", "sincos"):
    problems.append(f"model.position={config.model.get('position')!r}: {VIT_MAE_CLASS} adds a position table")
  return problems


def _write_vit_mae(config, data, params: Params, imported, staging: pathlib.Path) -> None:
  del data
  model, imaging = config.model, config.data.imaging
  size, patch = int(imaging.image_size[0]), int(imaging.patch_size[0])
  hf = {key: value for key, value in ((imported or {}).get("public_config") or {}).items()
        if key.startswith("decoder_") or key in ("_name_or_path", "transformers_version")}
  hf.update(architectures=[VIT_MAE_CLASS], model_type="vit_mae", hidden_size=model.embed_dim,
            num_hidden_layers=model.num_layers, num_attention_heads=model.num_heads, intermediate_size=model.mlp_dim,
            hidden_act="gelu", layer_norm_eps=float(model.norm_eps), image_size=size, patch_size=patch,
            num_channels=int(imaging.channels), qkv_bias=True, mask_ratio=float(imaging.mask_ratio),
            norm_pix_loss=bool(config.objective.get("norm_pix_loss", False)),
            hidden_dropout_prob=float(model.dropout_rate), attention_probs_dropout_prob=float(model.dropout_rate),
            dtype="float32")
  params = dict(params)
  position = ("imaging_encoder", "position_embedding")
  if position not in params:  # a fixed table: the rows our model adds (CLS's row is zeros, as MAE's)
    table = sincos_position_embedding(grid_shape((size, size), (patch, patch)), model.embed_dim)
    params[position] = np.concatenate([np.zeros((1, model.embed_dim)), table]).astype(np.float32)
  _save(staging, publish(params, vit_mae.rules(hf, prefix=""), model.num_layers), hf)
  (staging / "preprocessor_config.json").write_text(json.dumps({
      "image_processor_type": "ViTImageProcessor", "size": {"height": size, "width": size},
      "do_resize": False, "do_rescale": False, "do_normalize": False}, indent=2))


def _save(staging: pathlib.Path, tensors: dict[str, np.ndarray], hf: dict[str, Any]) -> None:
  from safetensors.numpy import save_file  # optional: the `weights` extra (pip install -e '.[weights]')
  save_file(tensors, str(staging / "model.safetensors"), metadata={"format": "pt"})
  (staging / "config.json").write_text(json.dumps(hf, indent=2, sort_keys=True))


PUBLISHERS = (Publisher("sequence", ESM_CLASS, ESM_ARCHITECTURE, _esm_checks, _write_esm),
              Publisher("omics", BERT_CLASS, BERT_ARCHITECTURE, _geneformer_checks, _write_geneformer),
              Publisher("imaging", VIT_MAE_CLASS, VIT_MAE_ARCHITECTURE, _vit_mae_checks, _write_vit_mae))


def publisher_for(config: ml_collections.ConfigDict) -> Publisher:
  """The publisher of the run's modality; an error lists what publishes."""
  for publisher in PUBLISHERS:
    if publisher.modality in config.data and "multimodal" not in config.data:
      return publisher
  raise ValueError("no public class computes this run's model; publishable runs: " + ", ".join(
      f"{p.modality} ({p.public_class})" for p in PUBLISHERS))


def esm_differences(config: ml_collections.ConfigDict) -> list[str]:
  """Each way the run differs from what EsmForMaskedLM computes."""
  return differences(config, PUBLISHERS[0])


def publish_run(workdir: str | os.PathLike, out: str | os.PathLike, fmt: str = "hf") -> pathlib.Path:
  """Writes the run's latest parameters to `out` as the public class that computes them."""
  if fmt not in HF_FORMATS:
    raise ValueError(f"--format={fmt!r}: choose one of {HF_FORMATS}")
  workdir, out = pathlib.Path(workdir).absolute(), pathlib.Path(out).absolute()
  check_out(out)
  config, data, _, params, _ = open_run(workdir)
  publisher = publisher_for(config)
  problems = differences(config, publisher)
  if problems:
    raise ValueError(f"{workdir} cannot be published as {publisher.public_class}: " + "; ".join(problems))
  record_path = workdir / IMPORT_RECORD
  imported = json.loads(record_path.read_text()) if record_path.is_file() and not record_path.is_symlink() else None
  flat = {path: np.asarray(leaf) for path, leaf in param_paths(params).items()}
  with written_whole(out, "publishing") as staging:
    publisher.write(config, data, flat, imported, staging)
  return out
