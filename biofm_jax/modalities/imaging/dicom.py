"""DICOM reading: headers, series grouping and slice order, spacing checks, pixels.

Orientation convention: rows and columns as stored (H = rows, W = columns; spacing =
PixelSpacing, which is [row spacing, column spacing]). A series (DICOM files of one folder
sharing a SeriesInstanceUID) is one 3D item: slices ordered by their position along the slice
normal (row cosines x column cosines of ImageOrientationPatient), D spacing from the position
differences, never SliceThickness. For a standard axial series (LPS) that makes [D, H, W] run
inferior->superior, anterior->posterior, right->left. RescaleSlope/Intercept (or a modality
LUT) is applied per slice, so CT is in Hounsfield units. MONOCHROME1 is not inverted (stats
counts it). In a directory scan with spatial_dims=2 every DICOM file is its own 2D item; a
manifest row naming a folder is always read as one series.

A multi-frame file (enhanced CT/MR, RT dose, NM) is one 3D item when its frames have
geometry: per-frame ImagePositionPatient in PerFrameFunctionalGroupsSequence (orientation and
pixel spacing per frame or shared), or GridFrameOffsetVector along the slice normal. Frames
are ordered along the normal like a series' slices, with the same spacing checks, and the
rescale (PixelValueTransformationSequence, per frame or shared) applies per frame. Frames
without geometry (a cine loop, a stack of captures) are not a volume and are refused.

Index-time checks here: unreadable or corrupt headers, multi-frame files without frame
geometry, unsupported samples per pixel or transfer syntax (a compressed one without an
installed decoder), truncated uncompressed files (shorter than their pixels), and a series or
multi-frame volume with mixed slice sizes, orientations or pixel spacings, missing geometry,
or inconsistent slice spacing (> 1% from the median gap). They raise image_items.ItemError.
"""
from __future__ import annotations

import collections
import dataclasses
import logging
import os
import pathlib
import threading
from typing import Sequence

import numpy as np
import pydicom
import pydicom.pixels
from pydicom.errors import InvalidDicomError

from biofm_jax.modalities.imaging.image_items import Item, ItemError

_SPACING_RTOL = 0.01


# ---------------------------------------------------------------- headers
def has_dicom_preamble(path: pathlib.Path) -> bool:
  """Whether the file has the DICM marker after its 128-byte preamble (a scan's sniff)."""
  try:
    with open(path, "rb") as f:
      return f.read(132)[128:] == b"DICM"
  except OSError:  # unreadable: not recognisably DICOM, so counted as an ignored file
    return False


def read_dicom_header(path: str) -> pydicom.Dataset:
  try:
    return pydicom.dcmread(path, stop_before_pixels=True)
  except InvalidDicomError:
    pass  # no preamble: some writers omit it; accept the file if it parses as an image
  except Exception as e:  # pydicom raises many types on corrupt input
    raise ItemError("corrupt", f"{path}: not a readable DICOM file ({type(e).__name__}: {e})")
  try:
    ds = pydicom.dcmread(path, stop_before_pixels=True, force=True)
  except Exception as e:
    raise ItemError("corrupt", f"{path}: not a readable DICOM file ({type(e).__name__}: {e})")
  if "Rows" not in ds or "Columns" not in ds:
    raise ItemError("corrupt", f"{path}: not a readable DICOM file (no DICM preamble and "
                               "no Rows/Columns elements)")
  return ds


def dicom_file_item(item: Item, ds: pydicom.Dataset) -> Item:
  """Validates one DICOM image header and fills shape, channels, spacing, modality."""
  path = item.files[0]
  if "Rows" not in ds or "Columns" not in ds:
    raise ItemError("corrupt", f"{path}: DICOM file has no image (Rows/Columns missing)")
  frames = _number_of_frames(ds, path)
  channels = int(ds.get("SamplesPerPixel", 1))
  if channels not in (1, 3):
    raise ItemError("unsupported", f"{path}: SamplesPerPixel={channels}, expected 1 or 3")
  syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
  if syntax is not None and (syntax.is_compressed or syntax.is_deflated):
    try:
      available = pydicom.pixels.get_decoder(syntax).is_available
    except NotImplementedError:
      available = False
    if not available:
      raise ItemError("unsupported", f"{path}: no installed pixel decoder for transfer "
                                     f"syntax {syntax.name}; install pylibjpeg or gdcm")
  else:  # stored raw: the pixels alone need this many bytes, so a shorter file is cut
    needed = -(-frames * ds.Rows * ds.Columns * channels * int(ds.get("BitsAllocated", 16)) // 8)
    size = os.path.getsize(path)
    if size < needed:
      frames_text = f"{frames} frames of " if frames > 1 else ""
      raise ItemError("truncated", f"{path}: truncated DICOM file ({size} bytes, the "
                                   f"{frames_text}{ds.Rows}x{ds.Columns} pixels alone need {needed})")
  if frames > 1:
    order, gap, pixel_spacing = frame_geometry(ds, path)
    return dataclasses.replace(
        item, kind="dicom_multiframe", shape=(frames, int(ds.Rows), int(ds.Columns)), channels=channels,
        acquisition_time=item.acquisition_time if item.acquisition_time is not None else header_time(ds),
        spacing=(gap,) + pixel_spacing, modality=item.modality or str(ds.get("Modality", "") or ""),
        flags=("dicom_monochrome1",) if ds.get("PhotometricInterpretation") == "MONOCHROME1" else ())
  spacing = ds.get("PixelSpacing") or ds.get("ImagerPixelSpacing")
  flags = ()
  if not spacing or len(spacing) != 2:
    spacing, flags = (1.0, 1.0), ("unknown_spacing",)
  if ds.get("PhotometricInterpretation") == "MONOCHROME1":
    flags += ("dicom_monochrome1",)
  return dataclasses.replace(
      item, shape=(int(ds.Rows), int(ds.Columns)), channels=channels,
      spacing=tuple(float(s) for s in spacing), flags=flags,
      acquisition_time=item.acquisition_time if item.acquisition_time is not None else header_time(ds),
      modality=item.modality or str(ds.get("Modality", "") or ""))


# Where a DICOM header says when the image was made, most specific first: the acquisition,
# else the series, else the study (each a DA date with an optional TM time).
_TIME_FIELDS = (("AcquisitionDate", "AcquisitionTime"), ("SeriesDate", "SeriesTime"), ("StudyDate", "StudyTime"))


def header_time(ds: pydicom.Dataset) -> np.datetime64 | None:
  """When the header says the image was made (AcquisitionDateTime, else a date field with
  its time; see _TIME_FIELDS), as datetime64[us] in the header's local time; None where no
  field holds a valid date (an anonymised file often blanks them)."""
  stamp = str(ds.get("AcquisitionDateTime", "") or "").split("+")[0].split("-")[0].strip()  # the UTC offset cut
  candidates = [(stamp[:8], stamp[8:])] if len(stamp) >= 8 else []
  candidates += [(str(ds.get(d, "") or "").strip(), str(ds.get(t, "") or "").strip()) for d, t in _TIME_FIELDS]
  for date, time in candidates:
    if len(date) != 8 or not date.isdigit():
      continue
    clock = time.split(".")[0]
    clock = (clock + "0000")[:6] if clock.isdigit() and len(clock) in (2, 4, 6) else "000000"
    try:
      return np.datetime64(f"{date[:4]}-{date[4:6]}-{date[6:]}T{clock[:2]}:{clock[2:4]}:{clock[4:]}", "us")
    except ValueError:
      continue
  return None


def _number_of_frames(ds: pydicom.Dataset, path: str) -> int:
  try:
    return int(ds.get("NumberOfFrames", 1) or 1)
  except (TypeError, ValueError):
    raise ItemError("corrupt", f"{path}: field NumberOfFrames is {ds.get('NumberOfFrames')!r}, not a number")


def _first(sequence_owner, *names):
  """The element at the end of a chain of one-item sequences, or None."""
  node = sequence_owner
  for name in names[:-1]:
    seq = node.get(name) if node is not None else None
    node = seq[0] if seq else None
  return node.get(names[-1]) if node is not None else None


def _functional(ds: pydicom.Dataset, frame: int, sequence: str, field: str):
  """A field of a functional group: the frame's own, else the shared one."""
  per_frame = ds.get("PerFrameFunctionalGroupsSequence")
  value = _first(per_frame[frame], sequence, field) if per_frame and frame < len(per_frame) else None
  if value is None:
    shared = ds.get("SharedFunctionalGroupsSequence")
    value = _first(shared[0], sequence, field) if shared else None
  return value


def _ordered_along_normal(positions: np.ndarray, orientation: np.ndarray, where: str,
                          names: Sequence[str]) -> tuple[np.ndarray, float]:
  """(order, mean gap) of slices at `positions` along the normal of `orientation`, with the
  series' spacing check (every gap within 1% of the median); `names` name the slices."""
  normal = np.cross(orientation[:3], orientation[3:])
  along_normal = positions @ normal
  order = np.argsort(along_normal, kind="stable")
  gaps = np.diff(along_normal[order])
  median = float(np.median(gaps))
  worst = int(np.argmax(np.abs(gaps - median)))
  if median <= 1e-6 or abs(gaps[worst] - median) > _SPACING_RTOL * median:
    raise ItemError("series_spacing", f"{where}: inconsistent slice spacing: gap {gaps[worst]:.4g} mm between "
                    f"{names[order[worst]]} and {names[order[worst + 1]]}, median gap {median:.4g} mm "
                    f"(tolerance {_SPACING_RTOL:.0%})")
  return order, float(gaps.mean())


def frame_geometry(ds: pydicom.Dataset, path: str) -> tuple[np.ndarray, float, tuple[float, float]]:
  """(frame order along the slice normal, slice spacing, (row, column) spacing) of a
  multi-frame file; ItemError when its frames have no geometry."""
  frames = _number_of_frames(ds, path)
  try:
    if ds.get("PerFrameFunctionalGroupsSequence"):
      positions = np.array([[float(v) for v in _functional(ds, f, "PlanePositionSequence", "ImagePositionPatient")]
                            for f in range(frames)])
      orientations = np.array([[float(v) for v in _functional(ds, f, "PlaneOrientationSequence",
                                                                "ImageOrientationPatient")] for f in range(frames)])
      spacings = np.array([[float(v) for v in _functional(ds, f, "PixelMeasuresSequence", "PixelSpacing")]
                           for f in range(frames)])
    elif ds.get("GridFrameOffsetVector") is not None:
      orientation = np.array([float(v) for v in ds.ImageOrientationPatient])
      offsets = np.array([float(v) for v in ds.GridFrameOffsetVector])
      if len(offsets) != frames:
        raise ItemError("series_geometry", f"{path}: GridFrameOffsetVector has {len(offsets)} offsets for "
                                           f"{frames} frames")
      normal = np.cross(orientation[:3], orientation[3:])
      positions = np.array([float(v) for v in ds.ImagePositionPatient])[None] + offsets[:, None] * normal[None]
      orientations = np.repeat(orientation[None], frames, axis=0)
      spacings = np.repeat(np.array([[float(v) for v in ds.PixelSpacing]]), frames, axis=0)
    else:
      raise ItemError("unsupported", f"{path}: multi-frame DICOM (NumberOfFrames={frames}) without frame "
                                     "geometry (no PerFrameFunctionalGroupsSequence positions, no "
                                     "GridFrameOffsetVector): a cine loop or a stack of captures, not a volume")
  except ItemError:
    raise
  except (TypeError, ValueError, AttributeError):
    raise ItemError("series_geometry", f"{path}: multi-frame DICOM frames lack ImagePositionPatient, "
                                       "ImageOrientationPatient or PixelSpacing; cannot order them") from None
  if orientations.shape != (frames, 6) or not np.allclose(orientations, orientations[0], atol=1e-3):
    raise ItemError("series_geometry", f"{path}: multi-frame DICOM frames differ in ImageOrientationPatient")
  if spacings.shape != (frames, 2) or not np.allclose(spacings, spacings[0], rtol=_SPACING_RTOL):
    raise ItemError("series_geometry", f"{path}: multi-frame DICOM frames differ in PixelSpacing")
  order, gap = _ordered_along_normal(positions, orientations[0], f"{path}: multi-frame DICOM",
                                     [f"frame {f + 1}" for f in range(frames)])
  return order, gap, (float(spacings[0, 0]), float(spacings[0, 1]))


def _dicom_series_item(item: Item, headers: Sequence[tuple[str, pydicom.Dataset]]) -> Item:
  """One 3D item from the files of one series: slices ordered along the slice normal."""
  folder = item.path
  slices = [dicom_file_item(dataclasses.replace(item, files=(p,)), ds) for p, ds in headers]
  by_size = {(s.shape, s.channels): s.files[0] for s in slices}
  if len(by_size) > 1:
    examples = ", ".join(f"{p} is {shape[0]}x{shape[1]}x{c}" for (shape, c), p in
                         list(by_size.items())[:2])
    raise ItemError("series_size", f"{folder}: DICOM series mixes slice sizes (Rows x "
                                   f"Columns x SamplesPerPixel): {examples}")
  try:
    orientations = np.array([[float(v) for v in ds.ImageOrientationPatient] for _, ds in headers])
    positions = np.array([[float(v) for v in ds.ImagePositionPatient] for _, ds in headers])
  except (AttributeError, TypeError, ValueError):
    raise ItemError("series_geometry", f"{folder}: a DICOM series file lacks "
                    "ImageOrientationPatient/ImagePositionPatient; cannot order the slices")
  if orientations.shape[1] != 6 or positions.shape[1] != 3 or not np.allclose(
      orientations, orientations[0], atol=1e-3):
    raise ItemError("series_geometry", f"{folder}: DICOM series slices differ in "
                                       "ImageOrientationPatient (or it is malformed)")
  if not np.allclose([s.spacing for s in slices], slices[0].spacing, rtol=_SPACING_RTOL):
    raise ItemError("series_geometry", f"{folder}: DICOM series slices differ in PixelSpacing")
  order, gap = _ordered_along_normal(positions, orientations[0], f"{folder}: DICOM series",
                                     [path for path, _ in headers])
  flags = tuple(sorted(set(f for s in slices for f in s.flags)))
  times = [s.acquisition_time for s in slices if s.acquisition_time is not None]
  return dataclasses.replace(
      slices[0], path=folder, kind="dicom_series", files=tuple(slices[i].files[0] for i in order),
      shape=(len(slices),) + slices[0].shape, spacing=(gap,) + slices[0].spacing,
      flags=flags, acquisition_time=min(times) if times else None)  # the series began with its first slice


def dicom_folder_items(item: Item, one_series: bool) -> list[Item | ItemError]:
  """Items from the DICOM files of one folder (item.files): one per SeriesInstanceUID."""
  results: list[Item | ItemError] = []
  series: dict[str, list[tuple[str, pydicom.Dataset]]] = collections.defaultdict(list)
  for path in item.files:
    try:
      ds = read_dicom_header(path)
      series[str(ds.get("SeriesInstanceUID", ""))].append((path, ds))
    except ItemError as e:
      results.append(e)
  if one_series and len(series) > 1:
    return [ItemError("series_geometry", f"{item.path}: folder holds {len(series)} DICOM "
                                         "series; point the manifest at one series")]
  for uid, headers in series.items():
    subject = item.subject_id if len(series) == 1 else f"{item.subject_id}/{uid}"
    series_item = dataclasses.replace(item, subject_id=subject)
    try:
      if len(headers) == 1:  # a lone file is a 2D image, not a series
        path, ds = headers[0]
        results.append(dicom_file_item(
            dataclasses.replace(series_item, path=path, files=(path,), kind="dicom"), ds))
      else:
        results.append(_dicom_series_item(series_item, headers))
    except ItemError as e:
      results.append(e)
  return results


# ---------------------------------------------------------------- pixel reads
# pydicom tries each installed decoder plugin in turn and logs each one's failure with its
# traceback (`LOGGER.exception`) before raising one RuntimeError that lists them all. While
# this module decodes, those per-plugin records are dropped: the error it raises carries every
# plugin's reason on one line, and read-time skips log that line once.
_DECODING = threading.local()


class _DropPluginTracebacks(logging.Filter):
  def filter(self, record: logging.LogRecord) -> bool:
    return not (getattr(_DECODING, "active", False) and record.exc_info)


logging.getLogger("pydicom.pixels.decoders.base").addFilter(_DropPluginTracebacks())


def decoded_pixels(ds: pydicom.Dataset) -> np.ndarray:
  """`ds.pixel_array`; when every decoder plugin fails, one ValueError naming each plugin's
  reason on one line (no per-plugin tracebacks in the log)."""
  _DECODING.active = True
  try:
    return ds.pixel_array
  except RuntimeError as e:
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    if not lines or not lines[0].startswith("Unable to decode as exceptions were raised by all"):
      raise
    raise ValueError(f"no installed decoder could decode the pixel data: {'; '.join(lines[1:])}") from e
  finally:
    _DECODING.active = False


def read_dicom_pixels(path: str) -> np.ndarray:
  ds = pydicom.dcmread(path, force=True)
  pixels = decoded_pixels(ds)
  if int(ds.get("SamplesPerPixel", 1)) == 1:  # the modality LUT is defined for gray only
    pixels = pydicom.pixels.apply_modality_lut(pixels, ds)
  return np.asarray(pixels, np.float32).reshape(int(ds.Rows), int(ds.Columns), -1)


def read_dicom_multiframe_pixels(path: str) -> np.ndarray:
  """A multi-frame volume as float32 [D, H, W, C], frames ordered along the slice normal, each
  with its own rescale (or the shared one, or the file's)."""
  ds = pydicom.dcmread(path, force=True)
  order, _, _ = frame_geometry(ds, path)
  pixels = np.asarray(decoded_pixels(ds), np.float32).reshape(len(order), int(ds.Rows), int(ds.Columns), -1)
  if int(ds.get("SamplesPerPixel", 1)) == 1:
    for f in range(len(order)):
      slope = _functional(ds, f, "PixelValueTransformationSequence", "RescaleSlope")
      intercept = _functional(ds, f, "PixelValueTransformationSequence", "RescaleIntercept")
      slope = float(slope if slope is not None else ds.get("RescaleSlope", 1.0) or 1.0)
      intercept = float(intercept if intercept is not None else ds.get("RescaleIntercept", 0.0) or 0.0)
      pixels[f] = pixels[f] * slope + intercept
  return pixels[order]


def read_dicom_series_pixels(files: Sequence[str]) -> np.ndarray:
  """The slices of a series (files already in D order) as float32 [D, H, W, C]."""
  return np.stack([read_dicom_pixels(f) for f in files])
