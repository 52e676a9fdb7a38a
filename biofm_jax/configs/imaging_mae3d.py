"""Masked-autoencoder pre-training of a 3D ViT on CT / MR volumes.

Run:
  python experiments/pretrain.py --config=configs/imaging_mae3d.py:tiny --workdir=runs/mae3d \
      --config.data.imaging.path=/path/to/volumes --config.data.imaging.spacing="(1.5, 1.5, 1.5)"

Same settings and presets as `imaging_mae.py`, with 3D patches (cubes) over [D, H, W].
"""
from biofm_jax.configs import imaging_mae


def get_config(arg=None):
  return imaging_mae.imaging_config(arg or "tiny", spatial_dims=3)
