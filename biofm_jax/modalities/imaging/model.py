"""The imaging modality in a model: ViT patches in, the MAE decoder's reconstruction out.

`model_modality(config, model_info)` is the registry's model entry (`registry.py`).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import ml_collections

from biofm_jax.data import batch as B
from biofm_jax.modalities.imaging.encoder import ImagingEncoder
from biofm_jax.models.heads import MAEDecoder
from biofm_jax.models.layers import TransformerConfig, transformer_config
from biofm_jax.models.modalities import Encoded, masked_mean
from biofm_jax.models.patches import grid_shape
from biofm_jax.models.transformer import flops_per_token


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
    return 0  # the decoder is counted in `extra_flops`

  def extra_flops(self, encoder_dim: int) -> float:
    """Patch embedding, the decoder over every patch, and the projections in and out of it."""
    total, masked = self.num_patches, self.num_masked
    patch_dim = self.channels * math.prod(self.patch_shape)
    decoder = total * flops_per_token(self.decoder_cfg, total, output_dim=0)
    project = 3 * 2 * ((total - masked) * encoder_dim * self.decoder_cfg.embed_dim
                       + masked * self.decoder_cfg.embed_dim * patch_dim)
    return decoder + project + 3 * 2 * patch_dim * encoder_dim * total  # + patch embedding


def model_modality(config: ml_collections.ConfigDict, info: Mapping[str, Any]) -> ImagingModality:
  num_patches = info["num_patches"]
  decoder = config.model.decoder
  decoder_cfg = transformer_config(config.model, max_len=num_patches, causal=False, dropout_rate=0.0,
                                   num_layers=decoder.num_layers, embed_dim=decoder.embed_dim,
                                   num_heads=decoder.num_heads, head_dim=0, mlp_dim=decoder.mlp_dim,
                                   position="sincos")
  num_visible = B.num_visible_patches(num_patches, config.data.imaging.mask_ratio)
  return ImagingModality(image_shape=tuple(info["image_shape"]), patch_shape=tuple(info["patch_shape"]),
                         channels=info["channels"], num_masked=num_patches - num_visible, decoder_cfg=decoder_cfg)
