"""Synthetic 2D and 3D CT-like images with planted lesions, for tests, demos and benchmarks.

This module owns `write_synthetic_images`, which writes a folder that
`imaging.ImagingDataset` reads:

  images/<subject_id>.npy (or .nii.gz, or .png)   one image per subject
  manifest.csv   subject_id, path, split (80/10/10 train/tuning/held_out), modality ("CT"),
                 lesion (0/1), lesion_size (radius in voxels, 0 without a lesion),
                 lesion_intensity (lesion contrast in HU, signed, 0 without a lesion)

Each image is in Hounsfield-like units: air (-1000) around an elliptical "body" (ellipsoid
in 3D) whose position and size jitter, of a per-subject base intensity with a smooth
texture, holding two or three inner "organs" that differ from the body by 40-90 HU, plus
voxel noise. Exactly half the subjects (lesion=1) carry a round lesion inside the body:
radius 0.09-0.14 of the image size (3-4.5 voxels at 32, 6-9 at 64), contrast 180-320 HU,
brighter or darker at random. Because the body intensity varies between subjects and the
lesion is as often dark as bright, the mean intensity of an image says little about the
label; the local round high-contrast structure says a lot, so a linear probe on a good
representation can find it.

Formats: "npy" float32 [*spatial] (spacing unknown to readers: 1 mm), "nifti" .nii.gz with
an affine carrying SPACING_MM (RAS+, so the reader's [D, H, W] equals the array written
here), "png" 2D only, uint8 after a CT window of [-250, 350] HU.

CLI:
  python -m biofm_jax.modalities.imaging.synthetic --out /tmp/img --spatial_dims 2 \
      --num_subjects 200 --seed 0
"""
from __future__ import annotations

import argparse
import csv
import os
import pathlib
from typing import Sequence

import nibabel as nib
import numpy as np
from PIL import Image
from scipy import ndimage

from biofm_jax.data.sources.atomic import atomic_directory
from biofm_jax.data.sources.splits import STANDARD_SPLITS

FORMATS = {"npy": ".npy", "nifti": ".nii.gz", "png": ".png"}
SPACING_MM = {2: (0.8, 0.8), 3: (1.5, 0.8, 0.8)}  # [H, W] and [D, H, W]
MANIFEST_COLUMNS = ("subject_id", "path", "split", "modality", "lesion", "lesion_size",
                    "lesion_intensity")
_AIR_HU = -1000.0
_PNG_WINDOW_HU = (-250.0, 350.0)


# ---------------------------------------------------------------- one image
def _grid(size: int, spatial_dims: int) -> np.ndarray:
  """Coordinates in [-1, 1], shape [spatial_dims, size, ..., size]."""
  axis = np.linspace(-1.0, 1.0, size, dtype=np.float32)
  return np.stack(np.meshgrid(*[axis] * spatial_dims, indexing="ij"))


def _inside(grid: np.ndarray, center: np.ndarray, radii: np.ndarray) -> np.ndarray:
  """Boolean mask of the axis-aligned ellipsoid with `center` and `radii`."""
  as_column = (-1,) + (1,) * (grid.ndim - 1)  # broadcast over the spatial axes
  offsets = (grid - center.reshape(as_column)) / radii.reshape(as_column)
  return (offsets ** 2).sum(axis=0) <= 1.0


def _smooth_texture(rng: np.random.Generator, shape: tuple[int, ...], size: int) -> np.ndarray:
  """Unit-variance noise smoothed over about a sixteenth of the image."""
  texture = ndimage.gaussian_filter(rng.standard_normal(shape).astype(np.float32), size / 16)
  return texture / max(float(texture.std()), 1e-6)


def _simulate_image(rng: np.random.Generator, spatial_dims: int, size: int,
                    has_lesion: bool, *, soft_tissue: float | None = None,
                    body_radii: np.ndarray | None = None,
                    organ_contrasts: Sequence[float] = (-60.0, 40.0, 90.0),
                    ) -> tuple[np.ndarray, float, float]:
  """(image in HU, lesion radius in voxels, lesion contrast in HU) for one subject.

  `soft_tissue` (the body's base intensity in HU) and `body_radii` ([spatial_dims], in
  units of the half image) are drawn when None; each organ's contrast to the body is one
  of `organ_contrasts` (HU) plus noise. A caller sets them to plant a latent state in the
  image (modalities/synthetic_cohort.py).
  """
  grid = _grid(size, spatial_dims)
  shape = grid.shape[1:]
  body_center = rng.normal(0.0, 0.05, spatial_dims).astype(np.float32)
  body_radii = (rng.uniform(0.6, 0.85, spatial_dims) if body_radii is None
                else np.asarray(body_radii)).astype(np.float32)
  body = _inside(grid, body_center, body_radii)
  if soft_tissue is None:
    soft_tissue = rng.uniform(-20.0, 80.0)  # varies so the mean does not give the label away
  texture = 15.0 * _smooth_texture(rng, shape, size)
  image = np.where(body, soft_tissue + texture, _AIR_HU)

  for _ in range(rng.integers(2, 4)):
    center = body_center + rng.uniform(-0.45, 0.45, spatial_dims) * body_radii
    radii = rng.uniform(0.25, 0.45, spatial_dims) * body_radii
    # Organs are subtler than lesions, so the lesion is the strongest local contrast.
    offset = rng.choice(organ_contrasts) + rng.normal(0.0, 10.0)
    # Replace rather than add, so overlapping organs never stack into lesion-like contrast.
    image = np.where(_inside(grid, center, radii) & body, soft_tissue + offset + texture, image)

  radius_voxels, contrast = 0.0, 0.0
  if has_lesion:
    radius_voxels = rng.uniform(0.09, 0.14) * size
    contrast = rng.choice([-1.0, 1.0]) * rng.uniform(180.0, 320.0)
    direction = rng.standard_normal(spatial_dims)
    direction /= np.linalg.norm(direction)
    center = body_center + direction * rng.uniform(0.0, 0.45) * body_radii
    radius = radius_voxels * 2.0 / (size - 1)  # voxels -> grid units
    lesion = _inside(grid, center.astype(np.float32), np.full(spatial_dims, radius, np.float32))
    image = np.where(lesion & body, image + contrast, image)

  image = image + rng.normal(0.0, 12.0, shape)
  return image.astype(np.float32), float(radius_voxels), float(contrast)


# ---------------------------------------------------------------- files
def _write_image(path: pathlib.Path, image: np.ndarray, file_format: str) -> None:
  if file_format == "npy":
    np.save(path, image)
  elif file_format == "png":
    low, high = _PNG_WINDOW_HU
    gray = np.clip((image - low) / (high - low) * 255.0, 0, 255).round().astype(np.uint8)
    Image.fromarray(gray, mode="L").save(path)
  else:  # NIfTI stores (i, j, k) = reversed [D, H, W]; a diagonal RAS+ affine keeps it so
    spacing = SPACING_MM[image.ndim]
    volume = image.transpose() if image.ndim == 3 else image.T[:, :, None]
    affine = np.diag(list(spacing[::-1]) + [1.0] * (4 - len(spacing)))
    nib.save(nib.Nifti1Image(volume, affine), path)


def _split_names(num_subjects: int, rng: np.random.Generator) -> np.ndarray:
  n_train, n_tuning = round(0.8 * num_subjects), round(0.1 * num_subjects)
  names = np.array([STANDARD_SPLITS[2]] * num_subjects, dtype=object)
  order = rng.permutation(num_subjects)
  names[order[:n_train]] = STANDARD_SPLITS[0]
  names[order[n_train:n_train + n_tuning]] = STANDARD_SPLITS[1]
  return names


def write_synthetic_images(out_dir: str | os.PathLike, *, spatial_dims: int,
                           num_subjects: int = 200, seed: int = 0, image_size: int = 64,
                           file_format: str = "npy") -> pathlib.Path:
  """Writes the images and manifest.csv to `out_dir` (absent or empty); returns its path.

  Deterministic given the arguments. Written to a hidden sibling directory and renamed, so
  an interrupted write never leaves a half-written dataset at `out_dir`.
  """
  if (spatial_dims not in (2, 3) or num_subjects < 1 or image_size < 16
      or file_format not in FORMATS or (file_format == "png" and spatial_dims != 2)):
    raise ValueError(f"write_synthetic_images: spatial_dims={spatial_dims}, num_subjects="
                     f"{num_subjects}, image_size={image_size}, file_format={file_format!r}; "
                     f"expected 2 or 3, >= 1, >= 16, one of {list(FORMATS)} (png: 2D only)")
  out = pathlib.Path(out_dir)
  if out.exists() and (not out.is_dir() or any(out.iterdir())):
    raise ValueError(f"{out}: exists and is not an empty directory; choose a new path")
  rng = np.random.default_rng([seed, 0])
  lesion = rng.permutation(num_subjects) < num_subjects // 2  # exactly balanced
  split_names = _split_names(num_subjects, rng)

  with atomic_directory(out) as staging:
    (staging / "images").mkdir()
    rows = []
    for i in range(num_subjects):
      subject_id = str(10_000 + i)
      image, size, contrast = _simulate_image(np.random.default_rng([seed, 1, i]),
                                              spatial_dims, image_size, bool(lesion[i]))
      relative = f"images/{subject_id}{FORMATS[file_format]}"
      _write_image(staging / relative, image, file_format)
      rows.append((subject_id, relative, split_names[i], "CT", int(lesion[i]),
                   f"{size:.3f}", f"{contrast:.1f}"))
    with open(staging / "manifest.csv", "w", newline="") as f:
      writer = csv.writer(f)
      writer.writerow(MANIFEST_COLUMNS)
      writer.writerows(rows)
  return out


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--out", required=True, help="new or empty directory to write")
  parser.add_argument("--spatial_dims", type=int, choices=(2, 3), required=True)
  parser.add_argument("--num_subjects", type=int, default=200)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--image_size", type=int, default=64)
  parser.add_argument("--file_format", choices=sorted(FORMATS), default="npy")
  args = parser.parse_args(argv)
  root = write_synthetic_images(args.out, spatial_dims=args.spatial_dims,
                                num_subjects=args.num_subjects, seed=args.seed,
                                image_size=args.image_size, file_format=args.file_format)
  print(f"wrote {root}: {args.num_subjects} {args.spatial_dims}D images of size "
        f"{args.image_size} ({args.file_format}), half with a lesion")


if __name__ == "__main__":
  main()
