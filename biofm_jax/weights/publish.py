"""Our runs published in a public model's own Hugging Face format, so its users load them
with `transformers` (`experiments/export.py --format=hf`).

A run is published only where the public class computes exactly what our model does; any
option that differs is named in the refusal (`model.norm='rmsnorm': EsmForMaskedLM computes
'layernorm'`). Today: protein masked-language models as `EsmForMaskedLM` (ESM-2), whether
imported from ESM-2 or pre-trained here with its architecture. The folder holds
`model.safetensors` under ESM-2's parameter names, `config.json`, and ESM's `vocab.txt`.
Our vocabulary's rows go to ESM's ids; ESM tokens we have no row for (<eos>, ".", "-",
<null_1>) get zero rows and a decoder bias of `esm2.UNSEEN_LOGIT`, so they are never predicted.
"""
from __future__ import annotations

import json
import os
import pathlib
from typing import Any

import ml_collections
import numpy as np

from biofm_jax.config import ARCHITECTURE_DEFAULTS
from biofm_jax.modalities.sequence.data import SequenceTokenizer
from biofm_jax.train.runs import open_run
from biofm_jax.weights import esm2
from biofm_jax.weights.conversion import publish
from biofm_jax.weights.run_folder import IMPORT_RECORD, check_out, param_paths, written_whole

HF_FORMATS = ("hf",)
ESM_CLASS = "EsmForMaskedLM"
# What EsmForMaskedLM computes, as our config.model fields.
ESM_ARCHITECTURE = dict(norm="layernorm", norm_position="pre", bias=True, activation="gelu", final_norm=True,
                        position="rope", mlm_head="transform", scan_layers=True)


def esm_differences(config: ml_collections.ConfigDict) -> list[str]:
  """Each way the run differs from what EsmForMaskedLM computes, as a readable line."""
  problems = []
  if "task" in config:
    problems.append(f"the run is fine-tuned for the task {config.task.name!r}; {ESM_CLASS} is the "
                    f"pre-trained masked language model (publish the pre-training run)")
  sequence = config.data.get("sequence")
  if sequence is None or "multimodal" in config.data:
    problems.append(f"the run's data is not one protein sequence modality ({ESM_CLASS} reads proteins)")
  elif sequence.tokenizer != "amino_acid":
    problems.append(f"data.sequence.tokenizer={sequence.tokenizer!r}: {ESM_CLASS} reads 'amino_acid' tokens")
  if config.objective.get("name") != "masked":
    problems.append(f"objective.name={config.objective.get('name')!r}: {ESM_CLASS} is a 'masked' language model")
  model = config.model
  for field, value in ESM_ARCHITECTURE.items():
    if model.get(field, ARCHITECTURE_DEFAULTS.get(field)) != value:  # a field a run predates: its default
      problems.append(f"model.{field}={model.get(field)!r}: {ESM_CLASS} computes {value!r}")
  if model.get("token_dropout", 0.0) not in (0.0, esm2.TOKEN_DROPOUT_RATE):
    problems.append(f"model.token_dropout={model.token_dropout!r}: {ESM_CLASS} has 0 or {esm2.TOKEN_DROPOUT_RATE}")
  if model.head_dim and model.head_dim * model.num_heads != model.embed_dim:
    problems.append(f"model.head_dim={model.head_dim}: {ESM_CLASS} has embed_dim / num_heads")
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


def publish_run(workdir: str | os.PathLike, out: str | os.PathLike, fmt: str = "hf") -> pathlib.Path:
  """Writes the run's latest parameters to `out` as the public class that computes them."""
  if fmt not in HF_FORMATS:
    raise ValueError(f"--format={fmt!r}: choose one of {HF_FORMATS}")
  workdir, out = pathlib.Path(workdir).absolute(), pathlib.Path(out).absolute()
  check_out(out)
  config, data, _, params, _ = open_run(workdir)
  problems = esm_differences(config)
  if problems:
    raise ValueError(f"{workdir} cannot be published as {ESM_CLASS}: " + "; ".join(problems))
  record_path = workdir / IMPORT_RECORD
  imported = json.loads(record_path.read_text()) if record_path.is_file() and not record_path.is_symlink() else None
  hf = esm_config(config, imported)
  ids = esm2.public_ids(esm2.ESM_TOKENS, SequenceTokenizer("amino_acid").tokens, "ESM-2's vocabulary")
  flat = {path: np.asarray(leaf) for path, leaf in param_paths(params).items()}
  tensors = publish(flat, esm2.rules(hf, ids), config.model.num_layers)
  with written_whole(out, "publishing") as staging:
    from safetensors.numpy import save_file  # optional: the `weights` extra (pip install -e '.[weights]')
    save_file(tensors, str(staging / "model.safetensors"), metadata={"format": "pt"})
    (staging / "config.json").write_text(json.dumps(hf, indent=2, sort_keys=True))
    (staging / "vocab.txt").write_text("\n".join(esm2.ESM_TOKENS) + "\n")
    (staging / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "EsmTokenizer",
                                                               "model_max_length": config.data.sequence.max_len + 1}))
  return out
