"""Size presets up to billions of parameters, FSDP shrinking per-device state as 1/N, and
the ahead-of-time compile command on a fake CPU mesh."""
import subprocess
import sys

import pytest

import helpers
from biofm_jax.train.aot import size_training


@pytest.mark.parametrize("preset, low, high", [("large", 0.25e9, 0.4e9), ("1b", 1.0e9, 1.5e9), ("7b", 6.0e9, 7.0e9)])
def test_size_presets_have_the_parameters_they_promise(preset, low, high):
  sizing = size_training(helpers.config_for(f"configs/ehr_bert.py:{preset}"), compile=False)
  assert low < sizing.num_params < high, sizing.num_params
  assert sizing.mesh == {"data": 1, "fsdp": 8, "tensor": 1}


def test_fsdp_shrinks_parameters_and_optimiser_state_per_device_as_one_over_n():
  def sizing(data, fsdp):
    return size_training(helpers.config_for("configs/ehr_bert.py:large", mesh__data=data, mesh__fsdp=fsdp),
                         compile=False)
  replicated, fsdp8, fsdp2 = sizing(8, 1), sizing(1, 8), sizing(4, 2)
  assert replicated.param_bytes_per_device == pytest.approx(4 * replicated.num_params, rel=1e-6)  # float32, whole
  for sharded, n in ((fsdp8, 8), (fsdp2, 2)):
    assert sharded.param_bytes_per_device == pytest.approx(replicated.param_bytes_per_device / n, rel=0.01)
    assert sharded.optimizer_bytes_per_device == pytest.approx(replicated.optimizer_bytes_per_device / n, rel=0.01)


def test_compile_command_reports_memory_flops_and_step_time_and_what_does_not_fit():
  run = [sys.executable, "experiments/compile.py", "--devices=8"]
  fits = subprocess.run(run + ["--config=configs/ehr_bert.py:tiny"], cwd=helpers.REPO, capture_output=True,
                        text=True, timeout=300)
  assert fits.returncode == 0, fits.stderr[-2000:]
  for line in ("compiled step memory", "model FLOPs per step", "step time", "fits:"):
    assert line in fits.stdout, fits.stdout
  too_big = subprocess.run(run + ["--config=configs/ehr_bert.py:7b", "--nocompile", "--device_memory_gb=4"],
                           cwd=helpers.REPO, capture_output=True, text=True, timeout=300)
  assert too_big.returncode == 1 and "does not fit" in too_big.stdout, too_big.stdout + too_big.stderr[-2000:]
