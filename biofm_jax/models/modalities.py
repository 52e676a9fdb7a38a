"""What each modality contributes to a model: how its batch becomes tokens, and its heads.

A modality is a small frozen (hashable) description with two methods, both called inside
a Linen module's compact method so the submodules they create belong to that module:

  encode(cfg, example, train)  -> Encoded(tokens [B, T, D], mask [B, T], positions [B, T], extra)
  heads(cfg, hidden, encoded, example, train, prefix) -> the modality's output dict

The single-modality models (`model.py`) put one transformer between the two; the
multimodal model (`fusion.py`) puts per-modality towers and a fusion block there. Both
return the same per-modality output dicts, so the pre-training objectives of each
modality serve either unchanged. `prefix` names the heads apart when several modalities
share one module ("" keeps the single-modality names, e.g. "code_head").
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from biofm_jax.data import batch as B
from biofm_jax.models.encoders.ehr import EHREncoder
from biofm_jax.models.encoders.imaging import ImagingEncoder, grid_shape
from biofm_jax.models.encoders.tabular import TabularEncoder
from biofm_jax.models.encoders.tokens import TokenEncoder
from biofm_jax.models.heads import MAEDecoder, TokenClassifier
from biofm_jax.models.layers import TransformerConfig, embed_init, zeros_init
from biofm_jax.models.transformer import flops_per_token


class Encoded(NamedTuple):
  tokens: jax.Array  # [B, T, D]
  mask: jax.Array  # bool [B, T]: real tokens
  positions: jax.Array  # int32 [B, T]
  extra: Any = None  # what the heads need besides the hidden states (imaging: the patches)


def masked_mean(hidden: jax.Array, mask: jax.Array) -> jax.Array:
  """[B, T, D] -> [B, D] float32 mean over the real tokens (0 where there are none)."""
  weights = mask.astype(jnp.float32)[..., None]
  return (hidden.astype(jnp.float32) * weights).sum(1) / jnp.maximum(weights.sum(1), 1.0)


@dataclasses.dataclass(frozen=True)
class TokenModality:
  """EHR timelines, expression profiles and sequences; EHR adds age and time features."""
  name: str
  vocab_size: int
  num_value_bins: int
  max_len: int
  position: str = "rope"  # what the modality's own tokens need: rope or learned

  def encode(self, cfg: TransformerConfig, example: Mapping[str, jax.Array], *, train: bool) -> Encoded:
    encoder = EHREncoder if self.name == "ehr" else TokenEncoder
    tokens, mask, positions = encoder(cfg, self.vocab_size, self.num_value_bins,
                                      name=f"{self.name}_encoder")(example, train=train)
    return Encoded(tokens, mask, positions)

  def heads(self, cfg: TransformerConfig, hidden: jax.Array, encoded: Encoded, example, *, train: bool,
            prefix: str = "") -> dict[str, jax.Array]:
    del example, train
    out = {"hidden": hidden, "mask": encoded.mask, "embedding": masked_mean(hidden, encoded.mask),
           "code_logits": TokenClassifier(cfg, self.vocab_size, name=f"{prefix}code_head")(hidden)}
    if self.num_value_bins:
      out["value_logits"] = TokenClassifier(cfg, self.num_value_bins + 1, class_axis=None,
                                            name=f"{prefix}value_head")(hidden)
    return out

  def num_tokens(self) -> int:
    return self.max_len

  def encoded_tokens(self) -> int:
    """Tokens the encoder hands to the transformer in pre-training."""
    return self.max_len

  def head_output_dim(self) -> int:
    return self.vocab_size + (self.num_value_bins + 1 if self.num_value_bins else 0)


@dataclasses.dataclass(frozen=True)
class ImagingModality:
  """2D/3D images as ViT patches; MAE reconstruction of the masked patches when the batch
  carries MAE patch ids, otherwise every patch is encoded (embeddings, probes)."""
  image_shape: tuple[int, ...]
  patch_shape: tuple[int, ...]
  channels: int
  num_masked: int
  decoder_cfg: TransformerConfig
  name: str = "imaging"
  position: str = "sincos"

  def encode(self, cfg: TransformerConfig, example: Mapping[str, jax.Array], *, train: bool) -> Encoded:
    tokens, mask, positions, patches = ImagingEncoder(cfg, self.image_shape, self.patch_shape,
                                                      name="imaging_encoder")(example, train=train)
    return Encoded(tokens, mask, positions, patches)

  def heads(self, cfg: TransformerConfig, hidden: jax.Array, encoded: Encoded, example, *, train: bool,
            prefix: str = "") -> dict[str, jax.Array]:
    del cfg
    out = {"hidden": hidden, "embedding": masked_mean(hidden, encoded.mask)}
    if B.IMAGE_MASKED in example:
      masked, patches = example[B.IMAGE_MASKED], encoded.extra
      decoder = MAEDecoder(self.decoder_cfg, grid_shape(self.image_shape, self.patch_shape),
                           patch_dim=patches.shape[-1], name=f"{prefix}decoder")
      out["predicted_patches"] = decoder(hidden, example[B.IMAGE_VISIBLE], masked, train=train)
      out["target_patches"] = jnp.take_along_axis(patches, masked[..., None], axis=1).astype(jnp.float32)
    return out

  @property
  def num_patches(self) -> int:
    return math.prod(grid_shape(self.image_shape, self.patch_shape))

  def num_tokens(self) -> int:
    return self.num_patches

  def encoded_tokens(self) -> int:
    """MAE encodes the visible patches only."""
    return self.num_patches - self.num_masked

  def head_output_dim(self) -> int:
    return 0  # the decoder is counted in `mae_flops`

  def mae_flops(self, encoder_dim: int) -> float:
    """Patch embedding, the decoder over every patch, and the projections in and out of it."""
    total, masked = self.num_patches, self.num_masked
    patch_dim = self.channels * math.prod(self.patch_shape)
    decoder = total * flops_per_token(self.decoder_cfg, total, output_dim=0)
    project = 3 * 2 * ((total - masked) * encoder_dim * self.decoder_cfg.embed_dim
                       + masked * self.decoder_cfg.embed_dim * patch_dim)
    return decoder + project + 3 * 2 * patch_dim * encoder_dim * total  # + patch embedding


class ColumnValueHead(nn.Module):
  """Reads each numeric column's value back through that column's own weights."""
  cfg: TransformerConfig
  num_numeric: int

  @nn.compact
  def __call__(self, numeric_hidden: jax.Array) -> jax.Array:
    cfg = self.cfg
    weight = self.param("kernel", embed_init(("features", "embed")), (self.num_numeric, cfg.embed_dim),
                        cfg.param_dtype)
    bias = self.param("bias", zeros_init(("features",)), (self.num_numeric,), cfg.param_dtype)
    return (jnp.einsum("bfd,fd->bf", numeric_hidden, weight.astype(cfg.dtype)) + bias).astype(jnp.float32)


@dataclasses.dataclass(frozen=True)
class TabularModality:
  """One token per column after a CLS token; the row's embedding is the CLS hidden state."""
  num_numeric: int
  num_categorical: int
  num_categories: int
  name: str = "tabular"
  position: str = "none"  # a column's identity is in its own weights

  def encode(self, cfg: TransformerConfig, example: Mapping[str, jax.Array], *, train: bool) -> Encoded:
    tokens, mask, positions = TabularEncoder(cfg, self.num_numeric, self.num_categorical, self.num_categories,
                                             name="tabular_encoder")(example, train=train)
    return Encoded(tokens, mask, positions)

  def heads(self, cfg: TransformerConfig, hidden: jax.Array, encoded: Encoded, example, *, train: bool,
            prefix: str = "") -> dict[str, jax.Array]:
    del encoded, example, train
    out = {"hidden": hidden, "embedding": hidden[:, 0].astype(jnp.float32),
           "value_predictions": ColumnValueHead(cfg, self.num_numeric, name=f"{prefix}value_head")(
               hidden[:, 1:1 + self.num_numeric])}
    if self.num_categorical:
      out["category_logits"] = TokenClassifier(cfg, self.num_categories, name=f"{prefix}category_head")(
          hidden[:, 1 + self.num_numeric:])
    return out

  def num_tokens(self) -> int:
    return 1 + self.num_numeric + self.num_categorical

  def encoded_tokens(self) -> int:
    return self.num_tokens()

  def head_output_dim(self) -> int:
    return self.num_categories


def encoder_flops(modality, cfg: TransformerConfig) -> float:
  """Training FLOPs per example of a modality's transformer over its tokens, with its heads."""
  tokens = modality.encoded_tokens()
  flops = tokens * flops_per_token(cfg, tokens, output_dim=modality.head_output_dim())
  return flops + modality.mae_flops(cfg.embed_dim) if isinstance(modality, ImagingModality) else flops
