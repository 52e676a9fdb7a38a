"""Slices to size a configuration for: device count, memory and peak per device, and for
TPUs the topology that libtpu's compiler builds on a CPU-only machine.

No jax import at module level: experiments/compile.py reads a GPU slice's device count
here before jax starts, to fake that many CPU devices.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import os
from jax.experimental import topologies

@dataclasses.dataclass(frozen=True)
class Topology:
  """A slice to size for: its device count, memory and dense bf16 peak per device, and for
  TPUs the topology the libtpu compiler builds (`jax.experimental.topologies`)."""
  name: str
  num_devices: int
  memory_gb: float  # per device
  peak_tflops: float  # per device, dense bf16
  tpu_topology: str | None = None  # e.g. "v5p:4x4x8"; None compiles on fake CPU devices

  def devices(self) -> list | None:
    """The TPU slice's devices (compile-only, from libtpu), or None for fake CPU devices."""
    if self.tpu_topology is None:
      return None
    if importlib.util.find_spec("libtpu") is None:  # the TPU compiler: an optional extra
      raise RuntimeError(f"topology {self.name} compiles with the TPU compiler, which comes with the "
                         f"libtpu wheel that the installed jax names: pip install -e '.[tpu]'")
    # Compile-only: no TPU is opened, so several sizing processes may hold libtpu at once
    # (without this, the second one fails on libtpu's lock file).
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    return list(topologies.get_topology_desc(topology_name=self.tpu_topology, platform="tpu").devices)


# Per chip: HBM and dense bf16 TFLOP/s from the vendors' datasheets. TPU v4 and v5p names count
# TensorCores (two per chip: v5p-256 is 128 chips); v5e and v6e names count chips.
_TPU_CHIPS = {"v4": (32, 275, True), "v5p": (95, 459, True), "v5e": (16, 197, False), "v6e": (32, 918, False)}
_TPU_3D = {4: "2x2x1", 8: "2x2x2", 16: "2x2x4", 32: "2x4x4", 64: "4x4x4", 128: "4x4x8", 256: "4x8x8",
           512: "8x8x8", 1024: "8x8x16", 2048: "8x16x16", 4096: "16x16x16"}  # chips -> torus
_TPU_2D = {1: "1x1", 4: "2x2", 8: "2x4", 16: "4x4", 32: "4x8", 64: "8x8", 128: "8x16", 256: "16x16"}
# GPUs: no compiler for them on a CPU machine, so their meshes compile on as many fake CPU devices.
_GPUS = {"h100": (80, 989), "h200": (141, 989), "a100": (80, 312), "b200": (180, 2250)}


def gpu_peak_tflops(device_kind: str) -> float | None:
  """Dense bf16 TFLOP/s of a GPU from jax's `device_kind` ("NVIDIA H200"), None if not listed."""
  return next((peak for kind, (_, peak) in _GPUS.items() if kind in device_kind.lower()), None)


def topology(name: str) -> Topology:
  """`v5p-256`, `v5e-16`, `v4-32`, `v6e-256` (TPU slices, as Cloud TPU names them), or
  `h100-8`, `h200-16`, `a100-8`, `b200-8` (that many GPUs, 8 per host)."""
  kind, _, count_text = name.lower().partition("-")
  if not count_text.isdigit() or int(count_text) < 1:
    raise ValueError(f"topology {name!r}: expected <kind>-<count>, e.g. v5p-256 or h100-8")
  count = int(count_text)
  if kind in _GPUS:
    memory, peak = _GPUS[kind]
    return Topology(name, count, memory, peak)
  if kind not in _TPU_CHIPS:
    raise ValueError(f"topology {name!r}: unknown kind {kind!r}; choose one of "
                     f"{sorted(_TPU_CHIPS) + sorted(_GPUS)}")
  memory, peak, counts_cores = _TPU_CHIPS[kind]
  chips = count // 2 if counts_cores else count
  shapes = _TPU_3D if counts_cores else _TPU_2D
  if chips not in shapes or (counts_cores and count % 2):
    sizes = sorted(2 * c for c in shapes) if counts_cores else sorted(shapes)
    raise ValueError(f"topology {name!r}: no {kind} slice of that size; choose one of {sizes}")
  return Topology(name, chips, memory, peak, f"{kind}:{shapes[chips]}")
