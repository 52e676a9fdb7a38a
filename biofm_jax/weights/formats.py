"""The public formats `experiments/import_weights.py --format` reads, each from a local
Hugging Face folder: `import_folder(format, folder, out, ...)` converts one into a run folder."""
from __future__ import annotations

import functools
import json
import os
import pathlib
from typing import Any

from biofm_jax.config import check_config, set_field
from biofm_jax.modalities.sequence.data import SequenceTokenizer
from biofm_jax.modalities.omics.gene_vocab import VOCAB_FILENAME
from biofm_jax.weights import esm2, geneformer, vit_mae
from biofm_jax.weights.conversion import convert
from biofm_jax.weights.run_folder import check_out, write_run_folder
from biofm_jax.weights.tensors import TensorFolder

FORMATS = (esm2.NAME, esm2.NUCLEOTIDE_NAME, geneformer.NAME, vit_mae.NAME)
# Formats the issue names that are not converted yet: an error says so rather than guessing.
PLANNED = ("timm_vit",)


def read_config(folder: pathlib.Path) -> dict[str, Any]:
  path = folder / "config.json"
  if path.is_symlink() or not path.is_file():
    raise ValueError(f"{folder}: no config.json (a Hugging Face model folder holds one)")
  try:
    hf = json.loads(path.read_text())
  except ValueError as e:
    raise ValueError(f"{path}: not JSON ({e})") from None
  if not isinstance(hf, dict):
    raise ValueError(f"{path}: not a JSON object")
  return hf


def read_vocab_txt(folder: pathlib.Path) -> tuple[str, ...] | None:
  path = folder / "vocab.txt"
  if not path.exists():
    return None
  if path.is_symlink() or not path.is_file():
    raise ValueError(f"{path}: not a regular file")
  return tuple(line.strip() for line in path.read_text().splitlines() if line.strip())


def convert_esm2(folder: pathlib.Path, max_len: int, *, nucleotides: bool = False):
  """(config, {our path: array}, record, artifacts) of an ESM folder: ESM-2, or with
  `nucleotides` the Nucleotide Transformer's DNA model of the same class."""
  hf = read_config(folder)
  where = str(folder / "config.json")
  if hf.get("model_type", "esm") != "esm":
    raise ValueError(f"{where}: model_type {hf.get('model_type')!r} is not an ESM model ('esm')")
  esm2.check_config(hf, where)
  tokens = read_vocab_txt(folder)
  if nucleotides and tokens is None:
    raise ValueError(f"{folder}: no vocab.txt; the Nucleotide Transformer's k-mer vocabulary is read from it")
  tokens = esm2.vocabulary(tokens, hf, str(folder / "vocab.txt"))
  kind, k = esm2.tokenizer_kind(tokens)
  if nucleotides != (kind == "nucleotide"):
    wanted = esm2.NUCLEOTIDE_NAME if kind == "nucleotide" else esm2.NAME
    raise ValueError(f"{folder / 'vocab.txt'}: a {'DNA k-mer' if kind == 'nucleotide' else 'protein'} vocabulary; "
                     f"import it with --format={wanted}")
  ids = esm2.public_ids(tokens, SequenceTokenizer(kind, k).tokens, str(folder / "vocab.txt"))
  config = esm2.base_config(hf, max_len, kind, k)
  params = convert(TensorFolder(folder), esm2.rules(hf, ids, max_len=config.data.sequence.max_len),
                   hf["num_hidden_layers"], ignored=esm2.IGNORED)
  record = {"format": esm2.NUCLEOTIDE_NAME if nucleotides else esm2.NAME, "public_config": hf,
            "public_vocabulary": list(tokens), "public_ids": ids.tolist()}
  return config, params, record, {}


def convert_geneformer(folder: pathlib.Path, max_len: int):
  """(config, {our path: array}, record, artifacts) of a Geneformer folder."""
  hf = read_config(folder)
  where = str(folder / "config.json")
  geneformer.check_config(hf, where)
  tokens, medians = geneformer.dictionaries(folder)
  config = geneformer.base_config(hf, max_len)
  vocab, ids = geneformer.gene_vocab(tokens, medians, hf, str(folder), config.data.omics.num_value_bins)
  params = convert(TensorFolder(folder), geneformer.rules(hf, ids, config.data.omics.max_len),
                   hf["num_hidden_layers"], ignored=geneformer.IGNORED)
  record = {"format": geneformer.NAME, "public_config": hf, "public_ids": ids.tolist()}
  return config, geneformer.fold_token_type(params), record, {VOCAB_FILENAME: vocab.save}


def convert_vit_mae(folder: pathlib.Path, max_len: int):
  """(config, {our path: array}, record, artifacts) of a ViT-MAE folder (its encoder)."""
  del max_len  # images have their geometry in config.json
  hf = read_config(folder)
  vit_mae.check_config(hf, str(folder / "config.json"))
  tensors = TensorFolder(folder)
  prefix = "vit." if any(name.startswith("vit.") for name in tensors.names) else ""
  params = convert(tensors, vit_mae.rules(hf, prefix), hf["num_hidden_layers"], ignored=vit_mae.IGNORED)
  record = {"format": vit_mae.NAME, "public_config": hf, "not_imported": ["the MAE decoder"]}
  return vit_mae.base_config(hf), params, record, {}


CONVERTERS = {esm2.NAME: convert_esm2, esm2.NUCLEOTIDE_NAME: functools.partial(convert_esm2, nucleotides=True),
              geneformer.NAME: convert_geneformer, vit_mae.NAME: convert_vit_mae}
# Our parameters that a format does not provide, initialised afresh (path prefixes).
FRESH = {vit_mae.NAME: vit_mae.FRESH}
# Formats whose run must open the user's data at import (a vocabulary of named genes finds
# none of them in generated data): the config field, and what it names.
NEEDS_DATA = {geneformer.NAME: ("data.omics.path", "cells (.h5ad or TileDB-SOMA) measured on the model's genes")}


def import_folder(fmt: str, folder: str | os.PathLike, out: str | os.PathLike, *, max_len: int,
                  overrides: dict[str, Any] | None = None) -> pathlib.Path:
  """Converts the public model in `folder` (format `fmt`) into the run folder `out`.
  `overrides` ({"data.sequence.path": ...}) set fields of the run's config."""
  folder = pathlib.Path(folder)
  if fmt in PLANNED:
    raise ValueError(f"--format={fmt}: not converted yet; this version imports {', '.join(FORMATS)}")
  if fmt not in FORMATS:
    raise ValueError(f"--format={fmt!r}: unknown; choose one of {', '.join(FORMATS)}")
  if not folder.is_dir():
    raise ValueError(f"--from {folder}: not a folder")
  check_out(pathlib.Path(out))  # before any tensor is read
  config, params, record, artifacts = CONVERTERS[fmt](folder, max_len)
  for dotted, value in (overrides or {}).items():
    set_field(config, dotted, value)
  check_config(config)
  if fmt in NEEDS_DATA:
    field, what = NEEDS_DATA[fmt]
    if not functools.reduce(lambda node, key: node[key], field.split("."), config):
      raise ValueError(f"--format={fmt}: set --config.{field} to your {what}")
  record["source_folder"] = str(folder.absolute())
  return write_run_folder(config, params, out, record, artifacts, fresh=FRESH.get(fmt, ()))
