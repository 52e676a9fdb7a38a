"""The pre-training loop: set up, init or restore, step, log, evaluate, checkpoint.

Read top to bottom, like big_vision's train.py:
  1. run record   2. data   3. model, objective, optimiser, compiled steps
  4. state: restore the latest checkpoint or initialise directly sharded
  5. the loop     6. final checkpoint and summary
The loop asks nothing about the kind of run: the data module brings its training stream
and data metrics (`data/module.py`), the objective its derived metrics, final evaluations
and summary lines (`objectives/base.py`), the model its cost per example.
A run killed at any point (even kill -9) resumes from its last complete checkpoint,
data order included. SIGTERM (a preempted VM) saves a checkpoint before exiting.
"""
from __future__ import annotations

import logging
import os
import pathlib
import signal
import time
from typing import Any, Callable

import jax
import ml_collections
import numpy as np
from jax.experimental import multihost_utils

from biofm_jax import parallel
from biofm_jax.config import ARCHITECTURE_DEFAULTS, check_config, config_to_dict, write_run_info
from biofm_jax.data import batch as batch_lib
from biofm_jax.data import pipeline
from biofm_jax.modalities import registry
from biofm_jax.train import state as state_lib
from biofm_jax.train.best_step import BestStep
from biofm_jax.train.build import build_training
from biofm_jax.train.checkpoint import Checkpointer, restore_run_params
from biofm_jax.train.metric_writer import MetricMeans, MetricWriter, Throughput, format_duration, measure_peak_flops
from biofm_jax.train.embed import embed_split_outputs

log = logging.getLogger("biofm_jax")
TRAIN_SPLIT, EVAL_SPLIT = "train", "tuning"
# Config sections a resumed run must share with the run that wrote the checkpoint: they
# decide the data order, the vocabulary and the parameter shapes. Mesh and step counts may change.
RESUME_INVARIANT_SECTIONS = ("seed", "data", "model", "objective", "task", "finetune")
# How the model runs, not what it computes or stores: a run may resume under other values
# (a checkpoint written on a GPU, where layers scan, resumes on a CPU, where they unroll).
RESUME_FREE_FIELDS = ("model.layer_loop", "model.attention")


class StopRequested:
  """Turns SIGTERM into a flag the loop checks between steps, so it can checkpoint first.

  With several processes the flag is agreed on every step: one preempted host stops all
  of them at the same step, so none waits forever in a collective or a checkpoint barrier.
  """

  def __init__(self):
    self._local = False
    self._previous = None

  def __enter__(self):
    def handler(signum, frame):
      log.warning("received signal %d: saving a checkpoint and stopping", signum)
      self._local = True
    try:
      self._previous = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread (e.g. a notebook worker): no handler
      self._previous = None
    return self

  def requested(self) -> bool:
    if jax.process_count() == 1:
      return self._local
    return bool(multihost_utils.process_allgather(np.array(self._local)).any())

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)


def open_data_module(config: ml_collections.ConfigDict, artifacts_dir: pathlib.Path):
  """Pre-training's data module (`registry.open_pretraining_data`); with several processes
  only the first writes a prepared folder's artifacts."""
  return registry.open_pretraining_data(config, artifacts_dir, writes_artifacts=jax.process_index() == 0)


def open_once(open_module: Callable[[], Any]):
  """`open_module()`, with several processes first in process 0: it writes the shared
  artifacts (a generated cohort, the vocabulary) that the others then read."""
  if jax.process_count() == 1:
    return open_module()
  module = open_module() if jax.process_index() == 0 else None
  multihost_utils.sync_global_devices("biofm_jax: data artifacts prepared")
  return module or open_module()


def make_train_iterator(data_module, config: ml_collections.ConfigDict):
  """The endless, checkpointable stream of per-process training batches."""
  layout = data_layout(parallel.make_mesh(config.mesh))
  dataset = data_module.make_train_dataset(global_batch_size=config.data.batch_size, seed=config.seed, **layout)
  return pipeline.make_iterator(dataset, num_workers=config.data.num_workers)


def data_layout(mesh) -> dict[str, int]:
  """This process's data shard of `mesh`, as the pipeline's process layout: processes
  whose devices hold the same batch rows read the same examples."""
  index, count = parallel.data_shard(mesh)
  return {"process_index": index, "process_count": count}


def check_resume_compatible(saved: dict, config: ml_collections.ConfigDict, step: int) -> None:
  """Fails, naming the fields, if the checkpoint was written under other data or model settings."""
  current = config_to_dict(config)
  def flatten(d, prefix=""):
    if not isinstance(d, dict):
      return {prefix: d}
    return {k: v for key, value in d.items() for k, v in flatten(value, f"{prefix}.{key}" if prefix else key).items()}
  old, new = ({k: v for k, v in flatten({s: c.get(s) for s in RESUME_INVARIANT_SECTIONS}).items()}
              for c in (saved, current))
  # A run saved before an architecture option existed was built with its default.
  old.update({f"model.{name}": default for name, default in ARCHITECTURE_DEFAULTS.items()
              if f"model.{name}" not in old and saved.get("model") is not None})
  changed = sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k) and k not in RESUME_FREE_FIELDS)
  if changed:
    details = ", ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in changed[:10])
    raise ValueError(f"the checkpoint at step {step} was written with other settings ({details}); "
                     f"resume with the same data/model/objective config, or use a new workdir")


def evaluate(setup, params, data_module, config) -> dict[str, float]:
  """One pass over the tuning split (or `train.eval_batches` batches): exact token averages."""
  dataset = pipeline.make_eval_dataset(
      data_module.source(EVAL_SPLIT), data_module.transforms(train=False),
      global_batch_size=config.data.batch_size, seed=config.seed, example_spec=data_module.example_spec(),
      **data_layout(setup.mesh))
  sums, counts = {}, {}
  for i, host_batch in enumerate(pipeline.make_iterator(dataset)):
    if config.train.eval_batches and i >= config.train.eval_batches:
      break
    out = jax.device_get(setup.eval_step(params, parallel.make_global_batch(host_batch, setup.mesh)))
    for name in out["sums"]:
      sums[name] = sums.get(name, 0.0) + float(out["sums"][name])
      counts[name] = counts.get(name, 0.0) + float(out["counts"][name])
  return summarize_eval(setup.objective, sums, counts)


def summarize_eval(objective, sums: dict[str, float], counts: dict[str, float]) -> dict[str, float]:
  """Token averages of every term, the weighted training loss, and the objective's own
  figures from them (next-event: perplexity)."""
  means = {name: sums[name] / max(counts[name], 1.0) for name in sums}
  result = {f"eval/{name}": value for name, value in means.items()}
  result["eval/loss"] = sum(w * means[name] for name, w in objective.loss_weights.items() if name in means)
  result.update({f"eval/{name}": value for name, value in objective.derived_metrics(means).items()})
  return result


def final_evaluations(setup, params, data_module, config) -> dict[str, float]:
  """The objective's final evaluations on the tuning split (contrastive alignment:
  cross-modal recall), each under its name; {} with several processes (embedding a split
  runs in one)."""
  evaluations = setup.objective.final_evaluations()
  if not evaluations or jax.process_count() > 1:
    return {}
  embed = lambda outputs: embed_split_outputs(setup, params, data_module, EVAL_SPLIT, outputs,  # noqa: E731
                                              batch_size=config.data.batch_size)
  figures = {}
  for evaluation in evaluations:
    figures.update({f"{evaluation.name}/{k}": v for k, v in evaluation(embed, data_module, EVAL_SPLIT).items()})
  for line in setup.objective.summary_lines(figures):
    log.info("%s", line)
  return figures


def log_progress(step: int, num_steps: int, train: dict, perf: dict, objective) -> None:
  real = (f" ({perf['perf/real_tokens_per_s']:,.0f} real, {100 * train['train/padding_fraction']:.0f}% padding)"
          if "perf/real_tokens_per_s" in perf else "")
  log.info("step %*d/%d | loss %.4f%s | lr %.2e | %s ex/s | %s tok/s%s | MFU %.2f%% | ETA %s",
           len(str(num_steps)), step, num_steps, train["train/loss"], loss_parts(train, objective),
           train["train/learning_rate"], f"{perf.get('perf/examples_per_s', 0):,.0f}",
           f"{perf.get('perf/tokens_per_s', 0):,.0f}", real, 100 * perf.get("perf/mfu", 0.0),
           format_duration(perf.get("perf/eta_s", 0)))


def loss_parts(train: dict, objective) -> str:
  """" (ehr 4.10, imaging 0.71, ...)": the weighted loss of each part of a multimodal objective."""
  parts: dict[str, float] = {}
  for name, weight in objective.loss_weights.items():
    if "/" in name and f"train/{name}" in train:
      prefix = name.split("/", 1)[0]
      parts[prefix] = parts.get(prefix, 0.0) + weight * train[f"train/{name}"]
  return f" ({', '.join(f'{k} {v:.2f}' for k, v in parts.items())})" if parts else ""


def step_cost(model, batch_size: int) -> Callable[[Any], tuple[float, float]]:
  """host batch -> (token slots, model FLOPs) of one global step, as the model counts the
  modalities the batch holds (a multimodal batch by availability pattern leaves some out)."""
  by_keys: dict[tuple[str, ...], tuple[float, float]] = {}

  def cost_of(host_batch):
    keys = tuple(sorted(host_batch))
    if keys not in by_keys:
      by_keys[keys] = (batch_size * model.tokens_per_example(modalities=keys),
                       batch_size * model.flops_per_example(modalities=keys))
    return by_keys[keys]
  return cost_of


def peak_flops(config) -> float:
  if config.train.peak_flops_per_device:
    return config.train.peak_flops_per_device * jax.device_count()
  # On CPU the fake devices share one machine, whose matmul rate is the peak.
  return measure_peak_flops() * (1 if jax.default_backend() == "cpu" else jax.device_count())


def fresh_state(config: ml_collections.ConfigDict, setup) -> Any:
  """A new run's first state: initialised from `config.seed`, with the parameters of the run
  `config.train.init_from` names where it names one (the optimiser starts afresh)."""
  state = setup.init_state(config.seed)
  if not config.train.get("init_from"):
    return state
  step, params = restore_run_params(config.train.init_from, setup.abstract_state.params)
  log.info("parameters from %s (its step %d): %s of them", config.train.init_from, step,
           f"{state_lib.param_count(params):,}")
  return state.replace(params=params)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | os.PathLike, *,
                       open_data: Callable[[pathlib.Path], Any] | None = None,
                       build: Callable[..., Any] = build_training,
                       initial_state: Callable[[Any], Any] | None = None) -> dict[str, Any]:
  """Trains as `config` says, in `workdir`; returns the run's summary. What is trained comes
  from the caller: `open_data(artifacts_dir)` gives the data module, `build(config, data)`
  the training setup, `initial_state(setup)` the state of a fresh run. The defaults
  pre-train (`open_data_module`, the registry's model and objective, a fresh
  initialisation); fine-tuning passes its own (`train/finetune.py: finetune`)."""
  start_time = time.time()
  check_config(config)  # a config built in code, too, fails on its fields before any data is read
  workdir = pathlib.Path(workdir).absolute()
  is_chief = jax.process_index() == 0

  # ------------------------------------------------------------ 1. run record
  if is_chief:
    workdir.mkdir(parents=True, exist_ok=True)
    write_run_info(config, workdir)

  # ------------------------------------------------------------ 2. data
  artifacts_dir = workdir / "artifacts"
  data_module = open_once(lambda: (open_data or (lambda d: open_data_module(config, d)))(artifacts_dir))
  log.info("data (%s): %s", data_module.name, ", ".join(f"{k}={v}" for k, v in data_module.summary().items()))
  evaluates = config.train.eval_every > 0 and pipeline.has_split(data_module, EVAL_SPLIT)
  if config.train.eval_every <= 0:
    log.info("train.eval_every=%d: no evaluation (periodic, final or retrieval)", config.train.eval_every)
  elif not evaluates:
    log.warning("no %r split with records: periodic evaluation is skipped", EVAL_SPLIT)
  baselines = (registry.reference_losses(data_module, config, train_split=TRAIN_SPLIT, eval_split=EVAL_SPLIT)
               if evaluates else {})
  for key, value in baselines.items():
    log.info("%s: %.4f (a context-free model's loss on the %s evaluation batches)", key, value, EVAL_SPLIT)
  train_iter = make_train_iterator(data_module, config)

  # ------------------------------------------------------------ 3. model, objective, optimiser, steps
  setup = build(config, data_module)
  log.info("mesh %s on %d devices (%d processes)", dict(setup.mesh.shape), jax.device_count(),
           jax.process_count())

  # ------------------------------------------------------------ 4. state: restore or init
  best = BestStep.from_config(config, evaluates)
  checkpointer = Checkpointer(workdir / "checkpoints", keep=config.checkpoint.keep,
                              async_save=config.checkpoint.async_save, best_metric=best.metric,
                              best_mode=best.mode)
  latest, state = checkpointer.restore_latest(
      setup.abstract_state, train_iter, lambda saved, step: check_resume_compatible(saved, config, step))
  if latest is not None:
    log.info("resumed from checkpoint step %d", latest)
  else:
    state = initial_state(setup) if initial_state is not None else fresh_state(config, setup)
  start_step = int(jax.device_get(state.step))
  best.resume(checkpointer, start_step, config.train.eval_every)
  num_params = state_lib.param_count(state.params)
  log.info("model: %s parameters", f"{num_params:,}")

  # ------------------------------------------------------------ 5. the loop
  batch_size, num_steps = config.data.batch_size, config.train.num_steps
  throughput = Throughput(examples_per_step=batch_size, peak_flops=peak_flops(config), total_steps=num_steps)
  cost_of = step_cost(setup.model, batch_size)
  train_means = MetricMeans()  # train/... lines are means over the steps since the last line
  writer = MetricWriter(workdir, resume_step=start_step, enabled=is_chief)
  log.info("training steps %d -> %d, global batch %d x %d tokens", start_step, num_steps, batch_size,
           setup.model.tokens_per_example())
  last_train, last_eval, stopped_early, patience_out = {}, {}, False, best.patience_out()
  step = start_step
  tokens = [0, 0]  # this process's real tokens and token slots since the last log line
  data_metrics = data_module.train_metrics() if is_chief else {}  # written with every train line
  first_row: dict[str, float] = {}  # metrics written once, with the first logged step
  try:
    with StopRequested() as stop:
      while step < num_steps and not patience_out:
        host_batch = next(train_iter)
        real, slots = batch_lib.token_slots(host_batch)
        tokens[0], tokens[1] = tokens[0] + real, tokens[1] + slots
        state, metrics = setup.train_step(state, parallel.make_global_batch(host_batch, setup.mesh))
        throughput.count(*cost_of(host_batch))
        train_means.add(metrics)
        step += 1
        if step == start_step + 1:  # time from the end of the first (compiling) step
          jax.block_until_ready(metrics)
          throughput.start(step)
          # Opening the data, building the model and compiling: what a (re)start costs.
          first_row = {"perf/time_to_first_step_s": time.time() - start_time}
        if step % config.train.log_every == 0 or step == num_steps:
          last_train = {f"train/{k}": v for k, v in train_means.pop().items()}
          perf = throughput.report(step)
          if tokens[1]:  # token sequences: what padding cost since the last line
            last_train["train/padding_fraction"] = 1.0 - tokens[0] / tokens[1]
            perf["perf/real_tokens_per_s"] = perf.get("perf/tokens_per_s", 0.0) * tokens[0] / tokens[1]
          tokens = [0, 0]
          writer.write(step, {**last_train, **perf, **data_metrics, **first_row})
          first_row = {}
          log_progress(step, num_steps, last_train, perf, setup.objective)
        evaluated = evaluates and (step % config.train.eval_every == 0 or step == num_steps)
        if evaluated:
          last_eval = evaluate(setup, state.params, data_module, config)
          writer.write(step, last_eval)
          log.info("eval at step %d | %s", step, " | ".join(f"{k[5:]} {v:.4f}" for k, v in last_eval.items()))
          throughput.start(step)  # evaluation time is not training throughput
          patience_out = best.record(step, last_eval)
        stopped_early = stop.requested()
        figure = {best.metric: last_eval[best.metric]} if best.metric and evaluated else None  # saved beside
        if step % config.checkpoint.every_steps == 0 or step == num_steps or stopped_early or patience_out or figure:
          checkpointer.save(step, state, train_iter, config, force=True, metrics=figure)
        if stopped_early:
          break
    if patience_out:
      log.info("stopped at step %d: %s has not improved on step %d's %.4f for %d evaluations "
               "(checkpoint.best_patience)", step, best.metric, best.best_step, best.best_value, best.patience)
    final = {}
    if not stopped_early and evaluates and step > start_step:
      final = final_evaluations(setup, state.params, data_module, config)
      if final:
        writer.write(step, final)
  finally:
    # Also on errors: finish an in-flight async save and flush the metric files.
    checkpointer.close()
    writer.close()

  # ------------------------------------------------------------ 6. summary
  chosen = {"best_step": best.best_step, f"best/{best.metric}": best.best_value} if best.best_step is not None else {}
  return {"steps": step, "start_step": start_step, "stopped_early": stopped_early, "num_params": num_params, **chosen,
          "mesh": dict(setup.mesh.shape), "wall_time_s": time.time() - start_time,
          "checkpoint": str(checkpointer.directory), **last_train, **last_eval, **baselines, **final,
          "summary_lines": setup.objective.summary_lines({**last_eval, **baselines, **final})}
