"""The tabular modality in a model: one token per column, values and categories read back.

`model_modality(config, model_info)` is the registry's model entry (`registry.py`).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from biofm_jax.modalities.tabular.encoder import TabularEncoder
from biofm_jax.models.heads import TokenClassifier
from biofm_jax.models.layers import TransformerConfig, embed_init, zeros_init
from biofm_jax.models.description import Encoded


class ColumnValueHead(nn.Module):
  """Reads each numeric column's value back through that column's own weights."""
  cfg: TransformerConfig
  num_numeric: int

  @nn.compact
  def __call__(self, numeric_hidden: jax.Array) -> jax.Array:
    cfg = self.cfg
    if not self.num_numeric:  # nothing to read back, and no zero-size parameters
      return jnp.zeros(numeric_hidden.shape[:2], jnp.float32)
    weight = self.param("kernel", embed_init(("features", "embed")), (self.num_numeric, cfg.embed_dim),
                        cfg.param_dtype)
    bias = self.param("bias", zeros_init(("features",)), (self.num_numeric,), cfg.param_dtype)
    return (jnp.einsum("bfd,fd->bf", numeric_hidden, weight.astype(cfg.dtype)) + bias).astype(jnp.float32)


@dataclasses.dataclass(frozen=True)
class TabularModality:
  """One token per column after a CLS token; the row's embedding is the CLS hidden state."""
  num_numeric: int
  num_categorical: int
  num_categories: int
  name: str = "tabular"
  position: str = "none"  # a column's identity is in its own weights

  def encode(self, cfg: TransformerConfig, example: Mapping[str, jax.Array], *, train: bool) -> Encoded:
    tokens, mask, positions = TabularEncoder(cfg, self.num_numeric, self.num_categorical, self.num_categories,
                                             name="tabular_encoder")(example, train=train)
    return Encoded(tokens, mask, positions)

  def heads(self, cfg: TransformerConfig, hidden: jax.Array, encoded: Encoded, example, *, train: bool,
            prefix: str = "") -> dict[str, jax.Array]:
    del encoded, example, train
    out = {"hidden": hidden, "embedding": hidden[:, 0].astype(jnp.float32),
           "value_predictions": ColumnValueHead(cfg, self.num_numeric, name=f"{prefix}value_head")(
               hidden[:, 1:1 + self.num_numeric])}
    if self.num_categorical:
      out["category_logits"] = TokenClassifier(cfg, self.num_categories, name=f"{prefix}category_head")(
          hidden[:, 1 + self.num_numeric:])
    return out

  def num_tokens(self) -> int:
    return 1 + self.num_numeric + self.num_categorical

  def encoded_tokens(self) -> int:
    return self.num_tokens()

  def head_output_dim(self) -> int:
    return self.num_categories

  def extra_flops(self, encoder_dim: int) -> float:
    del encoder_dim
    return 0.0


def model_modality(config: ml_collections.ConfigDict, info: Mapping[str, Any]) -> TabularModality:
  del config
  return TabularModality(num_numeric=info["num_numeric"], num_categorical=info["num_categorical"],
                         num_categories=info["num_categories"])
