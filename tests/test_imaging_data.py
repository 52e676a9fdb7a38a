"""Tests of the imaging transforms, `ImagingData` and imaging through the Grain pipeline."""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import ml_collections
import nibabel as nib
import numpy as np
import pytest

from biofm_jax.data import batch, pipeline
from biofm_jax.data.masking import MaskPatches
from biofm_jax.modalities.imaging import data as imaging
from biofm_jax.modalities.imaging import device_augment
from biofm_jax.modalities.imaging import transforms as T


def record(image, *, path="scan.npy", spacing=None, modality="OT", labels=(0.0,)):
  image = np.asarray(image, dtype=np.float32)
  spatial = image.ndim - 1
  return {"subject_id": "s0", "path": path, "image": image,
          "spacing": np.ones(spatial) if spacing is None else np.asarray(spacing, np.float64),
          "modality": modality, "labels": np.asarray(labels, np.float32)}


def imaging_cfg(**overrides):
  cfg = dict(path="", spatial_dims=2, image_size=(16, 16), patch_size=(4, 4), channels=1,
             spacing=(), intensity="auto", ct_window=(40.0, 400.0), crop_scale=(0.4, 1.0),
             flip_axes=(0, 1), brightness=0.1, contrast=0.1, mask_ratio=0.75, on_error="raise",
             synthetic_subjects=24, synthetic_seed=0)
  cfg.update(overrides)
  return ml_collections.ConfigDict(cfg)


def rng(seed):
  return np.random.default_rng(seed)


# ================================================================ resampling
def test_resample_2d_changes_shape_by_spacing_ratio_and_updates_spacing():
  rec = record(np.random.default_rng(0).normal(size=(20, 30, 2)), spacing=(2.0, 0.5))
  out = T.ResampleToSpacing((1.0, 1.0)).map(rec)
  assert out["image"].shape == (40, 15, 2)
  np.testing.assert_allclose(out["spacing"], (1.0, 1.0))
  assert rec["image"].shape == (20, 30, 2)  # the input record is untouched


def test_resample_3d_preserves_extent_and_values_of_a_ramp():
  ramp = np.broadcast_to(np.arange(10, dtype=np.float32)[:, None, None, None], (10, 12, 8, 1))
  rec = record(ramp, spacing=(3.0, 0.5, 1.0))
  out = T.ResampleToSpacing((1.5, 1.0, 1.0)).map(rec)
  assert out["image"].shape == (20, 6, 8, 1)
  np.testing.assert_allclose(out["spacing"], (1.5, 1.0, 1.0))
  assert np.isclose(out["image"].mean(), ramp.mean(), atol=1e-4)  # no shift of the content


def test_resample_matches_scipy_zoom_order_1():
  import scipy.ndimage
  image = np.random.default_rng(0).normal(size=(10, 12, 8, 1)).astype(np.float32)
  out = T.ResampleToSpacing((1.5, 1.0, 1.0)).map(record(image, spacing=(3.0, 0.5, 1.0)))
  zoomed = scipy.ndimage.zoom(image, (2.0, 0.5, 1.0, 1.0), order=1, mode="nearest",
                              grid_mode=True)
  np.testing.assert_allclose(out["image"], zoomed, atol=1e-5)


def test_resample_noop_without_target_and_errors_name_the_record():
  rec = record(np.zeros((5, 6, 1)), spacing=(0.7, 0.7))
  assert T.ResampleToSpacing(()).map(rec)["image"] is rec["image"]
  with pytest.raises(ValueError, match="bad.dcm.*spacing"):
    T.ResampleToSpacing((1.0, 1.0)).map(record(np.zeros((5, 6, 1)), path="bad.dcm",
                                               spacing=(1.0, 0.0)))
  with pytest.raises(ValueError, match="vol.nii.*3 spatial dims"):
    T.ResampleToSpacing((1.0, 1.0)).map(record(np.zeros((4, 5, 6, 1)), path="vol.nii"))


# ================================================================ intensity
def test_ct_window_maps_window_edges_to_range_ends():
  hu = np.array([-160.0, 40.0, 240.0, -1000.0, 3000.0]).reshape(5, 1, 1)
  out = T.NormalizeIntensity("auto", ct_window=(40, 400)).map(record(hu, modality="CT"))["image"]
  np.testing.assert_allclose(out.ravel(), [-1.0, 0.0, 1.0, -1.0, 1.0], atol=1e-6)
  assert out.dtype == np.float32


def test_mr_percentiles_map_to_range_ends():
  values = np.arange(1001, dtype=np.float32).reshape(1001, 1, 1)  # p1 = 10, p99 = 990
  out = T.NormalizeIntensity("auto").map(record(values, modality="MR"))["image"].ravel()
  np.testing.assert_allclose(out[[10, 500, 990]], [-1.0, 0.0, 1.0], atol=1e-6)
  assert out.min() == -1.0 and out.max() == 1.0  # tails are clipped
  constant = T.NormalizeIntensity("mr").map(record(np.full((4, 4, 1), 7.0)))["image"]
  assert np.all(constant == 0.0)


def test_uint8_and_auto_fallbacks():
  pixels = np.array([0.0, 127.5, 255.0]).reshape(3, 1, 1)
  out = T.NormalizeIntensity("uint8").map(record(pixels))["image"].ravel()
  np.testing.assert_allclose(out, [-1.0, 0.0, 1.0], atol=1e-6)
  assert T.resolve_intensity_mode("auto", "OT", pixels) == "uint8"
  assert T.resolve_intensity_mode("auto", "", pixels * 16) == "mr"
  assert T.resolve_intensity_mode("auto", "ct", pixels) == "ct"
  with pytest.raises(ValueError, match="xray.png.*'uint8' expects values in"):
    T.NormalizeIntensity("uint8").map(record(pixels * 16, path="xray.png"))
  with pytest.raises(ValueError, match="mode 'pet'"):
    T.NormalizeIntensity("pet")


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_image_is_an_error_naming_the_path(bad):
  image = np.zeros((4, 4, 1))
  image[1, 2] = bad
  with pytest.raises(ValueError, match="broken/ct_07.npy.*NaN or infinite"):
    T.NormalizeIntensity("auto").map(record(image, path="broken/ct_07.npy", modality="CT"))


# ================================================================ geometry
def gradient_image(shape):
  """Distinct values everywhere, so any crop or flip is visible."""
  return np.arange(np.prod(shape), dtype=np.float32).reshape(shape)


@pytest.mark.parametrize("in_shape,out_shape", [((40, 50, 1), (16, 16)),
                                                ((20, 24, 28, 2), (8, 8, 8))])
def test_random_resized_crop_shape_determinism_and_really_crops(in_shape, out_shape):
  rec = record(gradient_image(in_shape))
  crop = T.RandomResizedCrop(out_shape, scale=(0.1, 0.2))
  a, b = crop.random_map(rec, rng(1))["image"], crop.random_map(rec, rng(1))["image"]
  c = crop.random_map(rec, rng(2))["image"]
  assert a.shape == tuple(out_shape) + in_shape[-1:] and a.dtype == np.float32
  np.testing.assert_array_equal(a, b)
  assert not np.array_equal(a, c)
  whole = T.CenterResize(out_shape).map(rec)["image"]
  assert whole.shape == a.shape and not np.allclose(a, whole)
  # A box of 10-20% of the volume spans well under the image's value range.
  assert np.ptp(a) < 0.9 * np.ptp(whole)


def test_crop_box_respects_scale_and_pairwise_ratio():
  for dims in (2, 3):
    shape = np.array((60,) * dims)
    for seed in range(50):
      starts, sizes = T.sample_crop_box(shape, (0.3, 0.6), (3 / 4, 4 / 3), rng(seed))
      assert np.all(starts >= 0) and np.all(starts + sizes <= shape)
      assert 0.25 <= np.prod(sizes / shape) <= 0.65  # rounding of the sides
      ratios = sizes[None, :] / sizes[:, None]
      assert ratios.max() <= 4 / 3 * 1.1


def test_center_resize_matches_scipy_zoom():
  import scipy.ndimage
  image = np.random.default_rng(0).normal(size=(9, 17, 13, 2)).astype(np.float32)
  ours = T.resize_linear(image, (16, 8, 20))
  theirs = scipy.ndimage.zoom(image, (16 / 9, 8 / 17, 20 / 13, 1), order=1, mode="nearest",
                              grid_mode=True)
  np.testing.assert_allclose(ours, theirs, atol=1e-5)


@pytest.mark.parametrize("shape,axes", [((6, 7, 1), (0, 1)), ((4, 5, 6, 1), (0, 2))])
def test_flips_are_exact_flips_of_the_listed_axes(shape, axes):
  image = gradient_image(shape)
  expected = {(): image}
  for axis in axes:
    expected[(axis,)] = np.flip(image, axis)
  expected[axes] = np.flip(image, axes)
  seen = set()
  for seed in range(32):
    out = T.RandomFlip(axes).random_map(record(image), rng(seed))["image"]
    matches = [k for k, v in expected.items() if np.array_equal(out, v)]
    assert len(matches) == 1
    seen.add(matches[0])
  assert seen == set(expected)  # every combination occurs
  with pytest.raises(ValueError, match="flip axes"):
    T.RandomFlip((2,)).random_map(record(np.zeros((4, 4, 1))), rng(0))


def test_intensity_jitter_is_small_seeded_and_affine():
  image = np.random.default_rng(0).uniform(-1, 1, size=(8, 8, 1)).astype(np.float32)
  jitter = T.IntensityJitter(brightness=0.1, contrast=0.2)
  a = jitter.random_map(record(image), rng(3))["image"]
  np.testing.assert_array_equal(a, jitter.random_map(record(image), rng(3))["image"])
  gain, shift = np.polyfit(image.ravel(), a.ravel(), 1)
  assert 0.8 <= gain <= 1.2 and abs(a.mean() - image.mean()) <= 0.1 + 1e-6
  assert abs(gain - 1) > 1e-4 or abs(shift) > 1e-4
  identity = T.IntensityJitter(0.0, 0.0).random_map(record(image), rng(3))["image"]
  np.testing.assert_allclose(identity, image, atol=1e-6)


# ================================================================ examples and masking
def test_to_imaging_example_channel_rules():
  gray, rgb = np.random.default_rng(0).normal(size=(2, 4, 4, 1)), np.zeros((4, 4, 3))
  out = T.ToImagingExample(3).map(record(gray[0]))
  assert out[batch.IMAGE].shape == (4, 4, 3) and out[batch.IMAGE].dtype == np.float32
  assert all(np.array_equal(out[batch.IMAGE][..., c], gray[0][..., 0].astype(np.float32))
             for c in range(3))
  assert out[batch.VALID].dtype == np.bool_ and out[batch.VALID].shape == ()
  assert out[batch.VALID]
  assert set(out) == {batch.IMAGE, batch.VALID}  # nothing outside the batch contract
  assert T.ToImagingExample(3).map(record(rgb))[batch.IMAGE].shape == (4, 4, 3)
  assert T.ToImagingExample(1).map(record(gray[1]))[batch.IMAGE].shape == (4, 4, 1)
  with pytest.raises(ValueError, match="photo.png.*3 channel.*channels=1"):
    T.ToImagingExample(1).map(record(rgb, path="photo.png"))
  with pytest.raises(ValueError, match="two.npy.*2 channel.*channels=3"):
    T.ToImagingExample(3).map(record(np.zeros((4, 4, 2)), path="two.npy"))
  with pytest.raises(ValueError, match="small.npy.*spatial shape"):
    T.ToImagingExample(1, image_shape=(8, 8)).map(record(gray[0], path="small.npy"))


@pytest.mark.parametrize("total,ratio", [(64, 0.75), (512, 0.9), (4, 0.5)])
def test_mask_patches_split_is_disjoint_complete_sorted_and_seeded(total, ratio):
  mask = MaskPatches(total, ratio)
  out = mask.random_map({batch.IMAGE: np.zeros(1)}, rng(5))
  visible, masked = out[batch.IMAGE_VISIBLE], out[batch.IMAGE_MASKED]
  num_visible = batch.num_visible_patches(total, ratio)
  assert visible.shape == (num_visible,) and masked.shape == (total - num_visible,)
  assert visible.dtype == masked.dtype == np.int32
  assert np.all(np.diff(visible) > 0) and np.all(np.diff(masked) > 0)
  assert not set(visible.tolist()) & set(masked.tolist())
  assert sorted(visible.tolist() + masked.tolist()) == list(range(total))
  again = mask.random_map({batch.IMAGE: np.zeros(1)}, rng(5))
  np.testing.assert_array_equal(again[batch.IMAGE_VISIBLE], visible)
  others = [mask.random_map({}, rng(s))[batch.IMAGE_VISIBLE] for s in range(6, 12)]
  assert any(not np.array_equal(o, visible) for o in others)


# ================================================================ settings
@pytest.mark.parametrize("overrides,message", [
    (dict(image_size=(18, 16)), "image_size.*multiple of patch_size"),
    (dict(image_size=(16, 16, 16)), "image_size.*spatial_dims=2"),
    (dict(spatial_dims=3), "image_size.*3 sizes"),
    (dict(mask_ratio=1.0), "mask_ratio.*in \\(0, 1\\)"),
    (dict(mask_ratio=0.0), "mask_ratio"),
    (dict(intensity="pet"), "intensity.*'pet'"),
    (dict(spacing=(1.0,)), "spacing"),
    (dict(flip_axes=(2,)), "flip_axes"),
    (dict(on_error="ignore"), "on_error"),
    (dict(crop_scale=(0.0, 1.0)), "crop_scale"),
])
def test_settings_errors_name_the_field(overrides, message):
  with pytest.raises(ValueError, match=f"config.data.imaging.{message}"):
    imaging.ImagingSettings.from_config(imaging_cfg(**overrides))


def test_unknown_objective_names_the_allowed_ones(tmp_path):
  with pytest.raises(ValueError, match=r"^ImagingData: cannot make 'masked' targets; it makes \['masked_patches'\]$"):
    imaging.ImagingData.from_config(imaging_cfg(), targets="masked", artifacts_dir=tmp_path)


# ================================================================ through the pipeline
class HandBuiltDataset:
  """The parts of sources.imaging.ImagingDataset that ImagingData uses, over dicts."""
  label_names = ("lesion",)

  def __init__(self, records_by_split):
    self.records = records_by_split
    self.splits = {k: np.arange(len(v)) for k, v in records_by_split.items()}
    self.stats = {"images": sum(len(v) for v in records_by_split.values()), "skipped": 0}

  def source(self, split):
    return self.records[split]  # a list of dicts is a valid Grain source


def hand_built_records(num, spatial_shape, seed=0):
  rng_ = np.random.default_rng(seed)
  out = []
  for i in range(num):
    shape = tuple(int(s + rng_.integers(-3, 4)) for s in spatial_shape) + (1,)
    modality = ("CT", "MR", "OT")[i % 3]
    image = rng_.normal(0, 1, size=shape) * (300 if modality == "CT" else 40) + 50
    if modality == "OT":
      image = np.clip(image, 0, 255)
    spacing = rng_.uniform(0.8, 1.2, size=len(spatial_shape))
    out.append(record(image, path=f"img_{i:03d}.npy", spacing=spacing, modality=modality,
                      labels=(float(i % 2),)))
  return out


@pytest.fixture(scope="module", params=[2, 3], ids=["2d", "3d"])
def hand_built_data(request):
  dims = request.param
  cfg = imaging_cfg(spatial_dims=dims, image_size=(8,) * dims, patch_size=(4,) * dims,
                    spacing=(1.0,) * dims, flip_axes=tuple(range(dims)))
  dataset = HandBuiltDataset({"train": hand_built_records(12, (12,) * dims, seed=1),
                              "tuning": hand_built_records(6, (12,) * dims, seed=2)})
  return imaging.ImagingData(dataset, imaging.ImagingSettings.from_config(cfg), targets="masked_patches")


def take(iterator, n):
  return [next(iterator) for _ in range(n)]


def assert_batches_equal(a, b):
  for x, y in zip(a, b):
    for name in x["imaging"]:
      np.testing.assert_array_equal(x["imaging"][name], y["imaging"][name], err_msg=name)


def test_train_pipeline_matches_spec_and_resumes(hand_built_data):
  data = hand_built_data
  spec = data.example_spec()[data.name]
  dataset = pipeline.make_train_dataset(
      data.source("train"), data.transforms(train=True),
      global_batch_size=4, seed=7, process_index=0, process_count=1)
  iterator = pipeline.make_iterator(dataset)
  first = take(iterator, 2)
  for host_batch in first:
    assert set(host_batch) == {"imaging"}
    for i in range(4):
      batch.check_example({k: v[i] for k, v in host_batch["imaging"].items()}, spec, "batch")
    assert host_batch["imaging"][batch.VALID].all()
  state = iterator.get_state()
  expected = take(iterator, 3)  # crosses the epoch boundary (12 records, batches of 4)
  resumed = pipeline.make_iterator(dataset)
  resumed.set_state(state)
  assert_batches_equal(take(resumed, 3), expected)


def test_eval_pipeline_pads_and_masks_repeatably(hand_built_data):
  data = hand_built_data
  def eval_batches():
    dataset = pipeline.make_eval_dataset(
        data.source("tuning"), data.transforms(train=False),
        global_batch_size=4, seed=7, example_spec=data.example_spec(), process_index=0,
        process_count=1)
    return list(pipeline.make_iterator(dataset))
  batches = eval_batches()
  assert len(batches) == 2
  valid = np.concatenate([b["imaging"][batch.VALID] for b in batches])
  assert valid.tolist() == [True] * 6 + [False] * 2
  assert not batches[1]["imaging"][batch.IMAGE][2:].any()
  assert_batches_equal(eval_batches(), batches)


def test_transforms_pickle_for_worker_processes(hand_built_data):
  import pickle
  for train in (True, False):
    transforms = hand_built_data.transforms(train)
    restored = pickle.loads(pickle.dumps(transforms))
    assert [type(t) for t in restored] == [type(t) for t in transforms]


def test_model_info_summary_and_labels(hand_built_data):
  data = hand_built_data
  dims = data.settings.spatial_dims
  info = data.model_info()[data.name]
  assert info == {"image_shape": (8,) * dims, "channels": 1, "patch_shape": (4,) * dims,
                  "num_patches": 2 ** dims, "spatial_dims": dims}
  assert info["num_patches"] == batch.num_patches(info["image_shape"], info["patch_shape"])
  summary = data.summary()
  assert summary["items_train"] == 12 and summary["items_tuning"] == 6
  assert summary["imaging_images"] == 18 and summary["num_patches"] == 2 ** dims
  values, names = data.labels("train")
  assert names == ("lesion",) and values.shape == (12, 1) and values.dtype == np.float32
  assert values[:, 0].tolist() == [float(i % 2) for i in range(12)]


# ================================================================ synthetic data, end to end
@pytest.mark.parametrize("dims,size", [(2, 32), (3, 16)], ids=["2d", "3d"])
def test_from_config_on_synthetic_images_end_to_end(tmp_path, dims, size):
  cfg = imaging_cfg(spatial_dims=dims, image_size=(size,) * dims, patch_size=(8,) * dims,
                    flip_axes=tuple(range(dims)), synthetic_subjects=24)
  data = imaging.ImagingData.from_config(cfg, targets="masked_patches", artifacts_dir=tmp_path)
  assert (tmp_path / imaging.SYNTHETIC_DIRNAME).is_dir()
  assert data.summary()["items_train"] > 0
  spec = data.example_spec()[data.name]
  train = pipeline.make_iterator(pipeline.make_train_dataset(
      data.source("train"), data.transforms(train=True),
      global_batch_size=4, seed=0, process_index=0, process_count=1))
  host_batch = next(train)["imaging"]
  for name, (shape, dtype) in spec.items():
    assert host_batch[name].shape == (4,) + shape and host_batch[name].dtype == dtype, name
  assert -1.5 <= host_batch[batch.IMAGE].min() and host_batch[batch.IMAGE].max() <= 1.5
  assert np.ptp(host_batch[batch.IMAGE]) > 0.1  # real content, not a constant
  values, names = data.labels("train")
  assert values.shape == (len(data.source("train")), len(names))
  again = imaging.ImagingData.from_config(cfg, targets="masked_patches", artifacts_dir=tmp_path)
  assert again.summary() == data.summary()  # reuses the generated images


# ================================================================ augmentation in the step
@pytest.mark.parametrize("shape,out", [((20, 26, 2), (8, 12)), ((10, 12, 14, 1), (6, 8, 4))])
def test_device_resize_and_flips_match_the_host_transforms(shape, out):
  image = np.random.default_rng(3).normal(size=shape).astype(np.float32)
  resize = jax.jit(device_augment.resize_box, static_argnums=3)
  for starts, sizes in (((0,) * len(out), shape[:-1]), ((3,) * len(out), (5,) * len(out))):
    host = T.resize_linear(image, out, starts, sizes)
    args = (jnp.asarray(starts, jnp.float32), jnp.asarray(sizes, jnp.float32))
    np.testing.assert_allclose(resize(image, *args, out), host, atol=1e-5)
    flips = np.arange(len(out)) % 2 == 0
    np.testing.assert_allclose(resize(image, *args, out, jnp.asarray(flips)),
                               np.flip(host, tuple(np.flatnonzero(flips))), atol=1e-5)


def test_device_crop_boxes_stay_inside_and_cover_the_scale():
  boxes = jax.jit(jax.vmap(lambda k: device_augment.crop_box(k, (60, 60, 60), (0.3, 0.6))))
  starts, sizes = np.asarray(boxes(jax.random.split(jax.random.key(0), 400)))
  assert (starts >= 0).all() and (starts + sizes <= 60).all() and (sizes >= 1).all()
  fractions = np.prod(sizes / 60, axis=1)
  assert fractions.min() >= 0.25 and fractions.max() <= 0.65  # rounding of the sides
  assert fractions.mean() == pytest.approx(0.45, abs=0.02)
  assert (sizes.max(1) / sizes.min(1)).max() <= 4 / 3 * 1.1
  assert len(np.unique(starts[:, 0])) > 10


@pytest.mark.parametrize("shape,scale,ratio", [((60, 60), (0.2, 0.9), (3 / 4, 4 / 3)),
                                               ((40, 50, 60), (0.3, 0.8), (0.8, 1.5))])
def test_device_crop_boxes_follow_the_host_s_law(shape, scale, ratio):
  """The same distribution of box volumes and side ratios as `sample_crop_box` (other numbers)."""
  draws = 2000
  boxes = jax.jit(jax.vmap(lambda k: device_augment.crop_box(k, shape, scale, ratio)))
  device_sizes = np.asarray(boxes(jax.random.split(jax.random.key(1), draws))[1])
  host_sizes = np.stack([T.sample_crop_box(shape, scale, ratio, rng(seed))[1] for seed in range(draws)])
  for sizes in (device_sizes, host_sizes):
    assert (sizes <= np.asarray(shape)).all()
  def features(sizes):
    relative = sizes / np.asarray(shape)
    return [np.prod(relative, axis=1)] + [relative[:, j] / relative[:, i] for i in range(len(shape))
                                          for j in range(i + 1, len(shape))]
  for ours, theirs in zip(features(device_sizes), features(host_sizes)):
    np.testing.assert_allclose(np.quantile(ours, [0.1, 0.5, 0.9]), np.quantile(theirs, [0.1, 0.5, 0.9]),
                               rtol=0.06)


def test_device_augment_is_seeded_and_the_identity_without_randomness():
  augment = device_augment.DeviceAugment("imaging", (16, 16), (0.3, 0.6), (0, 1), 0.1, 0.1)
  images = np.random.default_rng(0).normal(size=(4, 24, 24, 1)).astype(np.float32)
  seeds = np.array([1, 2, 1, 3], np.uint32)
  batch_in = {"imaging": {batch.IMAGE: images, device_augment.AUGMENT_SEED: seeds, batch.VALID: np.ones(4, bool)}}
  out = jax.jit(augment)(batch_in)["imaging"]
  assert set(out) == {batch.IMAGE, batch.VALID} and out[batch.IMAGE].shape == (4, 16, 16, 1)
  same_image = np.stack([images[0]] * 4)
  repeated = np.asarray(jax.jit(augment)({"imaging": {**batch_in["imaging"], batch.IMAGE: same_image}})
                        ["imaging"][batch.IMAGE])
  np.testing.assert_array_equal(repeated[0], repeated[2])  # the same seed draws the same augmentation
  assert not np.allclose(repeated[0], repeated[1]) and not np.allclose(repeated[1], repeated[3])
  plain = device_augment.DeviceAugment("imaging", (24, 24), (1.0, 1.0), (), 0.0, 0.0)
  np.testing.assert_allclose(jax.jit(plain)(batch_in)["imaging"][batch.IMAGE], images, atol=1e-5)
  with pytest.raises(ValueError, match="augment_seed"):
    augment({"imaging": {batch.IMAGE: images}})
  assert augment({"ehr": {}}) == {"ehr": {}}


def test_device_augmentation_stream_holds_canvases_and_seeds_by_position(hand_built_data):
  s = hand_built_data.settings
  data = imaging.ImagingData(hand_built_data.dataset, dataclasses.replace(s, augment="device",
                                                                          canvas_size=(10,) * s.spatial_dims),
                             targets="masked_patches")
  make = lambda index, count: pipeline.make_iterator(pipeline.make_train_dataset(
      data.source("train"), data.transforms(train=True), global_batch_size=4, seed=7, process_index=index,
      process_count=count))
  whole = next(make(0, 1))["imaging"]
  assert whole[batch.IMAGE].shape == (4,) + (10,) * s.spatial_dims + (1,)
  assert whole[device_augment.AUGMENT_SEED].dtype == np.uint32 and len(set(whole["augment_seed"].tolist())) == 4
  halves = [next(make(i, 2))["imaging"] for i in range(2)]  # the same seeds under two processes
  np.testing.assert_array_equal(np.stack([h["augment_seed"][k] for k in range(2) for h in halves]),
                                whole["augment_seed"])
  augmented = jax.jit(data.device_transform())({"imaging": whole})["imaging"]
  spec = data.example_spec()["imaging"]
  for i in range(4):
    batch.check_example({k: np.asarray(v[i]) for k, v in augmented.items()}, spec, "augmented batch")
  assert hand_built_data.device_transform() is None
  assert data.transforms(train=False) and all(not isinstance(t, device_augment.AugmentSeed)
                                              for t in data.transforms(train=False))
  with pytest.raises(ValueError, match="config.data.imaging.augment is 'gpu'"):
    imaging.ImagingSettings.from_config(imaging_cfg(augment="gpu"))
  spec = data.train_example_spec()["imaging"]  # what the pipeline yields, before the step's transform
  for i in range(4):
    batch.check_example({k: np.asarray(v[i]) for k, v in whole.items()}, spec, "canvas batch")
  assert hand_built_data.train_example_spec() == hand_built_data.example_spec()


def test_from_config_names_the_files_skipped_at_indexing_beside_the_run(tmp_path):
  images = tmp_path / "images"
  images.mkdir()
  volume = np.random.default_rng(0).normal(size=(16, 16, 16)).astype(np.float32)
  for name, array in (("a", volume), ("b", volume + 1), ("flat", volume[:, :, 0])):
    nib.save(nib.Nifti1Image(array, np.eye(4)), images / f"{name}.nii.gz")
  cfg = imaging_cfg(path=str(images), spatial_dims=3, image_size=(8, 8, 8), patch_size=(4, 4, 4),
                    flip_axes=(0,), on_error="skip")
  data = imaging.ImagingData.from_config(cfg, targets="masked_patches", artifacts_dir=tmp_path / "run" / "artifacts")
  assert data.summary()["imaging_skipped_rank"] == 1 and data.summary()["imaging_items"] == 2
  lines = (tmp_path / "run" / "skipped_at_indexing.csv").read_text().splitlines()
  assert lines[0] == "path,reason,message" and len(lines) == 2
  assert lines[1].startswith(f"{images / 'flat.nii.gz'},rank,")
