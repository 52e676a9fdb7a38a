"""EHR encoder: embeds coded events with their numeric-value bin, age and time.

Each token of a timeline is the sum of
- a code embedding (the vocabulary from the training split),
- a value-bin embedding (per-code quantile bin of the numeric value; bin 0 = no value),
- a continuous time embedding: sinusoidal features of age (years) and of time before the
  window's last event (days, log-scaled), projected to the model width. Unknown ages
  (no birth event) and unknown times (static events) contribute nothing rather than a
  misleading zero age,
- a learned position embedding when the stack does not use rotary positions,
and, when the batch carries them (`data.ehr.value_inputs` / `time_inputs`, `ehr/data.py`):
- the value's quantile within its code's training values, as Fourier features projected to
  the model width (the bins say roughly where a value lies; the quantile says exactly, so a
  trend of small steps within one bin stays visible),
- sinusoidal features of the log days since the previous event, projected likewise (the
  offsets from the window's first event show a 10-day gap at day 700 as a 1% change).
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from biofm_jax.data import batch as B
from biofm_jax.models.encoders.tokens import embed_tokens, positions_and_dropout
from biofm_jax.models.layers import TransformerConfig, kernel_init, zeros_init

NUM_TIME_FREQUENCIES = 8


def sinusoidal_features(x: jax.Array, max_period: float) -> jax.Array:
  """[...] -> [..., 2 * NUM_TIME_FREQUENCIES] sin/cos features over geometric periods."""
  periods = max_period ** (jnp.arange(NUM_TIME_FREQUENCIES, dtype=jnp.float32) / (NUM_TIME_FREQUENCIES - 1))
  angles = x[..., None] * (2 * jnp.pi / periods)
  return jnp.concatenate([jnp.sin(angles), jnp.cos(angles)], axis=-1)


def quantile_features(quantile: jax.Array, has_value: jax.Array) -> jax.Array:
  """[...] quantiles in [0, 1] -> [..., 2 * NUM_TIME_FREQUENCIES + 1]: sin/cos of the quantile
  at 1..NUM_TIME_FREQUENCIES half-turns, and whether there is a value (all 0 where none)."""
  turns = jnp.arange(1, NUM_TIME_FREQUENCIES + 1, dtype=jnp.float32)
  angles = quantile.astype(jnp.float32)[..., None] * turns * jnp.pi
  has = has_value.astype(jnp.float32)[..., None]
  return jnp.concatenate([jnp.sin(angles) * has, jnp.cos(angles) * has, has], axis=-1)


def _projection(cfg: TransformerConfig, name: str, features: jax.Array) -> jax.Array:
  """A Dense layer from `features` to the model width (created in the calling module)."""
  return nn.Dense(cfg.embed_dim, dtype=cfg.dtype, param_dtype=cfg.param_dtype, kernel_init=kernel_init((None, "embed")),
                  bias_init=zeros_init(("embed",)), name=name)(features.astype(cfg.dtype))


class EHREncoder(nn.Module):
  """Maps an EHR batch (see `data/batch.py`) to `(tokens, mask, positions)`."""
  cfg: TransformerConfig
  vocab_size: int
  num_value_bins: int

  @nn.compact
  def __call__(self, ehr: dict[str, jax.Array], *, train: bool):
    cfg = self.cfg
    tokens = embed_tokens(cfg, ehr, self.vocab_size, self.num_value_bins)
    age = sinusoidal_features(ehr[B.EHR_AGE], max_period=100.0) * ehr[B.EHR_AGE_KNOWN][..., None]
    days = ehr[B.EHR_TIME]
    log_days = jnp.sign(days) * jnp.log1p(jnp.abs(days))
    time = sinusoidal_features(log_days, max_period=10.0) * ehr[B.EHR_TIME_KNOWN][..., None]
    features = jnp.concatenate([age, time, ehr[B.EHR_AGE_KNOWN][..., None], ehr[B.EHR_TIME_KNOWN][..., None]], axis=-1)
    tokens += _projection(cfg, "time_projection", features)
    if B.EHR_VALUE_QUANTILE in ehr:
      tokens += _projection(cfg, "value_quantile_projection", quantile_features(
          ehr[B.EHR_VALUE_QUANTILE], ehr[B.EHR_VALUE_BINS] != B.NO_VALUE_BIN))
    if B.EHR_GAP in ehr:
      known = ehr[B.EHR_GAP_KNOWN][..., None]
      gap = sinusoidal_features(jnp.log1p(jnp.maximum(ehr[B.EHR_GAP], 0.0)), max_period=10.0) * known
      tokens += _projection(cfg, "gap_projection", jnp.concatenate([gap, known], axis=-1))
    tokens, positions = positions_and_dropout(self, cfg, tokens, train=train, segments=ehr.get(B.SEGMENT_IDS))
    return tokens, ehr[B.EHR_MASK], positions
