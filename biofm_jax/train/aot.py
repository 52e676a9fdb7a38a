"""Ahead-of-time sizing: what a configuration costs on a mesh, before anyone pays for it.

`size_training` builds the training setup from a config alone (no data: `abstract_data`
stands in for the data module, from the modality's registry `sizing`, with the config's
shapes and a stated vocabulary size), and reports per device:
  * the parameter and optimiser-state bytes from the state's shardings (exact, no compile),
    so the 1/N shrinking of FSDP shows directly;
  * with `compile=True`, the compiled train step's memory (argument + output - aliased +
    temporaries, `memory_analysis`) and the compiler's FLOP count as a cross-check;
  * model FLOPs per step (analytic: the compiler counts a scanned layer once) and the step
    time they imply at a stated MFU of a stated per-device peak.
"""
from __future__ import annotations

import copy
import dataclasses
import math
from typing import Any

import jax
import ml_collections
import numpy as np

from biofm_jax.modalities import registry
from biofm_jax.models.layers import attention_on, runs_unrolled, transformer_config
from biofm_jax.train.build import build_training
from biofm_jax.train.state import param_count
from biofm_jax import parallel


def abstract_data(config: ml_collections.ConfigDict, vocab_size: int):
  """A stand-in data module: the shapes a config implies, without reading data.

  Each modality's registry row says how (`sizing`): EHR configs take their vocabulary size
  from `vocab_size` (the data decides it in a real run; a sequence tokenizer's is fixed by
  the config); imaging and ECG configs need nothing more than their settings (imaging brings
  its device augmentation, `augment="device"`: the step is sized from canvas batches, with
  the augmentation in it). Expression and tabular inputs are sized by the data itself (gene
  panel, columns), so they have none, and are refused with that reason."""
  sizable = [name for name, m in registry.MODALITIES.items() if m.sizing is not None]
  present = registry.configured(config.data)
  if len(present) != 1 or "multimodal" in config.data:
    raise ValueError(f"ahead-of-time sizing is built for single-modality configs of {sizable} "
                     f"(config.data.<modality>); this config has {sorted(config.data.keys())}")
  name, = present
  if registry.get(name).sizing is None:
    raise ValueError(f"config.data.{name} cannot be sized ahead of time: its data decides its shapes (the "
                     f"registry row has sizing=None); modalities that can be sized: {sizable}")
  targets = registry.objective_kind(config.objective.name, name).targets
  return registry.get(name).sizing(config.data[name], targets, vocab_size)


class DoesNotFit(Exception):
  """The compiler found the step too large for a device's memory (its message says by how much)."""


@dataclasses.dataclass
class Sizing:
  mesh: dict
  num_params: int
  param_bytes_per_device: int
  optimizer_bytes_per_device: int
  model_flops_per_step: float
  layer_loop: str  # how the sized program runs its stacked layers: "scan" or "unroll"
  compiled_bytes_per_device: int | None = None
  compiler_flops_per_step: float | None = None

  def step_seconds(self, peak_flops_per_device: float, mfu: float) -> float:
    devices = math.prod(self.mesh.values())
    return self.model_flops_per_step / (devices * peak_flops_per_device * mfu)

  def bytes_per_device(self) -> int:
    """What must fit: the compiled step's memory when compiled, else the state alone."""
    return self.compiled_bytes_per_device or (self.param_bytes_per_device + self.optimizer_bytes_per_device)


def bytes_per_device(abstract_tree: Any) -> int:
  """Bytes of the largest shard set on one device: each leaf's shard shape times its itemsize."""
  per_device: dict[Any, int] = {}
  for leaf in jax.tree.leaves(abstract_tree):
    sharding = leaf.sharding
    shard = math.prod(sharding.shard_shape(leaf.shape)) * np.dtype(leaf.dtype).itemsize
    for device in sharding.device_set:
      per_device[device] = per_device.get(device, 0) + shard
  return max(per_device.values(), default=0)


def size_training(config: ml_collections.ConfigDict, *, vocab_size: int = 20_000, compile: bool = True,
                  devices: list | None = None, platform: str | None = None) -> Sizing:
  """`devices`: the mesh's devices (default jax.devices(), fake CPU devices in
  experiments/compile.py; `Topology.devices()` for a TPU slice). `platform` ("cpu", "gpu",
  "tpu"; default this process's backend) is where the sized run will train: it decides what
  `model.layer_loop="auto"` compiles (a GPU slice sized on fake CPU devices scans its layers,
  as the run on GPUs will)."""
  config = _for_platform(config, platform or jax.default_backend())
  data = abstract_data(config, vocab_size)
  setup = build_training(config, data, devices)
  abstract = setup.abstract_state
  sizing = Sizing(
      mesh=dict(setup.mesh.shape), num_params=param_count(abstract.params),
      param_bytes_per_device=bytes_per_device(abstract.params),
      optimizer_bytes_per_device=bytes_per_device(abstract.opt_state),
      model_flops_per_step=config.data.batch_size * setup.model.flops_per_example(),
      layer_loop=config.model.layer_loop)
  if compile:
    batch = abstract_batch(data.train_example_spec(), config.data.batch_size, _batch_sharding(setup))
    try:
      compiled = setup.train_step.lower(abstract, batch).compile()
    except Exception as e:  # the TPU compiler refuses what cannot fit, naming the bytes
      if "RESOURCE_EXHAUSTED" in str(e) or "Ran out of memory" in str(e):
        raise DoesNotFit(str(e).split("\n")[0][:2000]) from e
      raise
    memory = compiled.memory_analysis()
    if memory is not None:
      sizing.compiled_bytes_per_device = int(memory.argument_size_in_bytes + memory.output_size_in_bytes
                                             - memory.alias_size_in_bytes + memory.temp_size_in_bytes)
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    if cost and "flops" in cost:
      sizing.compiler_flops_per_step = float(cost["flops"])
  return sizing


def _for_platform(config: ml_collections.ConfigDict, platform: str) -> ml_collections.ConfigDict:
  """`config` with `model.layer_loop` and `model.attention` "auto" resolved as a run on
  `platform` resolves them (the sizing process's own backend may be another)."""
  read = transformer_config(config.model, max_len=1, causal=False)  # the one reader of both settings
  loop, attention = read.layer_loop, read.attention
  if loop != "auto" and attention != "auto":
    return config
  config = copy.deepcopy(config)
  with config.unlocked():
    if loop == "auto":
      config.model.layer_loop = "unroll" if runs_unrolled("auto", platform) else "scan"
    if attention == "auto":  # jax's own choice off CPU: its "xla" form stands in for it
      config.model.attention = attention_on("auto", platform) or "xla"
  return config


def abstract_batch(spec: dict, batch_size: int, sharding) -> dict:
  """A training batch of `spec` (`{modality: {field: (shape, dtype)}}`) as abstract arrays."""
  return {m: {name: jax.ShapeDtypeStruct((batch_size,) + tuple(shape), dtype, sharding=sharding)
              for name, (shape, dtype) in fields.items()} for m, fields in spec.items()}


def _batch_sharding(setup):
  return parallel.batch_sharding(setup.mesh)

