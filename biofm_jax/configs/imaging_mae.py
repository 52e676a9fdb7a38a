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
from biofm_jax.config import apply_model_size, base_config

MODALITY = "imaging"  # the fusion config reads this modality's sections here


def imaging_config(preset: str, spatial_dims: int):
  """The shared body of the 2D and 3D imaging MAE configs."""
  config = base_config()
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
  config.model.position = "sincos"
  config.model.decoder = dict(num_layers=1, embed_dim=32, num_heads=2, mlp_dim=64)
  config.objective = dict(name="mae", norm_pix_loss=True)
  config.train.update(weight_decay=0.05, adam_b2=0.95)

  if preset == "tiny":
    apply_model_size(config, "tiny")
    size = 32 if spatial_dims == 2 else 16
    config.data.imaging.update(image_size=(size,) * spatial_dims, patch_size=(size // 4,) * spatial_dims,
                               synthetic_subjects=120 if spatial_dims == 2 else 60)
    config.data.batch_size = 16
    config.train.update(num_steps=20, warmup_steps=5, learning_rate=3e-3, log_every=5, eval_every=10,
                        eval_batches=2)
    config.checkpoint.update(every_steps=10, keep=2)
  elif preset == "demo":
    apply_model_size(config, "small")
    config.model.decoder.update(num_layers=2, embed_dim=64, num_heads=2, mlp_dim=256)
    config.data.imaging.update(image_size=(64,) * spatial_dims if spatial_dims == 2 else (32,) * 3,
                               patch_size=(8,) * spatial_dims, synthetic_subjects=400)
    config.data.batch_size = 32
    config.train.update(num_steps=400, warmup_steps=40, learning_rate=1.5e-3, log_every=25, eval_every=200)
    config.checkpoint.update(every_steps=200)
  elif preset == "base":
    apply_model_size(config, "base")
    config.model.update(dtype="bfloat16", remat="dots_with_no_batch_dims_saveable")
    config.model.decoder.update(num_layers=8, embed_dim=512, num_heads=16, mlp_dim=2048)
    config.data.imaging.update(image_size=(224,) * spatial_dims if spatial_dims == 2 else (96,) * 3,
                               patch_size=(16,) * spatial_dims)
    config.data.batch_size = 256
    config.train.update(num_steps=100_000, warmup_steps=5000, learning_rate=1.5e-4, log_every=50,
                        eval_every=2000, eval_batches=20)
    config.checkpoint.update(every_steps=2000)
  elif preset in ("large", "1b", "7b"):  # FSDP over every device: size them with experiments/compile.py
    apply_model_size(config, preset)
    config.model.decoder.update(num_layers=8, embed_dim=512, num_heads=16, mlp_dim=2048)
    config.data.imaging.update(image_size=(224,) * spatial_dims if spatial_dims == 2 else (128,) * 3,
                               patch_size=(16,) * spatial_dims)
    config.data.batch_size = 1024 if spatial_dims == 2 else 256
    config.train.update(num_steps=200_000, warmup_steps=10_000, learning_rate=1.5e-4, log_every=50,
                        eval_every=5000, eval_batches=20)
    config.checkpoint.update(every_steps=2000)
  else:
    raise ValueError(f"unknown preset {preset!r}: choose tiny, demo, base, large, 1b or 7b")
  return config


def get_config(arg=None):
  return imaging_config(arg or "tiny", spatial_dims=2)
