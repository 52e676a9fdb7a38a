"""Everything a training run compiles against, built once from a config and a data module.

The loop, the benchmarks and the tests all build their mesh, model, objective,
optimiser, state shardings and jitted steps here, so they measure and test exactly
what training runs.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

import ml_collections
import numpy as np
import optax
from jax.sharding import Mesh

from biofm_jax import parallel
from biofm_jax.modalities.registry import build_model, objective_for
from biofm_jax.objectives import Objective
from biofm_jax.train import state as state_lib
from biofm_jax.train import step as step_lib


@dataclasses.dataclass(frozen=True)
class TrainingSetup:
  mesh: Mesh
  rules: tuple
  model: Any
  objective: Objective
  tx: optax.GradientTransformation
  schedule: optax.Schedule
  init_batch: dict  # zeros shaped like a batch with one example per batch shard
  abstract_state: Any  # ShapeDtypeStructs carrying the target shardings (for restore)
  state_shardings: Any
  train_step: Callable
  eval_step: Callable

  def init_state(self, seed: int):
    """A fresh state, created directly in its shardings."""
    return state_lib.create_sharded_state(self.model, self.tx, self.init_batch, self.mesh, self.rules, seed,
                                          shardings=self.state_shardings)


def example_batch(data_module, num_examples: int) -> dict:
  """Zeros shaped like a batch of `num_examples`, to trace the model's init."""
  return {modality: {name: np.zeros((num_examples,) + shape, dtype) for name, (shape, dtype) in spec.items()}
          for modality, spec in data_module.example_spec().items()}


def build_training(config: ml_collections.ConfigDict, data_module, devices=None, *, model=None,
                   objective: Objective | None = None, trainable=None,
                   lr_scales: dict[str, float] | None = None) -> TrainingSetup:
  """`devices`: the mesh's devices, jax.devices() by default; ahead-of-time sizing passes a
  TPU topology's (train/aot.py). `model` and `objective` default to the pre-training ones
  the modality registry builds for the data; fine-tuning passes its own, with `trainable`
  (params -> "train" / "freeze" labels for the optimiser, or a label of `lr_scales` that
  trains at that multiple of the learning rate; train/finetune.py)."""
  mesh = parallel.make_mesh(config.mesh, devices)
  rules = parallel.logical_rules(config.mesh)
  accum = config.train.grad_accum_steps
  parallel.check_batch_divides_mesh(config.data.batch_size, mesh, accum)
  info = data_module.model_info()
  if model is None:
    model = build_model(config, info)
  if objective is None:
    objective = objective_for(config.objective, info)
  tx = state_lib.make_optimizer(config.train, trainable=trainable, lr_scales=lr_scales)
  schedule = state_lib.learning_rate_schedule(config.train)
  init_batch = example_batch(data_module, math.prod(mesh.shape[a] for a in parallel.BATCH_AXES))
  abstract, shardings = state_lib.abstract_state(model, tx, init_batch, mesh, rules)
  # A data module may hand work to the step (image augmentation on the accelerator).
  prepare = data_module.device_transform()
  train_step = step_lib.jit_train_step(model, tx, objective, schedule, shardings, mesh, rules, accum, prepare)
  eval_step = step_lib.jit_eval_step(model, objective, shardings.params, mesh, rules)
  return TrainingSetup(mesh, rules, model, objective, tx, schedule, init_batch, abstract, shardings,
                       train_step, eval_step)
