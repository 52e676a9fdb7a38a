"""Blocked attention with an online softmax (FlashAttention's algorithm) in plain JAX.

`blocked_attention` gives what `layers.heads_first_attention` gives (jax's "xla"
arithmetic: logits in float32 scaled by 1/sqrt(head dim), masked with the same large
negative, softmax in float32) without ever holding a [T, S] matrix of logits or
probabilities. Queries and keys are cut into blocks (`blocks` = (queries, keys) per tile,
`model.attention_blocks`); each block of queries reads the key blocks one at a time, keeping per query a running maximum, a running
sum of exponentials and a running weighted sum of values, rescaled when a later block holds
a larger logit. Scratch memory is then a few tiles per (batch row, head), and
with a causal mask the key blocks wholly after a query block are never read (half the work
of a long row).

The backward pass (`jax.custom_vjp`) does not keep the forward's probabilities either: it
keeps the output and each query's softmax normaliser, and for each key block recomputes the
probabilities of the query blocks that read it (FlashAttention-2's backward: dS = P * (dP -
rowsum(dO * O))), accumulating the query gradient across key blocks.

The mask is built per tile from its parts rather than passed as a [B, 1, T, S] array: the
keys that are real (`key_mask`, [B, S]), packed rows' segment ids (`segments`, [B, T]: a
query sees only keys of its own segment, and a padding query, segment 0, every real key, as
`layers.Attention` says) and the causal order. Every (batch row, head) pair is computed on
its own, so a mesh that splits batch and heads splits this too, with no communication (the
compiled forward and backward on such a mesh hold no collective: tests/test_blocked_attention.py).
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from biofm_jax.config import ATTENTION_BLOCKS

Array = jax.Array


def _mask_value(dtype) -> Array:
  # The "xla" implementation's: finite, so a row with no visible key is a uniform average
  # (as there) rather than NaN.
  return jnp.asarray(-0.7 * jnp.finfo(dtype).max, dtype)


def _blocks(x: Array, block: int, axis: int, fill=0) -> Array:
  """Splits `axis` (padded with `fill` to a multiple of `block`) into [num_blocks, ...] leading."""
  size = x.shape[axis]
  padded = -(-size // block) * block
  if padded != size:
    pad = [(0, 0)] * x.ndim
    pad[axis] = (0, padded - size)
    x = jnp.pad(x, pad, constant_values=fill)
  x = x.reshape(x.shape[:axis] + (padded // block, block) + x.shape[axis + 1:])
  return jnp.moveaxis(x, axis, 0)


def _unblock(x: Array, size: int) -> Array:
  """[N, B, H, block, K] -> [B, size, H, K], the padding cut."""
  x = jnp.moveaxis(x, 0, 2).reshape(x.shape[1], x.shape[2], -1, x.shape[-1])[:, :, :size]
  return x.transpose(0, 2, 1, 3)


class _Tiles:
  """The blocked operands of one call: heads first, [N, B, H, block, K] and [N, B, block]."""

  def __init__(self, q, k, v, key_mask, segments, is_causal, blocks):
    query_block, block = blocks
    self.query_block, self.key_block = query_block, block
    self.is_causal, self.slots = is_causal, k.shape[1]
    self.logits_dtype = jnp.promote_types(q.dtype, jnp.float32)
    self.scale = jnp.asarray(1.0 / math.sqrt(q.shape[-1]), self.logits_dtype)
    self.q = _blocks(q.transpose(0, 2, 1, 3), query_block, axis=2)
    self.k = _blocks(k.transpose(0, 2, 1, 3), block, axis=2)
    self.v = _blocks(v.transpose(0, 2, 1, 3), block, axis=2)
    self.key_mask = _blocks(key_mask, block, axis=1)  # the slots padding the last block are not real
    self.query_segments = None if segments is None else _blocks(segments, query_block, axis=1)
    self.key_segments = None if segments is None else _blocks(segments, block, axis=1)
    self.query_ids = _blocks(jnp.arange(q.shape[1]), query_block, axis=0)
    self.key_ids = _blocks(jnp.arange(k.shape[1]), block, axis=0, fill=k.shape[1])  # padding: out of range

  def logits(self, i, j) -> tuple[Array, Array]:
    """Query block i against key block j: float32 [B, H, queries, keys] logits (masked keys at
    the mask value, padding slots at -inf) and which of them are visible."""
    take = functools.partial(jax.lax.dynamic_index_in_dim, keepdims=False)
    key_ids = take(self.key_ids, j)
    visible = take(self.key_mask, j)[:, None, None, :]
    if self.query_segments is not None:
      queries, keys = take(self.query_segments, i), take(self.key_segments, j)
      same = (queries[:, :, None] == keys[:, None, :]) | (queries[:, :, None] == 0)
      visible = visible & same[:, None]
    if self.is_causal:
      visible = visible & (take(self.query_ids, i)[:, None] >= key_ids[None, :])[None, None]
    logits = jnp.einsum("bhtk,bhsk->bhts", take(self.q, i), take(self.k, j),
                        preferred_element_type=self.logits_dtype) * self.scale
    logits = jnp.where(visible, logits, _mask_value(self.logits_dtype)).astype(jnp.float32)
    # The slots that pad the last block are not keys at all: exp(-inf) = 0 even in a row with
    # no visible key, whose softmax stays uniform over the real slots, as in the reference.
    return jnp.where((key_ids < self.slots)[None, None, None, :], logits, -jnp.inf), visible

  def key_blocks_read_by(self, i):
    """Key blocks [0, upper) that query block i reads: with a causal mask, none after it."""
    count = self.k.shape[0]
    return jnp.minimum(((i + 1) * self.query_block - 1) // self.key_block + 1, count) if self.is_causal else count

  def first_query_block_reading(self, j):
    """With a causal mask, query blocks before this one never read key block j."""
    return (j * self.key_block) // self.query_block if self.is_causal else 0


def _forward(q, k, v, key_mask, segments, is_causal, blocks):
  tiles = _Tiles(q, k, v, key_mask, segments, is_causal, blocks)
  batch, heads = q.shape[0], q.shape[2]

  def query_block(i):
    def key_block(j, carry):
      running_max, running_sum, acc = carry
      logits, _ = tiles.logits(i, j)
      new_max = jnp.maximum(running_max, logits.max(-1))
      correction = jnp.exp(running_max - new_max)
      probs = jnp.exp(logits - new_max[..., None])
      values = jax.lax.dynamic_index_in_dim(tiles.v, j, keepdims=False)
      acc = acc * correction[..., None] + jnp.einsum("bhts,bhsk->bhtk", probs.astype(v.dtype), values,
                                                     preferred_element_type=jnp.float32)
      return new_max, running_sum * correction + probs.sum(-1), acc

    rows = (batch, heads, tiles.query_block)
    start = (jnp.full(rows, -jnp.inf, jnp.float32), jnp.zeros(rows, jnp.float32),
             jnp.zeros(rows + (v.shape[-1],), jnp.float32))
    running_max, running_sum, acc = jax.lax.fori_loop(0, tiles.key_blocks_read_by(i), key_block, start)
    return (acc / running_sum[..., None]).astype(v.dtype), running_max, running_sum

  out, row_max, row_sum = jax.lax.map(query_block, jnp.arange(tiles.q.shape[0]))
  # Each row's softmax normaliser is kept as its maximum and its sum rather than their log-
  # sum-exp: at the mask value (a row with no visible key) log(sum) vanishes in rounding.
  return _unblock(out, q.shape[1]), (row_max, row_sum)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6))
def _attention(q, k, v, key_mask, segments, is_causal, blocks):
  return _forward(q, k, v, key_mask, segments, is_causal, blocks)[0]


def _attention_fwd(q, k, v, key_mask, segments, is_causal, blocks):
  out, normaliser = _forward(q, k, v, key_mask, segments, is_causal, blocks)
  return out, (q, k, v, key_mask, segments, out, normaliser)


def _attention_bwd(is_causal, blocks, residuals, d_out):
  q, k, v, key_mask, segments, out, (row_max, row_sum) = residuals
  tiles = _Tiles(q, k, v, key_mask, segments, is_causal, blocks)
  d_out_blocks = _blocks(d_out.transpose(0, 2, 1, 3).astype(jnp.float32), tiles.query_block, axis=2)
  # rowsum(dO * O): the softmax's backward term shared by every key block of a query's row.
  delta = jnp.einsum("nbhtk,nbhtk->nbht", d_out_blocks,
                     _blocks(out.transpose(0, 2, 1, 3).astype(jnp.float32), tiles.query_block, axis=2))
  num_query_blocks = tiles.q.shape[0]
  take = functools.partial(jax.lax.dynamic_index_in_dim, keepdims=False)

  def key_block(d_q, j):
    keys, values = (take(x, j).astype(jnp.float32) for x in (tiles.k, tiles.v))

    def query_block(i, carry):
      d_q, d_k, d_v = carry
      logits, visible = tiles.logits(i, j)
      probs = jnp.exp(logits - take(row_max, i)[..., None]) / take(row_sum, i)[..., None]
      grad_out = take(d_out_blocks, i)
      d_v = d_v + jnp.einsum("bhts,bhtk->bhsk", probs, grad_out)
      d_probs = jnp.einsum("bhtk,bhsk->bhts", grad_out, values)
      # Masked logits are constants (the mask value): no gradient reaches q or k through them.
      d_logits = jnp.where(visible, probs * (d_probs - take(delta, i)[..., None]), 0.0) * tiles.scale
      d_q = jax.lax.dynamic_update_index_in_dim(
          d_q, take(d_q, i) + jnp.einsum("bhts,bhsk->bhtk", d_logits, keys), i, 0)
      d_k = d_k + jnp.einsum("bhts,bhtk->bhsk", d_logits, take(tiles.q, i).astype(jnp.float32))
      return d_q, d_k, d_v

    first = tiles.first_query_block_reading(j)
    zeros = jnp.zeros(keys.shape, jnp.float32)
    d_q, d_k, d_v = jax.lax.fori_loop(first, num_query_blocks, query_block, (d_q, zeros, zeros))
    return d_q, (d_k, d_v)

  d_q, (d_k, d_v) = jax.lax.scan(key_block, jnp.zeros(tiles.q.shape, jnp.float32), jnp.arange(tiles.k.shape[0]))
  return (_unblock(d_q, q.shape[1]).astype(q.dtype), _unblock(d_k, k.shape[1]).astype(k.dtype),
          _unblock(d_v, v.shape[1]).astype(v.dtype), None, None)


_attention.defvjp(_attention_fwd, _attention_bwd)


def blocked_attention(q: Array, k: Array, v: Array, key_mask: Array, segments: Array | None = None,
                      is_causal: bool = False, blocks: tuple[int, int] = ATTENTION_BLOCKS) -> Array:
  """Self-attention of [B, T, H, K] queries over [B, T, H, K] keys and values, in tiles of
  `blocks` = (queries, keys): `key_mask` [B, T] marks the real keys, `segments` [B, T] (packed
  rows) limits each query to its own segment's keys. Returns [B, T, H, K]."""
  if q.shape[1] != k.shape[1]:
    raise ValueError(f"blocked attention is self-attention: {q.shape[1]} queries, {k.shape[1]} keys")
  if len(blocks) != 2 or min(blocks) < 1:
    raise ValueError(f"model.attention_blocks must be two positive sizes (queries, keys), got {blocks!r}")
  return _attention(q, k, v, key_mask.astype(bool), segments, is_causal, tuple(min(b, k.shape[1]) for b in blocks))
