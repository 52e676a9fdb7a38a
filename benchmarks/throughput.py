"""Training-step and input-pipeline throughput of a config, with MFU against this machine.

  python benchmarks/throughput.py --config=configs/ehr_bert.py:demo [--steps=50] [--workers=0] \
      [--override=data.ehr.path=/data/meds]

Measures, in one process (examples are records: timelines for EHR, images for imaging,
subjects for the multimodal join):
  - the float32 matmul peak of this machine (the MFU denominator on CPU),
  - the jitted train step alone on device-resident batches (model speed, MFU),
  - the Grain pipeline alone: read, tokenise, mask and batch (examples/s),
so a run whose pipeline is slower than its step is visibly input-bound. Prints one JSON
line per measurement; add them to benchmarks/RESULTS.md with the machine they ran on.
"""
from __future__ import annotations

import argparse
import json
import pathlib
import platform
import sys
import tempfile
import time

REPO = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

# As every command: JAX on the CPU where no accelerator is attached, and there freed host
# memory kept in the process (biofm_jax/host_memory.py), set before jax starts.
from biofm_jax import cli  # noqa: E402,F401

import jax  # noqa: E402

from biofm_jax import parallel  # noqa: E402
from biofm_jax.config import load_config  # noqa: E402
from biofm_jax.train.loop import make_train_iterator, open_data_module, peak_flops  # noqa: E402
from biofm_jax.train import state as state_lib  # noqa: E402
from biofm_jax.train.build import build_training  # noqa: E402
from timing import median_step_time  # noqa: E402  (benchmarks/timing.py)


def time_train_step(config, data, batches, steps: int, warmup: int = 2) -> dict:
  setup = build_training(config, data)
  state = setup.init_state(config.seed)
  device_batches = [parallel.make_global_batch(b, setup.mesh) for b in batches]
  for i in range(warmup):  # the first compiles; the next lets the host heap reach its working size
    state, metrics = setup.train_step(state, device_batches[i % len(device_batches)])
  jax.block_until_ready(metrics)

  def run(i):
    nonlocal state, metrics
    state, metrics = setup.train_step(state, device_batches[i % len(device_batches)])
    return metrics

  step_time, fastest = median_step_time(run, steps, jax.block_until_ready)
  tokens = config.data.batch_size * setup.model.tokens_per_example()
  return {"step_time_s": step_time, "step_time_min_s": fastest, "examples_per_s": config.data.batch_size / step_time,
          "tokens_per_s": tokens / step_time,
          "model_flops_per_step": config.data.batch_size * setup.model.flops_per_example(),
          "num_params": state_lib.param_count(state.params)}


def time_pipeline(config, data, batches_to_read: int, workers: int) -> tuple[dict, list]:
  config.data.num_workers = workers
  iterator = make_train_iterator(data, config)  # exactly the training loop's stream
  first = [next(iterator) for _ in range(2)]  # start-up (workers, first reads) is not throughput
  start = time.perf_counter()
  for _ in range(batches_to_read):
    next(iterator)
  seconds = time.perf_counter() - start
  return {"pipeline_examples_per_s": batches_to_read * config.data.batch_size / seconds,
          "pipeline_workers": workers}, first


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--config", default="configs/ehr_bert.py:demo")
  parser.add_argument("--steps", type=int, default=30)
  parser.add_argument("--workers", type=int, default=0)
  parser.add_argument("--pipeline_only", action="store_true",
                      help="measure the input pipeline only (for configs whose step is too slow for this machine)")
  parser.add_argument("--batches", type=int, default=20, help="pipeline batches to time")
  parser.add_argument("--override", action="append", default=[],
                      help="config overrides as field=value, e.g. data.ehr.path=/data/meds")
  args = parser.parse_args()
  config = load_config(str(REPO / args.config), dict(o.split("=", 1) for o in args.override))
  with tempfile.TemporaryDirectory() as tmp:
    data = open_data_module(config, pathlib.Path(tmp))
    pipe, batches = time_pipeline(config, data, batches_to_read=args.batches, workers=args.workers)
    result = {"config": args.config, "modality": data.name, "backend": jax.default_backend(),
              "devices": jax.device_count(), "device_kind": jax.devices()[0].device_kind,
              "machine": platform.processor() or platform.machine(), "batch_size": config.data.batch_size, **pipe}
    if not args.pipeline_only:
      peak = peak_flops(config)  # the loop's MFU denominator, so both report the same MFU
      step = time_train_step(config, data, batches, args.steps)
      result.update(peak_flops=peak, **step, mfu=step["model_flops_per_step"] / step["step_time_s"] / peak)
  print(json.dumps(result))


if __name__ == "__main__":
  main()
