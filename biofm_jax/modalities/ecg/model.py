"""The ECG modality in a model: per-lead 1D patches in (ST-MEM style), the MAE decoder's
reconstruction of the masked patches out (the decoder half is shared with imaging:
`models/patch_mae.py`).

Each lead is cut into patches of `patch_size` samples; a patch becomes a token by one
linear map shared by all leads, plus a learned embedding of its lead and fixed sin-cos
positions over the (lead, time) grid. Tokens of absent leads, and all-padding patches,
are masked out of attention. `model_modality(config, model_info)` is the registry's model
entry (`modalities/registry.py`).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import einops
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from biofm_jax.modalities.ecg import data as ecg_data
from biofm_jax.models.layers import TransformerConfig, embed_init, kernel_init, zeros_init
from biofm_jax.models.description import Encoded
from biofm_jax.models.patch_mae import PatchMAEModality, mae_half
from biofm_jax.models.patches import sincos_position_embedding


class ECGEncoder(nn.Module):
  """An ECG batch -> (tokens, mask, positions, patches); with MAE ids only visible tokens."""
  cfg: TransformerConfig
  num_leads: int
  patch_size: int

  @nn.compact
  def __call__(self, ecg: Mapping[str, jax.Array], *, train: bool):
    cfg = self.cfg
    patches = einops.rearrange(ecg[ecg_data.SIGNAL], "b (n p) l -> b (l n) p", p=self.patch_size)
    grid = (self.num_leads, patches.shape[1] // self.num_leads)
    tokens = nn.Dense(cfg.embed_dim, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
                      kernel_init=kernel_init(("patch", "embed")), bias_init=zeros_init(("embed",)),
                      name="patch_embedding")(patches)
    leads = self.param("lead_embedding", embed_init((None, "embed")), (self.num_leads, cfg.embed_dim),
                       cfg.param_dtype)
    position = jnp.asarray(sincos_position_embedding(grid, cfg.embed_dim)) + jnp.repeat(leads, grid[1], axis=0)
    tokens = tokens + position.astype(cfg.dtype)[None]
    mask = ecg[ecg_data.TOKEN_PRESENT]
    positions = jnp.broadcast_to(jnp.arange(patches.shape[1], dtype=jnp.int32), patches.shape[:2])
    if ecg_data.VISIBLE in ecg:
      visible = ecg[ecg_data.VISIBLE]
      tokens = jnp.take_along_axis(tokens, visible[..., None], axis=1)
      mask = jnp.take_along_axis(mask, visible, axis=1)
      positions = visible
    tokens = nn.Dropout(cfg.dropout_rate, deterministic=not train)(tokens)
    return tokens, mask, positions, patches


@dataclasses.dataclass(frozen=True)
class ECGModality(PatchMAEModality):
  """12-lead (or any lead set) ECG waveforms as per-lead patch tokens."""
  num_leads: int
  patch_size: int
  name: str = ecg_data.NAME
  position: str = "sincos"

  def encode(self, cfg: TransformerConfig, example: Mapping[str, jax.Array], *, train: bool) -> Encoded:
    if cfg.position == "rope":
      raise ValueError("model.position 'rope' is for token sequences; ECG patches use 'sincos' or 'learned'")
    tokens, mask, positions, patches = ECGEncoder(cfg, self.num_leads, self.patch_size,
                                                  name="ecg_encoder")(example, train=train)
    return Encoded(tokens, mask, positions, patches)


def model_modality(config: ml_collections.ConfigDict, info: Mapping[str, Any]) -> ECGModality:
  mae = mae_half(config, (info["num_leads"], info["patches_per_lead"]), info["patch_size"],
                 config.data.ecg.mask_ratio, masked_key=ecg_data.MASKED, visible_key=ecg_data.VISIBLE)
  return ECGModality(mae=mae, num_leads=info["num_leads"], patch_size=info["patch_size"])
