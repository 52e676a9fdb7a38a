"""The shared transformer stack: stacked blocks (scanned or unrolled), a remat policy and an analytic FLOP count.

Every modality's encoder produces `[batch, length, embed]` tokens plus a boolean mask;
this stack is the same for all of them, so parallelism, remat and dtype choices are made
once here.
"""
from __future__ import annotations

from typing import NamedTuple

import flax.linen as nn
import jax

from biofm_jax.models.layers import Block, TransformerConfig, cache_shapes, make_norm, rotary_tables


class LayerCaches(NamedTuple):
  """A decoding cache held per layer: `layers[i]` = (keys, values) of layer i, shaped as
  `layers.cache_shapes` says. Each layer reads and updates its own buffers, so a decoding
  loop that carries them updates them in place; a cache stacked on a layers axis is sliced
  and re-stacked (copied whole) at every step instead."""
  layers: tuple


def empty_layer_caches(cfg: TransformerConfig, batch: int, slots: int) -> LayerCaches:
  keys, values = cache_shapes(cfg, batch, slots)
  return LayerCaches(tuple((jax.numpy.zeros(keys, cfg.dtype), jax.numpy.zeros(values, cfg.dtype))
                           for _ in range(cfg.num_layers)))


def empty_stacked_cache(cfg: TransformerConfig, batch: int, slots: int) -> tuple:
  """The same cache stacked on a leading layers axis (the scanned stack's form)."""
  return tuple(jax.numpy.zeros((cfg.num_layers,) + shape, cfg.dtype) for shape in cache_shapes(cfg, batch, slots))

REMAT_POLICIES = {
    "full": None,  # recompute everything in the backward pass
    "dots_saveable": jax.checkpoint_policies.checkpoint_dots,
    "dots_with_no_batch_dims_saveable": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
}


def _block_class(cfg: TransformerConfig):
  if cfg.remat == "none":
    return Block
  if cfg.remat not in REMAT_POLICIES:
    raise ValueError(f"model.remat must be one of {['none', *REMAT_POLICIES]}, got {cfg.remat!r}")
  # prevent_cse is only needed outside scan; inside scan it would block useful fusions.
  looped = cfg.scan_layers and not cfg.unrolls
  return nn.remat(Block, policy=REMAT_POLICIES[cfg.remat], prevent_cse=not looped)


class TransformerStack(nn.Module):
  """`num_layers` blocks followed by a final norm (unless `cfg.final_norm` is off)."""
  cfg: TransformerConfig

  @nn.compact
  def __call__(self, x: jax.Array, mask: jax.Array, positions: jax.Array, *, train: bool,
               segments: jax.Array | None = None, cache=None, slot=None):
    """`segments` (int32 [B, L], packed rows): attention stays within each segment.

    Decoding (`generate.py`): `cache` = `LayerCaches` (the stacked layers then run unrolled,
    whatever `layer_loop` says), or `empty_stacked_cache`'s (keys, values); `slot`,
    where the new tokens go; `mask` is then [B, S]. Returns (hidden, the updated cache), in
    the form it was given."""
    cfg = self.cfg
    block = _block_class(cfg)
    per_layer = isinstance(cache, LayerCaches)
    if cfg.position == "rope":  # every layer's attention reads the same sines and cosines
      positions = rotary_tables(positions, cfg.kv_dim)
    if cfg.scan_layers and (cfg.unrolls or per_layer) and not self.is_initializing():
      x, cache = self._unrolled_over_stacked(block, x, mask, positions, segments, cache, slot, train=train)
    elif cfg.scan_layers:
      # One compiled block body, parameters stacked on a leading "layers" axis (and so is the cache).
      scanned = nn.scan(block, variable_axes={"params": 0}, split_rngs={"params": True, "dropout": True},
                        in_axes=(nn.broadcast, nn.broadcast, nn.broadcast, 0, nn.broadcast), length=cfg.num_layers,
                        metadata_params={nn.PARTITION_NAME: "layers"})
      x, cache = scanned(cfg, deterministic=not train, name="layers")(x, mask, positions, segments, cache, slot)
    else:
      layers = []
      for i in range(cfg.num_layers):
        x, layer_cache = block(cfg, deterministic=not train, name=f"layer_{i}")(x, mask, positions, segments,
                                                                                _layer_cache(cache, i), slot)
        layers.append(layer_cache)
      cache = _caches_as_given(cache, layers)
    if cfg.final_norm:
      x = make_norm(cfg, "final_norm")(x)
    return x if cache is None else (x, cache)

  def _unrolled_over_stacked(self, block, x, mask, positions, segments, cache, slot, *, train: bool):
    """The scanned layers' computation without the loop: layer i runs on slice i of the
    stacked parameters (created by the scan at init, so the layout never changes)."""
    cfg = self.cfg
    stacked = nn.meta.unbox(self.variables["params"]["layers"])
    dropout = train and cfg.dropout_rate > 0
    base_rng = self.make_rng("dropout") if dropout else None
    layers = []
    for i in range(cfg.num_layers):
      rngs = {"dropout": jax.random.fold_in(base_rng, i)} if dropout else {}
      x, layer_cache = block(cfg, deterministic=not train, parent=None).apply(
          {"params": jax.tree.map(lambda p, i=i: p[i], stacked)}, x, mask, positions, segments,
          _layer_cache(cache, i), slot, rngs=rngs)
      layers.append(layer_cache)
    return x, _caches_as_given(cache, layers)


def _layer_cache(cache, i: int):
  """Layer i's (keys, values) of a decoding cache in either form (None: not decoding)."""
  if cache is None:
    return None
  return cache.layers[i] if isinstance(cache, LayerCaches) else (cache[0][i], cache[1][i])


def _caches_as_given(cache, layers: list):
  """The layers' updated caches, in the form the stack was given."""
  if cache is None:
    return None
  if isinstance(cache, LayerCaches):
    return LayerCaches(tuple(layers))
  return tuple(jax.numpy.stack([layer[j] for layer in layers]) for j in range(2))


def flops_per_token(cfg: TransformerConfig, seq_len: int, output_dim: int) -> float:
  """Training FLOPs (forward + backward = 3x forward) per token of the stack and output head.

  Counts matmuls only, as MFU conventions do: projections, MLP, attention scores and
  values (full, not halved for causal masks), and the output projection to `output_dim`.
  """
  d, h = cfg.embed_dim, cfg.num_heads * cfg.kv_dim
  mlp_inputs = 2 if cfg.activation == "swiglu" else 1  # a gated MLP projects its input twice
  per_layer = 2 * (3 * d * h + h * d) + 2 * ((1 + mlp_inputs) * d * cfg.mlp_dim) + 2 * (2 * seq_len * h)
  forward = cfg.num_layers * per_layer + 2 * d * output_dim
  return 3.0 * forward
