"""Image augmentation inside the jitted train step (`data.imaging.augment="device"`).

The host then only reads, resamples and normalises each image to a fixed canvas
(`data.imaging.canvas_size`, the image size by default) and draws one uint32 seed per
example (`AugmentSeed`, seeded by Grain per stream position, so a batch is the same on
resume and under any process count). The step turns each canvas into a training image
with the host transforms' arithmetic, batched on the accelerator:

  random resized crop and flips (`crop_box`, `resize_box`) -> intensity jitter

`resize_box` is `transforms.resize_linear` (half-pixel centres, separable multilinear)
as one matmul per axis: a box of the same image gives the host's numbers (to float
rounding). The crop is taken from the canvas, not from the full-resolution image: with
the default canvas (the image size) a crop of half the area is upsampled by about 1.4 per
axis, where the host crops the source. Set `canvas_size` to keep the crops' resolution
(image_size / sqrt(min crop scale) in 2D, or the sources' own size).
`crop_box` draws boxes by `sample_crop_box`'s rule, its ten attempts drawn at once (a
fixed number of draws, as jit needs): other numbers than the host's, the same law.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping, Sequence

import grain
import jax
import jax.numpy as jnp
import numpy as np

from biofm_jax.data import batch as B
from biofm_jax.modalities.imaging.transforms import CROP_ATTEMPTS, CROP_RATIO

AUGMENT_SEED = "augment_seed"  # uint32 []: the example's augmentation draws


class AugmentSeed(grain.transforms.RandomMap):
  """Adds the example's augmentation seed, one draw of its position's generator."""

  def random_map(self, example: Mapping[str, Any], rng: np.random.Generator) -> dict:
    return {**example, AUGMENT_SEED: np.asarray(rng.integers(2**32, dtype=np.uint32))}


@dataclasses.dataclass(frozen=True)
class DeviceAugment:
  """Canvas batch -> augmented batch of `image_size` images, for one modality's examples."""
  modality: str
  image_size: tuple[int, ...]
  crop_scale: tuple[float, float]
  flip_axes: tuple[int, ...]
  brightness: float
  contrast: float

  def __call__(self, batch: Mapping[str, Any]) -> dict:
    if self.modality not in batch:  # a multimodal batch without this modality
      return dict(batch)
    example = dict(batch[self.modality])
    if AUGMENT_SEED not in example:
      raise ValueError(f"data.imaging.augment='device': the {self.modality} batch has no {AUGMENT_SEED!r} "
                       f"field (fields {sorted(example)}); its training transforms must end in AugmentSeed")
    seeds = example.pop(AUGMENT_SEED)
    example[B.IMAGE] = jax.vmap(self.one)(example[B.IMAGE], seeds)
    return {**batch, self.modality: example}

  def one(self, image: jax.Array, seed: jax.Array) -> jax.Array:
    crop_key, flip_key, jitter_key = jax.random.split(jax.random.fold_in(jax.random.key(0), seed), 3)
    starts, sizes = crop_box(crop_key, image.shape[:-1], self.crop_scale)
    flips = jax.random.bernoulli(flip_key, 0.5, (len(self.flip_axes),))
    flipped = jnp.zeros(len(self.image_size), bool).at[jnp.asarray(self.flip_axes, jnp.int32)].set(flips)
    image = resize_box(image, starts, sizes, self.image_size, flipped)
    return intensity_jitter(jitter_key, image, self.brightness, self.contrast)


def crop_box(key: jax.Array, shape: Sequence[int], scale: tuple[float, float],
             ratio: tuple[float, float] = CROP_RATIO, attempts: int = CROP_ATTEMPTS) -> tuple[jax.Array, jax.Array]:
  """float32 (starts, sizes), whole pixels, of a random box drawn as `sample_crop_box`
  draws it: volume fraction uniform in `scale`, each later axis' side relative to axis 0
  log-uniform in `ratio`, a draw kept only when among axes 1..n-1 each later side over
  each earlier one is within `ratio` too and the box fits; `attempts` draws at once, the
  first kept one used, else the whole image."""
  n = len(shape)
  volume_key, aspect_key, start_key = jax.random.split(key, 3)
  volume = jax.random.uniform(volume_key, (attempts, 1), minval=scale[0], maxval=scale[1])
  low, high = math.log(ratio[0]), math.log(ratio[1])
  offsets = jnp.concatenate([jnp.zeros((attempts, 1)),
                             jax.random.uniform(aspect_key, (attempts, n - 1), minval=low, maxval=high)], axis=1)
  extent = jnp.asarray(shape, jnp.float32)
  sizes = jnp.round(jnp.exp(jnp.log(volume) / n + offsets - offsets.mean(axis=1, keepdims=True)) * extent)
  # The host's rule: among axes 1..n-1, each later axis' side over each earlier one's in `ratio`.
  later = np.triu(np.ones((n - 1, n - 1), bool), k=1)
  pairs = (offsets[:, None, 1:] - offsets[:, 1:, None])[:, later]  # [attempt, pair]
  kept = (((pairs >= low) & (pairs <= high)).all(axis=1)
          & (sizes >= 1).all(axis=1) & (sizes <= extent).all(axis=1))
  sizes = jnp.where(kept.any(), sizes[jnp.argmax(kept)], extent)
  starts = jnp.floor(jax.random.uniform(start_key, (n,)) * (extent - sizes + 1.0))
  return starts, sizes


def interpolation_matrix(n_in: int, start: jax.Array, size: jax.Array, n_out: int) -> jax.Array:
  """float32 [n_out, n_in]: row i holds the two linear-interpolation weights of output pixel
  i of the box start..start + size (half-pixel centres, as `transforms._linear_sample_points`)."""
  centres = start + (jnp.arange(n_out, dtype=jnp.float32) + 0.5) * (size / n_out) - 0.5
  centres = jnp.clip(centres, 0.0, n_in - 1)
  low = jnp.floor(centres)
  weight = (centres - low)[:, None]
  high = jnp.minimum(low + 1, n_in - 1)
  columns = jnp.arange(n_in, dtype=jnp.float32)[None]
  return (columns == low[:, None]) * (1.0 - weight) + (columns == high[:, None]) * weight


def resize_box(image: jax.Array, starts: jax.Array, sizes: jax.Array, output_shape: Sequence[int],
               flips: jax.Array | None = None) -> jax.Array:
  """The box of a channels-last image resized to `output_shape` (as `resize_linear`), each
  spatial axis whose `flips` entry is True reversed. One small matmul per axis with an
  interpolation matrix (a flip reverses its rows): matmuls, not gathers, on any backend."""
  for axis, n_out in enumerate(output_shape):
    matrix = interpolation_matrix(image.shape[axis], starts[axis], sizes[axis], n_out)
    if flips is not None:
      matrix = jnp.where(flips[axis], matrix[::-1], matrix)
    image = jnp.moveaxis(jnp.tensordot(matrix, image, axes=((1,), (axis,))), 0, axis)
  return image


def intensity_jitter(key: jax.Array, image: jax.Array, brightness: float, contrast: float) -> jax.Array:
  """x -> mean + (x - mean) * (1 + c) + b, c ~ U(+-contrast), b ~ U(+-brightness)."""
  gain_key, shift_key = jax.random.split(key)
  gain = 1.0 + jax.random.uniform(gain_key, (), minval=-contrast, maxval=contrast)
  shift = jax.random.uniform(shift_key, (), minval=-brightness, maxval=brightness)
  mean = image.mean()
  return (image - mean) * gain + (mean + shift)
