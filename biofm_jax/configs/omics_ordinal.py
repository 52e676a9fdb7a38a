"""Masked-expression pre-training scored as ordered bins (`objectives/ordinal_values.py`).

The data, model and presets are `omics_expression.py`'s (binned tokenization); the hidden
bins are scored by the ranked probability score instead of cross-entropy.

  python experiments/pretrain.py --config=configs/omics_ordinal.py:tiny --workdir=runs/ordinal
"""
from biofm_jax.configs import omics_expression


def get_config(arg=None):
  config = omics_expression.get_config(arg)
  if config.data.omics.tokenization != "binned":
    raise ValueError(f"omics_ordinal: preset {arg!r} tokenizes by rank; ordered bins need 'binned'")
  config.objective = dict(name="masked_ordinal")
  return config
