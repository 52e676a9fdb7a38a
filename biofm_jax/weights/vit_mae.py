"""ViT-MAE (`transformers.ViTMAEForPreTraining` / `ViTMAEModel`, `facebook/vit-mae-base` ...,
Apache-2.0; RETFound's recipe): its encoder as a biofm_jax 2-D imaging MAE.

The architecture, in the options of our shared block: a CLS token before the patches,
pre-LayerNorm blocks (`layer_norm_eps`, 1e-12) with biases, exact GELU, a final LayerNorm.
The patch embedding is ViT's convolution with kernel = stride = patch, which is our dense
layer over each patch's pixels once its weight [D, C, p, p] is laid out in our patch order
(rows, columns, channels). The fixed 2-D sin-cos table, whose axis order differs from
`models/patches.py`'s, is loaded as the position table (`model.position="learned"`, CLS in
row 0), so the same pixels give the same tokens.

The decoder is not imported: fine-tuning and probing use the encoder (as RETFound's
released weights hold only it), and continued MAE pre-training starts a new decoder of
the folder's `decoder_*` shape. Images are channels-last here ([B, H, W, C]) and channels-
first in torch ([B, C, H, W]); the pixels are the same.
"""
from __future__ import annotations

from typing import Any

import ml_collections
import numpy as np

from biofm_jax.configs import imaging_mae
from biofm_jax.weights.conversion import Rule, layer_norm, layer_rules

NAME = "vit_mae"
# The decoder (not imported: see the module docstring).
IGNORED = (r"decoder\..*",)
FRESH = (("decoder",),)  # our parameters a new run initialises rather than imports


def check_config(hf: dict[str, Any], where: str) -> None:
  if hf.get("model_type") != "vit_mae":
    raise ValueError(f"{where}: model_type {hf.get('model_type')!r}; ViT-MAE folders have 'vit_mae'")
  if hf.get("hidden_act", "gelu") != "gelu":
    raise ValueError(f"{where}: hidden_act={hf['hidden_act']!r}; ViT-MAE import supports 'gelu' only")
  if not hf.get("qkv_bias", True):
    raise ValueError(f"{where}: qkv_bias=false; ViT-MAE import supports biased attention projections only")
  for field in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "image_size",
                "patch_size", "num_channels"):
    if not isinstance(hf.get(field), int):
      raise ValueError(f"{where}: field {field!r} is missing or not an integer")
  if hf["image_size"] % hf["patch_size"]:
    raise ValueError(f"{where}: image_size {hf['image_size']} is not a multiple of patch_size {hf['patch_size']}")


def base_config(hf: dict[str, Any]) -> ml_collections.ConfigDict:
  """A 2-D imaging MAE config (configs/imaging_mae.py:tiny) with the architecture and image
  geometry of `hf`, and a decoder of its `decoder_*` shape."""
  config = imaging_mae.get_config("tiny")
  config.model.update(num_layers=hf["num_hidden_layers"], embed_dim=hf["hidden_size"],
                      num_heads=hf["num_attention_heads"], head_dim=0, mlp_dim=hf["intermediate_size"],
                      position="learned", norm="layernorm", bias=True, activation="gelu",
                      norm_eps=float(hf.get("layer_norm_eps", 1e-12)), norm_position="pre", final_norm=True,
                      cls_token=True)
  config.model.decoder.update(num_layers=hf.get("decoder_num_hidden_layers", 8),
                              embed_dim=hf.get("decoder_hidden_size", 512),
                              num_heads=hf.get("decoder_num_attention_heads", 16),
                              mlp_dim=hf.get("decoder_intermediate_size", 2048))
  size, patch = hf["image_size"], hf["patch_size"]
  config.data.imaging.update(image_size=(size, size), patch_size=(patch, patch), channels=hf["num_channels"])
  config.data.imaging.mask_ratio = float(hf.get("mask_ratio", 0.75))
  config.objective.norm_pix_loss = bool(hf.get("norm_pix_loss", False))
  return config


def rules(hf: dict[str, Any], prefix: str) -> list[Rule]:
  """Our parameter paths <- ViT-MAE's encoder tensors (`prefix` "vit." in a pre-training
  folder, "" in a ViTMAEModel folder)."""
  d, f, h = hf["hidden_size"], hf["intermediate_size"], hf["num_attention_heads"]
  c, p = hf["num_channels"], hf["patch_size"]
  num_patches = (hf["image_size"] // p) ** 2
  layer = prefix + "encoder.layer.{layer}."
  encoder = ("imaging_encoder",)

  def norm(path, source):
    return layer_norm(path, source, d)

  def patch_kernel(w):  # conv [D, C, p, p] -> our dense kernel over (row, column, channel) pixels
    return np.ascontiguousarray(w.transpose(2, 3, 1, 0).reshape(p * p * c, d))

  def patch_conv(kernel):  # the inverse
    return np.ascontiguousarray(kernel.reshape(p, p, c, d).transpose(3, 2, 0, 1))

  out = [Rule(encoder + ("patch_embedding", "kernel"), prefix + "embeddings.patch_embeddings.projection.weight",
              (d, c, p, p), patch_kernel, inverse=patch_conv),
         Rule(encoder + ("patch_embedding", "bias"), prefix + "embeddings.patch_embeddings.projection.bias", (d,)),
         Rule(encoder + ("position_embedding",), prefix + "embeddings.position_embeddings", (1, num_patches + 1, d),
              lambda x: np.ascontiguousarray(x[0]), inverse=lambda x: x[None]),
         Rule(encoder + ("cls_token",), prefix + "embeddings.cls_token", (1, 1, d), lambda x: x.reshape(d),
              inverse=lambda x: x.reshape(1, 1, d))]
  out += layer_rules({"query": layer + "attention.attention.query", "key": layer + "attention.attention.key",
                      "value": layer + "attention.attention.value", "out": layer + "attention.output.dense",
                      "attention_norm": layer + "layernorm_before", "wi": layer + "intermediate.dense",
                      "wo": layer + "output.dense", "mlp_norm": layer + "layernorm_after"}, d, f, h)
  out += norm(("transformer", "final_norm"), prefix + "layernorm")
  return out
