"""EHR encoder: embeds coded events with their numeric-value bin, age and time.

Each token of a timeline is the sum of
- a code embedding (the vocabulary from the training split),
- a value-bin embedding (per-code quantile bin of the numeric value; bin 0 = no value),
- a continuous time embedding: sinusoidal features of age (years) and of time before the
  window's last event (days, log-scaled), projected to the model width. Unknown ages
  (no birth event) and unknown times (static events) contribute nothing rather than a
  misleading zero age,
- a learned position embedding when the stack does not use rotary positions.
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from biofm_jax.data import batch as B
from biofm_jax.models.layers import TransformerConfig, embed_init, kernel_init

NUM_TIME_FREQUENCIES = 8


def sinusoidal_features(x: jax.Array, max_period: float) -> jax.Array:
  """[...] -> [..., 2 * NUM_TIME_FREQUENCIES] sin/cos features over geometric periods."""
  periods = max_period ** (jnp.arange(NUM_TIME_FREQUENCIES, dtype=jnp.float32) / (NUM_TIME_FREQUENCIES - 1))
  angles = x[..., None] * (2 * jnp.pi / periods)
  return jnp.concatenate([jnp.sin(angles), jnp.cos(angles)], axis=-1)


class EHREncoder(nn.Module):
  """Maps an EHR batch (see `data/batch.py`) to `(tokens, mask, positions)`."""
  cfg: TransformerConfig
  vocab_size: int
  num_value_bins: int

  @nn.compact
  def __call__(self, ehr: dict[str, jax.Array], *, train: bool):
    cfg = self.cfg
    codes = ehr[B.EHR_CODES]
    mask = ehr[B.EHR_MASK]
    tokens = nn.Embed(self.vocab_size, cfg.embed_dim, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
                      embedding_init=embed_init(("vocab", "embed")), name="code_embedding")(codes)
    tokens += nn.Embed(self.num_value_bins + 1, cfg.embed_dim, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
                       embedding_init=embed_init((None, "embed")), name="value_embedding")(ehr[B.EHR_VALUE_BINS])
    age = sinusoidal_features(ehr[B.EHR_AGE], max_period=100.0) * ehr[B.EHR_AGE_KNOWN][..., None]
    days = ehr[B.EHR_TIME]
    log_days = jnp.sign(days) * jnp.log1p(jnp.abs(days))
    time = sinusoidal_features(log_days, max_period=10.0) * ehr[B.EHR_TIME_KNOWN][..., None]
    features = jnp.concatenate([age, time, ehr[B.EHR_AGE_KNOWN][..., None], ehr[B.EHR_TIME_KNOWN][..., None]],
                               axis=-1).astype(cfg.dtype)
    tokens += nn.Dense(cfg.embed_dim, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
                       kernel_init=kernel_init((None, "embed")), name="time_projection")(features)
    positions = jnp.broadcast_to(jnp.arange(codes.shape[1], dtype=jnp.int32), codes.shape)
    if cfg.position == "sincos":
      raise ValueError("model.position 'sincos' is for image patches; EHR uses 'rope' or 'learned'")
    if cfg.position == "learned":
      table = self.param("position_embedding", embed_init((None, "embed")), (cfg.max_len, cfg.embed_dim),
                         cfg.param_dtype)
      tokens += table[: codes.shape[1]].astype(cfg.dtype)[None]
    tokens = nn.Dropout(cfg.dropout_rate, deterministic=not train)(tokens)
    return tokens, mask, positions
