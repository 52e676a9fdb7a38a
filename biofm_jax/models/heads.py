"""Output heads on top of the transformer's hidden states."""
from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

from biofm_jax.models.layers import TransformerConfig, activate, kernel_init, make_norm, zeros_init
from biofm_jax.models.patches import sincos_position_embedding
from biofm_jax.models.transformer import TransformerStack


class TokenClassifier(nn.Module):
  """Per-position logits over `num_classes` (codes, value bins), always in float32.

  Logits are returned in float32 even under bf16 compute, because the softmax
  cross-entropy over a large vocabulary loses accuracy in bf16.
  With `transform` (`model.mlm_head="transform"`, the MLM head of BERT, ESM-2 and RoBERTa):
  a dense layer of the model's width, its activation (exact GELU for a gated MLP's model)
  and a LayerNorm come before the output layer.
  """
  cfg: TransformerConfig
  num_classes: int
  class_axis: str | None = "vocab"
  transform: bool = False

  @nn.compact
  def __call__(self, hidden: jax.Array) -> jax.Array:
    cfg = self.cfg
    if self.transform:
      hidden = nn.Dense(cfg.embed_dim, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
                        kernel_init=kernel_init(("embed", "mlp")), bias_init=zeros_init(("mlp",)),
                        name="transform")(hidden)
      hidden = activate(dataclasses.replace(cfg, activation="gelu") if cfg.activation == "swiglu" else cfg, hidden)
      hidden = make_norm(cfg, "transform_norm", norm="layernorm")(hidden)
    logits = nn.Dense(self.num_classes, dtype=self.cfg.dtype, param_dtype=self.cfg.param_dtype,
                      kernel_init=kernel_init(("embed", self.class_axis)),
                      bias_init=zeros_init((self.class_axis,)), name="dense")(hidden)
    return logits.astype(jnp.float32)


class MAEDecoder(nn.Module):
  """The light masked-autoencoder decoder: predicts the pixels of the masked patches.

  Encoder outputs (visible patches) are projected to the decoder width, a learned mask
  token fills the masked positions, the sequence is put back into patch order with
  fixed sin-cos positions, and a small transformer predicts each masked patch.
  """
  cfg: TransformerConfig  # the decoder's own (narrower, shallower) stack
  grid_shape: tuple[int, ...]
  patch_dim: int  # pixels per patch times channels

  @nn.compact
  def __call__(self, encoded: jax.Array, visible: jax.Array, masked: jax.Array, *, train: bool) -> jax.Array:
    cfg = self.cfg
    x = nn.Dense(cfg.embed_dim, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
                 kernel_init=kernel_init(("embed", "decoder_embed")), bias_init=zeros_init(("decoder_embed",)),
                 name="project")(encoded)
    mask_token = self.param("mask_token", nn.with_logical_partitioning(nn.initializers.normal(0.02),
                                                                        ("decoder_embed",)),
                            (cfg.embed_dim,), cfg.param_dtype)
    mask_tokens = jnp.broadcast_to(mask_token.astype(cfg.dtype), masked.shape + (cfg.embed_dim,))
    # Concatenated order is [visible..., masked...]; argsort of the ids restores patch order.
    order = jnp.concatenate([visible, masked], axis=1)
    restore = jnp.argsort(order, axis=1)
    x = jnp.take_along_axis(jnp.concatenate([x, mask_tokens], axis=1), restore[..., None], axis=1)
    x = x + jnp.asarray(sincos_position_embedding(self.grid_shape, cfg.embed_dim)).astype(cfg.dtype)[None]
    full = jnp.ones(x.shape[:2], jnp.bool_)
    positions = jnp.broadcast_to(jnp.arange(x.shape[1], dtype=jnp.int32), x.shape[:2])
    x = TransformerStack(cfg, name="stack")(x, full, positions, train=train)
    x = jnp.take_along_axis(x, masked[..., None], axis=1)
    pixels = nn.Dense(self.patch_dim, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
                      kernel_init=kernel_init(("decoder_embed", "patch")), bias_init=zeros_init(("patch",)),
                      name="predict")(x)
    return pixels.astype(jnp.float32)
