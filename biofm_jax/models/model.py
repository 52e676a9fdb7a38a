"""Builds the pre-training model from a config: modality encoder -> transformer -> heads.

`MODALITIES` is the registry, keyed by modality name: it turns a data module's
`model_info()` into the modality's description (`modalities.py`: its encoder and heads).
One configured modality gives a `SingleModalityModel`; several give the multimodal model
of `fusion.py`. Every model returns a dict per modality, so objectives find what they
need by name, and reports its analytic cost for MFU:

    {"ehr": {"hidden": [B, L, D], "embedding": [B, D], "code_logits": [B, L, V], "value_logits": [B, L, K+1]}}
    (the same for "omics" and "sequence"; "value_logits" only where tokens carry value bins)
    {"imaging": {"hidden": [B, T, D], "embedding": [B, D],
                 "predicted_patches": [B, M, P], "target_patches": [B, M, P]}}
    {"tabular": {"hidden": [B, 1+F+C, D], "embedding": [B, D], "value_predictions": [B, F],
                 "category_logits": [B, C, K]}}
"""
from __future__ import annotations

import functools
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from biofm_jax.data import batch as B
from biofm_jax.models.layers import TransformerConfig
from biofm_jax.models.modalities import (ImagingModality, TabularModality, TokenModality, encoder_flops)
from biofm_jax.models.transformer import TransformerStack

Modality = TokenModality | ImagingModality | TabularModality
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


class SingleModalityModel(nn.Module):
  """One modality's encoder -> the shared transformer stack -> that modality's heads.

  Token sequences embed as the mean of their real tokens' final hidden states, images as
  the mean over patches, table rows as the CLS token's state (see `modalities.py`).
  """
  cfg: TransformerConfig
  modality: Modality

  @nn.compact
  def __call__(self, batch: Mapping[str, Mapping[str, jax.Array]], *, train: bool = False):
    example = batch[self.modality.name]
    encoded = self.modality.encode(self.cfg, example, train=train)
    hidden = TransformerStack(self.cfg, name="transformer")(encoded.tokens, encoded.mask, encoded.positions,
                                                           train=train)
    return {self.modality.name: self.modality.heads(self.cfg, hidden, encoded, example, train=train)}

  def tokens_per_example(self) -> int:
    return self.modality.num_tokens()

  def flops_per_example(self) -> float:
    return encoder_flops(self.modality, self.cfg)


def transformer_config(model_cfg: ml_collections.ConfigDict, *, max_len: int, causal: bool,
                       **replace: Any) -> TransformerConfig:
  for name in ("dtype", "param_dtype"):
    if model_cfg[name] not in DTYPES:
      raise ValueError(f"model.{name} must be one of {sorted(DTYPES)}, got {model_cfg[name]!r}")
  fields = dict(
      num_layers=model_cfg.num_layers, embed_dim=model_cfg.embed_dim, num_heads=model_cfg.num_heads,
      head_dim=model_cfg.head_dim, mlp_dim=model_cfg.mlp_dim, dropout_rate=model_cfg.dropout_rate,
      position=model_cfg.position, max_len=max_len, causal=causal, norm=model_cfg.norm,
      dtype=DTYPES[model_cfg.dtype], param_dtype=DTYPES[model_cfg.param_dtype], remat=model_cfg.remat,
      scan_layers=model_cfg.scan_layers)
  return TransformerConfig(**{**fields, **replace})


def token_modality(config: ml_collections.ConfigDict, info: Mapping[str, Any], *, modality: str) -> Modality:
  return TokenModality(modality, vocab_size=info["vocab_size"], num_value_bins=info["num_value_bins"],
                       max_len=info["max_len"])


def imaging_modality(config: ml_collections.ConfigDict, info: Mapping[str, Any]) -> Modality:
  num_patches = info["num_patches"]
  decoder = config.model.decoder
  decoder_cfg = transformer_config(config.model, max_len=num_patches, causal=False, dropout_rate=0.0,
                                   num_layers=decoder.num_layers, embed_dim=decoder.embed_dim,
                                   num_heads=decoder.num_heads, head_dim=0, mlp_dim=decoder.mlp_dim,
                                   position="sincos")
  num_visible = B.num_visible_patches(num_patches, config.data.imaging.mask_ratio)
  return ImagingModality(image_shape=tuple(info["image_shape"]), patch_shape=tuple(info["patch_shape"]),
                         channels=info["channels"], num_masked=num_patches - num_visible, decoder_cfg=decoder_cfg)


def tabular_modality(config: ml_collections.ConfigDict, info: Mapping[str, Any]) -> Modality:
  del config
  return TabularModality(num_numeric=info["num_numeric"], num_categorical=info["num_categorical"],
                         num_categories=info["num_categories"])


# Modality name -> `(config, data_module.model_info()) -> Modality`.
MODALITIES = {
    "ehr": functools.partial(token_modality, modality="ehr"),
    "omics": functools.partial(token_modality, modality="omics"),
    "sequence": functools.partial(token_modality, modality="sequence"),
    "imaging": imaging_modality,
    "tabular": tabular_modality,
}


def build_single_modality_model(config: ml_collections.ConfigDict, modality: Modality) -> SingleModalityModel:
  cfg = transformer_config(config.model, max_len=modality.num_tokens(),
                           causal=config.objective.name == "autoregressive")
  return SingleModalityModel(cfg, modality)


def build_model(config: ml_collections.ConfigDict, data_info: Mapping[str, Mapping[str, Any]]) -> nn.Module:
  """`data_info` holds what only the data knows, e.g. `{"ehr": {"vocab_size": ..., ...}}`.

  One modality gives a single-modality model; several give the multimodal model of
  `fusion.py`, with the fusion that `config.model.fusion` names.
  """
  unknown = sorted(set(data_info) - set(MODALITIES))
  if unknown or not data_info:
    raise ValueError(f"no model for modalities {sorted(data_info)}; registered: {sorted(MODALITIES)}")
  modalities = {name: MODALITIES[name](config, info) for name, info in data_info.items()}
  if len(modalities) == 1:
    return build_single_modality_model(config, *modalities.values())
  from biofm_jax.models.fusion import build_multimodal_model
  return build_multimodal_model(config, modalities)
