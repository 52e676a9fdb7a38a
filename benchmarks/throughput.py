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
import numpy as np  # noqa: E402

from biofm_jax import parallel  # noqa: E402
from biofm_jax.config import load_config  # noqa: E402
from biofm_jax.models.fusion import MultimodalModel  # noqa: E402
from biofm_jax.train.loop import make_train_iterator, open_data_module, peak_flops, step_cost  # noqa: E402
from biofm_jax.train import state as state_lib  # noqa: E402
from biofm_jax.train.build import build_training  # noqa: E402
from timing import CHUNK_STEPS, median_step_time  # noqa: E402  (benchmarks/timing.py)


def time_train_step(config, data, batches, steps: int, warmup: int = 2) -> dict:
  """The jitted step cycling through `batches`. Batches that hold different modalities
  (multimodal batching by pattern) are different compiled steps: each is warmed up, a
  timing chunk is one cycle through all of them, and the model FLOPs are their mean."""
  setup = build_training(config, data)
  state = setup.init_state(config.seed)
  device_batches = [parallel.make_global_batch(b, setup.mesh) for b in batches]
  kinds = {tuple(sorted(b)): i for i, b in enumerate(batches)}
  for i in sorted(kinds.values()):
    for _ in range(warmup):  # the first compiles; the next lets the host heap reach its working size
      state, metrics = setup.train_step(state, device_batches[i])
  jax.block_until_ready(metrics)

  def run(i):
    nonlocal state, metrics
    state, metrics = setup.train_step(state, device_batches[i % len(device_batches)])
    return metrics

  chunk = len(batches) if len(kinds) > 1 else CHUNK_STEPS
  step_time, fastest = median_step_time(run, max(steps, chunk), jax.block_until_ready, chunk=chunk)
  cost_of = step_cost(setup.model, config.data.batch_size)
  tokens, flops = (sum(values) / len(batches) for values in zip(*(cost_of(b) for b in batches)))
  result = {"step_time_s": step_time, "step_time_min_s": fastest, "examples_per_s": config.data.batch_size / step_time,
            "tokens_per_s": tokens / step_time, "model_flops_per_step": flops, "batch_kinds": len(kinds),
            "num_params": state_lib.param_count(state.params)}
  if isinstance(setup.model, MultimodalModel):
    result["present_flops_per_step"] = present_flops(setup.model, batches)
  return result


def present_flops(model, batches) -> float:
  """Mean model FLOPs per step of each example's present modalities only: the work a
  step has to do, whatever it computes for absent slots (the same yardstick for mixed
  batches and batches by pattern)."""
  total = 0.0
  for b in batches:
    names = sorted(b)
    present = np.stack([np.asarray(b[m]["present"], bool) for m in names], axis=1)
    for row in present:
      total += model.flops_per_example(modalities=tuple(m for m, p in zip(names, row) if p))
  return total / len(batches)


def time_pipeline(config, data, batches_to_read: int, workers: int, keep: int = 2) -> tuple[dict, list]:
  """Pipeline examples/s, and the first `keep` batches (for the step's timing)."""
  config.data.num_workers = workers
  iterator = make_train_iterator(data, config)  # exactly the training loop's stream
  first = [next(iterator) for _ in range(keep)]  # start-up (workers, first reads) is not throughput
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
  parser.add_argument("--step_batches", type=int, default=2,
                      help="distinct batches the step cycles through (more for multimodal batching by pattern, "
                           "so the cycle holds the patterns in their proportions)")
  parser.add_argument("--override", action="append", default=[],
                      help="config overrides as field=value, e.g. data.ehr.path=/data/meds")
  args = parser.parse_args()
  config = load_config(str(REPO / args.config), dict(o.split("=", 1) for o in args.override))
  with tempfile.TemporaryDirectory() as tmp:
    data = open_data_module(config, pathlib.Path(tmp))
    pipe, batches = time_pipeline(config, data, batches_to_read=args.batches, workers=args.workers,
                                  keep=max(2, args.step_batches))
    result = {"config": args.config, "modality": data.name, "backend": jax.default_backend(),
              "devices": jax.device_count(), "device_kind": jax.devices()[0].device_kind,
              "machine": platform.processor() or platform.machine(), "batch_size": config.data.batch_size, **pipe}
    if not args.pipeline_only:
      peak = peak_flops(config)  # the loop's MFU denominator, so both report the same MFU
      step = time_train_step(config, data, batches, args.steps)
      result.update(peak_flops=peak, **step, mfu=step["model_flops_per_step"] / step["step_time_s"] / peak)
      if "present_flops_per_step" in step:  # MFU of the work the present modalities need
        result["present_mfu"] = step["present_flops_per_step"] / step["step_time_s"] / peak
  print(json.dumps(result))


if __name__ == "__main__":
  main()
