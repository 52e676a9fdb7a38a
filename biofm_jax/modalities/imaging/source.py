"""Random-access reader for medical images: DICOM, NIfTI, PNG/JPEG and NumPy files.

This module owns turning a manifest CSV or a folder of image files into records that a Grain
pipeline can index, read lazily one item at a time:

  dataset = ImagingDataset("/data/ct", spatial_dims=3)
  source = dataset.source("train")   # picklable random-access sequence
  record = source[0]   # {"subject_id", "path", "image", "spacing", "modality", "labels"}

`image` is float32 [*spatial, C] (2D [H, W, C], 3D [D, H, W, C]) in physical units, `spacing`
float64 [spatial_dims] in mm in the same axis order. Here: finding items (manifest or
directory scan), dispatching each to its format's reader, rank and channel checks, splits and
stats. The per-format readers, each documenting its orientation convention, live in:

- dicom.py: DICOM files and series (rows/columns as stored; a series ordered along the slice
  normal, D spacing from slice positions; rescale applied, so CT is in Hounsfield units).
- image_files.py: NIfTI (closest canonical RAS+, arranged [D, H, W] = canonical (k, j, i)),
  PNG/JPEG (values as stored) and .npy (channels-last); spacing 1 mm where unknown.
- image_items.py: the Item record and ItemError they fill and raise.

spatial_dims=2 squeezes a volume with exactly one single-slice axis; with spatial_dims=3 a 2D
image, and a volume with a single slice along any axis (a 2D NIfTI file is stored so), is a
rank error naming the file: resampling it to a 3D size would only repeat the one slice.
Channel counts must agree across the dataset.

Index time reads headers only and validates: missing path, unreadable or corrupt header,
truncated uncompressed DICOM or .nii files (shorter than their voxels), a series with
inconsistent slice spacing (> 1% from the median gap), mixed sizes or orientations, wrong
spatial rank, mixed channel counts. on_error="raise" raises ValueError naming the file;
on_error="skip" drops the item and counts it in stats["skipped_<reason>"] (for mixed
channels the minority kind is dropped), names the first few in a warning, and lists each
skipped item and each file a directory scan ignored in `index_skip_file` (a run's
`<workdir>/skipped_at_indexing.csv`, `data/sources/index_skips.py`). Read time (`source[i]`)
raises ValueError naming the file for unreadable pixels or NaN/inf values, or with
on_error="skip" replaces the item by the next readable one (`data/sources/read_skips.py`).

Subject ids come from the manifest, or in a directory scan (no manifest.csv in the root)
from the path relative to the root without extension (a series: its folder). Splits: the
manifest's `split` column, else splits.hash_split_buckets over subject ids. Logs carry
counts and file paths only.
"""
from __future__ import annotations

import collections
import dataclasses
import logging
import os
import pathlib
from typing import Sequence

import numpy as np

from biofm_jax.modalities.imaging import dicom as dicom
from biofm_jax.modalities.imaging import image_files as image_files
from biofm_jax.data.sources import splits as splits_lib
from biofm_jax.modalities.imaging.image_items import Item, ItemError
from biofm_jax.data.sources.indexing import checked_index
from biofm_jax.data.sources import index_skips, read_skips
from biofm_jax.data.sources.manifest import ACQUISITION_TIME, acquisition_time, read_manifest

log = logging.getLogger(__name__)

MANIFEST_NAME = "manifest.csv"
_PIL_KINDS = {".png": "png", ".jpg": "jpeg", ".jpeg": "jpeg"}
_KINDS = ("dicom", "dicom_series", "dicom_multiframe", "nifti", "png", "jpeg", "npy")
_SKIP_REASONS = ("missing", "corrupt", "truncated", "unsupported", "series_spacing",
                 "series_size", "series_geometry", "rank", "channels")
_IGNORED_PREFIXES = (".", "_")  # hidden files, macOS resource forks, _SUCCESS markers

# Every fixed key of ImagingDataset.stats (ints); plus "modality_<NAME>" per modality.
STAT_KEYS = (
    "items",  # items kept (over all splits)
    "subjects",  # distinct subject ids among them
    "manifest_rows",  # rows of the manifest (0 for a directory scan)
    "ignored_files",  # directory scan: files of no supported format
    *(f"format_{k}" for k in _KINDS),  # kept items per format
    "skipped",  # items dropped with on_error="skip", all reasons
    *(f"skipped_{r}" for r in _SKIP_REASONS),
    "squeezed_to_2d",  # volumes with one slice read as 2D
    "nifti_first_volume_only",  # 4D NIfTI files of which only volume 0 is read
    "unknown_spacing",  # items without a spacing in their header (1 mm used)
    "dicom_monochrome1",  # DICOM items stored as MONOCHROME1 (values not inverted)
    "alpha_dropped",  # PNG/JPEG items whose alpha channel is dropped
    "fallback_split",  # 1 when no split column was given and the hash split was used
    "items_without_split",  # manifest rows with an empty split cell (in no split)
)


# ---------------------------------------------------------------- rank and pixel dispatch
def _fit_rank(item: Item, spatial_dims: int) -> Item:
  """Checks the item's spatial rank; a one-slice volume becomes 2D for spatial_dims=2."""
  if len(item.shape) == 2 and spatial_dims == 3:
    raise ItemError("rank", f"{item.path}: is a 2D image of shape {item.shape}; "
                            "spatial_dims=3 needs a volume")
  if spatial_dims == 3 and 1 in item.shape:  # resampling would repeat its one slice
    raise ItemError("rank", f"{item.path}: is a single-slice volume of shape {item.shape}, a 2D image; "
                            "spatial_dims=3 needs at least 2 slices along every axis (use spatial_dims=2)")
  if len(item.shape) == spatial_dims:
    return item
  single = [axis for axis, size in enumerate(item.shape) if size == 1]
  if len(single) != 1:
    raise ItemError("rank", f"{item.path}: is a 3D volume of shape {item.shape}; "
                            "spatial_dims=2 needs exactly one single-slice axis")
  return dataclasses.replace(item, flags=item.flags + ("squeezed_to_2d",))


def _read_pixels(kind: str, files: Sequence[str], stored_rank: int) -> np.ndarray:
  """The stored pixels as float32 [*stored spatial shape, C], in physical units."""
  if kind == "dicom_series":
    return dicom.read_dicom_series_pixels(files)
  if kind == "dicom_multiframe":
    return dicom.read_dicom_multiframe_pixels(files[0])
  if kind == "dicom":
    return dicom.read_dicom_pixels(files[0])
  if kind == "nifti":
    return image_files.read_nifti_pixels(files[0])
  if kind == "npy":
    return image_files.read_npy_pixels(files[0], stored_rank)
  return image_files.read_pil_pixels(files[0])


# ---------------------------------------------------------------- finding items
def _strip_suffix(relative: str) -> str:
  lower = relative.lower()
  return relative[:-len(".nii.gz")] if lower.endswith(".nii.gz") else os.path.splitext(relative)[0]


def _file_kind(path: pathlib.Path) -> str | None:
  """The format of a file by its name, or by the DICM preamble; None when unsupported."""
  name = path.name.lower()
  if name.endswith((".nii", ".nii.gz")):
    return "nifti"
  suffix = path.suffix.lower()
  if suffix in _PIL_KINDS:
    return _PIL_KINDS[suffix]
  if suffix in (".npy", ".dcm", ".dicom"):
    return "npy" if suffix == ".npy" else "dicom"
  return "dicom" if dicom.has_dicom_preamble(path) else None


def _visible_files(folder: pathlib.Path, recursive: bool) -> list[pathlib.Path]:
  found = folder.rglob("*") if recursive else folder.iterdir()
  return sorted(p for p in found if p.is_file() and not any(
      part.startswith(_IGNORED_PREFIXES) for part in p.relative_to(folder).parts))


def _scan_directory(root: pathlib.Path, spatial_dims: int,
                    ignored: list[index_skips.IndexSkip]) -> list[Item]:
  """Candidate items of a folder tree; with spatial_dims=3 DICOM files group by folder.
  Files of no supported format are appended to `ignored`."""
  items, dicom_folders = [], collections.defaultdict(list)
  for path in _visible_files(root, recursive=True):
    kind, relative = _file_kind(path), path.relative_to(root).as_posix()
    if kind is None:
      ignored.append(index_skips.IndexSkip(str(path), "ignored", f"{path}: no supported image format "
                                           "(DICOM, NIfTI, PNG/JPEG, .npy); ignored by the folder scan"))
    elif kind == "dicom" and spatial_dims == 3:
      dicom_folders[path.parent].append(str(path))
    else:
      items.append(Item(subject_id=_strip_suffix(relative), path=str(path), kind=kind,
                        files=(str(path),)))
  for folder, files in dicom_folders.items():
    items.append(Item(subject_id=folder.relative_to(root).as_posix(), path=str(folder),
                      kind="dicom_folder", files=tuple(files)))
  return items


def _read_manifest(csv_path: pathlib.Path) -> tuple[list[Item], tuple[str, ...], bool]:
  """Candidate items, label column names, and whether a split column is present."""
  rows, label_names, columns = read_manifest(csv_path, reserved=("split", "modality", ACQUISITION_TIME))
  dated = ACQUISITION_TIME in columns
  items = []
  for row in rows:
    path = row.path
    kind = "series_folder" if path.is_dir() else (_file_kind(path) if path.is_file() else "missing")
    files = (tuple(str(p) for p in _visible_files(path, recursive=False)
                   if _file_kind(p) == "dicom") if path.is_dir() else (str(path),))
    items.append(Item(subject_id=row.subject_id, path=str(path), kind=kind or "unsupported", files=files,
                      modality=row.fields["modality"], split=row.fields["split"], labels=row.labels,
                      acquisition_time=acquisition_time(csv_path, row.line, row.fields[ACQUISITION_TIME])
                      if dated else None))
  return items, label_names, "split" in columns


def _inspect(item: Item, spatial_dims: int) -> list[Item | ItemError]:
  """Header checks of one candidate; a DICOM folder may give several items."""
  if item.kind == "missing":
    return [ItemError("missing", f"{item.path}: file or folder does not exist")]
  if item.kind == "unsupported":
    return [ItemError("unsupported", f"{item.path}: unsupported format; expected DICOM, "
                                     "NIfTI (.nii/.nii.gz), PNG/JPEG or .npy")]
  try:
    if item.kind in ("dicom_folder", "series_folder"):
      if not item.files:
        raise ItemError("missing", f"{item.path}: folder holds no DICOM files")
      found = dicom.dicom_folder_items(item, one_series=item.kind == "series_folder")
    elif item.kind == "dicom":
      found = [dicom.dicom_file_item(item, dicom.read_dicom_header(item.files[0]))]
    elif item.kind == "nifti":
      found = [image_files.nifti_item(item)]
    elif item.kind == "npy":
      found = [image_files.npy_item(item, spatial_dims)]
    else:
      found = [image_files.pil_item(item)]
  except ItemError as e:
    return [e]
  results: list[Item | ItemError] = []
  for result in found:
    try:
      results.append(_fit_rank(result, spatial_dims) if isinstance(result, Item) else result)
    except ItemError as e:
      results.append(e)
  return results


def _keep_one_channel_count(items: list[Item], on_error: str,
                            skipped: list[index_skips.IndexSkip]) -> list[Item]:
  """All items must share C; with "skip" the most common count wins (ties: fewer channels),
  the others are appended to `skipped`."""
  by_channels = collections.Counter(item.channels for item in items)
  if len(by_channels) <= 1:
    return items
  if on_error == "raise":
    examples = {}
    for item in items:
      examples.setdefault(item.channels, item.path)
    raise ValueError("images mix channel counts: " + "; ".join(
        f"{path} has {c} channel(s)" for c, path in sorted(examples.items())) +
        "; convert them to one kind or pass on_error='skip'")
  keep = max(by_channels, key=lambda c: (by_channels[c], -c))
  skipped.extend(index_skips.IndexSkip(item.path, "channels", f"{item.path}: has {item.channels} channel(s), "
                                       f"most images have {keep}") for item in items if item.channels != keep)
  return [item for item in items if item.channels == keep]


def _manifest_splits(items: list[Item], csv_path: pathlib.Path,
                     stats: dict) -> dict[str, np.ndarray]:
  """Split name -> item indices from the split column; a subject may be in one split only."""
  split_of_subject: dict[str, str] = {}
  for item in items:
    if item.split and split_of_subject.setdefault(item.subject_id, item.split) != item.split:
      raise ValueError(f"{csv_path}: subject {item.subject_id!r} appears in splits "
                       f"{split_of_subject[item.subject_id]!r} and {item.split!r}; a subject "
                       "must stay in one split")
  stats["items_without_split"] = sum(not item.split for item in items)
  names = {item.split for item in items if item.split}
  order = splits_lib.ordered(names)
  split_names = np.array([item.split for item in items], dtype=object)
  return {name: np.flatnonzero(split_names == name).astype(np.int64) for name in order}


# ---------------------------------------------------------------- public API
class ImagingSource:
  """The items of one split: random access, reading one image per __getitem__.

  Holds only plain lists and numpy arrays, so it pickles to Grain workers. `subject_ids`,
  `paths` and `labels` (float32 [items, len(label_names)], NaN where missing) are known
  without reading pixels, e.g. for a linear probe's targets.
  """

  def __init__(self, items: Sequence[Item], spatial_dims: int, num_labels: int, *, on_error: str = "raise",
               skip_file: str = "", dated: bool | None = None):
    self.spatial_dims, self.on_error, self.skip_file = spatial_dims, on_error, skip_file
    self._known_bad = read_skips.listed(skip_file)  # named by an earlier read: not read again
    self.subject_ids = [item.subject_id for item in items]
    self.paths = [item.path for item in items]
    self._kinds = [item.kind for item in items]
    self._files = [item.files for item in items]
    self._stored_shapes = [item.shape + (item.channels,) for item in items]
    self._modalities = [item.modality or "OT" for item in items]
    # Dated when the dataset's images carry times (a manifest column, DICOM headers), even if
    # none of this split's do: its records are then of unknown time, not undated.
    self._dated = any(item.acquisition_time is not None for item in items) if dated is None else dated
    self._times = np.array([np.datetime64("NaT") if item.acquisition_time is None else item.acquisition_time
                            for item in items], "datetime64[us]")
    self.labels = np.array([item.labels for item in items], np.float32).reshape(
        len(items), num_labels)
    # Axis squeezed to make a one-slice volume 2D; -1 when the item already has the rank.
    self._squeeze_axes = [item.shape.index(1) if len(item.shape) > spatial_dims else -1
                          for item in items]
    self._spacing = np.array([
        [s for axis, s in enumerate(item.spacing) if axis != squeeze]
        for item, squeeze in zip(items, self._squeeze_axes)], np.float64).reshape(
            len(items), spatial_dims)

  def __len__(self) -> int:
    return len(self.paths)

  @property
  def record_keys(self) -> list[str]:
    """Each item's file (or series folder), as the manifest or folder scan named it."""
    return [str(p) for p in self.paths]

  def record_times(self) -> np.ndarray | None:
    """Each item's acquisition time (datetime64[us]), or None where the manifest gives none."""
    return self._times if self._dated else None

  def __getitem__(self, index: int) -> dict:
    i = checked_index(index, len(self), "ImagingSource ... items")
    return read_skips.read_or_replace(i, self.paths, self._read, on_error=self.on_error,
                                      skip_file=self.skip_file, known_bad=self._known_bad)

  def _read(self, i: int) -> dict:
    path = self.paths[i]
    try:
      image = _read_pixels(self._kinds[i], self._files[i], len(self._stored_shapes[i]) - 1)
    except Exception as e:  # pydicom, nibabel and PIL raise many types on bad pixel data
      raise ValueError(f"{path}: could not read the pixel data "
                       f"({type(e).__name__}: {e})") from e
    if image.shape != self._stored_shapes[i]:
      raise ValueError(f"{path}: pixel data has shape {image.shape}, the header said "
                       f"{self._stored_shapes[i]} (was the file changed after indexing?)")
    bad = int(image.size - np.count_nonzero(np.isfinite(image)))
    if bad:
      raise ValueError(f"{path}: {bad} NaN/inf pixel value(s); expected finite values "
                       "(fix or exclude the file)")
    if self._squeeze_axes[i] >= 0:
      image = image.squeeze(self._squeeze_axes[i])
    return {"subject_id": self.subject_ids[i], "path": path, "image": image,
            "spacing": self._spacing[i].copy(), "modality": self._modalities[i],
            "labels": self.labels[i].copy()}

  def __repr__(self) -> str:
    return f"ImagingSource(items={len(self)}, spatial_dims={self.spatial_dims})"


class ImagingDataset:
  """An indexed set of images (headers validated, pixels not read), with its splits.

  Attributes:
    path: the manifest CSV or the scanned directory.
    splits: split name -> int64 item indices, from the manifest's `split` column when present
      (custom names kept), else `splits.hash_split_buckets(subject_ids, fallback_fractions,
      fallback_seed)` into train/tuning/held_out (every item of a subject in one split).
    stats: counts only, safe to log: the keys of STAT_KEYS plus "modality_<NAME>".
    label_names: the manifest's label columns, in file order (may be empty).
    channels: the channel count C shared by every item.
  """

  def __init__(self, path: str | os.PathLike, *, spatial_dims: int, on_error: str = "raise",
               fallback_fractions: Sequence[float] = (0.8, 0.1, 0.1), fallback_seed: int = 0,
               skip_file: str = "", index_skip_file: str = ""):
    if spatial_dims not in (2, 3) or on_error not in ("raise", "skip"):
      raise ValueError(f"ImagingDataset: spatial_dims={spatial_dims!r}, on_error={on_error!r}; "
                       "expected 2 or 3, and 'raise' or 'skip'")
    self.path, self.spatial_dims = pathlib.Path(path), spatial_dims
    self.on_error, self.skip_file = on_error, skip_file  # read-time skips (`data/sources/read_skips.py`)
    self.stats: dict[str, int] = dict.fromkeys(STAT_KEYS, 0)
    manifest = self.path / MANIFEST_NAME if self.path.is_dir() else self.path
    skipped: list[index_skips.IndexSkip] = []
    ignored: list[index_skips.IndexSkip] = []
    if self.path.is_dir() and not manifest.is_file():
      candidates, self.label_names, has_split = _scan_directory(self.path, spatial_dims, ignored), (), False
      self.stats["ignored_files"] = len(ignored)
    elif manifest.is_file():
      candidates, self.label_names, has_split = _read_manifest(manifest)
      self.stats["manifest_rows"] = len(candidates)
    else:
      raise ValueError(f"{self.path}: does not exist; expected a manifest CSV or a directory")

    items = []
    for candidate in candidates:
      for result in _inspect(candidate, spatial_dims):
        if isinstance(result, Item):
          items.append(result)
        elif on_error == "raise":
          raise result
        else:
          skipped.append(index_skips.IndexSkip(candidate.path, result.reason, str(result)))
    items = _keep_one_channel_count(items, on_error, skipped)
    for skip in skipped:
      self.stats[f"skipped_{skip.reason}"] += 1
    index_skips.write_index_skips(index_skip_file, skipped + ignored)
    if not items:
      first = f"; first: {skipped[0].message}" if skipped else ""
      raise ValueError(f"{self.path}: no readable images found ({self._skip_summary()}){first}")
    self._items, self.channels = items, items[0].channels
    self._dated = any(item.acquisition_time is not None for item in items)
    self._count(items)
    if has_split:
      self.splits = _manifest_splits(items, manifest, self.stats)
    else:
      self.stats["fallback_split"] = 1
      buckets = splits_lib.hash_split_buckets([item.subject_id for item in items],
                                              fallback_fractions, fallback_seed)
      self.splits = {name: np.flatnonzero(buckets == i).astype(np.int64)
                     for i, name in enumerate(splits_lib.STANDARD_SPLITS)}
    index_skips.warn_named(log, f"imaging {self.path}: skipped", skipped, index_skip_file)
    if ignored:  # a folder may hold sidecars or notes: named, not warned about
      log.info("imaging %s: the folder scan ignored %d file(s) of no supported format, e.g. %s", self.path,
               len(ignored), ", ".join(skip.path for skip in ignored[:index_skips.NAMED_IN_LOG]))
    log.info("imaging %s: %s", self.path, ", ".join(f"{k}={v}" for k, v in self.stats.items()))

  def _count(self, items: list[Item]) -> None:
    self.stats["skipped"] = sum(self.stats[f"skipped_{r}"] for r in _SKIP_REASONS)
    self.stats["items"] = len(items)
    self.stats["subjects"] = len({item.subject_id for item in items})
    for item in items:
      self.stats[f"format_{item.kind}"] += 1
      for flag in item.flags:
        self.stats[flag] += 1
      key = f"modality_{item.modality or 'OT'}"
      self.stats[key] = self.stats.get(key, 0) + 1

  def _skip_summary(self) -> str:
    return ", ".join(f"{r}={self.stats[f'skipped_{r}']}" for r in _SKIP_REASONS
                     if self.stats[f"skipped_{r}"]) or "none skipped"

  def source(self, split: str) -> ImagingSource:
    """The items of `split`, in manifest (or sorted scan) order."""
    if split not in self.splits:
      raise ValueError(f"{self.path}: unknown split {split!r}; available splits: "
                       f"{list(self.splits)}")
    return ImagingSource([self._items[i] for i in self.splits[split]], self.spatial_dims,
                         len(self.label_names), on_error=self.on_error, skip_file=self.skip_file,
                         dated=self._dated)

  def __repr__(self) -> str:
    return (f"ImagingDataset({str(self.path)!r}, items={self.stats['items']}, "
            f"spatial_dims={self.spatial_dims}, "
            f"splits={ {k: len(v) for k, v in self.splits.items()} })")
