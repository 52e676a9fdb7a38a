"""Size presets up to billions of parameters, FSDP shrinking per-device state as 1/N, and
the ahead-of-time compile command on a fake CPU mesh and on a TPU slice (TPU compiler)."""
import importlib.util
import re
import subprocess
import sys

import pytest

import helpers
from biofm_jax.hardware import topology
from biofm_jax.modalities import registry
from biofm_jax.train import aot
from biofm_jax.train.aot import size_training

pytestmark = pytest.mark.devices(8)  # sizes runs over meshes of up to 8 devices (tests/conftest.py)


@pytest.mark.parametrize("spec, low, high", [
    ("ehr_bert.py:large", 0.25e9, 0.4e9), ("ehr_bert.py:1b", 1.0e9, 1.5e9), ("ehr_bert.py:7b", 6.0e9, 7.0e9),
    ("ehr_gpt.py:1b", 1.0e9, 1.5e9), ("ehr_motor.py:large", 0.3e9, 0.4e9), ("imaging_mae.py:large", 0.3e9, 0.4e9), ("imaging_mae3d.py:1b", 1.0e9, 1.5e9),
    ("imaging_mae.py:7b", 6.0e9, 7.0e9), ("omics_sequence.py:1b", 1.0e9, 1.5e9)])
def test_size_presets_have_the_parameters_they_promise(spec, low, high):
  sizing = size_training(helpers.config_for(f"configs/{spec}"), compile=False)
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


@pytest.mark.parametrize("name, devices, tpu_topology", [
    ("v5p-256", 128, "v5p:4x4x8"), ("v4-32", 16, "v4:2x2x4"), ("v5e-256", 256, "v5e:16x16"),
    ("v6e-8", 8, "v6e:2x4"), ("h100-16", 16, None)])
def test_topology_names_resolve_to_the_slices_cloud_tpu_and_gpu_hosts_have(name, devices, tpu_topology):
  slice_ = topology(name)
  assert (slice_.num_devices, slice_.tpu_topology) == (devices, tpu_topology)


@pytest.mark.parametrize("name, message", [("v5p-3", "no v5p slice of that size"), ("x9-8", "unknown kind"),
                                           ("v5p", "expected <kind>-<count>")])
def test_bad_topology_names_are_refused(name, message):
  with pytest.raises(ValueError, match=message):
    topology(name)


def test_compile_command_sizes_a_tpu_slice_with_the_tpu_compiler():
  if importlib.util.find_spec("libtpu") is None:
    pytest.skip("the TPU compiler (libtpu, pip install -e '.[tpu]') is not installed")
  run = subprocess.run([sys.executable, "experiments/compile.py", "--config=configs/ehr_bert.py:tiny",
                        "--topology=v5e-4"], cwd=helpers.REPO, capture_output=True, text=True, timeout=300)
  assert run.returncode == 0, run.stderr[-2000:]
  assert "v5e-4 (4 devices, TPU compiler, topology v5e:2x2), mesh {'data': 4, 'fsdp': 1, 'tensor': 1}" in run.stdout
  memory = float(re.search(r"compiled step memory\s+([\d.]+) GiB per device \(TPU\)", run.stdout).group(1))
  assert 0 < memory < 1, run.stdout
  assert "of 16 GiB per device" in run.stdout and "of 197 TFLOP/s" in run.stdout  # v5e's datasheet
  # The TPU compiler's own refusal becomes "does not fit", with its figures.
  too_big = subprocess.run([sys.executable, "experiments/compile.py", "--config=configs/ehr_bert.py:7b",
                            "--topology=v5e-256"], cwd=helpers.REPO, capture_output=True, text=True, timeout=300)
  assert too_big.returncode == 1, too_big.stderr[-2000:]
  assert "does not fit: the compiler says RESOURCE_EXHAUSTED" in too_big.stdout, too_big.stdout


def test_sizing_for_an_accelerator_compiles_the_scanned_layers_a_run_there_would_use():
  # model.layer_loop="auto" unrolls on this CPU host; a TPU or GPU run scans: its program
  # holds one loop over the layers where the CPU's holds none.
  config = helpers.config_for("configs/ehr_bert.py:tiny")
  assert config.model.layer_loop == "auto" and config.model.num_layers >= 2
  here, tpu = (size_training(config, platform=p) for p in ("cpu", "tpu"))
  assert (here.layer_loop, tpu.layer_loop) == ("unroll", "scan")
  assert here.compiler_flops_per_step == pytest.approx(tpu.compiler_flops_per_step, rel=0.05)  # same model
  assert _while_loops(config, "cpu") == 0 and _while_loops(config, "tpu") >= 1
  pinned = size_training(helpers.config_for("configs/ehr_bert.py:tiny", model__layer_loop="unroll"), platform="tpu")
  assert pinned.layer_loop == "unroll"  # an explicit choice is kept
  assert config.model.layer_loop == "auto"  # the caller's config is not changed


def _while_loops(config, platform) -> int:
  from biofm_jax.train.build import build_training
  resolved = aot._for_platform(config, platform)
  data = aot.abstract_data(resolved, 20_000)
  setup = build_training(resolved, data, None)
  batch = aot.abstract_batch(data.example_spec(), resolved.data.batch_size, aot._batch_sharding(setup))
  return setup.train_step.lower(setup.abstract_state, batch).as_text().count("stablehlo.while")


def test_sizing_a_run_with_image_augmentation_in_the_step_compiles_it_from_canvas_batches():
  """With `augment="device"` the sized step takes canvas-size images and seeds, as the run's
  does, and its compiled cost holds the augmentation."""
  host, device = (size_training(helpers.config_for("configs/imaging_mae.py:tiny", mesh__data=8, **extra))
                  for extra in ({}, {"data__imaging__augment": "device", "data__imaging__canvas_size": (48, 48)}))
  assert device.num_params == host.num_params and device.model_flops_per_step == host.model_flops_per_step
  assert device.compiler_flops_per_step > host.compiler_flops_per_step


# ---------------------------------------------------------------- every registry row
def _row_objectives(with_sizing: bool) -> list[tuple[str, str]]:
  return [(name, objective) for name, row in registry.MODALITIES.items() if (row.sizing is not None) == with_sizing
          for objective in row.objectives]


@pytest.fixture(scope="module")
def tiny_pretraining_configs() -> dict:
  """{(modality, objective name): the tiny preset of a single-modality config in configs/}.
  finetune.py adapts a pre-trained model and the fusion config joins modalities: neither is
  one row's pre-training."""
  found = {}
  for path in sorted((helpers.REPO / "configs").glob("*.py")):
    if path.name in ("__init__.py", "finetune.py"):
      continue
    config = helpers.config_for(f"configs/{path.name}:tiny")
    present = registry.configured(config.data)
    if len(present) == 1 and "multimodal" not in config.data:
      found.setdefault((present[0], config.objective.name), config)
  return found


@pytest.mark.parametrize("modality, objective", _row_objectives(with_sizing=True))
def test_every_registry_row_with_sizing_sizes_and_compiles_each_of_its_objectives(modality, objective,
                                                                                 tiny_pretraining_configs):
  config = tiny_pretraining_configs.get((modality, objective))
  assert config is not None, f"no tiny config in configs/ pre-trains {modality} with {objective}: add one"
  stand_in = aot.abstract_data(config, 64)
  assert set(stand_in.model_info()) == {modality} and set(stand_in.example_spec()) == {modality}
  sizing = size_training(config, vocab_size=64)
  assert sizing.num_params > 0 and sizing.model_flops_per_step > 0
  # The compiled step holds at least the state it is handed (parameters and optimiser state).
  assert sizing.compiled_bytes_per_device >= sizing.param_bytes_per_device + sizing.optimizer_bytes_per_device > 0


@pytest.mark.parametrize("modality, objective", _row_objectives(with_sizing=False))
def test_registry_rows_without_sizing_are_refused_saying_their_data_decides_the_shapes(modality, objective,
                                                                                     tiny_pretraining_configs):
  config = tiny_pretraining_configs.get((modality, objective))
  assert config is not None, f"no tiny config in configs/ pre-trains {modality} with {objective}: add one"
  with pytest.raises(ValueError, match=rf"^config\.data\.{modality} cannot be sized ahead of time: its data "
                                       r"decides its shapes \(the registry row has sizing=None\)"):
    size_training(config, compile=False)


def test_compile_command_sizes_an_ecg_config():
  run = subprocess.run([sys.executable, "experiments/compile.py", "--devices=2", "--nocompile",
                        "--config=configs/ecg_mae.py:tiny"], cwd=helpers.REPO, capture_output=True, text=True,
                       timeout=300)
  assert run.returncode == 0, run.stderr[-2000:]
  assert "mesh {'data': 2, 'fsdp': 1, 'tensor': 1}" in run.stdout and "fits:" in run.stdout, run.stdout
