"""Test helpers shared by every modality's training tests: run, compare, resume.

A modality's tests pass their own config; these helpers own how a run is started (in
process or as a killable subprocess) and how runs are compared, so each modality checks
mesh agreement and exact resume the same way.
"""
from __future__ import annotations

import os
import pathlib
import signal
import subprocess
import sys
import time

import jax
import numpy as np

from biofm_jax.config import load_config
from biofm_jax.eval import classical
from biofm_jax.eval.metrics import task_metrics
from biofm_jax.train.loop import train_and_evaluate
from biofm_jax.train.metric_writer import read_metrics

REPO = pathlib.Path(__file__).resolve().parent.parent
QUIET = {"train.peak_flops_per_device": 1e9}  # skip the matmul peak measurement in tests
# A subprocess that trains for hundreds of steps: LLVM fully optimising (not the suite's -O0),
# with XLA:CPU's older fusion emitters, which compile sooner and here also run faster (the
# retrieval run, 300 steps of configs/multimodal_fusion.py:tiny widened, alone on this VM:
# 118 s with the default emitters, 95 s with these, the same recalls to four digits). No
# persistent cache: jax 0.10.2's XLA:CPU has aborted loading such a step back from it.
OPTIMISED_ENV = {"XLA_FLAGS": "--xla_cpu_use_fusion_emitters=false", "JAX_ENABLE_COMPILATION_CACHE": "false"}


class Jitted:
  """A Linen model whose `init` and `apply` each run as one compiled program.

  Called outside jit, a model dispatches every primitive on its own, and each new shape of
  each primitive compiles once per test process: at the suite's -O0 that costs more than
  compiling the whole function once. Other attributes are the model's.
  """

  def __init__(self, model):
    self.module = model
    self.init = jax.jit(model.init, static_argnames=("train",))
    self.apply = jax.jit(model.apply, static_argnames=("train",))

  def __getattr__(self, name):
    return getattr(self.module, name)


def config_for(spec: str, **overrides):
  flat = {**QUIET, **{k.replace("__", "."): v for k, v in overrides.items()}}
  return load_config(str(REPO / spec), flat)


def train(config, workdir) -> dict:
  return train_and_evaluate(config, workdir)


def train_losses(workdir) -> dict[int, float]:
  return {r["step"]: r["train/loss"] for r in read_metrics(workdir) if "train/loss" in r}


def final_params(workdir, config):
  """The parameters of the workdir's latest checkpoint, as host numpy arrays."""
  import orbax.checkpoint as ocp
  step_dir = pathlib.Path(workdir) / "checkpoints"
  latest = max(int(p.name) for p in step_dir.iterdir() if p.name.isdigit())
  path = step_dir / str(latest) / "state"
  checkpointer = ocp.StandardCheckpointer()
  metadata = checkpointer.metadata(path)
  metadata = getattr(metadata, "item_metadata", metadata)
  # Onto this process's first device, whatever mesh and process count wrote the step.
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), dict(metadata))
  restored = checkpointer.restore(path, target)
  return jax.tree.map(np.asarray, restored["params"])


def assert_trees_close(a, b, atol: float) -> None:
  flat_a, flat_b = jax.tree_util.tree_leaves_with_path(a), jax.tree_util.tree_leaves_with_path(b)
  assert [p for p, _ in flat_a] == [p for p, _ in flat_b]
  for (path, x), (_, y) in zip(flat_a, flat_b):
    np.testing.assert_allclose(x, y, atol=atol, rtol=0, err_msg=jax.tree_util.keystr(path))


def assert_curves_close(a: dict[int, float], b: dict[int, float], atol: float) -> None:
  assert sorted(a) == sorted(b), (sorted(a), sorted(b))
  np.testing.assert_allclose([a[s] for s in sorted(a)], [b[s] for s in sorted(b)], atol=atol, rtol=0)


def pretrain_command(spec: str, workdir, overrides: dict) -> list[str]:
  args = [sys.executable, str(REPO / "experiments" / "pretrain.py"), f"--config={REPO / spec}",
          f"--workdir={workdir}"]
  return args + [f"--config.{k}={v}" for k, v in {**QUIET, **overrides}.items()]


def start_pretrain(spec: str, workdir, overrides: dict, log_path, env: dict | None = None) -> subprocess.Popen:
  """Starts experiments/pretrain.py as a subprocess with the test process's XLA flags (the
  same 8 fake devices and compiler settings, so its numbers match an in-process run)."""
  env = {**os.environ, "JAX_PLATFORMS": "cpu", **(env or {})}
  log = open(log_path, "ab")
  return subprocess.Popen(pretrain_command(spec, workdir, overrides), stdout=log, stderr=subprocess.STDOUT,
                          env=env, cwd=REPO)


def wait_for_checkpoint(workdir, min_step: int, process: subprocess.Popen, timeout: float = 240) -> int:
  """Polls until a complete checkpoint of at least `min_step` exists."""
  step_dir = pathlib.Path(workdir) / "checkpoints"
  deadline = time.time() + timeout
  while time.time() < deadline:
    steps = [int(p.name) for p in step_dir.glob("*") if p.name.isdigit()] if step_dir.exists() else []
    if steps and max(steps) >= min_step:
      return max(steps)
    if process.poll() is not None:
      raise AssertionError(f"training process exited with {process.returncode} before step {min_step}")
    time.sleep(0.2)
  raise AssertionError(f"no checkpoint of step >= {min_step} within {timeout} s")


def kill(process: subprocess.Popen, sig=signal.SIGKILL) -> int:
  process.send_signal(sig)
  return process.wait(timeout=120)


# ---------------------------------------------------------------- checks every modality runs
def mesh_overrides(shape) -> dict:
  data, fsdp, tensor = shape
  return dict(mesh__data=data, mesh__fsdp=fsdp, mesh__tensor=tensor)


def constant_lr_overrides(num_steps: int, **extra) -> dict:
  """Logs every step; a constant learning rate after warm-up, so the first k steps of a run
  do not depend on its length (a run of k steps is a prefix of a longer one). No evaluation
  (these runs compare training curves and parameters), unless `extra` asks for it."""
  return {**dict(train__num_steps=num_steps, train__log_every=1, train__eval_every=0,
                 train__final_lr_fraction=1.0, checkpoint__every_steps=5), **extra}


def train_on_meshes(spec: str, meshes, make_workdir, **overrides) -> dict:
  """Trains `spec` once per mesh shape; returns {shape: (workdir, config)}."""
  runs = {}
  for shape in meshes:
    workdir = make_workdir("mesh_" + "x".join(map(str, shape)))
    config = config_for(spec, **{**overrides, **mesh_overrides(shape)})
    train(config, workdir)
    runs[shape] = (workdir, config)
  return runs


def assert_runs_agree(runs: dict, atol: float = 1e-5, param_atol: float | None = None) -> None:
  """Same loss curve and final parameters on every mesh, and a curve that really moved."""
  (ref_dir, ref_config), *others = runs.values()
  reference = train_losses(ref_dir)
  assert len(reference) > 1 and reference[max(reference)] != reference[min(reference)]
  for workdir, config in others:
    assert_curves_close(train_losses(workdir), reference, atol=atol)
    assert_trees_close(final_params(workdir, config), final_params(ref_dir, ref_config),
                       atol=param_atol or atol)


def assert_resume_reproduces(spec: str, workdir, *, stop_at: int, num_steps: int, reference_dir=None,
                             atol: float = 1e-6, **overrides) -> None:
  """Runs to `stop_at`, resumes to `num_steps` (in `workdir`), and compares the whole loss
  curve and the final parameters with an uninterrupted run (trained in `reference_dir`
  unless that already holds one)."""
  workdir = pathlib.Path(workdir)
  reference_dir = pathlib.Path(reference_dir or workdir.parent / (workdir.name + "_reference"))
  full = config_for(spec, **{**overrides, **constant_lr_overrides(num_steps)})
  if not (reference_dir / "metrics.jsonl").exists():
    train(full, reference_dir)
  train(config_for(spec, **{**overrides, **constant_lr_overrides(stop_at)}), workdir)
  summary = train(full, workdir)
  assert summary["start_step"] == stop_at
  assert_curves_close(train_losses(workdir), train_losses(reference_dir), atol=atol)
  assert_trees_close(final_params(workdir, full), final_params(reference_dir, full), atol=atol)


def pretrain_and_restore(spec: str, workdir, *, optimised: bool = False, **overrides):
  """Trains `spec` in `workdir`, then rebuilds its data module and training setup and
  restores the latest parameters: (config, data module, setup, params, metrics).

  `optimised`: train in a subprocess on one CPU device with fully optimised code (not the
  suite's quick-compiling -O0): for learning checks of hundreds of steps whose step time,
  not compile time, dominates (the DNA 6-mer model's 300 steps: 165 s in-process, 74 s so)."""
  from biofm_jax.train.runs import open_run
  flat = {"train.log_every": 10, "train.eval_every": 100, "checkpoint.every_steps": 1000,
          **{k.replace("__", "."): v for k, v in overrides.items()}}
  config = config_for(spec, **flat)
  if optimised:
    log = pathlib.Path(workdir).parent / f"{pathlib.Path(workdir).name}.log"
    process = start_pretrain(spec, workdir, flat, log, env=OPTIMISED_ENV)
    assert process.wait(timeout=900) == 0, log.read_text()[-3000:]
  else:
    train(config, workdir)
  config, data, setup, params, _ = open_run(workdir, config)
  return config, data, setup, params, read_metrics(workdir)


def probe_accuracy(train_x, train_y, test_x, test_y) -> float:
  """Held-out accuracy of the reports' linear probe (L2 logistic regression, as
  `experiments/evaluate.py` fits it) on embeddings."""
  labels = test_y.astype(int)
  probs = classical.fit_predict("logistic", "multiclass", train_x, train_y.astype(int), test_x,
                                num_classes=int(max(train_y.max(), labels.max())) + 1)
  return task_metrics("multiclass", {"label": labels}, probs)["accuracy"]


def probe_auroc(train_x, train_y, test_x, test_y) -> float:
  probs = classical.fit_predict("logistic", "binary", train_x, train_y.astype(int), test_x)
  return task_metrics("binary", {"label": test_y.astype(int)}, probs)["auroc"]


def binary_scores_in_predictions(eval_dir, model: str, split: str) -> dict:
  """AUROC and row count recomputed from the per-row predictions file a report wrote
  (`eval/prediction_files.py`), to hold the report's figures to."""
  import pyarrow.parquet as pq
  from sklearn.metrics import roc_auc_score
  table = pq.read_table(pathlib.Path(eval_dir) / "predictions" / model / f"{split}.parquet").to_pydict()
  truth = np.asarray(table["boolean_value"], bool)
  return {"n": len(truth), "auroc": float(roc_auc_score(truth, np.asarray(table["predicted_boolean_probability"])))}


def predicted_scores(table: dict, task_type: str, classes=()) -> np.ndarray:
  """The scores a predictions table (`eval/prediction_files.py`, as a pydict) holds, in the
  form `eval/metrics.py` takes them: a probability per row, or per row and class."""
  if task_type == "binary":
    return np.asarray(table["predicted_boolean_probability"])
  if task_type == "multiclass":
    return np.stack([table[f"predicted_categorical_value_probability_{c}"] for c in classes], axis=1)
  if task_type == "multilabel":
    return np.stack([table[f"predicted_{c}_probability"] for c in classes], axis=1)
  if task_type == "survival":
    return np.asarray(table["predicted_risk"])
  return np.asarray(table["predicted_float_value"])


def true_labels(table: dict, task_type: str, classes=()) -> np.ndarray:
  """The true label column of a predictions table, as the task's targets (class ids)."""
  if task_type == "binary":
    return np.asarray(table["boolean_value"], np.float32)
  if task_type == "multiclass":
    return np.asarray([list(classes).index(c) for c in table["categorical_value"]], np.int32)
  return np.asarray(table["float_value"], np.float32)


def params_at_init(setup, config):
  """The same architecture's parameters before any training (the seed a run starts from): the
  probe on its embeddings is what pre-training must improve on."""
  return jax.tree.map(np.asarray, setup.init_state(seed=config.seed).params)


def export_and_compare_task_logits(run_dir, export_dir, modality: str):
  """Exports a fine-tuned run with experiments/export.py and checks that the export, loaded
  without the library, gives the library's task logits on a held-out batch. Returns
  (the loaded export, the library's logits, the export's)."""
  from biofm_jax import parallel
  from biofm_jax.data import pipeline
  from biofm_jax.export import load_exported
  from biofm_jax.train.runs import open_run
  from biofm_jax.train.step import jit_embed_step
  result = subprocess.run([sys.executable, "experiments/export.py", f"--workdir={run_dir}", f"--out={export_dir}"],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-2000:]
  _, data, setup, params, _ = open_run(run_dir)
  exported = load_exported(export_dir)
  dataset = pipeline.make_eval_dataset(data.source("held_out"), data.transforms(train=False),
                                       global_batch_size=16, seed=0, example_spec=data.example_spec())
  batch = next(iter(pipeline.make_iterator(dataset)))
  logits = np.asarray(jit_embed_step(setup.model, ("task", "logits"), setup.state_shardings.params, setup.mesh,
                                     setup.rules)(params, parallel.make_global_batch(batch, setup.mesh)))
  got = np.asarray(exported({modality: batch[modality]}))
  np.testing.assert_allclose(got, logits, atol=1e-5)
  return exported, logits, got
