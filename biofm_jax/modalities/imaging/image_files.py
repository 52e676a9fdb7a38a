"""Readers for single-file image formats: NIfTI, PNG/JPEG and NumPy .npy.

Orientation conventions:

- NIfTI: reoriented to the closest canonical (RAS+) orientation as
  nibabel.as_closest_canonical does, then arranged [D, H, W] = canonical (k, j, i), i.e. a
  transpose (2, 1, 0); spacing = the header zooms in that order. [D, H, W] thus runs
  inferior->superior, posterior->anterior, left->right: H and W are flipped relative to a
  standard axial DICOM series. scl_slope/scl_inter are applied by nibabel. A 4D file gives
  its first volume (counted in stats["nifti_first_volume_only"]); a 2D file is one slice.
  An uncompressed .nii file shorter than its voxels is reported as truncated.
- PNG/JPEG: grayscale -> C=1, RGB (and palette/CMYK) -> C=3, alpha dropped (counted);
  values as stored; spacing 1 mm (counted as unknown).
- NumPy .npy: channels-last, an array of rank spatial_dims has C=1; spacing 1 mm.

`*_item` functions read headers only and raise image_items.ItemError; `read_*_pixels`
return float32 [*stored spatial shape, C].
"""
from __future__ import annotations

import dataclasses
import os
import threading

import nibabel as nib
import numpy as np
from PIL import Image

from biofm_jax.modalities.imaging.image_items import Item, ItemError

_MODES_TO_RGB = ("RGB", "RGBA", "P", "PA", "CMYK", "YCbCr", "LAB", "HSV")


# ---------------------------------------------------------------- headers
def _nifti_orientation(image) -> np.ndarray:
  return nib.orientations.io_orientation(image.affine)


def nifti_item(item: Item) -> Item:
  path = item.files[0]
  try:
    image = nib.load(path)
    header_shape, zooms = tuple(image.shape), tuple(image.header.get_zooms())
    dtype, data_offset = image.get_data_dtype(), int(image.header.get_data_offset())
  except Exception as e:
    raise ItemError("corrupt", f"{path}: not a readable NIfTI file ({type(e).__name__}: {e})")
  if path.lower().endswith(".nii"):  # uncompressed: the voxels must fit in the file
    needed = data_offset + int(np.prod(header_shape)) * dtype.itemsize
    if os.path.getsize(path) < needed:
      raise ItemError("truncated", f"{path}: truncated NIfTI file ({os.path.getsize(path)} "
                                   f"bytes, header shape {header_shape} needs {needed})")
  if dtype.fields is not None:
    raise ItemError("unsupported", f"{path}: NIfTI with a structured (RGB) data type is not "
                                   "supported; expected scalar voxels")
  if len(header_shape) > 4 and max(header_shape[4:]) > 1:
    raise ItemError("unsupported", f"{path}: NIfTI of shape {header_shape}; expected 2D, "
                                   "3D or 4D (first volume used)")
  shape = (header_shape + (1, 1))[:3]
  zooms = (zooms + (1.0, 1.0))[:3]
  flags = ("nifti_first_volume_only",) if len(header_shape) > 3 and header_shape[3] > 1 else ()
  canonical_shape, canonical_zooms = [0] * 3, [0.0] * 3
  for axis, (target, _) in enumerate(_nifti_orientation(image).astype(int)):
    canonical_shape[target], canonical_zooms[target] = shape[axis], float(zooms[axis])
  return dataclasses.replace(item, shape=tuple(canonical_shape[::-1]), channels=1,
                             spacing=tuple(canonical_zooms[::-1]), flags=flags)


def pil_item(item: Item) -> Item:
  path = item.files[0]
  try:
    with Image.open(path) as image:
      mode, (width, height) = image.mode, image.size
  except Exception as e:
    raise ItemError("corrupt", f"{path}: not a readable image ({type(e).__name__}: {e})")
  flags = ("unknown_spacing",) + (("alpha_dropped",) if mode in ("RGBA", "LA", "PA") else ())
  return dataclasses.replace(item, shape=(height, width), spacing=(1.0, 1.0), flags=flags,
                             channels=3 if mode in _MODES_TO_RGB else 1)


def _npy_layout(shape: tuple[int, ...], spatial_dims: int) -> tuple[tuple[int, ...], int] | None:
  """(spatial shape, channels) of a channels-last array, None when the rank does not fit."""
  if len(shape) == spatial_dims:
    return shape, 1
  if len(shape) == spatial_dims + 1 or (spatial_dims == 2 and len(shape) == 4):
    return shape[:-1], shape[-1]
  if spatial_dims == 3 and len(shape) == 2:
    return shape, 1  # a 2D image: reported as a rank error by imaging._fit_rank
  return None


def npy_item(item: Item, spatial_dims: int) -> Item:
  path = item.files[0]
  try:
    array = load_npy(path, mmap_mode="r")
    shape, dtype = array.shape, array.dtype
  except Exception as e:
    raise ItemError("corrupt", f"{path}: not a readable .npy file ({type(e).__name__}: {e})")
  if dtype.kind not in "biuf":
    raise ItemError("unsupported", f"{path}: .npy of dtype {dtype}; expected bool, int or float")
  layout = _npy_layout(shape, spatial_dims)
  if layout is None:
    raise ItemError("rank", f"{path}: .npy of shape {shape}; expected [*spatial] or "
                            f"[*spatial, C] with {spatial_dims} spatial dims")
  return dataclasses.replace(item, shape=layout[0], channels=layout[1],
                             spacing=(1.0,) * len(layout[0]), flags=("unknown_spacing",))


# ---------------------------------------------------------------- pixel reads
def read_nifti_pixels(path: str) -> np.ndarray:
  image = nib.load(path)
  extra_axes = max(len(image.shape) - 3, 0)
  # Slicing the proxy reads only the first volume of a 4D file; nibabel applies scl_*.
  data = image.dataobj[(slice(None),) * 3 + (0,) * extra_axes] if extra_axes else image.dataobj
  data = np.asarray(data, np.float32)
  data = data.reshape(data.shape + (1,) * (3 - data.ndim))
  canonical = nib.orientations.apply_orientation(data, _nifti_orientation(image))
  return np.ascontiguousarray(canonical.transpose(2, 1, 0))[..., None]


def read_pil_pixels(path: str) -> np.ndarray:
  with Image.open(path) as image:
    image.load()
    if image.mode in _MODES_TO_RGB:
      image = image.convert("RGB")
    elif image.mode in ("LA", "1"):
      image = image.convert("L")
    pixels = np.asarray(image, np.float32)
  return pixels if pixels.ndim == 3 else pixels[..., None]


# np.load parses the .npy header with ast.literal_eval, which CPython 3.11 can fail with
# "SystemError: AST constructor recursion depth mismatch" when Grain's reader threads
# parse concurrently. Only the header parse is serialised; pixel reads stay parallel.
_NPY_HEADER_LOCK = threading.Lock()


def load_npy(path: str, mmap_mode: str | None = None) -> np.ndarray:
  with _NPY_HEADER_LOCK:
    array = np.load(path, mmap_mode="r", allow_pickle=False)
  return array if mmap_mode else np.array(array)


def read_npy_pixels(path: str, stored_rank: int) -> np.ndarray:
  pixels = load_npy(path).astype(np.float32)
  return pixels[..., None] if pixels.ndim == stored_rank else pixels  # implicit C=1
