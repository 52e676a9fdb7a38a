"""Tabular encoder: one token per column (FT-Transformer style), plus a CLS token.

A numeric column's token is `value * W_col + b_col`: the column's identity lives in its
own weights, so no position embedding is needed. A missing value takes the column's
learned missing embedding instead; a value hidden for masked-feature modelling takes a
shared mask embedding plus the column's bias, so the model knows which column to
reconstruct. Categorical columns embed their category id (0 = missing) plus a column
embedding.
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from biofm_jax.data import batch as B
from biofm_jax.models.layers import TransformerConfig, embed_init


class TabularEncoder(nn.Module):
  """Maps a tabular batch to `(tokens, mask, positions)`: [CLS, numeric..., categorical...]."""
  cfg: TransformerConfig
  num_numeric: int
  num_categorical: int
  num_categories: int

  @nn.compact
  def __call__(self, tab: dict[str, jax.Array], *, train: bool):
    cfg, d = self.cfg, self.cfg.embed_dim
    def param(name, shape, axes):
      return self.param(name, embed_init(axes), shape, cfg.param_dtype).astype(cfg.dtype)

    values = tab[B.TABULAR_VALUES].astype(cfg.dtype)[..., None]
    mask_token = param("mask_embedding", (d,), ("embed",))
    parts = [jnp.broadcast_to(param("cls_embedding", (d,), ("embed",)), (values.shape[0], 1, d))]
    if self.num_numeric:  # an all-categorical table has no numeric weights (no zero-size arrays to save)
      weight = param("value_weight", (self.num_numeric, d), ("features", "embed"))
      bias = param("value_bias", (self.num_numeric, d), ("features", "embed"))
      missing = param("missing_embedding", (self.num_numeric, d), ("features", "embed"))
      numeric = values * weight + bias
      numeric = jnp.where(tab[B.TABULAR_MISSING][..., None], missing, numeric)
      if B.TABULAR_VALUE_MASK in tab:
        numeric = jnp.where(tab[B.TABULAR_VALUE_MASK][..., None], bias + mask_token, numeric)
      parts.append(numeric)
    if self.num_categorical:
      categories = nn.Embed(self.num_categories, d, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
                            embedding_init=embed_init(("vocab", "embed")), name="category_embedding")
      columns = param("category_column_embedding", (self.num_categorical, d), ("features", "embed"))
      categorical = categories(tab[B.TABULAR_CATEGORIES]) + columns
      if B.TABULAR_CATEGORY_MASK in tab:
        categorical = jnp.where(tab[B.TABULAR_CATEGORY_MASK][..., None], columns + mask_token, categorical)
      parts.append(categorical)
    tokens = nn.Dropout(cfg.dropout_rate, deterministic=not train)(jnp.concatenate(parts, axis=1))
    mask = jnp.ones(tokens.shape[:2], jnp.bool_)
    positions = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape[:2])
    return tokens, mask, positions
