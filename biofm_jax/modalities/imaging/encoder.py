"""Imaging encoder: 2D/3D patch embedding with fixed sin-cos positions (ViT / MAE style).

Images are channels-last `[B, *spatial, C]`; patches are numbered row-major over the
patch grid, the same numbering the data pipeline's MAE masking uses. One code path
serves 2D and 3D: the number of spatial dims is read from the patch shape.
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from biofm_jax.data import batch as B
from biofm_jax.models.layers import TransformerConfig, embed_init, kernel_init, zeros_init
from biofm_jax.models.patches import grid_shape, patchify, sincos_position_embedding


class ImagingEncoder(nn.Module):
  """Maps an imaging batch to `(tokens, mask, positions, patches)`.

  With MAE patch ids in the batch only the visible patches become tokens (the encoder's
  compute scales with what it sees); without them every patch does (embedding, probes).
  """
  cfg: TransformerConfig
  image_shape: tuple[int, ...]
  patch_shape: tuple[int, ...]

  @nn.compact
  def __call__(self, imaging: dict[str, jax.Array], *, train: bool):
    cfg = self.cfg
    if cfg.position == "rope":
      raise ValueError("model.position 'rope' is for sequences; imaging uses 'sincos' (fixed) or 'learned'")
    patches = patchify(imaging[B.IMAGE], self.patch_shape)
    tokens = nn.Dense(cfg.embed_dim, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
                      kernel_init=kernel_init(("patch", "embed")), bias_init=zeros_init(("embed",)),
                      name="patch_embedding")(patches)
    num = patches.shape[1]
    rows = num + int(cfg.cls_token)  # with a CLS token, row 0 of the table is its position
    if cfg.position == "learned":
      table = self.param("position_embedding", embed_init((None, "embed")), (rows, cfg.embed_dim), cfg.param_dtype)
    else:  # a CLS token's fixed position is zeros, as in MAE's table
      table = jnp.asarray(sincos_position_embedding(grid_shape(self.image_shape, self.patch_shape), cfg.embed_dim))
      table = jnp.pad(table, ((rows - num, 0), (0, 0)))
    tokens = tokens + table[rows - num:].astype(cfg.dtype)[None]
    positions = jnp.broadcast_to(jnp.arange(num, dtype=jnp.int32), patches.shape[:2])
    if B.IMAGE_VISIBLE in imaging:
      visible = imaging[B.IMAGE_VISIBLE]
      tokens = jnp.take_along_axis(tokens, visible[..., None], axis=1)
      positions = visible
    if cfg.cls_token:  # after the visible patches are chosen: the CLS token is always seen
      cls = self.param("cls_token", embed_init(("embed",)), (cfg.embed_dim,), cfg.param_dtype)
      cls = (cls.astype(cfg.dtype) + table[0].astype(cfg.dtype))[None, None]
      tokens = jnp.concatenate([jnp.broadcast_to(cls, (tokens.shape[0], 1, cfg.embed_dim)), tokens], axis=1)
      positions = jnp.concatenate([jnp.zeros_like(positions[:, :1]), positions + 1], axis=1)
    tokens = nn.Dropout(cfg.dropout_rate, deterministic=not train)(tokens)
    mask = jnp.ones(tokens.shape[:2], jnp.bool_)
    return tokens, mask, positions, patches
