"""The pre-training loop: set up, init or restore, step, log, evaluate, checkpoint.

Read top to bottom, like big_vision's train.py:
  1. run record and mesh   2. data   3. model, objective, optimiser
  4. state: restore the latest checkpoint or initialise directly sharded
  5. compiled steps        6. the loop   7. final checkpoint and summary
A run killed at any point (even kill -9) resumes from its last complete checkpoint,
data order included. SIGTERM (a preempted VM) saves a checkpoint before exiting.
"""
from __future__ import annotations

import logging
import math
import os
import pathlib
import signal
import time
from typing import Any

import jax
import ml_collections
import numpy as np

from biofm_jax import parallel
from biofm_jax.config import write_run_info
from biofm_jax.data import pipeline
from biofm_jax.eval.baselines import reference_losses
from biofm_jax.models.model import build_model, model_flops_per_token
from biofm_jax.objectives import build_objective
from biofm_jax.train import state as state_lib
from biofm_jax.train import step as step_lib
from biofm_jax.train.checkpoint import Checkpointer
from biofm_jax.train.metrics import MetricWriter, Throughput, format_duration, measure_peak_flops

log = logging.getLogger("biofm_jax")
TRAIN_SPLIT, EVAL_SPLIT = "train", "tuning"


class StopRequested:
  """Turns SIGTERM into a flag the loop checks between steps, so it can checkpoint first."""

  def __init__(self):
    self.requested = False
    self._previous = None

  def __enter__(self):
    def handler(signum, frame):
      log.warning("received signal %d: saving a checkpoint and stopping", signum)
      self.requested = True
    try:
      self._previous = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread (e.g. a notebook worker): no handler
      self._previous = None
    return self

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)


def example_batch(data_module, num_examples: int) -> dict:
  """Zeros shaped like a batch of `num_examples`, to trace the model's init."""
  return {data_module.name: {name: np.zeros((num_examples,) + shape, dtype)
                             for name, (shape, dtype) in data_module.example_spec().items()}}


def evaluate(eval_step, params, data_module, objective, config, mesh) -> dict[str, float]:
  """One pass over the tuning split (or `train.eval_batches` batches): exact token averages."""
  dataset = pipeline.make_eval_dataset(
      data_module.source(EVAL_SPLIT), data_module.transforms(train=False), modality=data_module.name,
      global_batch_size=config.data.batch_size, seed=config.seed, example_spec=data_module.example_spec())
  sums, counts = {}, {}
  for i, host_batch in enumerate(pipeline.make_iterator(dataset)):
    if config.train.eval_batches and i >= config.train.eval_batches:
      break
    out = jax.device_get(eval_step(params, parallel.make_global_batch(host_batch, mesh)))
    for name in out["sums"]:
      sums[name] = sums.get(name, 0.0) + float(out["sums"][name])
      counts[name] = counts.get(name, 0.0) + float(out["counts"][name])
  return summarize_eval(objective, sums, counts)


def summarize_eval(objective, sums: dict[str, float], counts: dict[str, float]) -> dict[str, float]:
  """Token averages of every term, the weighted training loss, and (next-event) perplexity."""
  result = {f"eval/{name}": sums[name] / max(counts[name], 1.0) for name in sums}
  result["eval/loss"] = sum(w * result[f"eval/{name}"] for name, w in objective.loss_weights.items())
  if objective.name == "autoregressive":
    result["eval/perplexity"] = math.exp(min(result["eval/code_loss"], 50.0))
  return result


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | os.PathLike) -> dict[str, Any]:
  """Pre-trains as `config` says, in `workdir`; returns the run's summary."""
  start_time = time.time()
  workdir = pathlib.Path(workdir).absolute()
  is_chief = jax.process_index() == 0

  # ------------------------------------------------------------ 1. run record and mesh
  if is_chief:
    workdir.mkdir(parents=True, exist_ok=True)
    write_run_info(config, workdir)
  mesh = parallel.make_mesh(config.mesh)
  rules = parallel.logical_rules(config.mesh)
  accum = config.train.grad_accum_steps
  parallel.check_batch_divides_mesh(config.data.batch_size, mesh, accum)
  log.info("mesh %s on %d devices (%d processes)", dict(mesh.shape), jax.device_count(), jax.process_count())

  # ------------------------------------------------------------ 2. data
  modalities = [name for name in config.data.keys() if name in pipeline.DATA_MODULES]
  if len(modalities) != 1:
    raise ValueError(f"config.data must configure exactly one of {sorted(pipeline.DATA_MODULES)}; "
                     f"found {modalities}")
  data_module = pipeline.DATA_MODULES[modalities[0]](
      config.data[modalities[0]], objective=config.objective.name, artifacts_dir=workdir / "artifacts")
  for key, value in data_module.summary().items():
    log.info("data %s: %s", key, value)
  baselines = reference_losses(data_module, config, train_split=TRAIN_SPLIT, eval_split=EVAL_SPLIT)
  for key, value in baselines.items():
    log.info("%s: %.4f (a context-free model's %s loss on the evaluation batches)", key, value, EVAL_SPLIT)
  train_dataset = pipeline.make_train_dataset(
      data_module.source(TRAIN_SPLIT), data_module.transforms(train=True), modality=data_module.name,
      global_batch_size=config.data.batch_size, seed=config.seed)
  train_iter = pipeline.make_iterator(train_dataset, num_workers=config.data.num_workers)

  # ------------------------------------------------------------ 3. model, objective, optimiser
  model = build_model(config, {data_module.name: data_module.model_info()})
  objective = build_objective(config.objective)
  tx = state_lib.make_optimizer(config.train)
  schedule = state_lib.learning_rate_schedule(config.train)
  batch_shards = math.prod(mesh.shape[a] for a in parallel.BATCH_AXES)
  init_batch = example_batch(data_module, batch_shards)

  # ------------------------------------------------------------ 4. state: restore or init
  abstract, shardings = state_lib.abstract_state(model, tx, init_batch, mesh, rules)
  checkpointer = Checkpointer(workdir / "checkpoints", keep=config.checkpoint.keep,
                              async_save=config.checkpoint.async_save)
  latest = checkpointer.latest_step()
  if latest is not None:
    state = checkpointer.restore(latest, abstract, train_iter)
    log.info("resumed from checkpoint step %d", latest)
  else:
    state = state_lib.create_sharded_state(model, tx, init_batch, mesh, rules, config.seed)
  start_step = int(jax.device_get(state.step))
  num_params = state_lib.param_count(state.params)
  log.info("model: %s parameters", f"{num_params:,}")

  # ------------------------------------------------------------ 5. compiled steps
  train_step = step_lib.jit_train_step(model, tx, objective, schedule, shardings, mesh, rules, accum)
  eval_step = step_lib.jit_eval_step(model, objective, shardings.params, mesh, rules)
  seq_len = data_module.model_info()["max_len"]
  tokens_per_step = config.data.batch_size * seq_len
  peak = config.train.peak_flops_per_device * jax.device_count()
  if not peak:
    # On CPU the fake devices share one machine, whose matmul rate is the peak.
    peak = measure_peak_flops() * (1 if jax.default_backend() == "cpu" else jax.device_count())
  throughput = Throughput(examples_per_step=config.data.batch_size, tokens_per_step=tokens_per_step,
                          flops_per_step=model_flops_per_token(model, seq_len) * tokens_per_step,
                          peak_flops=peak, total_steps=config.train.num_steps)
  writer = MetricWriter(workdir, resume_step=start_step, enabled=is_chief)

  # ------------------------------------------------------------ 6. the loop
  num_steps = config.train.num_steps
  log.info("training steps %d -> %d, global batch %d x %d tokens", start_step, num_steps,
           config.data.batch_size, seq_len)
  last_train, last_eval, stopped_early = {}, {}, False
  step = start_step
  with StopRequested() as stop:
    while step < num_steps:
      host_batch = next(train_iter)
      state, metrics = train_step(state, parallel.make_global_batch(host_batch, mesh))
      step += 1
      if step == start_step + 1:  # time from the end of the first (compiling) step
        jax.block_until_ready(metrics)
        throughput.start(step)
      if step % config.train.log_every == 0 or step == num_steps:
        last_train = {f"train/{k}": float(v) for k, v in jax.device_get(metrics).items()}
        perf = throughput.report(step)
        writer.write(step, {**last_train, **perf})
        log.info("step %*d/%d | loss %.4f | lr %.2e | %s ex/s | %s tok/s | MFU %.2f%% | ETA %s",
                 len(str(num_steps)), step, num_steps, last_train["train/loss"],
                 last_train["train/learning_rate"], f"{perf.get('perf/examples_per_s', 0):,.0f}",
                 f"{perf.get('perf/tokens_per_s', 0):,.0f}", 100 * perf.get("perf/mfu", 0.0),
                 format_duration(perf.get("perf/eta_s", 0)))
      if step % config.train.eval_every == 0 or step == num_steps:
        last_eval = evaluate(eval_step, state.params, data_module, objective, config, mesh)
        writer.write(step, last_eval)
        log.info("eval at step %d | %s", step, " | ".join(f"{k[5:]} {v:.4f}" for k, v in last_eval.items()))
        throughput.start(step)  # evaluation time is not training throughput
      if step % config.checkpoint.every_steps == 0 or step == num_steps or stop.requested:
        checkpointer.save(step, state, train_iter, config, force=True)
      if stop.requested:
        stopped_early = True
        break

  # ------------------------------------------------------------ 7. final checkpoint and summary
  checkpointer.close()
  writer.close()
  summary = {"steps": step, "start_step": start_step, "stopped_early": stopped_early,
             "num_params": num_params, "mesh": dict(mesh.shape), "wall_time_s": time.time() - start_time,
             "checkpoint": str(checkpointer.directory), **last_train, **last_eval, **baselines}
  return summary
