"""Output heads on top of the transformer's hidden states."""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from biofm_jax.models.layers import TransformerConfig, kernel_init, zeros_init


class TokenClassifier(nn.Module):
  """Per-position logits over `num_classes` (codes, value bins), always in float32.

  Logits are returned in float32 even under bf16 compute, because the softmax
  cross-entropy over a large vocabulary loses accuracy in bf16.
  """
  cfg: TransformerConfig
  num_classes: int
  class_axis: str | None = "vocab"

  @nn.compact
  def __call__(self, hidden: jax.Array) -> jax.Array:
    logits = nn.Dense(self.num_classes, dtype=self.cfg.dtype, param_dtype=self.cfg.param_dtype,
                      kernel_init=kernel_init(("embed", self.class_axis)),
                      bias_init=zeros_init((self.class_axis,)), name="dense")(hidden)
    return logits.astype(jnp.float32)
