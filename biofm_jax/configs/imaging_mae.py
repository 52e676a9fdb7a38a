"""Masked-autoencoder pre-training of a 2D ViT on medical images (RETFound-style MAE).

Run:
  python experiments/pretrain.py --config=configs/imaging_mae.py:tiny --workdir=runs/mae2d \
      --config.data.imaging.path=/path/to/images_or_manifest.csv

`data.imaging.path` is a directory (DICOM, NIfTI, PNG/JPEG, .npy; scanned recursively)
or a manifest CSV with `subject_id`, `path` and optional `split`, `modality` and label
columns. Empty: a synthetic dataset with planted lesions is generated in the workdir.
Presets: tiny (CPU tests), demo (a few minutes on a CPU), base (ViT-B/16 at 224 x 224),
large / 1b / 7b (FSDP over every device, bf16; size them first with experiments/compile.py).
"""
from biofm_jax.config import FSDP_SIZES, mae_config

MODALITY = "imaging"  # the fusion config reads this modality's sections here


def imaging_config(preset: str, spatial_dims: int):
  """The shared body of the 2D and 3D imaging MAE configs (the MAE recipe: `config.mae_config`)."""
  config = mae_config(preset, presets=("tiny", "demo", "base") + FSDP_SIZES)
  config.data.imaging = dict(
      path="",
      spatial_dims=spatial_dims,
      image_size=(64,) * spatial_dims,
      patch_size=(8,) * spatial_dims,
      channels=1,
      spacing=(),  # target voxel spacing in mm; () keeps each image's native spacing
      intensity="auto",  # "auto" by modality, or "ct", "mr", "uint8"
      ct_window=(40.0, 400.0),  # centre and width in Hounsfield units
      crop_scale=(0.5, 1.0),
      flip_axes=tuple(range(spatial_dims)),
      brightness=0.1, contrast=0.1,
      # "device": crop, flips and jitter run batched in the jitted train step; the host only
      # reads and normalises to canvas_size (() = image_size) and draws a seed per image.
      # Crops come from the canvas: a canvas of image_size / sqrt(min crop_scale) (or the
      # sources' own size) keeps their resolution as host crops from the source do.
      augment="host", canvas_size=(),
      mask_ratio=0.75,
      on_error="raise",  # "skip": bad images dropped at indexing, unreadable ones replaced at read time
      synthetic_subjects=200, synthetic_seed=0)
  if preset == "tiny":
    size = 32 if spatial_dims == 2 else 16
    config.data.imaging.update(image_size=(size,) * spatial_dims, patch_size=(size // 4,) * spatial_dims,
                               synthetic_subjects=120 if spatial_dims == 2 else 60)
  elif preset == "demo":
    config.data.imaging.update(image_size=(64,) * spatial_dims if spatial_dims == 2 else (32,) * 3,
                               patch_size=(8,) * spatial_dims, synthetic_subjects=400)
  elif preset == "base":
    config.data.imaging.update(image_size=(224,) * spatial_dims if spatial_dims == 2 else (96,) * 3,
                               patch_size=(16,) * spatial_dims)
  else:  # FSDP over every device: size them with experiments/compile.py
    config.data.imaging.update(image_size=(224,) * spatial_dims if spatial_dims == 2 else (128,) * 3,
                               patch_size=(16,) * spatial_dims)
    config.data.batch_size = 1024 if spatial_dims == 2 else 256
  return config


def get_config(arg=None):
  return imaging_config(arg or "tiny", spatial_dims=2)
