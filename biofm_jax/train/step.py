"""Pure `train_step` and `eval_step`, and their jitted, sharded forms.

`train_step(state, batch) -> (state, metrics)` splits the global batch into
`grad_accum_steps` micro-batches and sums their gradients in a `lax.scan`; every term is
normalised by the whole batch's count first (see `objectives/base.py`), so the update
equals the full-batch update whatever the accumulation.
"""
from __future__ import annotations

import functools
from typing import Any, Callable, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from biofm_jax import parallel
from biofm_jax.objectives import Objective, means, weighted_loss
from biofm_jax.train.state import TrainState


def _split_micro_batches(batch: Any, accum_steps: int, mesh: Mesh | None) -> Any:
  """[B, ...] -> [accum, B / accum, ...], micro-batch i = examples i, i + accum, ...

  Striding rather than slicing keeps every micro-batch spread over all batch shards, so
  no data moves between devices.
  """
  def split(x):
    x = x.reshape((x.shape[0] // accum_steps, accum_steps) + x.shape[1:]).swapaxes(0, 1)
    if mesh is not None:
      x = jax.lax.with_sharding_constraint(x, NamedSharding(mesh, P(None, parallel.BATCH_AXES)))
    return x
  return jax.tree.map(split, batch)


def train_step(state: TrainState, batch: Any, *, model: nn.Module, tx: optax.GradientTransformation,
               objective: Objective, schedule: optax.Schedule, accum_steps: int = 1,
               mesh: Mesh | None = None, prepare: Callable[[Any], Any] | None = None
               ) -> tuple[TrainState, dict[str, jax.Array]]:
  """`prepare`: the data module's device transform (e.g. image augmentation), applied to
  the batch first, inside the compiled step."""
  if prepare is not None:
    batch = prepare(batch)
  counts = objective.counts(batch)
  rng = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)

  def loss_fn(params, micro_batch, micro_rng):
    outputs = model.apply({"params": params}, micro_batch, train=True, rngs={"dropout": micro_rng})
    sums = objective.sums(outputs, micro_batch)
    return weighted_loss(objective, sums, counts), sums

  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
  if accum_steps == 1:
    (loss, sums), grads = grad_fn(state.params, batch, rng)
  else:
    micro_batches = _split_micro_batches(batch, accum_steps, mesh)

    def accumulate(carry, xs):
      micro_batch, index = xs
      (loss, sums), grads = grad_fn(state.params, micro_batch, jax.random.fold_in(rng, index))
      return jax.tree.map(jnp.add, carry, (loss, sums, grads)), None

    zero_sums = jax.eval_shape(lambda: loss_fn(state.params, jax.tree.map(lambda x: x[0], micro_batches), rng)[1])
    init = (jnp.zeros((), jnp.float32), jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), zero_sums),
            jax.tree.map(jnp.zeros_like, state.params))
    (loss, sums, grads), _ = jax.lax.scan(accumulate, init, (micro_batches, jnp.arange(accum_steps)))

  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  metrics = {"loss": loss, "grad_norm": optax.global_norm(grads), "learning_rate": schedule(state.step),
             **means(sums, counts)}
  return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics


def eval_step(params: Any, batch: Any, *, model: nn.Module, objective: Objective) -> dict[str, jax.Array]:
  """Per-term sums and counts, to be added up over an evaluation pass."""
  outputs = model.apply({"params": params}, batch, train=False)
  return {"sums": objective.sums(outputs, batch), "counts": objective.counts(batch)}


def jit_train_step(model, tx, objective, schedule, state_shardings, mesh: Mesh, rules, accum_steps: int,
                   prepare: Callable[[Any], Any] | None = None):
  step = functools.partial(train_step, model=model, tx=tx, objective=objective, schedule=schedule,
                           accum_steps=accum_steps, mesh=mesh, prepare=prepare)
  jitted = jax.jit(step, in_shardings=(state_shardings, parallel.batch_sharding(mesh)),
                   out_shardings=(state_shardings, parallel.replicated(mesh)), donate_argnums=(0,))
  return _with_mesh_and_rules(jitted, mesh, rules)


def jit_eval_step(model, objective, param_shardings, mesh: Mesh, rules):
  step = functools.partial(eval_step, model=model, objective=objective)
  jitted = jax.jit(step, in_shardings=(param_shardings, parallel.batch_sharding(mesh)),
                   out_shardings=parallel.replicated(mesh))
  return _with_mesh_and_rules(jitted, mesh, rules)


def _with_mesh_and_rules(fn, mesh, rules):
  """Traces under the mesh and logical rules, so the models' logical constraints resolve."""
  @functools.wraps(fn)
  def wrapped(*args):
    with mesh, nn.logical_axis_rules(rules):
      return fn(*args)
  wrapped.lower = lambda *args: _lower(fn, mesh, rules, *args)
  return wrapped


def _lower(fn, mesh, rules, *args):
  with mesh, nn.logical_axis_rules(rules):
    return fn.lower(*args)


def output_path(output: str | tuple[str, ...]) -> tuple[str, ...]:
  """A modality name (its pooled "embedding") or a path into the model's outputs:
  ("fused", "embedding") for the multimodal model's fused embedding, ("contrastive", "ehr")
  for a modality's tower projection in the shared contrastive space."""
  return (output, "embedding") if isinstance(output, str) else tuple(output)


def jit_embed_step(model, output: str | tuple[str, ...] | Mapping[str, Any], param_shardings, mesh: Mesh, rules):
  """`(params, batch) -> [B, D]` embeddings at `output` (see `output_path`), replicated on
  every device; with a mapping {name: output}, a dict of them from one forward pass."""
  paths = ({name: output_path(o) for name, o in output.items()} if isinstance(output, Mapping)
           else output_path(output))

  def select(out, path):
    for key in path:
      out = out[key]
    return out

  def embed(params, batch):
    out = model.apply({"params": params}, batch, train=False)
    return ({name: select(out, path) for name, path in paths.items()} if isinstance(paths, dict)
            else select(out, paths))
  jitted = jax.jit(embed, in_shardings=(param_shardings, parallel.batch_sharding(mesh)),
                   out_shardings=parallel.replicated(mesh))
  return _with_mesh_and_rules(jitted, mesh, rules)
