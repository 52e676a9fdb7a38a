"""Two processes on 127.0.0.1 (jax.distributed, CPU collectives through gloo), 4 fake devices
each, train exactly as one process with 8 devices; a run resumes with another process count.

Global batch k holds the same examples whatever the process count (`data/pipeline.py`), so
the loss curves agree to float32 reduction order.
"""
import os
import socket
import subprocess

import pytest

import helpers
from biofm_jax.train.metric_writer import read_metrics

pytestmark = pytest.mark.devices(8)  # the one-process reference runs on 8 devices (tests/conftest.py)

SPEC = "configs/ehr_bert.py:tiny"
STEPS = 10


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def run_processes(workdir, overrides: dict, num_processes: int = 2, devices_per_process: int = 4) -> None:
  """Runs experiments/pretrain.py as `num_processes` processes of one job; all must succeed."""
  port = free_port()
  # The persistent compilation cache stays off in these children: jax 0.10.2's XLA:CPU has
  # aborted loading some programs back from it (see test_multimodal_retrieval.py).
  env = {**os.environ, "XLA_FLAGS": os.environ["XLA_FLAGS"].replace(  # conftest.py's, with fewer devices
             "device_count=8", f"device_count={devices_per_process}"),
         "JAX_PLATFORMS": "cpu", "JAX_ENABLE_COMPILATION_CACHE": "false"}
  processes = []
  for index in range(num_processes):
    args = helpers.pretrain_command(SPEC, workdir, {k.replace("__", "."): v for k, v in overrides.items()}) + [
        f"--coordinator_address=127.0.0.1:{port}", f"--num_processes={num_processes}", f"--process_id={index}"]
    log = open(workdir.parent / f"{workdir.name}_process{index}.log", "wb")
    processes.append((subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=helpers.REPO), log))
  for index, (process, log) in enumerate(processes):
    code = process.wait(timeout=600)
    log.close()
    assert code == 0, (workdir.parent / f"{workdir.name}_process{index}.log").read_text()[-3000:]


def test_two_processes_train_exactly_as_one(tmp_path):
  # With the final evaluation, which the two processes also run together.
  overrides = {**helpers.constant_lr_overrides(STEPS, train__eval_every=STEPS), **helpers.mesh_overrides((2, 4, 1))}
  run_processes(tmp_path / "two", overrides)
  summary = helpers.train(helpers.config_for(SPEC, **overrides), tmp_path / "one")
  assert (tmp_path / "two" / "checkpoints" / str(STEPS) / "data" / "process_1-of-2.json").exists()
  two_eval = [r["eval/loss"] for r in read_metrics(tmp_path / "two") if "eval/loss" in r]
  assert len(two_eval) == 1 and abs(two_eval[0] - summary["eval/loss"]) < 1e-5
  helpers.assert_curves_close(helpers.train_losses(tmp_path / "two"), helpers.train_losses(tmp_path / "one"),
                              atol=1e-5)
  helpers.assert_trees_close(helpers.final_params(tmp_path / "two", None),
                             helpers.final_params(tmp_path / "one", None), atol=1e-5)


def test_a_run_resumes_with_another_number_of_processes(tmp_path):
  total = 2 * STEPS
  reference = tmp_path / "reference"
  helpers.train(helpers.config_for(SPEC, **helpers.constant_lr_overrides(total)), reference)
  # Saved by two processes, resumed by one ...
  run_processes(tmp_path / "two_then_one", helpers.constant_lr_overrides(STEPS))
  summary = helpers.train(helpers.config_for(SPEC, **helpers.constant_lr_overrides(total)), tmp_path / "two_then_one")
  assert summary["start_step"] == STEPS
  # ... and saved by one, resumed by two.
  helpers.train(helpers.config_for(SPEC, **helpers.constant_lr_overrides(STEPS)), tmp_path / "one_then_two")
  run_processes(tmp_path / "one_then_two", helpers.constant_lr_overrides(total))
  for workdir in (tmp_path / "two_then_one", tmp_path / "one_then_two"):
    helpers.assert_curves_close(helpers.train_losses(workdir), helpers.train_losses(reference), atol=1e-5)
    helpers.assert_trees_close(helpers.final_params(workdir, None), helpers.final_params(reference, None), atol=1e-5)


def test_a_tensor_axis_across_processes_feeds_both_the_same_examples(tmp_path):
  """One device per process and mesh (1, 1, 2): the tensor axis spans the processes, the
  batch is replicated over them, so both read the whole global batch."""
  overrides = {**helpers.constant_lr_overrides(STEPS), **helpers.mesh_overrides((1, 1, 2))}
  run_processes(tmp_path / "two", overrides, devices_per_process=1)
  helpers.train(helpers.config_for(SPEC, **helpers.constant_lr_overrides(STEPS)), tmp_path / "one")
  helpers.assert_curves_close(helpers.train_losses(tmp_path / "two"), helpers.train_losses(tmp_path / "one"),
                              atol=1e-5)
