"""Builds the pre-training model from a config: modality encoder -> transformer -> heads.

`MODEL_BUILDERS` is the registry, keyed by modality; a new modality adds one builder
(and its encoder module). Every model returns a dict per modality, so objectives find
what they need by name, and reports its analytic cost for MFU:

    {"ehr": {"hidden": [B, L, D], "embedding": [B, D], "code_logits": [B, L, V], "value_logits": [B, L, K+1]}}
    (the same for "omics" and "sequence"; "value_logits" only where tokens carry value bins)
    {"imaging": {"hidden": [B, T, D], "embedding": [B, D],
                 "predicted_patches": [B, M, P], "target_patches": [B, M, P]}}
    {"tabular": {"hidden": [B, 1+F+C, D], "embedding": [B, D], "value_predictions": [B, F],
                 "category_logits": [B, C, K]}}
"""
from __future__ import annotations

import functools
import math
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from biofm_jax.data import batch as B
from biofm_jax.models.encoders.ehr import EHREncoder
from biofm_jax.models.encoders.imaging import ImagingEncoder, grid_shape
from biofm_jax.models.encoders.tabular import TabularEncoder
from biofm_jax.models.encoders.tokens import TokenEncoder
from biofm_jax.models.heads import MAEDecoder, TokenClassifier
from biofm_jax.models.layers import TransformerConfig, embed_init, zeros_init
from biofm_jax.models.transformer import TransformerStack, flops_per_token

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


class TokenSequenceModel(nn.Module):
  """EHR timelines, expression profiles and sequences: token encoder, stack, token heads.

  EHR uses its own encoder (age and time features); the other modalities share the plain
  token encoder. A value-bin head exists only where the tokens carry value bins. The
  embedding of a sequence is the mean of its real tokens' final hidden states.
  """
  cfg: TransformerConfig
  modality: str
  vocab_size: int
  num_value_bins: int

  @nn.compact
  def __call__(self, batch: Mapping[str, Mapping[str, jax.Array]], *, train: bool = False):
    encoder = EHREncoder if self.modality == "ehr" else TokenEncoder
    tokens, mask, positions = encoder(self.cfg, self.vocab_size, self.num_value_bins,
                                      name=f"{self.modality}_encoder")(batch[self.modality], train=train)
    hidden = TransformerStack(self.cfg, name="transformer")(tokens, mask, positions, train=train)
    weights = mask.astype(jnp.float32)[..., None]
    out = {"hidden": hidden, "mask": mask,
           "embedding": (hidden.astype(jnp.float32) * weights).sum(1) / jnp.maximum(weights.sum(1), 1.0),
           "code_logits": TokenClassifier(self.cfg, self.vocab_size, name="code_head")(hidden)}
    if self.num_value_bins:
      out["value_logits"] = TokenClassifier(self.cfg, self.num_value_bins + 1, class_axis=None,
                                            name="value_head")(hidden)
    return {self.modality: out}

  def tokens_per_example(self) -> int:
    return self.cfg.max_len

  def flops_per_example(self) -> float:
    L = self.cfg.max_len
    value_classes = self.num_value_bins + 1 if self.num_value_bins else 0
    return L * flops_per_token(self.cfg, L, output_dim=self.vocab_size + value_classes)


class ImagingMAEModel(nn.Module):
  """A ViT encoder over the visible patches and a light decoder for the masked ones (MAE).

  Without MAE patch ids in the batch the encoder sees every patch and no decoder runs:
  that is the embedding path for probes and fine-tuning.
  """
  cfg: TransformerConfig
  decoder_cfg: TransformerConfig
  image_shape: tuple[int, ...]
  patch_shape: tuple[int, ...]
  channels: int
  num_masked: int

  @nn.compact
  def __call__(self, batch: Mapping[str, Mapping[str, jax.Array]], *, train: bool = False):
    imaging = batch["imaging"]
    tokens, mask, positions, patches = ImagingEncoder(self.cfg, self.image_shape, self.patch_shape,
                                                      name="imaging_encoder")(imaging, train=train)
    hidden = TransformerStack(self.cfg, name="transformer")(tokens, mask, positions, train=train)
    out = {"hidden": hidden, "embedding": hidden.mean(axis=1)}
    if B.IMAGE_MASKED in imaging:
      masked = imaging[B.IMAGE_MASKED]
      decoder = MAEDecoder(self.decoder_cfg, grid_shape(self.image_shape, self.patch_shape),
                           patch_dim=patches.shape[-1], name="decoder")
      out["predicted_patches"] = decoder(hidden, imaging[B.IMAGE_VISIBLE], masked, train=train)
      out["target_patches"] = jnp.take_along_axis(patches, masked[..., None], axis=1).astype(jnp.float32)
    return {"imaging": out}

  @property
  def num_patches(self) -> int:
    return math.prod(grid_shape(self.image_shape, self.patch_shape))

  def tokens_per_example(self) -> int:
    return self.num_patches

  def flops_per_example(self) -> float:
    total, masked = self.num_patches, self.num_masked
    visible = total - masked
    patch_dim = self.channels * math.prod(self.patch_shape)
    embed = 3 * 2 * patch_dim * self.cfg.embed_dim * total
    encoder = visible * flops_per_token(self.cfg, visible, output_dim=0)
    decoder = total * flops_per_token(self.decoder_cfg, total, output_dim=0)
    project = 3 * 2 * (visible * self.cfg.embed_dim * self.decoder_cfg.embed_dim
                       + masked * self.decoder_cfg.embed_dim * patch_dim)
    return embed + encoder + decoder + project


class TabularPretrainModel(nn.Module):
  """Column tokens -> transformer -> per-column reconstruction of hidden values.

  The embedding of a row is the CLS token's final hidden state.
  """
  cfg: TransformerConfig
  num_numeric: int
  num_categorical: int
  num_categories: int

  @nn.compact
  def __call__(self, batch: Mapping[str, Mapping[str, jax.Array]], *, train: bool = False):
    cfg = self.cfg
    tokens, mask, positions = TabularEncoder(cfg, self.num_numeric, self.num_categorical, self.num_categories,
                                             name="tabular_encoder")(batch["tabular"], train=train)
    hidden = TransformerStack(cfg, name="transformer")(tokens, mask, positions, train=train)
    numeric = hidden[:, 1:1 + self.num_numeric]
    # Each column reads its value back through its own weights (as it was embedded).
    weight = self.param("value_head", embed_init(("features", "embed")), (self.num_numeric, cfg.embed_dim),
                        cfg.param_dtype)
    bias = self.param("value_head_bias", zeros_init(("features",)), (self.num_numeric,), cfg.param_dtype)
    out = {"hidden": hidden, "embedding": hidden[:, 0],
           "value_predictions": (jnp.einsum("bfd,fd->bf", numeric, weight.astype(cfg.dtype)) + bias).astype(
               jnp.float32)}
    if self.num_categorical:
      out["category_logits"] = TokenClassifier(cfg, self.num_categories, name="category_head")(
          hidden[:, 1 + self.num_numeric:])
    return {"tabular": out}

  def tokens_per_example(self) -> int:
    return 1 + self.num_numeric + self.num_categorical

  def flops_per_example(self) -> float:
    tokens = self.tokens_per_example()
    return tokens * flops_per_token(self.cfg, tokens, output_dim=self.num_categories)


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


def build_token_model(config: ml_collections.ConfigDict, info: Mapping[str, Any], *, modality: str) -> nn.Module:
  cfg = transformer_config(config.model, max_len=info["max_len"],
                           causal=config.objective.name == "autoregressive")
  return TokenSequenceModel(cfg, modality=modality, vocab_size=info["vocab_size"],
                            num_value_bins=info["num_value_bins"])


def build_imaging_model(config: ml_collections.ConfigDict, info: Mapping[str, Any]) -> nn.Module:
  num_patches = info["num_patches"]
  cfg = transformer_config(config.model, max_len=num_patches, causal=False)
  decoder = config.model.decoder
  decoder_cfg = transformer_config(config.model, max_len=num_patches, causal=False, dropout_rate=0.0,
                                   num_layers=decoder.num_layers, embed_dim=decoder.embed_dim,
                                   num_heads=decoder.num_heads, head_dim=0, mlp_dim=decoder.mlp_dim)
  num_visible = B.num_visible_patches(num_patches, config.data.imaging.mask_ratio)
  return ImagingMAEModel(cfg, decoder_cfg, image_shape=tuple(info["image_shape"]),
                         patch_shape=tuple(info["patch_shape"]), channels=info["channels"],
                         num_masked=num_patches - num_visible)


def build_tabular_model(config: ml_collections.ConfigDict, info: Mapping[str, Any]) -> nn.Module:
  tokens = 1 + info["num_numeric"] + info["num_categorical"]
  cfg = transformer_config(config.model, max_len=tokens, causal=False)
  return TabularPretrainModel(cfg, num_numeric=info["num_numeric"], num_categorical=info["num_categorical"],
                              num_categories=info["num_categories"])


MODEL_BUILDERS = {
    "ehr": functools.partial(build_token_model, modality="ehr"),
    "omics": functools.partial(build_token_model, modality="omics"),
    "sequence": functools.partial(build_token_model, modality="sequence"),
    "imaging": build_imaging_model,
    "tabular": build_tabular_model,
}


def build_model(config: ml_collections.ConfigDict, data_info: Mapping[str, Mapping[str, Any]]) -> nn.Module:
  """`data_info` holds what only the data knows, e.g. `{"ehr": {"vocab_size": ..., ...}}`."""
  modalities = sorted(data_info)
  if len(modalities) != 1 or modalities[0] not in MODEL_BUILDERS:
    raise ValueError(f"no single-modality model for {modalities}; registered: {sorted(MODEL_BUILDERS)}")
  return MODEL_BUILDERS[modalities[0]](config, data_info[modalities[0]])
