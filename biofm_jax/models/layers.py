"""Transformer building blocks: norms, rotary positions, attention, MLP.

Every parameter is created through `nn.with_logical_partitioning` with logical axis
names (`embed`, `heads`, `kv`, `mlp`, `vocab`, ...); `parallel.py` maps those names to
mesh axes with the config's rules, so no layer knows the mesh. Activations are pinned
with `nn.with_logical_constraint` at block boundaries for the same reason.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from biofm_jax.config import ARCHITECTURE_DEFAULTS, ATTENTION_BLOCKS
from biofm_jax.models.blocked_attention import blocked_attention

Array = jax.Array
DType = Any

ACTIVATION_AXES = ("batch", "length", "embed")


def runs_unrolled(layer_loop: str, platform: str) -> bool:
  """Whether `model.layer_loop` unrolls the stacked layers on `platform` ("cpu", "gpu",
  "tpu"): "auto" unrolls on CPU only (`TransformerConfig.unrolls` says why)."""
  return platform == "cpu" if layer_loop == "auto" else layer_loop == "unroll"


ATTENTIONS = ("auto", "xla", "cudnn", "heads_first", "blocked")
# The MLP's activation: "gelu_tanh" (tanh-approximated GELU, ours by default), "gelu" (exact,
# erf: ESM-2, BERT's "gelu", ViT), "relu" (Geneformer) or "swiglu" (a gated MLP with a
# second input projection, `wi_gate`: Nucleotide Transformer v2, LLaMA).
ACTIVATIONS = ("gelu_tanh", "gelu", "relu", "swiglu")
NORM_POSITIONS = ("pre", "post")  # pre-norm (ours, ESM-2, ViT) or post-norm (BERT, Geneformer)
MLM_HEADS = ("linear", "transform")  # see `heads.TokenClassifier`


# From this many slots a row's attention runs blocked on CPU under "auto": at 2,048 slots
# its forward and backward took 310 ms causal and 469 ms not, against heads_first's 534 and
# 498 (512 slots: 132-145 ms against 110-130, so shorter rows stay heads_first).
BLOCKED_ON_CPU_FROM = 2048


def attention_on(attention: str, platform: str, length: int = 0) -> str | None:
  """`model.attention` resolved for `platform` and rows of `length` slots: "auto" is on CPU
  "heads_first" (1.5x the rate of jax's "xla" form there, benchmarks/step_parts.py) or, for
  rows of BLOCKED_ON_CPU_FROM slots or more, "blocked"; elsewhere jax's choice (None)."""
  if attention == "auto":
    if platform != "cpu":
      return None
    return "blocked" if length >= BLOCKED_ON_CPU_FROM else "heads_first"
  return attention


def heads_first_attention(q: Array, k: Array, v: Array, mask: Array | None, is_causal: bool = False) -> Array:
  """`jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=is_causal)` with the
  "xla" implementation's arithmetic (logits in at least float32, scaled by 1/sqrt(head
  dim), masked with the same large negative, softmax in float32), computed with heads
  before the sequence axes: [B, T, H, K] in and out, same number of query and key heads."""
  logits_dtype = jnp.promote_types(q.dtype, jnp.float32)
  qh, kh, vh = (x.transpose(0, 2, 1, 3) for x in (q, k, v))  # [B, H, T, K]
  logits = jnp.einsum("bhtk,bhsk->bhts", qh, kh, preferred_element_type=logits_dtype)
  logits = logits * jnp.asarray(1.0 / math.sqrt(q.shape[-1]), logits_dtype)
  if is_causal:
    causal = jnp.tril(jnp.ones((q.shape[1], k.shape[1]), bool))
    mask = causal if mask is None else mask & causal
  if mask is not None:
    logits = jnp.where(mask, logits, jnp.asarray(-0.7 * jnp.finfo(logits_dtype).max, logits_dtype))
  probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(v.dtype)
  return jnp.einsum("bhts,bhsk->bhtk", probs, vh).transpose(0, 2, 1, 3)


@dataclasses.dataclass(frozen=True)
class TransformerConfig:
  """Static hyper-parameters of the shared transformer stack (hashable for Linen)."""
  num_layers: int
  embed_dim: int
  num_heads: int
  mlp_dim: int
  head_dim: int = 0  # 0 means embed_dim // num_heads
  dropout_rate: float = 0.0
  position: str = "rope"  # "rope" (rotary, in attention); "learned"/"sincos" (added by the encoder); "none"
  max_len: int = 512
  causal: bool = False
  norm: str = "rmsnorm"  # "rmsnorm" or "layernorm"
  dtype: DType = jnp.float32  # compute dtype
  param_dtype: DType = jnp.float32
  remat: str = "none"  # "none", "full", "dots_saveable", "dots_with_no_batch_dims_saveable"
  scan_layers: bool = True  # parameters stacked on a leading "layers" axis (one checkpoint layout)
  # How stacked layers run: "scan" (one compiled body, a loop), "unroll" (each layer on its
  # slice of the stacked parameters, no loop) or "auto" (see `unrolls`). Parameters are the
  # same either way, so a checkpoint moves between backends.
  layer_loop: str = "auto"
  # Attention: `jax.nn.dot_product_attention`'s "xla" or "cudnn" (GPU, bf16/fp16),
  # "heads_first" (`heads_first_attention`: the same arithmetic as "xla", laid out for
  # XLA:CPU's batched matmuls), "blocked" (`blocked_attention`: an online softmax over
  # tiles of `attention_blocks`, no [T, T] matrix held) or "auto" (on CPU "heads_first",
  # "blocked" from BLOCKED_ON_CPU_FROM slots; jax's choice elsewhere).
  attention: str = "auto"
  attention_blocks: tuple[int, int] = ATTENTION_BLOCKS  # (queries, keys) per tile of "blocked"
  # Architecture options of public models (issue: start from public weights); the defaults
  # are this library's own architecture, so every existing checkpoint keeps its tree.
  bias: bool = False  # bias terms on the attention projections and the MLP
  activation: str = "gelu_tanh"  # ACTIVATIONS
  norm_eps: float = 1e-6  # every LayerNorm / RMSNorm of the stack, the encoder and the heads
  norm_position: str = "pre"  # NORM_POSITIONS
  final_norm: bool = True  # a norm after the last block (pre-norm stacks have one; post-norm do not)
  # ESM-2's token dropout: MASK tokens embed as zero and every row's embeddings are scaled by
  # (1 - token_dropout) / (1 - the row's share of MASK tokens); 0 = off. ESM-2 trains with 0.12.
  token_dropout: float = 0.0
  embedding_norm: bool = False  # a LayerNorm over the token embeddings (BERT, Geneformer)
  mlm_head: str = "linear"  # MLM_HEADS
  # A learned CLS token before the patches of an image (ViT, ViT-MAE, RETFound); the pooled
  # embedding stays the mean over the patches (RETFound's global pooling).
  cls_token: bool = False

  @property
  def kv_dim(self) -> int:
    return self.head_dim or self.embed_dim // self.num_heads

  @property
  def attention_implementation(self) -> str | None:
    """`jax.nn.dot_product_attention`'s implementation, or "heads_first" or "blocked" (ours)."""
    return attention_on(self.attention, jax.default_backend(), self.max_len)

  @property
  def unrolls(self) -> bool:
    """Whether stacked layers run unrolled. "auto" unrolls on CPU, where the scan's loop
    costs a third of the step (benchmarks/RESULTS.md: its stacked activation buffers are
    zero-filled, sliced and copied each step), and scans elsewhere, where compile time at
    depth is what the loop saves (compare both with `benchmarks/accelerator.py`)."""
    return runs_unrolled(self.layer_loop, jax.default_backend())

  def __post_init__(self):
    if self.attention not in ATTENTIONS:
      raise ValueError(f"model.attention must be one of {ATTENTIONS}, got {self.attention!r}")
    if len(self.attention_blocks) != 2 or min(self.attention_blocks) < 1:
      raise ValueError(f"model.attention_blocks must be two positive sizes (queries, keys), got "
                       f"{self.attention_blocks!r}")
    if self.layer_loop not in ("auto", "scan", "unroll"):
      raise ValueError(f"model.layer_loop must be 'auto', 'scan' or 'unroll', got {self.layer_loop!r}")
    if not self.head_dim and self.embed_dim % self.num_heads:
      raise ValueError(f"model.embed_dim={self.embed_dim} is not divisible by "
                       f"model.num_heads={self.num_heads}; set model.head_dim")
    if self.position not in ("rope", "learned", "sincos", "none"):
      raise ValueError(f"model.position must be 'rope', 'learned', 'sincos' or 'none', got {self.position!r}")
    if self.position == "rope" and self.kv_dim % 2:
      raise ValueError(f"rotary positions need an even head dim, got {self.kv_dim} (model.head_dim or "
                       f"model.embed_dim / model.num_heads)")
    if self.norm not in ("rmsnorm", "layernorm"):
      raise ValueError(f"model.norm must be 'rmsnorm' or 'layernorm', got {self.norm!r}")
    for field, allowed in (("activation", ACTIVATIONS), ("norm_position", NORM_POSITIONS),
                           ("mlm_head", MLM_HEADS)):
      if getattr(self, field) not in allowed:
        raise ValueError(f"model.{field} must be one of {allowed}, got {getattr(self, field)!r}")
    if not 0.0 <= self.token_dropout < 1.0:
      raise ValueError(f"model.token_dropout must be in [0, 1), got {self.token_dropout!r}")
    if not self.norm_eps > 0:
      raise ValueError(f"model.norm_eps must be positive, got {self.norm_eps!r}")


def kernel_init(axes: tuple[str | None, ...], scale: float = 1.0):
  return nn.with_logical_partitioning(nn.initializers.variance_scaling(scale, "fan_in", "truncated_normal"), axes)


def zeros_init(axes: tuple[str | None, ...]):
  return nn.with_logical_partitioning(nn.initializers.zeros_init(), axes)


def ones_init(axes: tuple[str | None, ...]):
  return nn.with_logical_partitioning(nn.initializers.ones_init(), axes)


def embed_init(axes: tuple[str | None, ...]):
  return nn.with_logical_partitioning(nn.initializers.normal(stddev=0.02), axes)


def make_norm(cfg: TransformerConfig, name: str, norm: str | None = None) -> nn.Module:
  """The stack's norm (`cfg.norm`, or `norm` where a public architecture fixes one)."""
  if (norm or cfg.norm) == "rmsnorm":
    return nn.RMSNorm(epsilon=cfg.norm_eps, dtype=cfg.dtype, param_dtype=cfg.param_dtype, name=name,
                      scale_init=ones_init(("embed",)))
  # Variance as E[(x - mean)^2], as torch computes it: imported public weights give the same
  # outputs to float32 rounding (flax's default E[x^2] - mean^2 loses digits on large means).
  return nn.LayerNorm(epsilon=cfg.norm_eps, dtype=cfg.dtype, param_dtype=cfg.param_dtype, name=name,
                      use_fast_variance=False,
                      scale_init=ones_init(("embed",)), bias_init=zeros_init(("embed",)))


def activate(cfg: TransformerConfig, x: Array) -> Array:
  """`cfg.activation` of `x` (for "swiglu", of its gate: the MLP multiplies it in)."""
  if cfg.activation == "gelu_tanh":
    return nn.gelu(x, approximate=True)
  if cfg.activation == "gelu":
    return nn.gelu(x, approximate=False)
  if cfg.activation == "relu":
    return nn.relu(x)
  return nn.silu(x)


class RotaryTables(NamedTuple):
  """Rotary positions' sines and cosines, [batch, length, 1, head_dim / 2] float32: computed
  once per call of a stack (`TransformerStack`) and read by every layer's attention, rather
  than recomputed from the positions in each layer (a scanned stack's loop body cannot share
  them across iterations)."""
  sin: Array
  cos: Array


def rotary_tables(positions: Array, head_dim: int, max_wavelength: float = 10_000.0) -> RotaryTables:
  half = head_dim // 2
  freqs = max_wavelength ** (-jnp.arange(half, dtype=jnp.float32) / half)
  angles = positions[..., None].astype(jnp.float32) * freqs  # [B, L, half]
  return RotaryTables(jnp.sin(angles)[:, :, None, :], jnp.cos(angles)[:, :, None, :])


def apply_rope(x: Array, positions: Array | RotaryTables, max_wavelength: float = 10_000.0) -> Array:
  """Rotary position embedding on [batch, length, heads, head_dim] (head_dim even), from the
  positions or from their `rotary_tables`."""
  tables = positions if isinstance(positions, RotaryTables) else rotary_tables(positions, x.shape[-1],
                                                                                  max_wavelength)
  sin, cos = tables
  x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
  rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return rotated.astype(x.dtype)


def as_tokens(x: Array) -> Array:
  """(batch, length, ...) -> (batch * length, ...): the same values, one token axis.

  Dense layers take their inputs this way because XLA:CPU runs the backward pass of a
  matmul whose rows span two axes about 2x slower (it materialises a transposed copy of
  the output gradient); the math is unchanged and the merge is free (row-major)."""
  return x.reshape((-1,) + x.shape[2:])


def cache_shapes(cfg: "TransformerConfig", batch: int, slots: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
  """One layer's decoding cache: keys and values, each [B, heads, S, kv] (heads first, as
  attention's batched matmuls read them)."""
  shape = (batch, cfg.num_heads, slots, cfg.kv_dim)
  return shape, shape


class Attention(nn.Module):
  """Multi-head self-attention over padded sequences, via `jax.nn.dot_product_attention`."""
  cfg: TransformerConfig

  @nn.compact
  def __call__(self, x: Array, mask: Array, positions: Array, segments: Array | None = None,
               cache: tuple[Array, Array, Array] | None = None):
    """Self-attention over `x`, or with `cache` = (keys, values, slot int32), shaped as
    `cache_shapes` says: the new tokens' keys and values are written at slots [slot, slot + T) of a cache of S
    slots, `mask` [B, S] marks the slots holding real tokens (the new ones included), and
    each new token attends to the real slots up to its own. Returns the output, and with a
    cache also the updated (keys, values)."""
    cfg = self.cfg
    def projection(name):
      return nn.DenseGeneral((cfg.num_heads, cfg.kv_dim), dtype=cfg.dtype, param_dtype=cfg.param_dtype,
                             kernel_init=kernel_init(("embed", "heads", "kv")), use_bias=cfg.bias,
                             bias_init=zeros_init(("heads", "kv")), name=name)
    lead = x.shape[:2]
    tokens = as_tokens(x)
    q, k, v = (projection(name)(tokens).reshape(lead + (cfg.num_heads, cfg.kv_dim))
               for name in ("query", "key", "value"))
    if cfg.position == "rope":
      q, k = apply_rope(q, positions), apply_rope(k, positions)
    if cache is not None:
      return self._cached(q, k, v, mask, cache)
    if cfg.attention_implementation == "blocked":  # the same rules below, built per tile
      return self._project_out(blocked_attention(q, k, v, mask, segments, cfg.causal, cfg.attention_blocks))
    # Keys that are padding are never attended to. Queries at padding positions still get
    # a finite output (they attend to the real keys) and are masked out by every loss.
    key_mask = mask[:, None, None, :]
    if segments is not None:
      # Packed rows: a query sees only keys of its own segment. Padding queries (segment 0)
      # keep seeing every real key, as in unpacked rows, so their outputs stay finite.
      same = (segments[:, :, None] == segments[:, None, :]) | (segments[:, :, None] == 0)
      key_mask = key_mask & same[:, None]
    if cfg.attention_implementation == "heads_first":
      out = heads_first_attention(q, k, v, key_mask, is_causal=cfg.causal)
    else:
      out = jax.nn.dot_product_attention(q, k, v, mask=key_mask, is_causal=cfg.causal,
                                         implementation=cfg.attention_implementation)
    return self._project_out(out)

  def _project_out(self, out: Array) -> Array:
    cfg = self.cfg
    lead = out.shape[:2]
    out = nn.DenseGeneral(cfg.embed_dim, axis=(-2, -1), dtype=cfg.dtype, param_dtype=cfg.param_dtype,
                          kernel_init=kernel_init(("heads", "kv", "embed")), use_bias=cfg.bias,
                          bias_init=zeros_init(("embed",)), name="out")(as_tokens(out))
    return out.reshape(lead + (cfg.embed_dim,))

  def _cached(self, q: Array, k: Array, v: Array, mask: Array, cache):
    """Decoding (`generate.py`): causal attention of T new tokens over a key/value cache laid
    out as `cache_shapes` says, the arithmetic of `jax.nn.dot_product_attention`'s "xla"
    implementation (as `heads_first_attention`'s)."""
    keys, values, slot = cache
    keys = jax.lax.dynamic_update_slice_in_dim(keys, k.transpose(0, 2, 1, 3).astype(keys.dtype), slot, axis=2)
    values = jax.lax.dynamic_update_slice_in_dim(values, v.transpose(0, 2, 1, 3).astype(values.dtype), slot, axis=2)
    slots = keys.shape[2]
    query_slots = slot + jnp.arange(q.shape[1])
    visible = jnp.arange(slots)[None, :] <= query_slots[:, None]  # [T, S]
    key_mask = mask[:, None, None, :] & visible[None, None]  # [B, 1, T, S]
    logits_dtype = jnp.promote_types(q.dtype, jnp.float32)
    # Heads before slots: both products are batched matmuls over the stored buffers, with no
    # transposed copy of the cache per step (slots first, each layer copied it whole).
    logits = jnp.einsum("bhtk,bhsk->bhts", q.transpose(0, 2, 1, 3), keys.astype(q.dtype),
                        preferred_element_type=logits_dtype)
    logits = logits * jnp.asarray(1.0 / math.sqrt(q.shape[-1]), logits_dtype)
    logits = jnp.where(key_mask, logits, jnp.asarray(-0.7 * jnp.finfo(logits_dtype).max, logits_dtype))
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(q.dtype)
    out = jnp.matmul(probs, values.astype(q.dtype)).transpose(0, 2, 1, 3)  # [B, T, H, K]
    return self._project_out(out), (keys, values)


class MLP(nn.Module):
  cfg: TransformerConfig

  @nn.compact
  def __call__(self, x: Array) -> Array:
    cfg = self.cfg
    lead = x.shape[:2]
    def dense(features, axes, name):
      return nn.Dense(features, dtype=cfg.dtype, param_dtype=cfg.param_dtype, use_bias=cfg.bias,
                      kernel_init=kernel_init(axes), bias_init=zeros_init(axes[1:]), name=name)
    tokens = as_tokens(x)
    h = dense(cfg.mlp_dim, ("embed", "mlp"), "wi")(tokens)
    if cfg.activation == "swiglu":  # silu(gate) * up, the gate a projection of its own
      h = activate(cfg, dense(cfg.mlp_dim, ("embed", "mlp"), "wi_gate")(tokens)) * h
    else:
      h = activate(cfg, h)
    h = nn.with_logical_constraint(h.reshape(lead + (cfg.mlp_dim,)), ("batch", "length", "mlp"))
    out = dense(cfg.embed_dim, ("mlp", "embed"), "wo")(as_tokens(h))
    return out.reshape(lead + (cfg.embed_dim,))


class Block(nn.Module):
  """A transformer block, pre-norm (`x + f(norm(x))`) or post-norm (`norm(x + f(x))`,
  `cfg.norm_position`). `deterministic` is an attribute so scan/remat see no Python args."""
  cfg: TransformerConfig
  deterministic: bool = True

  @nn.compact
  def __call__(self, x: Array, mask: Array, positions: Array, segments: Array | None = None, cache=None,
               slot=None):
    """Returns (x, None), or when decoding with this layer's `cache` = (keys, values) and
    the first new token's `slot` (see `Attention`), (x, the updated cache)."""
    cfg = self.cfg
    drop = nn.Dropout(cfg.dropout_rate, deterministic=self.deterministic)
    x = nn.with_logical_constraint(x, ACTIVATION_AXES)
    pre = cfg.norm_position == "pre"
    attention_norm, mlp_norm = make_norm(cfg, "attention_norm"), make_norm(cfg, "mlp_norm")
    attended = Attention(cfg, name="attention")(attention_norm(x) if pre else x, mask, positions, segments,
                                                cache=None if cache is None else (*cache, slot))
    if cache is not None:
      attended, cache = attended
    x = x + drop(attended)
    x = x if pre else attention_norm(x)
    x = x + drop(MLP(cfg, name="mlp")(mlp_norm(x) if pre else x))
    x = x if pre else mlp_norm(x)
    return nn.with_logical_constraint(x, ACTIVATION_AXES), cache


DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def transformer_config(model_cfg: ml_collections.ConfigDict, *, max_len: int, causal: bool,
                       **replace: Any) -> TransformerConfig:
  for name in ("dtype", "param_dtype"):
    if model_cfg[name] not in DTYPES:
      raise ValueError(f"model.{name} must be one of {sorted(DTYPES)}, got {model_cfg[name]!r}")
  fields = dict(
      num_layers=model_cfg.num_layers, embed_dim=model_cfg.embed_dim, num_heads=model_cfg.num_heads,
      head_dim=model_cfg.head_dim, mlp_dim=model_cfg.mlp_dim, dropout_rate=model_cfg.dropout_rate,
      position=model_cfg.position, max_len=max_len, causal=causal, norm=model_cfg.norm,
      dtype=DTYPES[model_cfg.dtype], param_dtype=DTYPES[model_cfg.param_dtype], remat=model_cfg.remat,
      scan_layers=model_cfg.scan_layers, layer_loop=model_cfg.get("layer_loop", "auto"),
      attention=model_cfg.get("attention", "auto"), attention_blocks=tuple(model_cfg.get("attention_blocks", ATTENTION_BLOCKS)))
  # Public architectures' options: a run saved before they existed has their defaults.
  fields.update({name: model_cfg.get(name, default) for name, default in ARCHITECTURE_DEFAULTS.items()})
  return TransformerConfig(**{**fields, **replace})
