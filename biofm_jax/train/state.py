"""The training state, the optimiser, and creating the state directly sharded.

`TrainState` is a plain pytree (step, params, opt_state, rng), so Orbax saves it as a
tree of arrays and restores it onto any mesh. The rng is kept as raw key data so the
checkpoint holds ordinary uint32 arrays.
"""
from __future__ import annotations

from typing import Any, Mapping

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax
from jax.sharding import Mesh

from biofm_jax import parallel


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  opt_state: Any
  rng: jax.Array  # raw uint32 key data


def learning_rate_schedule(cfg: ml_collections.ConfigDict) -> optax.Schedule:
  """Linear warm-up then cosine decay to `final_lr_fraction` of the peak. At a fraction of 1
  the peak is held with no decay term at all, so the step program does not depend on
  `num_steps`: a k-step run is a prefix of a longer one under any compiler's rounding."""
  if cfg.final_lr_fraction == 1.0:
    warmup = max(cfg.warmup_steps, 1)
    return optax.join_schedules([optax.linear_schedule(0.0, cfg.learning_rate, warmup),
                                 optax.constant_schedule(cfg.learning_rate)], [warmup])
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=cfg.learning_rate, warmup_steps=max(cfg.warmup_steps, 1),
      decay_steps=max(cfg.num_steps, cfg.warmup_steps + 1), end_value=cfg.learning_rate * cfg.final_lr_fraction)


DECAYED_PARAMS = ("kernel", "embedding")


def decay_mask(params):
  """Weight decay on weight matrices and embeddings only, chosen by name: norms' scales,
  biases and learned tokens are left alone. (Not by rank: scanned layers stack a norm's
  scale into a matrix.)"""
  def decayed(path, _):
    return getattr(path[-1], "key", None) in DECAYED_PARAMS
  return jax.tree_util.tree_map_with_path(decayed, params)


def make_optimizer(cfg: ml_collections.ConfigDict, trainable=None,
                   lr_scales: Mapping[str, float] | None = None) -> optax.GradientTransformation:
  """AdamW with clipping; `trainable` (params -> tree of "train" / "freeze" / a label of
  `lr_scales`) leaves the frozen parameters exactly as they are (no update, no weight
  decay) and trains a parameter labelled with `lr_scales`' label at that multiple of the
  learning rate (its own AdamW and clipping: fine-tuning's backbone beside its head)."""
  schedule = learning_rate_schedule(cfg)

  def adamw(scale: float = 1.0) -> optax.GradientTransformation:
    rate = schedule if scale == 1.0 else (lambda step: schedule(step) * scale)
    return optax.chain(optax.clip_by_global_norm(cfg.grad_clip_norm),
                       optax.adamw(rate, b1=cfg.adam_b1, b2=cfg.adam_b2, weight_decay=cfg.weight_decay,
                                   mask=decay_mask))
  if trainable is None:
    return adamw()
  scaled = {label: adamw(float(scale)) for label, scale in (lr_scales or {}).items()}
  return optax.multi_transform({"train": adamw(), "freeze": optax.set_to_zero(), **scaled}, trainable)


def init_fn(model: nn.Module, tx: optax.GradientTransformation, example_batch: Any):
  """Returns `rng -> TrainState` with parameters still in their logical-axis boxes."""
  def init(rng):
    params_rng, state_rng = jax.random.split(rng)
    params = model.init({"params": params_rng}, example_batch, train=False)["params"]
    # On boxed params the optimiser moments inherit the boxes, so they shard alike.
    opt_state = tx.init(params)
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=opt_state,
                      rng=jax.random.key_data(state_rng))
  return init


def abstract_state(model, tx, example_batch, mesh: Mesh, rules):
  """(shape-dtype tree with shardings, shardings tree) of the state on `mesh`; no FLOPs."""
  boxed = jax.eval_shape(init_fn(model, tx, example_batch), jax.random.key(0))
  shardings = parallel.logical_shardings(boxed, mesh, rules)
  abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                          nn.meta.unbox(boxed), shardings)
  return abstract, shardings


def create_sharded_state(model, tx, example_batch, mesh: Mesh, rules, seed: int, shardings: Any = None):
  """Initialises the state directly into its shardings (no host-side full copy). `shardings`:
  the state's, when the caller has them already (each derivation traces the whole model)."""
  if shardings is None:
    _, shardings = abstract_state(model, tx, example_batch, mesh, rules)
  init = init_fn(model, tx, example_batch)
  with mesh, nn.logical_axis_rules(rules):
    return jax.jit(lambda rng: nn.meta.unbox(init(rng)), out_shardings=shardings)(jax.random.key(seed))


def param_count(params) -> int:
  return sum(x.size for x in jax.tree.leaves(params))
