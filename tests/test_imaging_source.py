"""Tests for the imaging source (modalities/imaging/source.py), the shared hash split (sources/splits.py)
and the synthetic image generator (modalities/imaging/synthetic.py).

Real files that packages ship (pydicom's CT_small.dcm and MR_small.dcm, nibabel's NIfTI test
files) are checked against what their headers state; DICOM series, NIfTI orientations,
PNG/NPY files, manifests and bad input are written by the tests themselves.
"""
from __future__ import annotations

import csv
import hashlib
import logging
import os
import pathlib
import pickle
import shutil

import grain
import nibabel as nib
import numpy as np
import pydicom
import pytest
from nibabel.testing import data_path as NIBABEL_DATA
from PIL import Image
from pydicom.data import get_testdata_file

from biofm_jax.data import pipeline
from biofm_jax.data.sources import splits
from biofm_jax.modalities.imaging import synthetic as synthetic_imaging
from biofm_jax.modalities.imaging.source import STAT_KEYS, ImagingDataset

# Bundled with pydicom; download=False so a missing file fails instead of fetching.
CT_SMALL = get_testdata_file("CT_small.dcm", download=False)
MR_SMALL = get_testdata_file("MR_small.dcm", download=False)


def _records(dataset: ImagingDataset) -> dict[str, dict]:
  """Every record of every split, by subject id."""
  out = {}
  for name in dataset.splits:
    source = dataset.source(name)
    for i in range(len(source)):
      out[source[i]["subject_id"]] = source[i]
  return out


def _only_record(dataset: ImagingDataset) -> dict:
  (record,) = _records(dataset).values()
  return record


def _write_manifest(path: pathlib.Path, header: list[str], rows: list[list]) -> pathlib.Path:
  with open(path, "w", newline="") as f:
    csv.writer(f).writerows([header, *rows])
  return path


# ---------------------------------------------------------------- DICOM files pydicom ships
# Compressed transfer syntaxes as archives hold them (pydicom's bundled files, named here:
# get_testdata_files() may try the network).
COMPRESSED = ["JPGExtended.dcm", "MR_small_jpeg_ls_lossless.dcm", "JPEGLSNearLossless_16.dcm",
              "MR_small_jp2klossless.dcm", "JPEG2000.dcm", "MR_small_RLE.dcm", "SC_rgb_jpeg_dcmtk.dcm",
              "SC_rgb_rle.dcm"]


@pytest.mark.parametrize("name", COMPRESSED)
def test_compressed_dicom_decodes_through_the_installed_plugins(tmp_path, name):
  source_file = get_testdata_file(name, download=False)
  shutil.copy(source_file, tmp_path / name)
  dataset = ImagingDataset(tmp_path, spatial_dims=2)
  assert dataset.stats["skipped"] == 0
  record = _only_record(dataset)
  header = pydicom.dcmread(source_file)
  assert header.file_meta.TransferSyntaxUID.is_compressed
  channels = int(header.get("SamplesPerPixel", 1))
  assert record["image"].shape == (header.Rows, header.Columns, channels)
  expected = header.pixel_array
  if channels == 1:
    expected = pydicom.pixels.apply_modality_lut(expected, header)
  np.testing.assert_array_equal(record["image"].reshape(expected.shape), expected.astype(np.float32))
  assert np.ptp(record["image"]) > 0


def test_a_multi_frame_rt_dose_file_is_a_volume_along_its_frame_offsets(tmp_path):
  source_file = get_testdata_file("rtdose.dcm", download=False)
  shutil.copy(source_file, tmp_path / "dose.dcm")
  record = _only_record(ImagingDataset(tmp_path, spatial_dims=3))
  header = pydicom.dcmread(source_file)
  assert record["image"].shape == (15, 10, 10, 1)
  np.testing.assert_array_equal(record["image"][..., 0], header.pixel_array.astype(np.float32))
  np.testing.assert_allclose(record["spacing"], [5.0, 10.0, 10.0])  # GridFrameOffsetVector steps of 5 mm
  with pytest.raises(ValueError, match="is a 3D volume of shape"):  # frames are not 2D images
    ImagingDataset(tmp_path, spatial_dims=2)


def _enhanced_mr(path, positions, slopes):
  """An enhanced MR file as scanners write them: frames in acquisition order, each with its
  own position and rescale in PerFrameFunctionalGroupsSequence, spacing shared."""
  from pydicom.dataset import Dataset, FileMetaDataset
  from pydicom.sequence import Sequence
  from pydicom.uid import ExplicitVRLittleEndian, generate_uid
  frames = len(positions)
  stored = np.arange(frames * 4 * 5, dtype=np.uint16).reshape(frames, 4, 5)
  meta = FileMetaDataset()
  meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.4.1"  # Enhanced MR Image Storage
  meta.MediaStorageSOPInstanceUID, meta.TransferSyntaxUID = generate_uid(), ExplicitVRLittleEndian
  ds = Dataset()
  ds.file_meta, ds.SOPClassUID, ds.SOPInstanceUID = meta, meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
  ds.Modality, ds.SeriesInstanceUID, ds.NumberOfFrames = "MR", generate_uid(), frames
  ds.Rows, ds.Columns, ds.SamplesPerPixel, ds.PhotometricInterpretation = 4, 5, 1, "MONOCHROME2"
  ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
  measures, orientation = Dataset(), Dataset()
  measures.PixelSpacing, measures.SliceThickness = [0.8, 0.6], 2.0
  orientation.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
  shared = Dataset()
  shared.PixelMeasuresSequence, shared.PlaneOrientationSequence = Sequence([measures]), Sequence([orientation])
  ds.SharedFunctionalGroupsSequence = Sequence([shared])
  per_frame = []
  for z, slope in zip(positions, slopes):
    plane, transform, group = Dataset(), Dataset(), Dataset()
    plane.ImagePositionPatient = [0.0, 0.0, z]
    transform.RescaleSlope, transform.RescaleIntercept, transform.RescaleType = slope, -1.0, "US"
    group.PlanePositionSequence, group.PixelValueTransformationSequence = Sequence([plane]), Sequence([transform])
    per_frame.append(group)
  ds.PerFrameFunctionalGroupsSequence = Sequence(per_frame)
  ds.PixelData = stored.tobytes()
  ds.save_as(path, enforce_file_format=True)
  return stored


def test_an_enhanced_mr_file_is_a_volume_ordered_by_frame_position_with_per_frame_rescale(tmp_path):
  positions, slopes = [7.5, 0.0, 2.5, 5.0], [1.0, 2.0, 3.0, 4.0]
  stored = _enhanced_mr(tmp_path / "enhanced.dcm", positions, slopes)
  record = _only_record(ImagingDataset(tmp_path, spatial_dims=3))
  order = np.argsort(positions)  # inferior to superior along the slice normal
  expected = np.stack([stored[f] * slopes[f] - 1.0 for f in order]).astype(np.float32)
  np.testing.assert_array_equal(record["image"][..., 0], expected)
  np.testing.assert_allclose(record["spacing"], [2.5, 0.8, 0.6])  # from positions, never SliceThickness
  _enhanced_mr(tmp_path / "gap.dcm", [0.0, 2.5, 5.0, 9.0], slopes)
  (tmp_path / "enhanced.dcm").unlink()
  with pytest.raises(ValueError, match=r"gap\.dcm: multi-frame DICOM: inconsistent slice spacing: gap 4 mm"):
    ImagingDataset(tmp_path, spatial_dims=3)


def test_multi_frame_captures_without_geometry_are_refused_as_not_a_volume(tmp_path):
  shutil.copy(get_testdata_file("SC_rgb_rle_2frame.dcm", download=False), tmp_path / "cine.dcm")
  with pytest.raises(ValueError, match=r"cine\.dcm: multi-frame DICOM \(NumberOfFrames=2\) without frame geometry"):
    ImagingDataset(tmp_path, spatial_dims=3)
  shutil.copy(get_testdata_file("rtdose.dcm", download=False), tmp_path / "dose.dcm")
  dataset = ImagingDataset(tmp_path, spatial_dims=3, on_error="skip")
  assert dataset.stats["skipped_unsupported"] == 1 and dataset.stats["format_dicom_multiframe"] == 1


def test_a_damaged_compressed_stream_is_a_read_error_naming_the_file(tmp_path):
  # JPEG-lossy.dcm: a 12-bit JPEG Extended stream whose scan header is malformed (every
  # installed decoder refuses it; JPGExtended.dcm is the same image, well formed).
  shutil.copy(get_testdata_file("JPEG-lossy.dcm", download=False), tmp_path / "lossy.dcm")
  dataset = ImagingDataset(tmp_path, spatial_dims=2)
  with pytest.raises(ValueError, match=r"lossy\.dcm"):
    dataset.source(next(s for s, rows in dataset.splits.items() if len(rows)))[0]


@pytest.mark.parametrize("name, modality", [("CT_small.dcm", "CT"), ("MR_small.dcm", "MR")])
def test_pydicom_files_shape_spacing_and_rescale(tmp_path, name, modality):
  source_file = get_testdata_file(name, download=False)
  shutil.copy(source_file, tmp_path / name)
  dataset = ImagingDataset(tmp_path, spatial_dims=2)
  record = _only_record(dataset)
  header = pydicom.dcmread(source_file)
  assert record["image"].dtype == np.float32
  assert record["image"].shape == (header.Rows, header.Columns, 1)
  np.testing.assert_array_equal(record["spacing"], [float(s) for s in header.PixelSpacing])
  assert record["spacing"].dtype == np.float64
  assert record["modality"] == modality and record["subject_id"] == name[:-4]
  slope, intercept = float(header.get("RescaleSlope", 1)), float(header.get("RescaleIntercept", 0))
  expected = header.pixel_array * slope + intercept
  np.testing.assert_array_equal(record["image"][..., 0], expected)
  for row, col in [(0, 0), (32, 32), (10, 50)]:
    assert record["image"][row, col, 0] == header.pixel_array[row, col] * slope + intercept
  assert dataset.stats[f"modality_{modality}"] == 1 and dataset.stats["format_dicom"] == 1
  if modality == "CT":  # stored 128..2191 with intercept -1024: HU from -896, not raw
    assert intercept == -1024 and record["image"].min() == -896.0
  assert record["labels"].shape == (0,) and dataset.label_names == ()


# ---------------------------------------------------------------- DICOM series written here
def _write_series(folder: pathlib.Path, positions_mm, *, orientation=(1, 0, 0, 0, 1, 0),
                  small_slice: int | None = None, seed: int = 0) -> None:
  """Copies of CT_small at the given positions along z, files named in shuffled order.

  Slice k has stored pixel [0, 0] = 500 + 100 k, so the read order is visible.
  """
  folder.mkdir(parents=True)
  names = np.random.default_rng(seed).permutation(len(positions_mm))
  for k, z in enumerate(positions_mm):
    ds = pydicom.dcmread(CT_SMALL)
    pixels = ds.pixel_array.copy()
    pixels[0, 0] = 500 + 100 * k
    if k == small_slice:
      pixels = pixels[::2, ::2].copy()
      ds.Rows, ds.Columns = pixels.shape
    ds.PixelData = pixels.tobytes()
    ds.ImagePositionPatient = [-158.1, -179.0, float(z)]
    ds.ImageOrientationPatient = list(orientation)
    ds.save_as(folder / f"img{names[k]:03d}.dcm")


@pytest.mark.parametrize("orientation, expected_order", [
    ((1, 0, 0, 0, 1, 0), [0, 1, 2, 3, 4]),  # normal +z: ascending z
    ((1, 0, 0, 0, -1, 0), [4, 3, 2, 1, 0]),  # normal -z: descending z
])
def test_dicom_series_is_one_volume_ordered_along_the_slice_normal(tmp_path, orientation,
                                                                   expected_order):
  _write_series(tmp_path / "patient1" / "ct", [0.0, 3.0, 6.0, 9.0, 12.0], orientation=orientation)
  dataset = ImagingDataset(tmp_path, spatial_dims=3)
  record = _only_record(dataset)
  assert record["subject_id"] == "patient1/ct" and record["path"] == str(tmp_path / "patient1/ct")
  assert record["image"].shape == (5, 128, 128, 1)
  # D spacing from the positions (3 mm), not SliceThickness (5 mm in CT_small).
  np.testing.assert_allclose(record["spacing"], [3.0, 0.661468, 0.661468])
  np.testing.assert_array_equal(record["image"][:, 0, 0, 0],
                                [500 + 100 * k - 1024 for k in expected_order])
  base = pydicom.dcmread(CT_SMALL)
  np.testing.assert_array_equal(record["image"][2, 1:, 1:, 0], base.pixel_array[1:, 1:] - 1024.0)
  assert dataset.stats["format_dicom_series"] == 1 and dataset.stats["modality_CT"] == 1
  # The same folder through a manifest, and the series read as one item in a 2D config fails.
  manifest = _write_manifest(tmp_path / "m.csv", ["subject_id", "path"], [["p1", "patient1/ct"]])
  assert _only_record(ImagingDataset(manifest, spatial_dims=3))["image"].shape == (5, 128, 128, 1)
  with pytest.raises(ValueError, match="patient1/ct.*single-slice"):
    ImagingDataset(manifest, spatial_dims=2)


@pytest.mark.parametrize("positions, small_slice, reason, message", [
    ([0.0, 3.0, 6.0, 10.0], None, "series_spacing", "inconsistent slice spacing"),
    ([0.0, 3.0, 3.0, 6.0], None, "series_spacing", "inconsistent slice spacing"),
    ([0.0, 3.0, 6.0, 9.0], 2, "series_size", "mixes slice sizes"),
])
def test_bad_dicom_series_raise_or_are_skipped(tmp_path, positions, small_slice, reason, message):
  _write_series(tmp_path / "bad", positions, small_slice=small_slice)
  _write_series(tmp_path / "good", [0.0, 2.0, 4.0])
  with pytest.raises(ValueError, match=f"{tmp_path / 'bad'}.*{message}") as error:
    ImagingDataset(tmp_path, spatial_dims=3)
  if small_slice is not None:  # names a file of each size
    assert "64x64" in str(error.value) and "128x128" in str(error.value)
  dataset = ImagingDataset(tmp_path, spatial_dims=3, on_error="skip")
  assert dataset.stats[f"skipped_{reason}"] == 1 and dataset.stats["skipped"] == 1
  assert list(_records(dataset)) == ["good"]


# ---------------------------------------------------------------- NIfTI files nibabel ships
def _canonical_dhw(path) -> np.ndarray:
  """The documented convention, computed independently: canonical, then (k, j, i)."""
  image = nib.as_closest_canonical(nib.load(path))
  data = np.asarray(image.dataobj, np.float32)
  return (data[..., 0] if data.ndim == 4 else data).transpose(2, 1, 0)


@pytest.mark.parametrize("name", ["anatomical.nii", "example4d.nii.gz", "standard.nii.gz"])
def test_nibabel_files_shape_spacing_and_orientation(tmp_path, name):
  shutil.copy(os.path.join(NIBABEL_DATA, name), tmp_path / name)
  dataset = ImagingDataset(tmp_path, spatial_dims=3)
  record = _only_record(dataset)
  header = nib.load(os.path.join(NIBABEL_DATA, name)).header
  expected = _canonical_dhw(os.path.join(NIBABEL_DATA, name))
  assert record["image"].shape == expected.shape + (1,)
  np.testing.assert_array_equal(record["image"][..., 0], expected)
  # These files' affines only flip axes (LAS -> RAS), so zooms keep their order: (z, y, x).
  np.testing.assert_allclose(record["spacing"], header.get_zooms()[:3][::-1], rtol=1e-6)
  assert record["modality"] == "OT" and dataset.stats["format_nifti"] == 1
  four_d = len(header.get_data_shape()) == 4
  assert dataset.stats["nifti_first_volume_only"] == int(four_d)


def test_nifti_flipped_and_permuted_affines_read_in_canonical_orientation(tmp_path):
  data = np.random.default_rng(0).normal(size=(6, 7, 8)).astype(np.float32)
  nib.save(nib.Nifti1Image(data, np.diag([2.0, 3.0, 4.0, 1.0])), tmp_path / "plain.nii")
  flipped = np.diag([-2.0, 3.0, 4.0, 1.0])
  flipped[0, 3] = 2.0 * 5  # same world position for every voxel as the plain file
  nib.save(nib.Nifti1Image(data[::-1].copy(), flipped), tmp_path / "flipped.nii.gz")
  # Stored (j, k, i): the first stored axis runs along world y, the second along z.
  permuted = np.array([[0, 0, 2.0, 0], [3.0, 0, 0, 0], [0, 4.0, 0, 0], [0, 0, 0, 1]])
  nib.save(nib.Nifti1Image(data.transpose(1, 2, 0).copy(), permuted), tmp_path / "permuted.nii")
  records = _records(ImagingDataset(tmp_path, spatial_dims=3))
  plain = records["plain"]
  assert plain["image"].shape == (8, 7, 6, 1)
  np.testing.assert_array_equal(plain["image"][..., 0], data.transpose(2, 1, 0))
  np.testing.assert_allclose(plain["spacing"], [4.0, 3.0, 2.0])
  for name in ("flipped", "permuted"):
    np.testing.assert_array_equal(records[name]["image"], plain["image"])
    np.testing.assert_allclose(records[name]["spacing"], plain["spacing"])


def test_nifti_scaling_and_single_slice_squeeze(tmp_path):
  raw = np.arange(5 * 4, dtype=np.int16).reshape(5, 4, 1)
  image = nib.Nifti1Image(raw, np.diag([0.5, 0.7, 3.0, 1.0]))
  image.header.set_slope_inter(2.0, -5.0)
  nib.save(image, tmp_path / "slice.nii")
  record = _only_record(ImagingDataset(tmp_path, spatial_dims=2))
  assert record["image"].shape == (4, 5, 1)  # (j, i) of the canonical single slice
  np.testing.assert_array_equal(record["image"][..., 0], raw[..., 0].T * 2.0 - 5.0)
  np.testing.assert_allclose(record["spacing"], [0.7, 0.5])
  shutil.copy(os.path.join(NIBABEL_DATA, "anatomical.nii"), tmp_path / "volume.nii")
  with pytest.raises(ValueError, match="volume.nii.*spatial_dims=2 needs exactly one"):
    ImagingDataset(tmp_path, spatial_dims=2)


# ---------------------------------------------------------------- PNG, NPY, manifests
def test_png_npy_and_manifest_with_labels_splits_and_relative_paths(tmp_path):
  rng = np.random.default_rng(0)
  gray = rng.integers(0, 256, (20, 30), dtype=np.uint8)
  (tmp_path / "img").mkdir()
  Image.fromarray(gray).save(tmp_path / "img/gray.png")
  volume_slice = rng.normal(size=(20, 30)).astype(np.float32)
  np.save(tmp_path / "img/array.npy", volume_slice)
  np.save(tmp_path / "img/one_slice.npy", volume_slice[None, :, :, None])
  shutil.copy(CT_SMALL, tmp_path / "img/ct.dcm")
  manifest = _write_manifest(
      tmp_path / "manifest.csv", ["subject_id", "path", "split", "modality", "age", "y"],
      [["s1", "img/gray.png", "train", "CR", "61.5", "1"],
       ["s2", "img/array.npy", "train", "", "", "0"],
       ["s2", "img/one_slice.npy", "train", "", "40", ""],
       ["s3", str(tmp_path / "img/ct.dcm"), "tuning", "", "70", "1"],
       ["s4", "img/gray.png", "", "", "1", "1"]])
  # A directory holding manifest.csv reads the manifest, not a scan.
  for path in (manifest, tmp_path):
    dataset = ImagingDataset(path, spatial_dims=2)
    assert dataset.label_names == ("age", "y") and dataset.channels == 1
    assert {k: v.tolist() for k, v in dataset.splits.items()} == {"train": [0, 1, 2],
                                                                 "tuning": [3]}
    assert dataset.stats["items_without_split"] == 1 and dataset.stats["fallback_split"] == 0
    assert dataset.stats["manifest_rows"] == 5 and dataset.stats["squeezed_to_2d"] == 1
  train = dataset.source("train")
  assert len(train) == 3
  np.testing.assert_array_equal(train[0]["image"][..., 0], gray)
  assert train[0]["modality"] == "CR" and train[1]["modality"] == "OT"
  np.testing.assert_array_equal(train[0]["labels"], np.float32([61.5, 1]))
  np.testing.assert_array_equal(train[1]["labels"], np.float32([np.nan, 0]))
  np.testing.assert_array_equal(train.labels, [[61.5, 1], [np.nan, 0], [40, np.nan]])
  np.testing.assert_array_equal(train[1]["image"][..., 0], volume_slice)
  np.testing.assert_array_equal(train[2]["image"], train[1]["image"])
  np.testing.assert_array_equal(train[1]["spacing"], [1.0, 1.0])
  assert dataset.source("tuning")[0]["modality"] == "CT"
  copy = pickle.loads(pickle.dumps(train))
  np.testing.assert_array_equal(copy[2]["image"], train[2]["image"])
  with pytest.raises(ValueError, match="unknown split 'held_out'.*'train', 'tuning'"):
    dataset.source("held_out")
  with pytest.raises(IndexError):
    train[3]


def test_rgb_png_and_directory_scan_hash_split(tmp_path):
  rng = np.random.default_rng(1)
  for i in range(30):
    folder = tmp_path / f"site{i % 3}"
    folder.mkdir(exist_ok=True)
    Image.fromarray(rng.integers(0, 256, (8, 9, 3), dtype=np.uint8)).save(folder / f"{i}.png")
  Image.fromarray(rng.integers(0, 256, (8, 9, 3), dtype=np.uint8)).save(tmp_path / "photo.JPG")
  (tmp_path / "notes.txt").write_text("not an image")
  dataset = ImagingDataset(tmp_path, spatial_dims=2, fallback_seed=5)
  assert dataset.channels == 3 and dataset.stats["items"] == 31
  assert dataset.stats["format_png"] == 30 and dataset.stats["format_jpeg"] == 1
  assert dataset.stats["ignored_files"] == 1 and dataset.stats["fallback_split"] == 1
  records = _records(dataset)
  assert set(records) == {f"site{i % 3}/{i}" for i in range(30)} | {"photo"}
  assert records["photo"]["image"].shape == (8, 9, 3)
  with Image.open(tmp_path / "site1/4.png") as image:
    np.testing.assert_array_equal(records["site1/4"]["image"], np.asarray(image))
  for name, indices in dataset.splits.items():
    ids = [dataset.source(name)[i]["subject_id"] for i in range(len(indices))]
    assert all(splits.hash_split_buckets([s], seed=5)[0] == splits.STANDARD_SPLITS.index(name)
               for s in ids)
  with pytest.raises(ValueError, match="photo.JPG: is a 2D image.*spatial_dims=3"):
    ImagingDataset(tmp_path, spatial_dims=3)


def test_string_subject_ids_hash_stably():
  # Canonical decimal strings share the integer's split (EHR ids are ints).
  ids = np.arange(-5, 500)
  np.testing.assert_array_equal(splits.hash_split_buckets([str(i) for i in ids]),
                                splits.hash_split_buckets(ids))
  # Other strings: blake2b of the UTF-8 bytes, the same in every process.
  key = int.from_bytes(hashlib.blake2b("site1/4".encode(), digest_size=8).digest(), "little")
  assert splits.subject_keys(["site1/4", "007"])[0] == key
  assert splits.subject_keys(["007"])[0] != 7
  fractions = np.bincount(splits.hash_split_buckets([f"p{i}" for i in range(4000)])) / 4000
  np.testing.assert_allclose(fractions, [0.8, 0.1, 0.1], atol=0.03)


# ---------------------------------------------------------------- bad input
def _bad_files(folder: pathlib.Path) -> dict[str, pathlib.Path]:
  folder.mkdir()
  data = pathlib.Path(CT_SMALL).read_bytes()
  paths = {"corrupt": folder / "corrupt.dcm", "truncated": folder / "half.dcm",
           "good": folder / "ct.dcm"}
  paths["corrupt"].write_bytes(np.random.default_rng(0).bytes(4000))
  paths["truncated"].write_bytes(data[:len(data) // 2])
  paths["good"].write_bytes(data)
  return paths


@pytest.mark.parametrize("bad, message", [("corrupt", "not a readable DICOM file"),
                                          ("truncated", "truncated DICOM file")])
def test_corrupt_and_truncated_dicom(tmp_path, bad, message):
  paths = _bad_files(tmp_path / "files")
  rows = [[name, str(path)] for name, path in paths.items() if name in (bad, "good")]
  manifest = _write_manifest(tmp_path / "m.csv", ["subject_id", "path"], rows)
  with pytest.raises(ValueError, match=f"{paths[bad].name}: {message}"):
    ImagingDataset(manifest, spatial_dims=2)
  dataset = ImagingDataset(manifest, spatial_dims=2, on_error="skip")
  assert dataset.stats[f"skipped_{bad}"] == 1 and list(_records(dataset)) == ["good"]


def test_truncated_nifti_and_corrupt_png(tmp_path):
  data = pathlib.Path(NIBABEL_DATA, "anatomical.nii").read_bytes()
  (tmp_path / "half.nii").write_bytes(data[:len(data) // 2])
  (tmp_path / "noise.png").write_bytes(np.random.default_rng(0).bytes(500))
  np.save(tmp_path / "fine.npy", np.zeros((2, 4, 4), np.float32))
  with pytest.raises(ValueError, match="half.nii: truncated NIfTI file"):
    ImagingDataset(tmp_path, spatial_dims=3)
  dataset = ImagingDataset(tmp_path, spatial_dims=3, on_error="skip")
  assert dataset.stats["skipped_truncated"] == 1 and dataset.stats["skipped_corrupt"] == 1
  assert list(_records(dataset)) == ["fine"]


def test_read_time_problems_name_the_file_or_are_replaced_and_listed_once(tmp_path, caplog):
  # The last bytes cut: the header and the file size pass, the pixel data does not.
  images = tmp_path / "images"
  images.mkdir()
  data = pathlib.Path(CT_SMALL).read_bytes()
  (images / "cut.dcm").write_bytes(data[:-200])
  image = np.ones((4, 5), np.float32)
  np.save(images / "good.npy", image)
  image[1, 2] = np.nan
  np.save(images / "nan.npy", image)
  np.save(images / "inf.npy", np.full((4, 5), np.inf, np.float32))
  manifest = _write_manifest(tmp_path / "m.csv", ["subject_id", "path", "split"],
                             [[n, f"images/{n}.{ext}", "train"] for n, ext in
                              (("cut", "dcm"), ("good", "npy"), ("nan", "npy"), ("inf", "npy"))])
  messages = {"cut": "cut.dcm: could not read the pixel data",
              "nan": "nan.npy: 1 NaN/inf pixel", "inf": "inf.npy: 20 NaN/inf pixel"}
  strict = ImagingDataset(manifest, spatial_dims=2).source("train")
  for i, subject in enumerate(strict.subject_ids):
    if subject in messages:
      with pytest.raises(ValueError, match=messages[subject] + r".*on_error='skip' replaces such records"):
        strict[i]
  skip_file = str(tmp_path / "skipped.csv")
  source = ImagingDataset(manifest, spatial_dims=2, on_error="skip", skip_file=skip_file).source("train")
  assert source.subject_ids == ["cut", "good", "nan", "inf"]
  # Each bad record is replaced by the next readable one of its split (cyclically): deterministic.
  assert [source[i]["subject_id"] for i in range(4)] == ["good", "good", "good", "good"]
  rows = list(csv.DictReader(open(skip_file)))
  assert sorted(pathlib.Path(r["path"]).name for r in rows) == ["cut.dcm", "inf.npy", "nan.npy"]
  # Read outside a training stream: no step, only the time.
  assert all(r["reason"] and r["first_seen_time"] and r["first_seen_step"] == "" for r in rows)
  caplog.clear()  # a resumed run: the listed files are not read (nor warned about) again
  again = ImagingDataset(manifest, spatial_dims=2, on_error="skip", skip_file=skip_file).source("train")
  assert [again[i]["subject_id"] for i in range(4)] == ["good"] * 4
  assert "skipping unreadable" not in caplog.text and len(list(csv.DictReader(open(skip_file)))) == 3


def test_read_time_skips_name_the_training_step_whose_batch_met_them(tmp_path):
  names = [f"s{i}" for i in range(8)]
  for name in names:
    image = np.ones((4, 5), np.float32)
    image[0, 0] = np.nan if name == "s5" else 1.0
    np.save(tmp_path / f"{name}.npy", image)
  manifest = _write_manifest(tmp_path / "m.csv", ["subject_id", "path", "split"],
                             [[n, f"{n}.npy", "train"] for n in names])
  skip_file = tmp_path / "skipped.csv"
  source = ImagingDataset(manifest, spatial_dims=2, on_error="skip", skip_file=str(skip_file)).source("train")
  dataset = pipeline.make_train_dataset(source, [lambda r: {"x": r["image"]}], global_batch_size=2, seed=5)
  iterator = pipeline.make_iterator(dataset)
  for _ in range(4):  # one epoch
    next(iterator)
  # The shuffled global stream: batch k (step k + 1) holds positions 2k and 2k + 1.
  order = [grain.MapDataset.range(8).shuffle(seed=5)[p] for p in range(8)]
  expected_step = order.index(source.subject_ids.index("s5")) // 2 + 1
  [row] = list(csv.DictReader(open(skip_file)))
  assert pathlib.Path(row["path"]).name == "s5.npy" and int(row["first_seen_step"]) == expected_step


def test_missing_path_and_channel_mix(tmp_path, caplog):
  for name, shape in [("a", (6, 6)), ("b", (6, 6, 3)), ("c", (6, 6)), ("d", (6, 6))]:
    Image.fromarray(np.zeros(shape, np.uint8)).save(tmp_path / f"{name}.png")
  header = ["subject_id", "path"]
  rows = [[n, f"{n}.png"] for n in "abcd"]
  manifest = _write_manifest(tmp_path / "m.csv", header, rows + [["e", "absent.png"]])
  with pytest.raises(ValueError, match="absent.png: file or folder does not exist"):
    ImagingDataset(manifest, spatial_dims=2)
  mixed = _write_manifest(tmp_path / "mixed.csv", header, rows)
  with pytest.raises(ValueError, match=r"a.png has 1 channel.*b.png has 3 channel"):
    ImagingDataset(mixed, spatial_dims=2)
  with caplog.at_level(logging.WARNING, logger="biofm_jax.modalities.imaging.source"):
    dataset = ImagingDataset(manifest, spatial_dims=2, on_error="skip")
  assert dataset.stats["skipped_missing"] == 1 and dataset.stats["skipped_channels"] == 1
  assert dataset.stats["skipped"] == 2 and dataset.stats["items"] == 3 and dataset.channels == 1
  warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
  assert len(warnings) == 1 and "skipped 2 item(s)" in warnings[0].getMessage()
  assert set(STAT_KEYS) <= set(dataset.stats)
  bad_label = _write_manifest(tmp_path / "l.csv", header + ["y"], [["a", "a.png", "yes"]])
  with pytest.raises(ValueError, match=r"l.csv: line 2, column 'y': 'yes' is not a number"):
    ImagingDataset(bad_label, spatial_dims=2)
  with pytest.raises(ValueError, match="expected unique names including 'subject_id'"):
    ImagingDataset(_write_manifest(tmp_path / "h.csv", ["id", "path"], []), spatial_dims=2)
  with pytest.raises(ValueError, match="nowhere: does not exist"):
    ImagingDataset(tmp_path / "nowhere", spatial_dims=2)


# ---------------------------------------------------------------- synthetic images
@pytest.mark.parametrize("spatial_dims, num_subjects, size, file_format", [
    (2, 200, 64, "npy"), (3, 100, 32, "npy"), (3, 10, 32, "nifti"), (2, 10, 32, "png")])
def test_synthetic_images(tmp_path, spatial_dims, num_subjects, size, file_format):
  kwargs = dict(spatial_dims=spatial_dims, num_subjects=num_subjects, seed=3, image_size=size,
                file_format=file_format)
  first = synthetic_imaging.write_synthetic_images(tmp_path / "a", **kwargs)
  dataset = ImagingDataset(first, spatial_dims=spatial_dims)
  assert dataset.label_names == ("lesion", "lesion_size", "lesion_intensity")
  assert {k: len(v) for k, v in dataset.splits.items()} == {
      "train": round(0.8 * num_subjects), "tuning": round(0.1 * num_subjects),
      "held_out": num_subjects - round(0.8 * num_subjects) - round(0.1 * num_subjects)}
  records = _records(dataset)
  labels = np.array([r["labels"] for r in records.values()])
  assert labels[:, 0].sum() == num_subjects // 2
  assert np.all((labels[:, 1] > 0) == (labels[:, 0] == 1))
  assert np.all((labels[:, 1][labels[:, 0] == 1] >= 0.09 * size - 1e-3))
  record = next(iter(records.values()))
  assert record["image"].shape == (size,) * spatial_dims + (1,) and record["modality"] == "CT"
  if file_format == "nifti":
    np.testing.assert_allclose(record["spacing"], synthetic_imaging.SPACING_MM[spatial_dims])
  if file_format == "npy":
    assert record["image"].min() < -900 and np.all(np.isfinite(record["image"]))
    second = synthetic_imaging.write_synthetic_images(tmp_path / "b", **kwargs)
    assert (first / "manifest.csv").read_bytes() == (second / "manifest.csv").read_bytes()
    for name in sorted(os.listdir(first / "images"))[:5]:
      np.testing.assert_array_equal(np.load(first / "images" / name),
                                    np.load(second / "images" / name))


def test_synthetic_cli(tmp_path):
  synthetic_imaging.main(["--out", str(tmp_path / "cli"), "--spatial_dims", "2",
                          "--num_subjects", "6", "--seed", "1", "--image_size", "16"])
  assert ImagingDataset(tmp_path / "cli", spatial_dims=2).stats["items"] == 6
  with pytest.raises(ValueError, match="not an empty directory"):
    synthetic_imaging.write_synthetic_images(tmp_path / "cli", spatial_dims=2)


# ---------------------------------------------------------------- 2D files in a 3D dataset, skips named
def test_a_2d_nifti_or_single_slice_volume_in_a_3d_manifest_is_a_rank_error_not_repeated_slices(tmp_path, caplog):
  rng = np.random.default_rng(0)
  nib.save(nib.Nifti1Image(rng.normal(size=(8, 6)).astype(np.float32), np.eye(4)), tmp_path / "flat.nii.gz")
  nib.save(nib.Nifti1Image(rng.normal(size=(8, 6, 1)).astype(np.float32), np.eye(4)), tmp_path / "one.nii.gz")
  nib.save(nib.Nifti1Image(rng.normal(size=(8, 6, 5)).astype(np.float32), np.eye(4)), tmp_path / "vol.nii.gz")
  rows = [["flat", "flat.nii.gz"], ["one", "one.nii.gz"], ["vol", "vol.nii.gz"]]
  manifest = _write_manifest(tmp_path / "manifest.csv", ["subject_id", "path"], rows)
  with pytest.raises(ValueError, match=r"flat.nii.gz: is a single-slice volume of shape \(1, 6, 8\)"):
    ImagingDataset(manifest, spatial_dims=3)
  listing = tmp_path / "run" / "skipped_at_indexing.csv"
  with caplog.at_level(logging.WARNING):
    dataset = ImagingDataset(manifest, spatial_dims=3, on_error="skip", index_skip_file=str(listing))
  assert dataset.stats["skipped_rank"] == 2 and dataset.stats["skipped"] == 2 and dataset.stats["items"] == 1
  assert list(_records(dataset)) == ["vol"]
  # The skipped files are named: the first few in one warning, every one in the CSV.
  warning = next(r.getMessage() for r in caplog.records if "at indexing" in r.getMessage())
  assert "skipped 2 item(s) at indexing (rank=2)" in warning
  assert "flat.nii.gz" in warning and "one.nii.gz" in warning and str(listing) in warning
  with open(listing, newline="") as f:
    listed = list(csv.DictReader(f))
  assert [(pathlib.Path(r["path"]).name, r["reason"]) for r in listed] == [("flat.nii.gz", "rank"),
                                                                           ("one.nii.gz", "rank")]
  assert "spatial_dims=3 needs at least 2 slices" in listed[0]["message"]
  # The same files still read as 2D images in a 2D dataset.
  assert _records(ImagingDataset(tmp_path / "manifest.csv", spatial_dims=2, on_error="skip"))["flat"][
      "image"].shape == (6, 8, 1)


def test_unsupported_and_channel_skips_and_ignored_scan_files_are_listed_and_a_stale_list_emptied(tmp_path):
  root = tmp_path / "images"
  root.mkdir()
  Image.fromarray(np.zeros((4, 5), np.uint8)).save(root / "gray.png")
  Image.fromarray(np.zeros((4, 5), np.uint8)).save(root / "gray2.png")
  Image.fromarray(np.zeros((4, 5, 3), np.uint8)).save(root / "rgb.png")
  (root / "notes.txt").write_text("not an image")
  (root / "scan.nrrd").write_bytes(b"NRRD0004\n")
  rows = [["a", "gray.png"], ["b", "gray2.png"], ["c", "rgb.png"], ["d", "scan.nrrd"]]
  manifest = _write_manifest(root / "manifest.csv", ["subject_id", "path"], rows)
  listing = tmp_path / "run" / "skipped_at_indexing.csv"
  dataset = ImagingDataset(manifest, spatial_dims=2, on_error="skip", index_skip_file=str(listing))
  assert dataset.stats["skipped_unsupported"] == 1 and dataset.stats["skipped_channels"] == 1
  with open(listing, newline="") as f:
    assert sorted((pathlib.Path(r["path"]).name, r["reason"]) for r in csv.DictReader(f)) == [
        ("rgb.png", "channels"), ("scan.nrrd", "unsupported")]
  # A folder scan names the files of no image format that it ignored.
  (root / "manifest.csv").rename(root / "manifest.txt")
  (root / "rgb.png").unlink()
  (root / "scan.nrrd").unlink()
  dataset = ImagingDataset(root, spatial_dims=2, on_error="skip", index_skip_file=str(listing))
  assert dataset.stats["ignored_files"] == 2 and dataset.stats["skipped"] == 0
  with open(listing, newline="") as f:
    assert sorted((pathlib.Path(r["path"]).name, r["reason"]) for r in csv.DictReader(f)) == [
        ("manifest.txt", "ignored"), ("notes.txt", "ignored")]
  (root / "notes.txt").unlink()
  (root / "manifest.txt").unlink()
  ImagingDataset(root, spatial_dims=2, on_error="skip", index_skip_file=str(listing))
  assert listing.read_text().splitlines() == ["path,reason,message"]  # nothing skipped now: no stale names


def test_an_undecodable_pixel_stream_is_one_log_line_with_every_decoders_reason(tmp_path, caplog):
  """pydicom logs each decoder plugin's failure with its traceback before raising; the skip
  line alone is logged, and it (and skipped.csv) keep every plugin's reason."""
  shutil.copy(get_testdata_file("JPEG-lossy.dcm", download=False), tmp_path / "lossy.dcm")  # see above
  shutil.copy(CT_SMALL, tmp_path / "fine.dcm")
  manifest = _write_manifest(tmp_path / "m.csv", ["subject_id", "path", "split"],
                             [["lossy", "lossy.dcm", "train"], ["fine", "fine.dcm", "train"]])
  skip_file = tmp_path / "skipped.csv"
  source = ImagingDataset(manifest, spatial_dims=2, on_error="skip", skip_file=str(skip_file)).source("train")
  with caplog.at_level(logging.DEBUG):
    assert source[0]["subject_id"] == "fine"
  assert not [r for r in caplog.records if r.exc_info or r.name.startswith("pydicom")], caplog.text
  (skip_line,) = [r.getMessage() for r in caplog.records if "skipping unreadable" in r.getMessage()]
  (row,) = csv.DictReader(open(skip_file))
  for reason in (skip_line, row["reason"]):
    assert "\n" not in reason and "no installed decoder could decode the pixel data: " in reason
    # Each installed plugin's own reason (pylibjpeg's libjpeg and Pillow refuse this stream).
    assert "pylibjpeg: libjpeg error" in reason and "pillow: Pillow does not support" in reason, reason


def test_a_manifest_s_acquisition_time_dates_each_image_and_must_be_given_for_every_row(tmp_path):
  (tmp_path / "img").mkdir()
  Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "img/a.png")
  header = ["subject_id", "path", "split", "acquisition_time", "y"]
  manifest = _write_manifest(tmp_path / "dated.csv", header, [
      ["s1", "img/a.png", "train", "2021-03-04", "1"], ["s2", "img/a.png", "train", "2021-03-04 10:15", "0"]])
  dataset = ImagingDataset(manifest, spatial_dims=2)
  assert dataset.label_names == ("y",)  # the time is not a label
  np.testing.assert_array_equal(dataset.source("train").record_times(), np.array(
      ["2021-03-04T00:00", "2021-03-04T10:15"], "datetime64[us]"))
  undated = _write_manifest(tmp_path / "plain.csv", ["subject_id", "path", "split"], [["s1", "img/a.png", "train"]])
  assert ImagingDataset(undated, spatial_dims=2).source("train").record_times() is None
  empty = _write_manifest(tmp_path / "empty.csv", header, [["s1", "img/a.png", "train", "", "1"]])
  with pytest.raises(ValueError, match=r"empty.csv: line 2, column 'acquisition_time' is empty; where the column"):
    ImagingDataset(empty, spatial_dims=2)
  bad = _write_manifest(tmp_path / "bad.csv", header, [["s1", "img/a.png", "train", "4 March 2021", "1"]])
  with pytest.raises(ValueError, match=r"bad.csv: line 2, column 'acquisition_time': '4 March 2021' is not an ISO"):
    ImagingDataset(bad, spatial_dims=2)


def test_dicom_headers_date_their_images_unless_the_manifest_does(tmp_path):
  """The acquisition, else the series, else the study date and time (pydicom's own files: CT
  acquired 1997-04-30 11:29:36, MR with only a study time); AcquisitionDateTime with its UTC
  offset; a file with every date blanked (as anonymisers do) is undated; a manifest's
  acquisition_time wins over the header."""
  from biofm_jax.modalities.imaging.dicom import header_time
  assert header_time(pydicom.dcmread(CT_SMALL)) == np.datetime64("1997-04-30T11:29:36", "us")
  assert header_time(pydicom.dcmread(MR_SMALL)) == np.datetime64("2004-08-26T18:50:59", "us")
  ds = pydicom.dcmread(CT_SMALL)
  ds.AcquisitionDateTime = "20210304101500.123456-0500"
  assert header_time(ds) == np.datetime64("2021-03-04T10:15:00", "us")
  for name in ("AcquisitionDateTime", "AcquisitionDate", "SeriesDate", "StudyDate"):
    setattr(ds, name, "")
  assert header_time(ds) is None
  (tmp_path / "img").mkdir()
  shutil.copy(CT_SMALL, tmp_path / "img/ct.dcm")
  ds.save_as(tmp_path / "img/blank.dcm")
  scanned = ImagingDataset(tmp_path / "img", spatial_dims=2)
  everything = {s: t for split in scanned.splits for s, t in zip(scanned.source(split).subject_ids,
                                                                   scanned.source(split).record_times())}
  assert everything["ct"] == np.datetime64("1997-04-30T11:29:36", "us") and np.isnat(everything["blank"])
  manifest = _write_manifest(tmp_path / "m.csv", ["subject_id", "path", "split", "acquisition_time"],
                             [["s1", "img/ct.dcm", "train", "2022-01-02"]])
  assert ImagingDataset(manifest, spatial_dims=2).source("train").record_times()[0] == np.datetime64("2022-01-02")
  _write_series(tmp_path / "series", [0.0, 2.0, 4.0])
  series = ImagingDataset(tmp_path / "series", spatial_dims=3)
  split = next(s for s, rows in series.splits.items() if len(rows))
  assert series.source(split).record_times()[0] == np.datetime64("1997-04-30T11:29:36", "us")
