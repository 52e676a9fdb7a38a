"""Training-step and input-pipeline throughput of a config, with MFU against this machine.

  python benchmarks/throughput.py --config=configs/ehr_bert.py:demo [--steps=50] [--workers=0]

Measures, in one process:
  - the float32 matmul peak of this machine (the MFU denominator on CPU),
  - the jitted train step alone on device-resident batches (model speed, MFU),
  - the Grain pipeline alone: read, tokenise, mask and batch (examples/s),
so a run whose pipeline is slower than its step is visibly input-bound. Prints one JSON
line per measurement; add them to benchmarks/RESULTS.md with the machine they ran on.
"""
from __future__ import annotations

import argparse
import json
import math
import pathlib
import platform
import sys
import tempfile
import time

import jax

REPO = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from biofm_jax import parallel  # noqa: E402
from biofm_jax.config import load_config  # noqa: E402
from biofm_jax.data import pipeline  # noqa: E402
from biofm_jax.models.model import build_model, model_flops_per_token  # noqa: E402
from biofm_jax.objectives import build_objective  # noqa: E402
from biofm_jax.train import state as state_lib  # noqa: E402
from biofm_jax.train import step as step_lib  # noqa: E402
from biofm_jax.train.loop import example_batch  # noqa: E402
from biofm_jax.train.metrics import measure_peak_flops  # noqa: E402


def time_train_step(config, data, batches, steps: int) -> dict:
  mesh, rules = parallel.make_mesh(config.mesh), parallel.logical_rules(config.mesh)
  model = build_model(config, {data.name: data.model_info()})
  objective, tx = build_objective(config.objective), state_lib.make_optimizer(config.train)
  shards = math.prod(mesh.shape[a] for a in parallel.BATCH_AXES)
  init_batch = example_batch(data, shards)
  _, shardings = state_lib.abstract_state(model, tx, init_batch, mesh, rules)
  state = state_lib.create_sharded_state(model, tx, init_batch, mesh, rules, config.seed)
  step = step_lib.jit_train_step(model, tx, objective, state_lib.learning_rate_schedule(config.train), shardings,
                                 mesh, rules, config.train.grad_accum_steps)
  device_batches = [parallel.make_global_batch(b, mesh) for b in batches]
  state, metrics = step(state, device_batches[0])  # compile
  jax.block_until_ready(metrics)
  start = time.perf_counter()
  for i in range(steps):
    state, metrics = step(state, device_batches[i % len(device_batches)])
  jax.block_until_ready(metrics)
  step_time = (time.perf_counter() - start) / steps
  seq_len = data.model_info()["max_len"]
  tokens = config.data.batch_size * seq_len
  return {"step_time_s": step_time, "examples_per_s": config.data.batch_size / step_time,
          "tokens_per_s": tokens / step_time, "model_flops_per_step": model_flops_per_token(model, seq_len) * tokens,
          "num_params": state_lib.param_count(state.params)}


def time_pipeline(config, data, batches_to_read: int, workers: int) -> tuple[dict, list]:
  dataset = pipeline.make_train_dataset(data.source("train"), data.transforms(train=True), modality=data.name,
                                        global_batch_size=config.data.batch_size, seed=config.seed)
  iterator = pipeline.make_iterator(dataset, num_workers=workers)
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
  parser.add_argument("--data_path", default="", help="a MEDS directory; default: a generated cohort")
  args = parser.parse_args()
  config = load_config(str(REPO / args.config) if ":" in args.config else args.config,
                       {"data.ehr.path": args.data_path} if args.data_path else {})
  with tempfile.TemporaryDirectory() as tmp:
    data = pipeline.DATA_MODULES["ehr"](config.data.ehr, objective=config.objective.name,
                                        artifacts_dir=pathlib.Path(tmp))
    peak = measure_peak_flops()
    pipe, batches = time_pipeline(config, data, batches_to_read=20, workers=args.workers)
    step = time_train_step(config, data, batches, args.steps)
  result = {"config": args.config, "backend": jax.default_backend(), "devices": jax.device_count(),
            "device_kind": jax.devices()[0].device_kind, "machine": platform.processor() or platform.machine(),
            "matmul_peak_flops": peak, **step, "mfu": step["model_flops_per_step"] / step["step_time_s"] / peak, **pipe}
  print(json.dumps(result))


if __name__ == "__main__":
  main()
