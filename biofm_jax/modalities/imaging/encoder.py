"""Imaging encoder: 2D/3D patch embedding with fixed sin-cos positions (ViT / MAE style).

Images are channels-last `[B, *spatial, C]`; patches are numbered row-major over the
patch grid, the same numbering the data pipeline's MAE masking uses. One code path
serves 2D and 3D: the number of spatial dims is read from the patch shape.
"""
from __future__ import annotations

import einops
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from biofm_jax.data import batch as B
from biofm_jax.models.layers import TransformerConfig, embed_init, kernel_init, zeros_init

_AXES = "dhw"  # names for up to three spatial axes in einops patterns


def _patch_pattern(ndim: int) -> tuple[str, str]:
  axes = _AXES[3 - ndim:]
  spatial = " ".join(f"({a} p{a})" for a in axes)
  grid = " ".join(axes)
  inner = " ".join(f"p{a}" for a in axes)
  return f"b {spatial} c", f"b ({grid}) ({inner} c)"


def patchify(images: jax.Array, patch_shape: tuple[int, ...]) -> jax.Array:
  """[B, *spatial, C] -> [B, num_patches, prod(patch_shape) * C], row-major patch order."""
  source, target = _patch_pattern(len(patch_shape))
  sizes = {f"p{a}": p for a, p in zip(_AXES[3 - len(patch_shape):], patch_shape)}
  return einops.rearrange(images, f"{source} -> {target}", **sizes)


def sincos_position_embedding(grid_shape: tuple[int, ...], dim: int) -> np.ndarray:
  """Fixed [prod(grid_shape), dim] embedding: 1D sin-cos per grid axis, concatenated.

  Each axis gets an even share of `dim`; leftover channels (when `dim` does not split
  evenly) are zero.
  """
  per_axis = (dim // len(grid_shape)) // 2 * 2
  if per_axis == 0:
    raise ValueError(f"embedding dim {dim} is too small for a {len(grid_shape)}-D position embedding")
  coords = np.meshgrid(*[np.arange(n, dtype=np.float64) for n in grid_shape], indexing="ij")
  omega = 1.0 / 10_000 ** (np.arange(per_axis // 2, dtype=np.float64) / (per_axis // 2))
  parts = []
  for c in coords:
    angles = c.reshape(-1)[:, None] * omega[None]
    parts += [np.sin(angles), np.cos(angles)]
  table = np.concatenate(parts, axis=1)
  return np.pad(table, ((0, 0), (0, dim - table.shape[1]))).astype(np.float32)


def grid_shape(image_shape: tuple[int, ...], patch_shape: tuple[int, ...]) -> tuple[int, ...]:
  return tuple(s // p for s, p in zip(image_shape, patch_shape))


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
    if cfg.position == "learned":
      table = self.param("position_embedding", embed_init((None, "embed")), (num, cfg.embed_dim), cfg.param_dtype)
    else:
      table = jnp.asarray(sincos_position_embedding(grid_shape(self.image_shape, self.patch_shape), cfg.embed_dim))
    tokens = tokens + table.astype(cfg.dtype)[None]
    positions = jnp.broadcast_to(jnp.arange(num, dtype=jnp.int32), patches.shape[:2])
    if B.IMAGE_VISIBLE in imaging:
      visible = imaging[B.IMAGE_VISIBLE]
      tokens = jnp.take_along_axis(tokens, visible[..., None], axis=1)
      positions = visible
    tokens = nn.Dropout(cfg.dropout_rate, deterministic=not train)(tokens)
    mask = jnp.ones(tokens.shape[:2], jnp.bool_)
    return tokens, mask, positions, patches
