"""Sizes a training configuration ahead of time on a mesh of fake CPU devices.

  python experiments/compile.py --config=configs/ehr_bert.py:1b --devices=8 --device_memory_gb=80 \
      --peak_tflops=989 --mfu=0.4

Prints the parameter count, per-device bytes of parameters and optimiser state (from the
shardings), the compiled train step's per-device memory and FLOPs (XLA:CPU compiler; skip
with --nocompile), model FLOPs per step, and the step time at `--mfu` of `--peak_tflops`
per device. Exits with status 1, saying "does not fit", when the per-device memory exceeds
`--device_memory_gb`. TPU topologies need the libtpu compiler, which is not installed here.
"""
from __future__ import annotations

import os
import sys

from absl import flags

FLAGS = flags.FLAGS
flags.DEFINE_string("config", None, "Config file and preset, e.g. configs/ehr_bert.py:1b.")
flags.DEFINE_integer("devices", 8, "Fake CPU devices to build the mesh over.")
flags.DEFINE_integer("vocab_size", 20_000, "Code vocabulary size to assume (the data decides it in a real run).")
flags.DEFINE_float("device_memory_gb", 80.0, "Memory per device; more than this is reported as not fitting.")
flags.DEFINE_float("peak_tflops", 989.0, "Per-device peak (dense bf16 TFLOP/s; 989 is an H100 SXM).")
flags.DEFINE_float("mfu", 0.4, "Model FLOPs utilisation to assume for the step time.")
flags.DEFINE_bool("compile", True, "Compile the train step (slower; gives the compiler's memory and FLOPs).")
flags.mark_flags_as_required(["config"])


def main(argv, overrides):
  del argv
  from biofm_jax.config import load_config
  from biofm_jax.train.aot import size_training
  try:
    config = load_config(FLAGS.config, overrides)
    sizing = size_training(config, vocab_size=FLAGS.vocab_size, compile=FLAGS.compile)
  except (KeyError, ValueError, FileNotFoundError) as e:
    sys.exit(f"error: {e}")
  gib = 2**30
  print(f"=== {FLAGS.config} on {FLAGS.devices} devices, mesh {sizing.mesh} ===")
  print(f"  parameters             {sizing.num_params / 1e9:.3f} B")
  print(f"  params per device      {sizing.param_bytes_per_device / gib:.3f} GiB")
  print(f"  optimiser per device   {sizing.optimizer_bytes_per_device / gib:.3f} GiB")
  if sizing.compiled_bytes_per_device is not None:
    print(f"  compiled step memory   {sizing.compiled_bytes_per_device / gib:.3f} GiB per device (XLA:CPU)")
  print(f"  model FLOPs per step   {sizing.model_flops_per_step:.3e}")
  if sizing.compiler_flops_per_step is not None:
    print(f"  compiler FLOPs         {sizing.compiler_flops_per_step:.3e} per device (a scanned layer counted once)")
  seconds = sizing.step_seconds(FLAGS.peak_tflops * 1e12, FLAGS.mfu)
  print(f"  step time              {seconds * 1e3:.3g} ms at {FLAGS.mfu:.0%} MFU of {FLAGS.peak_tflops:g} TFLOP/s "
        f"per device")
  need = sizing.bytes_per_device() / gib
  if need > FLAGS.device_memory_gb:
    print(f"  does not fit: {need:.2f} GiB per device > {FLAGS.device_memory_gb:g} GiB; add devices (FSDP) or "
          f"reduce data.batch_size / model size")
    sys.exit(1)
  counted = "compiled step" if sizing.compiled_bytes_per_device is not None else "state only, no activations"
  print(f"  fits: {need:.2f} GiB of {FLAGS.device_memory_gb:g} GiB per device ({counted})")


if __name__ == "__main__":
  # The fake device count must be set before jax is imported.
  count = next((a.split("=", 1)[1] for a in sys.argv if a.startswith("--devices=")), "8")
  os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={count}"
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  from biofm_jax import cli
  cli.run(main)
