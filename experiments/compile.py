"""Sizes a training configuration ahead of time for a slice: TPU topologies with the TPU
compiler, other meshes on as many fake CPU devices.

  python experiments/compile.py --config=configs/ehr_bert.py:1b --topology=v5p-256
  python experiments/compile.py --config=configs/ehr_bert.py:7b --topology=h100-64
  python experiments/compile.py --config=configs/ehr_bert.py:1b --devices=8 --device_memory_gb=80 \
      --peak_tflops=989 --mfu=0.4

Prints the parameter count, per-device bytes of parameters and optimiser state (from the
shardings), the compiled train step's per-device memory and FLOPs (skip with --nocompile),
model FLOPs per step, and the step time at `--mfu` of the per-device peak. Exits with
status 1, saying "does not fit", when the per-device memory exceeds the device's.

`--topology`: a TPU slice (`v4-32`, `v5e-16`, `v5p-256`, `v6e-256`, as Cloud TPU names them)
compiles with libtpu's TPU compiler on this CPU-only machine (`pip install -e '.[tpu]'`), so
memory and FLOPs are the TPU compiler's own; a GPU mesh (`h100-8`, `h200-16`, `a100-8`,
`b200-8`) compiles on that many fake CPU devices, whose memory count is XLA:CPU's, not the
GPU compiler's. Either sets the device memory and peak from the datasheet unless
`--device_memory_gb` / `--peak_tflops` are given.
"""
from __future__ import annotations

import os
import sys

from absl import flags

FLAGS = flags.FLAGS
flags.DEFINE_string("config", None, "Config file and preset, e.g. configs/ehr_bert.py:1b.")
flags.DEFINE_string("topology", None, "A slice to size for: v5p-256, v5e-16, v4-32, v6e-256 (TPU compiler) or "
                    "h100-8, h200-16, a100-8, b200-8 (fake CPU devices). Overrides --devices.")
flags.DEFINE_integer("devices", 8, "Fake CPU devices to build the mesh over (without --topology).")
flags.DEFINE_integer("vocab_size", 20_000, "Code vocabulary size to assume (the data decides it in a real run).")
flags.DEFINE_float("device_memory_gb", 80.0, "Memory per device; more than this is reported as not fitting.")
flags.DEFINE_float("peak_tflops", 989.0, "Per-device peak (dense bf16 TFLOP/s; 989 is an H100 SXM).")
flags.DEFINE_float("mfu", 0.4, "Model FLOPs utilisation to assume for the step time.")
flags.DEFINE_bool("compile", True, "Compile the train step (slower; gives the compiler's memory and FLOPs).")
flags.mark_flags_as_required(["config"])


def main(argv, overrides):
  del argv
  from biofm_jax.config import load_config
  from biofm_jax.hardware import topology
  from biofm_jax.train.aot import DoesNotFit, size_training
  memory_gb, peak_tflops, where = FLAGS.device_memory_gb, FLAGS.peak_tflops, f"{FLAGS.devices} fake CPU devices"
  try:
    config = load_config(FLAGS.config, overrides)
    slice_ = topology(FLAGS.topology) if FLAGS.topology else None
    devices = slice_.devices() if slice_ else None
    if slice_:
      memory_gb = memory_gb if FLAGS["device_memory_gb"].present else slice_.memory_gb
      peak_tflops = peak_tflops if FLAGS["peak_tflops"].present else slice_.peak_tflops
      where = (f"{slice_.name} ({slice_.num_devices} devices, TPU compiler, topology {slice_.tpu_topology})"
               if slice_.tpu_topology else f"{slice_.name} ({slice_.num_devices} fake CPU devices)")
    # The run trains on the slice's chips, not on this host's CPU (`model.layer_loop="auto"`).
    platform = ("tpu" if slice_.tpu_topology else "gpu") if slice_ else "cpu"
    sizing = size_training(config, vocab_size=FLAGS.vocab_size, compile=FLAGS.compile, devices=devices,
                           platform=platform)
  except DoesNotFit as e:
    print(f"=== {FLAGS.config} on {where} ===\n  does not fit: the compiler says {e}")
    sys.exit(1)
  except (KeyError, ValueError, FileNotFoundError, RuntimeError) as e:
    cli.fail(f"{e}")
  gib = 2**30
  compiler = "TPU" if slice_ and slice_.tpu_topology else "XLA:CPU"
  print(f"=== {FLAGS.config} on {where}, mesh {sizing.mesh} ===")
  print(f"  parameters             {sizing.num_params / 1e9:.3f} B")
  print(f"  params per device      {sizing.param_bytes_per_device / gib:.3f} GiB")
  print(f"  optimiser per device   {sizing.optimizer_bytes_per_device / gib:.3f} GiB")
  if sizing.compiled_bytes_per_device is not None:
    print(f"  compiled step memory   {sizing.compiled_bytes_per_device / gib:.3f} GiB per device ({compiler})")
  print(f"  model FLOPs per step   {sizing.model_flops_per_step:.3e}")
  if sizing.compiler_flops_per_step is not None:
    print(f"  compiler FLOPs         {sizing.compiler_flops_per_step:.3e} per device")
  print(f"  stacked layers         {'scanned' if sizing.layer_loop == 'scan' else 'unrolled'}, as on {platform}")
  seconds = sizing.step_seconds(peak_tflops * 1e12, FLAGS.mfu)
  print(f"  step time              {seconds * 1e3:.3g} ms at {FLAGS.mfu:.0%} MFU of {peak_tflops:g} TFLOP/s "
        f"per device")
  need = sizing.bytes_per_device() / gib
  if need > memory_gb:
    print(f"  does not fit: {need:.2f} GiB per device > {memory_gb:g} GiB; add devices (FSDP) or "
          f"reduce data.batch_size / model size")
    sys.exit(1)
  counted = "compiled step" if sizing.compiled_bytes_per_device is not None else "state only, no activations"
  print(f"  fits: {need:.2f} GiB of {memory_gb:g} GiB per device ({counted})")


if __name__ == "__main__":
  # The fake device count must be set before jax is imported.
  count = next((a.split("=", 1)[1] for a in sys.argv if a.startswith("--devices=")), "8")
  named = next((a.split("=", 1)[1] for a in sys.argv if a.startswith("--topology=")), None)
  if named:  # a GPU mesh compiles on that many fake CPU devices (a bad name is reported in main)
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from biofm_jax.hardware import topology  # no jax import
    try:
      count = str(topology(named).num_devices)
    except ValueError:
      pass
  os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={count}"
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  from biofm_jax import cli
  cli.run(main)
