"""Downstream models: a pre-trained backbone with a task head, optionally with LoRA adapters.

`TaskModel` runs the pre-training model unchanged (its parameters sit under "backbone",
so a pre-training checkpoint's parameters drop in as they are) and puts a linear head on
one of its embeddings:

    {"ehr": {...the backbone's outputs...}, "task": {"embedding": [B, D], "logits": [B, K]}}

(for survival, K = the time intervals' hazard logits: one risk score plus a baseline per interval).

The head reads the embedding standardised per feature by statistics of the training rows
(`input_mean`, `input_scale`: measured once before fine-tuning, never trained). The
embedding is one of the backbone's pooled summaries, or with `pooling="attention"` an
`AttentionPool` of the modality's hidden states that fine-tuning trains.

Three ways to adapt (`finetune.mode`), told apart by the optimiser's labels (`trainable`):
  full    every parameter trains
  frozen  only the head trains; the backbone runs deterministically and its gradient is
          cut (stop_gradient), so a step costs little more than a forward pass
  lora    the backbone is frozen and low-rank adapters are added to its attention and MLP
          kernels (W + alpha / r * A @ B, B = 0 at the start, so step 0 is the pre-trained
          model); `LoRAModel` holds them under params["lora"], mirroring the kernels' paths
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import traverse_util

from biofm_jax.models.layers import ones_init, zeros_init

MODES = ("full", "frozen", "lora")
# What the head reads (`task.pooling`): the backbone's pooled summary named by `embedding`, or
# an attention pool over that modality's hidden states with learned queries (an attentive
# probe when the backbone is frozen): one token's state, e.g. which of two codes came first,
# survives it where a mean over the timeline averages it away.
POOLINGS = ("summary", "attention")
POOL_HEADS = 4


class AttentionPool(nn.Module):
  """[B, T, D] hidden states and [B, T] mask -> [B, D] float32: POOL_HEADS learned queries,
  each a softmax over the real tokens of LayerNorm-ed keys, averaging its share of the values."""

  @nn.compact
  def __call__(self, hidden: jax.Array, mask: jax.Array) -> jax.Array:
    batch, _, width = hidden.shape
    heads = POOL_HEADS if width % POOL_HEADS == 0 else 1
    size = width // heads
    x = nn.LayerNorm(name="norm")(hidden.astype(jnp.float32))
    query = self.param("query", nn.initializers.normal(0.02), (heads, size), jnp.float32)
    keys = nn.DenseGeneral((heads, size), name="key")(x)
    values = nn.DenseGeneral((heads, size), name="value")(x)
    scores = jnp.einsum("bthd,hd->bht", keys, query) / math.sqrt(size)
    scores = jnp.where(mask[:, None, :], scores, -1e30)
    weights = jax.nn.softmax(scores, axis=-1)
    return jnp.einsum("bht,bthd->bhd", weights, values).reshape(batch, width)
# The head's input statistics (measured from the training rows, never trained).
INPUT_MEAN, INPUT_SCALE = "input_mean", "input_scale"
# Kernel name -> how many of its leading (non-layer) axes are inputs. Attention's q/k/v
# kernels are [embed, heads, kv]; its output kernel [heads, kv, embed]; MLP [in, out].
LORA_TARGETS = {"query": 1, "key": 1, "value": 1, "out": 2, "wi": 1, "wo": 1}
_OUT_AXES = {"query": 2, "key": 2, "value": 2, "out": 1, "wi": 1, "wo": 1}


def _hidden_states(outputs: Mapping[str, Any], modality: str) -> tuple[jax.Array, jax.Array]:
  found = outputs.get(modality, {})
  if "hidden" not in found or "mask" not in found:
    raise ValueError(f"task.pooling='attention' reads {modality!r}'s hidden states and mask, which this backbone's "
                     f"outputs do not hold (they hold {sorted(found)}); use task.pooling='summary'")
  return found["hidden"], found["mask"]


def select(outputs: Mapping[str, Any], path: tuple[str, ...]):
  for key in path:
    outputs = outputs[key]
  return outputs


def _inputs(modalities):
  """A batch's keys without its targets: the modalities the backbone reads (None: all)."""
  return None if modalities is None else tuple(m for m in modalities if m != "task")


class TaskModel(nn.Module):
  backbone: nn.Module
  embedding: tuple[str, ...]  # where the backbone's outputs hold the embedding, e.g. ("ehr", "embedding")
  num_outputs: int
  frozen_backbone: bool = False
  dropout_rate: float = 0.0
  # Survival: one risk score plus a baseline hazard logit per interval (a discrete-time
  # proportional-odds model), not a free logit per interval: late intervals have few
  # subjects at risk, and free per-interval weights there overfit and reorder the risks.
  proportional_hazards: bool = False
  prior_logits: tuple[float, ...] = ()  # the bias's start (the labels' prior); zeros when empty
  pooling: str = "summary"  # POOLINGS: "attention" pools `embedding[0]`'s hidden states instead

  @nn.compact
  def __call__(self, batch, *, train: bool = False):
    outputs = self.backbone(batch, train=train and not self.frozen_backbone)
    if self.pooling == "attention":
      hidden, mask = _hidden_states(outputs, self.embedding[0])
      if self.frozen_backbone:
        hidden = jax.lax.stop_gradient(hidden)
      embedding = AttentionPool(name="pool")(hidden, mask)
    else:
      embedding = select(outputs, self.embedding).astype(jnp.float32)
      if self.frozen_backbone:
        embedding = jax.lax.stop_gradient(embedding)
    # Each feature standardised by the training rows' mean and spread, measured once from
    # the backbone before fine-tuning (`train/finetune.head_input_statistics`), as the linear
    # probe's scaler (and MAE's non-affine BatchNorm) does: pre-trained embeddings, an MAE's
    # above all, can differ between examples by a sliver of their common part, which a head
    # at a fine-tuning learning rate does not resolve in hundreds of steps. The optimiser
    # never changes them (`trainable`); identity (0, 1) until measured.
    width = embedding.shape[-1]
    mean = self.param(INPUT_MEAN, zeros_init(("embed",)), (width,), jnp.float32)
    scale = self.param(INPUT_SCALE, ones_init(("embed",)), (width,), jnp.float32)
    x = (embedding - mean) * scale
    # Then a parameter-free LayerNorm and a zero-initialised head: every task starts at its
    # prior (logits = bias).
    x = nn.LayerNorm(use_scale=False, use_bias=False, name="head_norm")(x)
    x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
    prior = nn.with_logical_partitioning(
        lambda *_: jnp.asarray(self.prior_logits or (0.0,) * self.num_outputs, jnp.float32), (None,))
    if self.proportional_hazards:
      risk = nn.Dense(1, use_bias=False, kernel_init=zeros_init(("embed", None)), name="head")(x)
      logits = risk + self.param("baseline_hazard", prior, (self.num_outputs,))[None, :]
    else:
      logits = nn.Dense(self.num_outputs, kernel_init=zeros_init(("embed", None)), bias_init=prior, name="head")(x)
    return {**outputs, "task": {"embedding": embedding, "logits": logits}}

  def tokens_per_example(self, modalities=None) -> int:
    return self.backbone.tokens_per_example(_inputs(modalities))

  def flops_per_example(self, modalities=None) -> float:
    return self.backbone.flops_per_example(_inputs(modalities))


BACKBONE_LABEL = "backbone"  # the optimiser label of a fully fine-tuned backbone with its own learning rate


def trainable(mode: str, backbone_label: str = "train"):
  """`params -> tree of "train" / "freeze"`: the optimiser labels of a fine-tuning mode; in
  full mode the backbone's parameters get `backbone_label` (BACKBONE_LABEL: trained at a
  multiple of the head's learning rate, `make_optimizer`'s `lr_scales`)."""
  if mode not in MODES:
    raise ValueError(f"finetune.mode {mode!r} is not one of {MODES}")

  def labels(params):
    def label(path, _):
      top = getattr(path[0], "key", None)
      frozen = (mode != "full" and top == "backbone") or top in (INPUT_MEAN, INPUT_SCALE)
      if frozen:
        return "freeze"
      return backbone_label if top == "backbone" else "train"
    return jax.tree_util.tree_map_with_path(label, params)
  return labels


# ---------------------------------------------------------------- LoRA
def _lora_sites(backbone_params) -> dict[tuple[str, ...], Any]:
  """{path of a targeted kernel: its (possibly boxed) value}."""
  flat = traverse_util.flatten_dict(backbone_params)
  return {path: value for path, value in flat.items()
          if path[-1] == "kernel" and len(path) > 1 and path[-2] in LORA_TARGETS}


def _split_axes(name: str, ndim: int) -> tuple[int, int, int]:
  """(leading layer axes, input axes, output axes) of a targeted kernel."""
  n_in, n_out = LORA_TARGETS[name], _OUT_AXES[name]
  return ndim - n_in - n_out, n_in, n_out


@dataclasses.dataclass(frozen=True)
class LoRAModel:
  """A `TaskModel` with low-rank adapters; `init`/`apply` as a Linen module's."""
  model: TaskModel
  rank: int = 8
  alpha: float = 16.0

  def init(self, rngs, batch, *, train: bool = False):
    rngs = rngs if isinstance(rngs, Mapping) else {"params": rngs}
    params = dict(self.model.init(rngs, batch, train=train)["params"])
    key = jax.random.fold_in(rngs["params"], 7)
    adapters = {}
    for i, (path, kernel) in enumerate(sorted(_lora_sites(params["backbone"]).items())):
      boxed = isinstance(kernel, nn.Partitioned)
      value, names = (kernel.value, kernel.names) if boxed else (kernel, (None,) * kernel.ndim)
      lead, n_in, _ = _split_axes(path[-2], value.ndim)
      shape_a = value.shape[:lead + n_in] + (self.rank,)
      shape_b = value.shape[:lead] + (self.rank,) + value.shape[lead + n_in:]
      fan_in = math.prod(value.shape[lead:lead + n_in])
      a = jax.random.normal(jax.random.fold_in(key, i), shape_a, value.dtype) / math.sqrt(fan_in)
      b = jnp.zeros(shape_b, value.dtype)
      if boxed:  # the kernel's own box type (logical names), with the rank axis unsharded
        a = kernel.replace(value=a, names=tuple(names[:lead + n_in]) + (None,))
        b = kernel.replace(value=b, names=tuple(names[:lead]) + (None,) + tuple(names[lead + n_in:]))
      adapters[path[:-1] + ("lora_a",)] = a
      adapters[path[:-1] + ("lora_b",)] = b
    if not adapters:
      raise ValueError("finetune.mode='lora': the backbone has no attention or MLP kernels to adapt")
    params["lora"] = traverse_util.unflatten_dict(adapters)
    return {"params": params}

  def merged(self, params):
    """The TaskModel's parameters with every adapter folded into its kernel."""
    params = dict(params)
    adapters = traverse_util.flatten_dict(params.pop("lora"))
    flat = traverse_util.flatten_dict(params["backbone"])
    scale = self.alpha / self.rank
    for path in list(_lora_sites(params["backbone"])):
      kernel, a, b = flat[path], adapters[path[:-1] + ("lora_a",)], adapters[path[:-1] + ("lora_b",)]
      lead, n_in, _ = _split_axes(path[-2], kernel.ndim)
      a2 = a.reshape(a.shape[:lead] + (-1, self.rank))
      b2 = b.reshape(b.shape[:lead] + (self.rank, -1))
      # The kernel is frozen: no gradient is computed for it, only for the adapters.
      flat[path] = jax.lax.stop_gradient(kernel) + (scale * (a2 @ b2)).reshape(kernel.shape).astype(kernel.dtype)
    params["backbone"] = traverse_util.unflatten_dict(flat)
    return params

  def apply(self, variables, batch, *, train: bool = False, rngs=None):
    return self.model.apply({"params": self.merged(variables["params"])}, batch, train=train, rngs=rngs)

  def tokens_per_example(self, modalities=None) -> int:
    return self.model.tokens_per_example(modalities)

  def flops_per_example(self, modalities=None) -> float:
    return self.model.flops_per_example(modalities)
