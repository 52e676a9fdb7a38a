"""Masked-autoencoder pre-training of a 3D ViT on CT / MR volumes.

Run:
  python experiments/pretrain.py --config=configs/imaging_mae3d.py:tiny --workdir=runs/mae3d \
      --config.data.imaging.path=/path/to/volumes --config.data.imaging.spacing="(1.5, 1.5, 1.5)"

Same settings and presets as `imaging_mae.py`, with 3D patches (cubes) over [D, H, W].
"""
import importlib.util
import pathlib

_spec = importlib.util.spec_from_file_location("imaging_mae", pathlib.Path(__file__).with_name("imaging_mae.py"))
imaging_mae = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(imaging_mae)


def get_config(arg=None):
  return imaging_mae.imaging_config(arg or "tiny", spatial_dims=3)
