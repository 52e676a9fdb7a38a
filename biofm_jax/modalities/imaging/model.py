"""The imaging modality in a model: ViT patches in, the MAE decoder's reconstruction out
(the decoder half is shared with ECG: `models/patch_mae.py`).

`model_modality(config, model_info)` is the registry's model entry (`registry.py`).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

import jax
import ml_collections

from biofm_jax.data import batch as B
from biofm_jax.modalities.imaging.encoder import ImagingEncoder
from biofm_jax.models.layers import TransformerConfig
from biofm_jax.models.description import Encoded
from biofm_jax.models.patch_mae import PatchMAEModality, mae_half
from biofm_jax.models.patches import grid_shape


@dataclasses.dataclass(frozen=True)
class ImagingModality(PatchMAEModality):
  """2D/3D images as ViT patches; MAE reconstruction of the masked patches when the batch
  carries MAE patch ids, otherwise every patch is encoded (embeddings, probes)."""
  image_shape: tuple[int, ...]
  patch_shape: tuple[int, ...]
  name: str = "imaging"
  position: str = "sincos"

  def encode(self, cfg: TransformerConfig, example: Mapping[str, jax.Array], *, train: bool) -> Encoded:
    tokens, mask, positions, patches = ImagingEncoder(cfg, self.image_shape, self.patch_shape,
                                                      name="imaging_encoder")(example, train=train)
    return Encoded(tokens, mask, positions, patches, prefix_tokens=int(cfg.cls_token))


def model_modality(config: ml_collections.ConfigDict, info: Mapping[str, Any]) -> ImagingModality:
  image_shape, patch_shape = tuple(info["image_shape"]), tuple(info["patch_shape"])
  mae = mae_half(config, grid_shape(image_shape, patch_shape), info["channels"] * math.prod(patch_shape),
                 config.data.imaging.mask_ratio, masked_key=B.IMAGE_MASKED, visible_key=B.IMAGE_VISIBLE)
  return ImagingModality(mae=mae, image_shape=image_shape, patch_shape=patch_shape)
