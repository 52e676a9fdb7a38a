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
from biofm_jax.train.loop import train_and_evaluate
from biofm_jax.train.metrics import read_metrics

REPO = pathlib.Path(__file__).resolve().parent.parent
QUIET = {"train.peak_flops_per_device": 1e9}  # skip the matmul peak measurement in tests


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
  restored = ocp.StandardCheckpointer().restore(step_dir / str(latest) / "state")
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


def start_pretrain(spec: str, workdir, overrides: dict, log_path) -> subprocess.Popen:
  """Starts experiments/pretrain.py as a subprocess with the same 8 fake devices."""
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu"}
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
