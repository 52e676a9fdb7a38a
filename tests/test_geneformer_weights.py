"""Geneformer in: a folder as Geneformer ships it (a `BertForMaskedLM` in safetensors, its
token and gene-median dictionaries as pickles) imports as an expression run whose model
gives BertForMaskedLM's hidden states and MLM logits, whose rank tokenisation gives
Geneformer's gene tokens for the same cells, and whose pickles are read as plain values only.

Nothing downloads: the test builds a small random BertForMaskedLM with torch on the CPU,
and dictionaries of made-up Ensembl ids, as Geneformer V2's (<pad> <mask> <cls> <eos>, genes).
"""
from __future__ import annotations

import json
import pathlib
import pickle
import shutil

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
anndata = pytest.importorskip("anndata")

from biofm_jax.data import batch as B  # noqa: E402
from biofm_jax.weights import geneformer  # noqa: E402
from biofm_jax.weights.formats import import_folder  # noqa: E402

GENES = [f"ENSG{i:011d}" for i in range(1, 41)]
SPECIALS = ["<pad>", "<mask>", "<cls>", "<eos>"]
MAX_LEN = 24


def _geneformer_folder(folder: pathlib.Path) -> tuple[pathlib.Path, object, dict, dict]:
  torch.manual_seed(0)
  hf = transformers.BertConfig(vocab_size=len(SPECIALS) + len(GENES), hidden_size=32, num_hidden_layers=2,
                               num_attention_heads=4, intermediate_size=48, hidden_act="relu",
                               max_position_embeddings=64, type_vocab_size=2, layer_norm_eps=1e-12,
                               hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, pad_token_id=0)
  model = transformers.BertForMaskedLM(hf).eval()
  with torch.no_grad():  # every norm and bias off its initial value; weights at a scale where ReLU bites
    for name, p in model.named_parameters():
      if "LayerNorm" in name or name.endswith("bias"):
        p.add_(0.1 * torch.randn_like(p))
      elif "encoder.layer" in name or "embeddings" in name:
        p.mul_(10.0)
  model.save_pretrained(folder, safe_serialization=True)
  tokens = {name: i for i, name in enumerate(SPECIALS + GENES)}
  rng = np.random.default_rng(0)
  # Geneformer's medians are numpy floats: the restricted unpickler must admit those.
  medians = {g: np.float32(rng.uniform(0.5, 5.0)) for g in GENES}
  with open(folder / "token_dictionary_gc104M.pkl", "wb") as f:
    pickle.dump(tokens, f)
  with open(folder / "gene_median_dictionary_gc104M.pkl", "wb") as f:
    pickle.dump(medians, f)
  return folder, model, tokens, medians


def _cells(path: pathlib.Path, num_cells: int = 60) -> pathlib.Path:
  """Raw counts over the model's genes plus 5 it does not know, distinct values per cell
  (no ties in the ranks), a split column."""
  rng = np.random.default_rng(1)
  names = GENES + [f"OTHER{i}" for i in range(5)]
  counts = rng.poisson(rng.uniform(0.2, 6.0, size=(num_cells, len(names)))).astype(np.float32)
  counts += rng.uniform(0, 1e-3, counts.shape).astype(np.float32) * (counts > 0)
  split = np.array(["train", "tuning", "held_out"])[np.arange(num_cells) % 3]
  import pandas as pd
  adata = anndata.AnnData(X=counts, obs=pd.DataFrame({"split": split}, index=[f"c{i}" for i in range(num_cells)]),
                          var=pd.DataFrame(index=names))
  adata.write_h5ad(path)
  return path


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
  root = tmp_path_factory.mktemp("geneformer")
  folder, model, tokens, medians = _geneformer_folder(root / "gf")
  cells = _cells(root / "cells.h5ad")
  run = import_folder("geneformer", folder, root / "run", max_len=MAX_LEN,
                      overrides={"data.omics.path": str(cells)})
  return folder, model, tokens, medians, cells, run


def _geneformer_tokens(counts: np.ndarray, names: list[str], tokens: dict, medians: dict, keep: int) -> list[int]:
  """Geneformer's TranscriptomeTokenizer for one cell: counts / total * 10,000 / the gene's
  median over the genes it knows, nonzero ones ranked by that value, <cls> first."""
  known = np.array([n in tokens for n in names])
  values = counts / counts.sum() * 10_000
  genes = [n for n, k in zip(names, known) if k]
  norm = np.array([medians[g] for g in genes], np.float64)
  vector = values[known] / norm
  nonzero = np.nonzero(vector)[0]
  order = nonzero[np.argsort(-vector[nonzero], kind="stable")]
  return [tokens["<cls>"]] + [tokens[genes[i]] for i in order][:keep - 1]


def test_cells_tokenise_to_geneformers_gene_tokens(imported):
  from biofm_jax.train.runs import open_run
  _, _, tokens, medians, cells, run = imported
  _, data, _, _, _ = open_run(run)
  ids = np.asarray(json.loads((run / "imported.json").read_text())["public_ids"])
  adata = anndata.read_h5ad(cells)
  tokenize = data.transforms(train=False, mask=False)[0]
  source = data.source("held_out")
  checked = 0
  for i in range(len(source)):
    record = source[i]
    row = int(np.flatnonzero(adata.obs_names == record["cell_id"])[0]) if "cell_id" in record else None
    assert row is not None
    ours = tokenize.map(record)
    mine = ids[ours[B.TOKENS][ours[B.TOKEN_MASK]]].tolist()
    assert mine == _geneformer_tokens(np.asarray(adata.X[row]).ravel(), list(adata.var_names), tokens, medians,
                                      MAX_LEN)
    checked += 1
  assert checked >= 15


def test_an_imported_geneformer_gives_berts_hidden_states_and_logits(imported):
  from biofm_jax.train.runs import open_run
  _, model, _, _, _, run = imported
  config, data, setup, params, _ = open_run(run)
  assert config.model.norm_position == "post" and config.model.activation == "relu" and not config.model.final_norm
  ids = np.asarray(json.loads((run / "imported.json").read_text())["public_ids"])
  tokenize = data.transforms(train=False, mask=False)[0]
  source = data.source("train")
  rows = [tokenize.map(source[i]) for i in range(6)]
  tokens = np.stack([r[B.TOKENS] for r in rows])
  mask = np.stack([r[B.TOKEN_MASK] for r in rows])
  tokens[0, 2] = tokens[3, 5] = B.MASK_ID  # masked genes, as pre-training feeds them
  ours = setup.model.apply({"params": params}, {"omics": {B.TOKENS: tokens, B.TOKEN_MASK: mask}}, train=False)["omics"]
  with torch.no_grad():
    theirs = model(input_ids=torch.from_numpy(np.maximum(ids[tokens], 0)),
                   attention_mask=torch.from_numpy(mask.astype(np.int64)), output_hidden_states=True)
  np.testing.assert_allclose(np.asarray(ours["hidden"])[mask], theirs.hidden_states[-1].numpy()[mask], atol=1e-4,
                             rtol=0)
  known = ids >= 0
  logits = np.asarray(ours["code_logits"])[mask][:, known]
  np.testing.assert_allclose(logits, theirs.logits.numpy()[mask][:, ids[known]], atol=1e-4, rtol=0)
  assert logits.std() > 0.1


class _Payload:
  """A class a crafted pickle rebuilds: reading the dictionary must not."""

  def __reduce__(self):
    return (shutil.rmtree, ("/nonexistent-biofm-test-folder",))


@pytest.mark.parametrize("crafted, message", [
    ("code", r"token_dictionary_gc104M\.pkl: the pickle asks for shutil\.rmtree; only plain dicts"),
    ("array", r"gene_median_dictionary_gc104M\.pkl: the pickle asks for numpy\._core\.multiarray\._reconstruct"),
    ("date_scalar", r"gene_median_dictionary_gc104M\.pkl: the pickle holds a numpy value of dtype datetime64; only numbers"),
    ("not_a_dict", r"token_dictionary_gc104M\.pkl: holds a list, expected a dict"),
    ("string_value", r"gene_median_dictionary_gc104M\.pkl: entry 'ENSG00000000001': str, expected str keys"),
    ("no_cls", r"the token dictionary lacks \['<cls>'\]; Geneformer V1 dictionaries"),
    ("no_cells", r"--format=geneformer: set --config\.data\.omics\.path"),
])
def test_a_crafted_geneformer_folder_is_refused_and_runs_nothing(imported, tmp_path, crafted, message):
  source, _, tokens, medians, cells, _ = imported
  folder = tmp_path / "crafted"
  shutil.copytree(source, folder)
  token_file, median_file = folder / "token_dictionary_gc104M.pkl", folder / "gene_median_dictionary_gc104M.pkl"
  if crafted == "code":
    token_file.write_bytes(pickle.dumps({"<pad>": _Payload()}))
  elif crafted == "array":  # a numpy array is rebuilt by a function the unpickler does not admit
    median_file.write_bytes(pickle.dumps({g: np.array([1.0]) for g in GENES}))
  elif crafted == "date_scalar":  # numpy's scalar is admitted, for numbers only
    median_file.write_bytes(pickle.dumps({g: np.datetime64("2020-01-01") for g in GENES}))
  elif crafted == "not_a_dict":
    token_file.write_bytes(pickle.dumps(list(tokens)))
  elif crafted == "string_value":
    median_file.write_bytes(pickle.dumps({g: "1.0" for g in GENES}))
  elif crafted == "no_cls":
    token_file.write_bytes(pickle.dumps({k: v for k, v in tokens.items() if k != "<cls>"}))
  out = tmp_path / "out"
  overrides = {} if crafted == "no_cells" else {"data.omics.path": str(cells)}
  with pytest.raises(ValueError, match=message):
    import_folder("geneformer", folder, out, max_len=MAX_LEN, overrides=overrides)
  assert not out.exists() and not list(tmp_path.glob(".out*"))


def test_an_imported_geneformer_publishes_back_as_bert_with_its_dictionaries(imported, tmp_path):
  """Import then publish: Geneformer's dictionaries come back (read as plain values again),
  its tensors come back (positions cut to our rows, token type 0 folded into them), and
  transformers' BertForMaskedLM loaded from the folder computes the original's hidden states
  and logits over the tokens we have rows for."""
  from safetensors.numpy import load_file
  from biofm_jax.weights.pickles import read_plain_dict
  from biofm_jax.weights.publish import publish_run
  folder, model, tokens, medians, _, run = imported
  published = publish_run(run, tmp_path / "hf")
  assert read_plain_dict(published / "token_dictionary.pkl", str, (int,)) == tokens
  again_medians = read_plain_dict(published / "gene_median_dictionary.pkl", str, (float,))
  assert again_medians.keys() == medians.keys()
  np.testing.assert_allclose([again_medians[g] for g in GENES], [medians[g] for g in GENES], rtol=1e-7)

  original, again = load_file(str(folder / "model.safetensors")), load_file(str(published / "model.safetensors"))
  positions = "bert.embeddings.position_embeddings.weight"
  token_type = "bert.embeddings.token_type_embeddings.weight"
  np.testing.assert_allclose(again[positions], original[positions][:MAX_LEN] + original[token_type][0], atol=1e-6)
  assert not again[token_type].any()
  eos = tokens["<eos>"]
  for name, value in original.items():
    if name in (positions, token_type) or "pooler" in name or "position_ids" in name:
      continue
    mine = again[name]
    if name in ("bert.embeddings.word_embeddings.weight", "cls.predictions.bias", "cls.predictions.decoder.bias"):
      mine, value = np.delete(mine, eos, axis=0), np.delete(value, eos, axis=0)  # <eos>: no row of ours
    np.testing.assert_array_equal(mine, value, err_msg=name)

  bert = transformers.BertForMaskedLM.from_pretrained(published).eval()
  rng = np.random.default_rng(3)
  ids = np.concatenate([np.full((4, 1), tokens["<cls>"]), rng.integers(len(SPECIALS), len(tokens), (4, 15))], 1)
  ids[1, 4] = tokens["<mask>"]
  with torch.no_grad():
    theirs = model(input_ids=torch.from_numpy(ids), output_hidden_states=True)
    mine = bert(input_ids=torch.from_numpy(ids), output_hidden_states=True)
  np.testing.assert_allclose(mine.hidden_states[-1].numpy(), theirs.hidden_states[-1].numpy(), atol=1e-4, rtol=0)
  keep = np.arange(len(tokens)) != eos
  np.testing.assert_allclose(mine.logits.numpy()[..., keep], theirs.logits.numpy()[..., keep], atol=1e-4, rtol=0)
  assert (mine.logits.numpy().argmax(-1) != eos).all()


def test_an_expression_run_bert_does_not_compute_is_refused_naming_each_difference():
  from biofm_jax.config import load_config
  from biofm_jax.weights.publish import differences, publisher_for
  config = load_config(str(pathlib.Path(__file__).parents[1] / "configs/omics_expression.py:tiny"))
  problems = "; ".join(differences(config, publisher_for(config)))
  for expected in ("data.omics.tokenization='binned': Geneformer reads 'rank' tokens",
                   "model.norm_position='pre': BertForMaskedLM computes 'post'", "model.embedding_norm=False"):
    assert expected in problems
