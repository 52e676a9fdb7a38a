"""The masked-autoencoder half that patch modalities share: images' ViT patches and ECGs'
per-lead patches are encoded visible-only and reconstructed by one light decoder.

A patch modality (`modalities/imaging/model.py`, `modalities/ecg/model.py`) owns only how
its input becomes patch tokens (`encode`); `PatchMAEModality` brings the rest of the model
description: the decoder head over the patch grid (when the batch carries MAE ids), the
pooled embedding, and what pre-training costs (tokens encoded, decoder FLOPs).
`mae_half(config, grid, patch_dim, mask_ratio, ...)` builds the half from the config's
`model.decoder` section, so both modalities read their decoder the same way.
"""
from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import ml_collections

from biofm_jax.data import batch as B
from biofm_jax.models.heads import MAEDecoder
from biofm_jax.models.layers import TransformerConfig, transformer_config
from biofm_jax.models.description import Encoded, masked_mean
from biofm_jax.models.transformer import flops_per_token


@dataclasses.dataclass(frozen=True)
class PatchMAE:
  """The decoder side of MAE over a grid of patches, and what it costs."""
  grid: tuple[int, ...]  # the patch grid: an image's patches per axis, (leads, patches per lead)
  patch_dim: int  # values per patch (pixels times channels; samples of one lead)
  num_masked: int  # patches reconstructed per example
  decoder_cfg: TransformerConfig
  masked_key: str  # the batch's ids of the masked patches
  visible_key: str  # ... and of the visible ones

  @property
  def num_patches(self) -> int:
    return math.prod(self.grid)

  def heads(self, hidden: jax.Array, encoded: Encoded, example, *, train: bool, prefix: str) -> dict[str, jax.Array]:
    """The pooled embedding; with MAE ids in the batch, the masked patches predicted and their targets."""
    start = encoded.prefix_tokens  # a CLS token is neither pooled nor decoded
    patch_hidden = hidden[:, start:]
    out = {"hidden": hidden, "embedding": masked_mean(patch_hidden, encoded.mask[:, start:])}
    if self.masked_key in example:
      masked, patches = example[self.masked_key], encoded.extra
      decoder = MAEDecoder(self.decoder_cfg, self.grid, patch_dim=self.patch_dim, name=f"{prefix}decoder")
      out["predicted_patches"] = decoder(patch_hidden, example[self.visible_key], masked, train=train)
      out["target_patches"] = jnp.take_along_axis(patches, masked[..., None], axis=1).astype(jnp.float32)
    return out

  def extra_flops(self, encoder_dim: int) -> float:
    """Patch embedding, the decoder over every patch, and the projections in and out of it."""
    total, masked, width = self.num_patches, self.num_masked, self.decoder_cfg.embed_dim
    decoder = total * flops_per_token(self.decoder_cfg, total, output_dim=0)
    project = 3 * 2 * ((total - masked) * encoder_dim * width + masked * width * self.patch_dim)
    return decoder + project + 3 * 2 * self.patch_dim * encoder_dim * total  # + patch embedding


@dataclasses.dataclass(frozen=True)
class PatchMAEModality:
  """Base of the patch modalities' model descriptions: everything but `encode`."""
  mae: PatchMAE

  def heads(self, cfg: TransformerConfig, hidden: jax.Array, encoded: Encoded, example, *, train: bool,
            prefix: str = "") -> dict[str, jax.Array]:
    del cfg
    return self.mae.heads(hidden, encoded, example, train=train, prefix=prefix)

  def num_tokens(self) -> int:
    return self.mae.num_patches

  def encoded_tokens(self) -> int:
    """MAE encodes the visible patches only."""
    return self.mae.num_patches - self.mae.num_masked

  def head_output_dim(self) -> int:
    return 0  # the decoder is counted in `extra_flops`

  def extra_flops(self, encoder_dim: int) -> float:
    return self.mae.extra_flops(encoder_dim)


def mae_half(config: ml_collections.ConfigDict, grid: tuple[int, ...], patch_dim: int, mask_ratio: float, *,
             masked_key: str, visible_key: str) -> PatchMAE:
  """The MAE half of a patch modality, its decoder read from `config.model.decoder`."""
  total = math.prod(grid)
  decoder = config.model.decoder
  decoder_cfg = transformer_config(config.model, max_len=total, causal=False, dropout_rate=0.0,
                                   num_layers=decoder.num_layers, embed_dim=decoder.embed_dim,
                                   num_heads=decoder.num_heads, head_dim=0, mlp_dim=decoder.mlp_dim,
                                   position="sincos")
  return PatchMAE(grid=tuple(grid), patch_dim=patch_dim, num_masked=total - B.num_visible_patches(total, mask_ratio),
                  decoder_cfg=decoder_cfg, masked_key=masked_key, visible_key=visible_key)
