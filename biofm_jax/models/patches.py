"""Patch pieces every patch-based modality shares (images, waveforms): cutting an array
into a row-major grid of patches, the grid's shape, fixed sin-cos positions over it, and
per-patch normalisation of MAE targets."""
from __future__ import annotations

import einops
import jax
import numpy as np

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
