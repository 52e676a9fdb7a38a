"""Builds the pre-training model from a config: modality encoder -> transformer -> heads.

`ENCODERS` is the registry of modality encoders; a new modality adds one entry and its
own encoder module. The model's output is a dict per modality, so objectives find what
they need by name:

    {"ehr": {"hidden": [B, L, D], "code_logits": [B, L, V], "value_logits": [B, L, K+1]}}
"""
from __future__ import annotations

from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from biofm_jax.models.encoders.ehr import EHREncoder
from biofm_jax.models.heads import TokenClassifier
from biofm_jax.models.layers import TransformerConfig
from biofm_jax.models.transformer import TransformerStack, flops_per_token

ENCODERS = {"ehr": EHREncoder}
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


class EHRPretrainModel(nn.Module):
  """A single-modality EHR model with code and value-bin heads."""
  cfg: TransformerConfig
  vocab_size: int
  num_value_bins: int

  @nn.compact
  def __call__(self, batch: Mapping[str, Mapping[str, jax.Array]], *, train: bool = False):
    tokens, mask, positions = EHREncoder(self.cfg, self.vocab_size, self.num_value_bins,
                                         name="ehr_encoder")(batch["ehr"], train=train)
    hidden = TransformerStack(self.cfg, name="transformer")(tokens, mask, positions, train=train)
    return {"ehr": {
        "hidden": hidden,
        "mask": mask,
        "code_logits": TokenClassifier(self.cfg, self.vocab_size, name="code_head")(hidden),
        "value_logits": TokenClassifier(self.cfg, self.num_value_bins + 1, class_axis=None,
                                        name="value_head")(hidden),
    }}


def transformer_config(model_cfg: ml_collections.ConfigDict, *, max_len: int, causal: bool) -> TransformerConfig:
  for name in ("dtype", "param_dtype"):
    if model_cfg[name] not in DTYPES:
      raise ValueError(f"model.{name} must be one of {sorted(DTYPES)}, got {model_cfg[name]!r}")
  return TransformerConfig(
      num_layers=model_cfg.num_layers, embed_dim=model_cfg.embed_dim, num_heads=model_cfg.num_heads,
      head_dim=model_cfg.head_dim, mlp_dim=model_cfg.mlp_dim, dropout_rate=model_cfg.dropout_rate,
      position=model_cfg.position, max_len=max_len, causal=causal, norm=model_cfg.norm,
      dtype=DTYPES[model_cfg.dtype], param_dtype=DTYPES[model_cfg.param_dtype], remat=model_cfg.remat,
      scan_layers=model_cfg.scan_layers)


def build_model(config: ml_collections.ConfigDict, data_info: Mapping[str, Mapping[str, Any]]) -> nn.Module:
  """`data_info` holds what only the data knows, e.g. `{"ehr": {"vocab_size": ..., ...}}`."""
  modalities = sorted(data_info)
  if modalities != ["ehr"]:
    raise ValueError(f"no model for modalities {modalities}; registered encoders: {sorted(ENCODERS)}")
  info = data_info["ehr"]
  cfg = transformer_config(config.model, max_len=info["max_len"],
                           causal=config.objective.name == "autoregressive")
  return EHRPretrainModel(cfg, vocab_size=info["vocab_size"], num_value_bins=info["num_value_bins"])


def model_flops_per_token(model: nn.Module, seq_len: int) -> float:
  """Analytic training FLOPs per token, for MFU."""
  return flops_per_token(model.cfg, seq_len, output_dim=model.vocab_size + model.num_value_bins + 1)
