"""Token-sequence encoder shared by EHR timelines, gene-expression profiles and
biological sequences: token embeddings, an optional value-bin embedding, positions.

The helpers create their submodules inside the calling module's compact method, so an
encoder that adds its own features (EHR's age and time) keeps one flat parameter tree.
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from biofm_jax.data import batch as B
from biofm_jax.models.layers import TransformerConfig, embed_init, make_norm


def embed_tokens(cfg: TransformerConfig, seq: dict[str, jax.Array], vocab_size: int,
                 num_value_bins: int) -> jax.Array:
  """Code embedding plus, when the sequence has value bins, a value-bin embedding (bin 0 = none)."""
  tokens = nn.Embed(vocab_size, cfg.embed_dim, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
                    embedding_init=embed_init(("vocab", "embed")), name="code_embedding")(seq[B.TOKENS])
  if num_value_bins:
    tokens += nn.Embed(num_value_bins + 1, cfg.embed_dim, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
                       embedding_init=embed_init((None, "embed")), name="value_embedding")(seq[B.TOKEN_VALUE_BINS])
  return tokens


def esm_token_dropout(tokens: jax.Array, ids: jax.Array, mask: jax.Array, rate: float) -> jax.Array:
  """ESM-2's token dropout, as its public implementation computes it in training and in
  inference alike: MASK tokens embed as zero, each row is scaled by (1 - rate) / (1 - its
  share of MASK tokens among its real tokens), and padding embeds as zero."""
  is_mask = ids == B.MASK_ID
  tokens = jnp.where(is_mask[..., None], 0, tokens)
  real = jnp.maximum(mask.sum(-1), 1).astype(jnp.float32)
  observed = (is_mask & mask).sum(-1).astype(jnp.float32) / real
  scale = (1.0 - rate) / (1.0 - observed)
  return (tokens * scale[:, None, None].astype(tokens.dtype)) * mask[..., None].astype(tokens.dtype)


def segment_positions(segments: jax.Array) -> jax.Array:
  """int32 [B, L] position of each token within its segment (0 at each segment's first token)."""
  index = jnp.arange(segments.shape[1], dtype=jnp.int32)
  first = jnp.concatenate([jnp.ones_like(segments[:, :1], bool), segments[:, 1:] != segments[:, :-1]], axis=1)
  return index - jax.lax.cummax(jnp.where(first, index, 0), axis=1)


def positions_and_dropout(module: nn.Module, cfg: TransformerConfig, tokens: jax.Array, *,
                          train: bool, segments: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
  """Adds a learned position table when `cfg.position == "learned"` (RoPE is the stack's job).
  Positions count from each segment's start in packed rows (`segments`, `data/packing.py`)."""
  length = tokens.shape[1]
  if cfg.position == "sincos":
    raise ValueError("model.position 'sincos' is for image patches; token sequences use 'rope' or 'learned'")
  if segments is None:
    positions = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), tokens.shape[:2])
  else:
    positions = segment_positions(segments)
  if cfg.position == "learned":
    table = module.param("position_embedding", embed_init((None, "embed")), (cfg.max_len, cfg.embed_dim),
                         cfg.param_dtype)
    rows = table[:length][None] if segments is None else table[positions]
    tokens += rows.astype(cfg.dtype)
  if cfg.embedding_norm:  # BERT's embedding LayerNorm, after the positions are added
    tokens = make_norm(cfg, "embedding_norm", norm="layernorm")(tokens)
  return nn.Dropout(cfg.dropout_rate, deterministic=not train)(tokens), positions


class TokenEncoder(nn.Module):
  """Maps a token-sequence batch (see `data/batch.py`) to `(tokens, mask, positions)`."""
  cfg: TransformerConfig
  vocab_size: int
  num_value_bins: int = 0

  @nn.compact
  def __call__(self, seq: dict[str, jax.Array], *, train: bool):
    tokens = embed_tokens(self.cfg, seq, self.vocab_size, self.num_value_bins)
    if self.cfg.token_dropout:
      tokens = esm_token_dropout(tokens, seq[B.TOKENS], seq[B.TOKEN_MASK], self.cfg.token_dropout)
    tokens, positions = positions_and_dropout(self, self.cfg, tokens, train=train, segments=seq.get(B.SEGMENT_IDS))
    return tokens, seq[B.TOKEN_MASK], positions
