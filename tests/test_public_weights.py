"""Public weights in and out: an ESM-2 folder written by `transformers` imports as a run
folder whose model gives ESM-2's own hidden states and MLM logits, tokenises as ESM's
tokenizer does, continues pre-training on a FASTA, and refuses a crafted folder before
writing; a run with ESM-2's architecture publishes as a folder `EsmForMaskedLM` loads with
the run's own outputs.

Nothing downloads: each test builds a small random `EsmForMaskedLM` with torch on the CPU
and saves it with `save_pretrained` (safetensors), as a user's copy of
`facebook/esm2_t6_8M_UR50D` is laid out.
"""
from __future__ import annotations

import json
import pathlib
import shutil

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
safetensors_numpy = pytest.importorskip("safetensors.numpy")

from biofm_jax.data import batch as B  # noqa: E402
from biofm_jax.modalities.sequence.data import SequenceTokenizer  # noqa: E402
from biofm_jax.weights import esm2  # noqa: E402
from biofm_jax.weights.formats import import_folder  # noqa: E402
from biofm_jax.weights.publish import esm_differences, publish_run  # noqa: E402

PROTEINS = ("MKTAYIAKQRQISFVKSHFSRQ", "GVLSEGEWQLVLHVWAKVEAD", "MALWMRLLPLLALLALWGPDPAAA")
MAX_LEN = 32


def _random_esm(folder: pathlib.Path, **overrides) -> tuple[pathlib.Path, object]:
  """A small random ESM-2 saved as `save_pretrained` writes it, with every LayerNorm and
  bias drawn at random too (their initial ones and zeros would hide a swapped pair), and
  the layers' weights 10x their initial scale: at 0.02 every GELU input is near zero, where
  tanh-GELU and exact GELU agree to 4e-6, and attention is near uniform, hiding the rotary
  positions; at this scale either mistake moves the outputs by far more than 1e-4."""
  torch.manual_seed(0)
  fields = dict(vocab_size=33, mask_token_id=32, pad_token_id=1, hidden_size=32, num_hidden_layers=2,
                num_attention_heads=4, intermediate_size=48, max_position_embeddings=1026,
                position_embedding_type="rotary", token_dropout=True, emb_layer_norm_before=False,
                layer_norm_eps=1e-5, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
  fields.update(overrides)
  model = transformers.EsmForMaskedLM(transformers.EsmConfig(**fields)).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "LayerNorm" in name or "layer_norm" in name or name.endswith("bias"):
        p.add_(0.1 * torch.randn_like(p))
      elif "encoder.layer" in name:
        p.mul_(10.0)
  model.save_pretrained(folder, safe_serialization=True)
  (folder / "vocab.txt").write_text("\n".join(esm2.ESM_TOKENS) + "\n")
  return folder, model


@pytest.fixture(scope="module")
def esm(tmp_path_factory):
  root = tmp_path_factory.mktemp("esm")
  folder, model = _random_esm(root / "esm2_tiny")
  run = import_folder("esm2", folder, root / "run", max_len=MAX_LEN)
  return folder, model, run


def _our_batch(tokenizer: SequenceTokenizer, masked_positions=()) -> dict:
  """CLS + residues + PAD rows, as the sequence pipeline builds them; MASK at the positions given."""
  tokens = np.zeros((len(PROTEINS), MAX_LEN), np.int32)
  mask = np.zeros((len(PROTEINS), MAX_LEN), bool)
  for row, protein in enumerate(PROTEINS):
    ids = np.concatenate([[B.CLS_ID], tokenizer.encode(protein)])
    tokens[row, :len(ids)], mask[row, :len(ids)] = ids, True
  for row, position in masked_positions:
    tokens[row, position] = B.MASK_ID
  return {"sequence": {B.TOKENS: tokens, B.TOKEN_MASK: mask}}


def test_an_imported_esm2_gives_esm2s_hidden_states_and_logits(esm):
  from biofm_jax.train.runs import open_run
  folder, model, run = esm
  config, data, setup, params, step = open_run(run)
  assert step == 0 and config.model.mlm_head == "transform" and config.model.activation == "gelu"
  record = json.loads((run / "imported.json").read_text())
  ids = np.asarray(record["public_ids"])
  tokenizer = data.tokenizer
  # Inputs with MASK tokens: ESM-2's token dropout rescales the rows that hold them.
  for masked in ((), ((0, 3), (0, 7), (2, 5))):
    batch = _our_batch(tokenizer, masked)
    outputs = setup.model.apply({"params": params}, batch, train=False)["sequence"]
    tokens, mask = batch["sequence"][B.TOKENS], batch["sequence"][B.TOKEN_MASK]
    with torch.no_grad():
      theirs = model(input_ids=torch.from_numpy(ids[tokens]), attention_mask=torch.from_numpy(mask.astype(np.int64)),
                     output_hidden_states=True)
    hidden = theirs.hidden_states[-1].numpy()
    real = mask
    np.testing.assert_allclose(np.asarray(outputs["hidden"])[real], hidden[real], atol=1e-4, rtol=0)
    logits = theirs.logits.numpy()[..., ids]  # ESM's logits of our vocabulary's tokens
    np.testing.assert_allclose(np.asarray(outputs["code_logits"])[real], logits[real], atol=1e-4, rtol=0)
    # Not trivially equal: the logits vary across tokens and positions.
    assert np.asarray(outputs["code_logits"])[real].std() > 0.1


def test_protein_tokens_are_esm2s_own_ids(esm):
  folder, _, run = esm
  public = transformers.EsmTokenizer(vocab_file=str(folder / "vocab.txt"))
  ids = np.asarray(json.loads((run / "imported.json").read_text())["public_ids"])
  ours = SequenceTokenizer("amino_acid")
  for protein in (*PROTEINS, "XBUZO" + "ACDEFGHIKLMNPQRSTVWY"):
    expected = public(protein)["input_ids"]
    mine = ids[np.concatenate([[B.CLS_ID], ours.encode(protein)])].tolist()
    assert mine + [public.eos_token_id] == expected, protein  # ESM's rows end with <eos>; ours carry none
  assert ids[B.PAD_ID] == public.pad_token_id and ids[B.MASK_ID] == public.mask_token_id


def test_an_imported_run_continues_pre_training_on_a_fasta(esm, tmp_path):
  from biofm_jax.config import load_config
  from biofm_jax.train.loop import fresh_state, open_data_module, train_and_evaluate
  from biofm_jax.train.build import build_training
  from biofm_jax.train.runs import open_run, with_init_run_model
  _, _, run = esm
  fasta = tmp_path / "mine.fa"
  fasta.write_text("".join(f">p{i}\n{PROTEINS[i % 3] * 2}\n" for i in range(40)))
  config = with_init_run_model(load_config(str(pathlib.Path(__file__).parents[1] / "configs/omics_sequence.py:protein"), {
      "train.init_from": str(run), "data.sequence.path": str(fasta), "data.sequence.max_len": MAX_LEN,
      "train.num_steps": 4, "train.log_every": 2, "train.eval_every": 0, "checkpoint.every_steps": 4,
      "data.batch_size": 8}))
  assert config.model.mlm_head == "transform" and config.model.bias  # the imported architecture
  _, _, _, imported, _ = open_run(run)
  setup = build_training(config, open_data_module(config, tmp_path / "artifacts"))
  first = fresh_state(config, setup).params
  for a, b in zip(*(map(np.asarray, __import__("jax").tree.leaves(t)) for t in (first, imported))):
    np.testing.assert_array_equal(a, b)
  summary = train_and_evaluate(config, tmp_path / "continued")
  assert summary["train/loss"] < 4.0 and np.isfinite(summary["train/loss"])
  # The continued run publishes as ESM-2: transformers loads it and computes what we do.
  published = publish_run(tmp_path / "continued", tmp_path / "hf")
  _assert_transformers_matches_run(published, tmp_path / "continued")


def _assert_transformers_matches_run(published: pathlib.Path, run: pathlib.Path) -> None:
  """`EsmForMaskedLM.from_pretrained(published)` gives the run's hidden states and MLM logits
  (those of our vocabulary's tokens), with and without MASK tokens, to 1e-4."""
  from biofm_jax.train.runs import open_run
  _, data, setup, params, _ = open_run(run)
  model = transformers.EsmForMaskedLM.from_pretrained(published).eval()
  public = transformers.EsmTokenizer.from_pretrained(published)
  ids = esm2.public_ids(esm2.ESM_TOKENS, data.tokenizer.tokens, "test")
  for masked in ((), ((1, 4), (2, 2))):
    batch = _our_batch(data.tokenizer, masked)
    tokens, mask = batch["sequence"][B.TOKENS], batch["sequence"][B.TOKEN_MASK]
    if not masked:  # the public tokenizer's ids, less its closing <eos>, are what we feed
      encoded = public(list(PROTEINS), padding="max_length", max_length=MAX_LEN + 1)["input_ids"]
      for row, protein in enumerate(PROTEINS):
        assert ids[tokens[row, :len(protein) + 1]].tolist() == encoded[row][:len(protein) + 1]
    ours = setup.model.apply({"params": params}, batch, train=False)["sequence"]
    with torch.no_grad():
      theirs = model(input_ids=torch.from_numpy(ids[tokens]), attention_mask=torch.from_numpy(mask.astype(np.int64)),
                     output_hidden_states=True)
    np.testing.assert_allclose(np.asarray(ours["hidden"])[mask], theirs.hidden_states[-1].numpy()[mask], atol=1e-4,
                               rtol=0)
    logits = theirs.logits.numpy()
    np.testing.assert_allclose(np.asarray(ours["code_logits"])[mask], logits[..., ids][mask], atol=1e-4, rtol=0)
    # ESM tokens we have no row for are never the prediction.
    assert (logits[mask].argmax(-1)[:, None] == ids[None, :]).any(-1).all()


def test_an_imported_esm2_publishes_back_with_the_same_tensors(esm, tmp_path):
  """Import then publish gives ESM-2's own tensors back (the rows of tokens we lack aside),
  and transformers loads the published folder."""
  folder, _, run = esm
  published = publish_run(run, tmp_path / "hf")
  original, again = _tensors(folder), _tensors(published)
  ids = esm2.public_ids(esm2.ESM_TOKENS, SequenceTokenizer("amino_acid").tokens, "test")
  renamed = {k.replace("LayerNorm.gamma", "LayerNorm.weight").replace("LayerNorm.beta", "LayerNorm.bias"): v
             for k, v in original.items() if "contact_head" not in k and "inv_freq" not in k}
  assert set(again) == set(renamed) | {"lm_head.decoder.weight"}
  for name, value in renamed.items():
    vocab_rows = name in ("esm.embeddings.word_embeddings.weight", "lm_head.bias")
    np.testing.assert_allclose(again[name][ids] if vocab_rows else again[name], value[ids] if vocab_rows else value,
                               atol=1e-7, err_msg=name)
  np.testing.assert_allclose(again["lm_head.decoder.weight"][ids], original["esm.embeddings.word_embeddings.weight"][ids])
  _assert_transformers_matches_run(published, run)


def test_a_run_no_public_class_computes_is_refused_naming_each_difference(tmp_path):
  from biofm_jax.config import load_config
  config = load_config(str(pathlib.Path(__file__).parents[1] / "configs/omics_sequence.py:protein"))
  problems = "; ".join(esm_differences(config))
  for expected in ("model.norm='rmsnorm': EsmForMaskedLM computes 'layernorm'", "model.bias=False",
                   "model.activation='gelu_tanh'", "model.mlm_head='linear'"):
    assert expected in problems
  dna = load_config(str(pathlib.Path(__file__).parents[1] / "configs/omics_sequence.py:tiny"))
  assert "data.sequence.tokenizer='nucleotide': EsmForMaskedLM reads 'amino_acid' tokens" in "; ".join(
      esm_differences(dna))
  from biofm_jax.weights.publish import publisher_for
  ehr = load_config(str(pathlib.Path(__file__).parents[1] / "configs/ehr_bert.py:tiny"))
  with pytest.raises(ValueError, match=r"no public class computes this run's model; publishable runs: sequence "
                                       r"\(EsmForMaskedLM\), omics \(BertForMaskedLM\), imaging \(ViTMAEModel\)"):
    publisher_for(ehr)


def _tensors(folder: pathlib.Path) -> dict:
  return safetensors_numpy.load_file(str(folder / "model.safetensors"))


@pytest.mark.parametrize("crafted, message", [
    ("missing", r"tensor 'esm\.encoder\.layer\.1\.output\.dense\.bias' is missing"),
    ("shape", r"model\.safetensors: tensor 'esm\.encoder\.layer\.0\.intermediate\.dense\.weight' has shape \[48, 31\]"),
    ("extra", r"model\.safetensors: tensor 'esm\.encoder\.layer\.0\.adapter\.weight' is not part of"),
    ("architecture", r"config\.json: position_embedding_type='alibi'; ESM import supports"),
    ("pickle_only", r"no model\.safetensors .*pytorch_model\.bin: pickle-based files are not read"),
    ("linked_shard", r"tensor file .* is not a regular file inside"),
])
def test_a_crafted_folder_is_refused_by_name_and_nothing_is_written(esm, tmp_path, crafted, message):
  source, _, _ = esm
  folder = tmp_path / "crafted"
  shutil.copytree(source, folder)
  tensors = _tensors(folder)
  if crafted == "missing":
    del tensors["esm.encoder.layer.1.output.dense.bias"]
  elif crafted == "shape":
    tensors["esm.encoder.layer.0.intermediate.dense.weight"] = np.zeros((48, 31), np.float32)
  elif crafted == "extra":
    tensors["esm.encoder.layer.0.adapter.weight"] = np.zeros((2, 2), np.float32)
  if crafted in ("missing", "shape", "extra"):
    safetensors_numpy.save_file(tensors, str(folder / "model.safetensors"))
  elif crafted == "architecture":
    hf = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**hf, "position_embedding_type": "alibi"}))
  elif crafted == "pickle_only":
    (folder / "model.safetensors").rename(folder / "pytorch_model.bin")
  elif crafted == "linked_shard":  # an index whose shard is a link to a file elsewhere
    outside = tmp_path / "elsewhere.safetensors"
    (folder / "model.safetensors").rename(outside)
    (folder / "shard-1.safetensors").symlink_to(outside)
    (folder / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {name: "shard-1.safetensors" for name in tensors}}))
  out = tmp_path / "out"
  with pytest.raises(ValueError, match=message):
    import_folder("esm2", folder, out, max_len=MAX_LEN)
  assert not out.exists() and not list(tmp_path.glob(".out*"))


def test_an_unknown_or_planned_format_and_a_used_out_folder_are_refused(esm, tmp_path):
  source, _, run = esm
  with pytest.raises(ValueError, match="--format=.bert.: unknown; choose one of esm2, nucleotide_transformer"):
    import_folder("bert", source, tmp_path / "a", max_len=MAX_LEN)
  with pytest.raises(ValueError, match="--format=timm_vit: not converted yet"):
    import_folder("timm_vit", source, tmp_path / "b", max_len=MAX_LEN)
  (tmp_path / "used").mkdir()
  (tmp_path / "used" / "notes.txt").write_text("mine")
  with pytest.raises(ValueError, match="exists and is not an empty folder"):
    import_folder("esm2", source, tmp_path / "used", max_len=MAX_LEN)
  assert (tmp_path / "used" / "notes.txt").read_text() == "mine"


def test_layer_norms_under_either_name_import_the_same(esm, tmp_path):
  """transformers 5's `save_pretrained` writes ESM's LayerNorms as `gamma` / `beta`; the
  checkpoints on the Hub name them `weight` / `bias`. Both import to the same parameters."""
  import jax
  from biofm_jax.train.runs import open_run
  source, _, run = esm
  folder = tmp_path / "hub_names"
  shutil.copytree(source, folder)
  tensors = _tensors(folder)
  renamed = {k.replace("LayerNorm.gamma", "LayerNorm.weight").replace("LayerNorm.beta", "LayerNorm.bias"): v
             for k, v in tensors.items()}
  assert renamed.keys() != tensors.keys()
  safetensors_numpy.save_file(renamed, str(folder / "model.safetensors"))
  other = import_folder("esm2", folder, tmp_path / "run", max_len=MAX_LEN)
  for a, b in zip(jax.tree.leaves(open_run(run)[3]), jax.tree.leaves(open_run(other)[3])):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_the_command_imports_a_folder_and_names_a_bad_one(esm, tmp_path):
  import subprocess
  import sys
  source, _, _ = esm
  repo = pathlib.Path(__file__).resolve().parents[1]
  command = [sys.executable, "experiments/import_weights.py", f"--from={source}", "--format=esm2",
             f"--out={tmp_path / 'run'}", "--max_len=24", "--config.data.sequence.mask_rate=0.2"]
  result = subprocess.run(command, cwd=repo, capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-2000:]
  assert f"imported esm2 weights into {tmp_path / 'run'}" in result.stdout
  saved = json.loads((tmp_path / "run" / "run_info.json").read_text())["starts"][-1]["config"]
  assert saved["data"]["sequence"]["max_len"] == 24 and saved["data"]["sequence"]["mask_rate"] == 0.2
  result = subprocess.run(command[:2] + [f"--from={tmp_path}", "--format=esm2", f"--out={tmp_path / 'other'}"],
                          cwd=repo, capture_output=True, text=True, timeout=300)
  assert result.returncode == 2 and result.stderr.strip().splitlines()[-1] == f"error: {tmp_path}: no config.json " \
      "(a Hugging Face model folder holds one)"


def test_an_imported_esm2_fine_tunes_on_a_record_label_and_exports(esm, tmp_path):
  """`--pretrained=<imported run>` works as for a run pre-trained here: the fine-tuning entry
  takes its backbone (restored exactly) and the label its records carry; the fine-tuned run
  exports."""
  import jax
  from biofm_jax.config import load_config
  from biofm_jax.export import export_run
  from biofm_jax.train.finetune import finetune, finetune_config
  from biofm_jax.train.runs import open_run
  _, _, run = esm
  repo = pathlib.Path(__file__).resolve().parents[1]
  config = finetune_config(load_config(f"{repo / 'configs/finetune.py'}:binary,tiny", {
      "task.label_column": "motif", "train.num_steps": 4, "train.eval_every": 4, "checkpoint.every_steps": 4,
      "train.log_every": 2, "finetune.mode": "frozen"}), run)
  summary = finetune(config, tmp_path / "ft")
  assert summary["steps"] == 4 and np.isfinite(summary["eval/task_loss"])
  backbone = open_run(tmp_path / "ft")[3]["backbone"]  # frozen: still the imported parameters
  for a, b in zip(jax.tree.leaves(backbone), jax.tree.leaves(open_run(run)[3])):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  export_dir, step = export_run(tmp_path / "ft", tmp_path / "export")
  assert step == 4 and (export_dir / "MODEL_CARD.md").exists()


NT_SPECIALS = ("<unk>", "<pad>", "<mask>", "<cls>", "<eos>", "<bos>")


def test_a_nucleotide_transformer_gives_its_hidden_states_logits_and_6mer_tokens(tmp_path):
  """The Nucleotide Transformer's first release is EsmForMaskedLM over DNA 6-mers with learned
  positions (numbered from the pad id + 1) and an embedding LayerNorm: the same checks as
  ESM-2's, on a vocabulary whose 6-mers are in an order of their own (matched by text)."""
  import itertools
  kmers = ["".join(p) for p in itertools.product("ACGT", repeat=6)]
  np.random.default_rng(0).shuffle(kmers)
  tokens = (*NT_SPECIALS, *kmers, "A", "T", "C", "G", "N")
  folder, model = _random_esm(tmp_path / "nt", vocab_size=len(tokens), pad_token_id=1, mask_token_id=2,
                              position_embedding_type="absolute", max_position_embeddings=40, token_dropout=False,
                              emb_layer_norm_before=True)
  (folder / "vocab.txt").write_text("\n".join(tokens) + "\n")
  with pytest.raises(ValueError, match="a DNA k-mer vocabulary; import it with --format=nucleotide_transformer"):
    import_folder("esm2", folder, tmp_path / "wrong", max_len=MAX_LEN)
  run = import_folder("nucleotide_transformer", folder, tmp_path / "run", max_len=64)
  from biofm_jax.train.runs import open_run
  config, data, setup, params, _ = open_run(run)
  assert config.data.sequence.kmer == 6 and config.model.position == "learned"
  assert config.data.sequence.max_len == 40 - 2  # the table's rows after the pad id's
  ids = np.asarray(json.loads((run / "imported.json").read_text())["public_ids"])
  public = transformers.EsmTokenizer(vocab_file=str(folder / "vocab.txt"))
  rng = np.random.default_rng(1)
  dna = ["".join(rng.choice(list("ACGT"), size=n)) for n in (40, 75, 111)]
  batch_tokens = np.zeros((3, 38), np.int32)
  mask = np.zeros((3, 38), bool)
  for row, sequence in enumerate(dna):
    mine = np.concatenate([[B.CLS_ID], data.tokenizer.encode(sequence)])
    assert ids[mine].tolist() + [public.eos_token_id] == public(sequence)["input_ids"], sequence  # 6-mers, then bases
    batch_tokens[row, :len(mine)], mask[row, :len(mine)] = mine, True
  batch_tokens[1, 3] = B.MASK_ID
  ours = setup.model.apply({"params": params}, {"sequence": {B.TOKENS: batch_tokens, B.TOKEN_MASK: mask}},
                           train=False)["sequence"]
  with torch.no_grad():
    theirs = model(input_ids=torch.from_numpy(ids[batch_tokens]), attention_mask=torch.from_numpy(mask.astype(np.int64)),
                   output_hidden_states=True)
  np.testing.assert_allclose(np.asarray(ours["hidden"])[mask], theirs.hidden_states[-1].numpy()[mask], atol=1e-4, rtol=0)
  np.testing.assert_allclose(np.asarray(ours["code_logits"])[mask], theirs.logits.numpy()[..., ids][mask], atol=1e-4,
                             rtol=0)


def test_a_remote_code_nucleotide_transformer_v2_is_refused_by_name(esm, tmp_path):
  source, _, _ = esm
  folder = tmp_path / "v2"
  shutil.copytree(source, folder)
  hf = json.loads((folder / "config.json").read_text())
  (folder / "config.json").write_text(json.dumps({**hf, "add_bias_fnn": False,
                                                  "auto_map": {"AutoModelForMaskedLM": "esm.EsmForMaskedLM"}}))
  with pytest.raises(ValueError, match="remote-code ESM variant .*Nucleotide Transformer v2"):
    import_folder("nucleotide_transformer", folder, tmp_path / "out", max_len=MAX_LEN)


def test_an_imported_folder_is_started_from_not_resumed_and_stays_whole(esm):
  """Its checkpoint holds parameters only: resuming it is an error that says how to start
  from it, and the step is not set aside as unreadable (the folder is the user's)."""
  from biofm_jax.train.checkpoint import pretrained_checkpoint
  from biofm_jax.train.loop import train_and_evaluate
  import ml_collections
  _, _, run = esm
  _, _, saved = pretrained_checkpoint(run)
  with pytest.raises(ValueError, match=rf"holds parameters only .* --config\.train\.init_from={run}"):
    train_and_evaluate(ml_collections.ConfigDict(saved), run)
  assert (run / "checkpoints" / "0").is_dir() and not list((run / "checkpoints").glob("*.unreadable*"))
