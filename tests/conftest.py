"""Test set-up: one CPU device for most tests, 8 fake CPU devices for those that test
sharding (marked `pytest.mark.devices(8)`, a whole file through its `pytestmark`: meshes,
multi-process runs, sizing).

A process's device count is fixed while its backend lives, so a worker switches it between
tests (`use_devices`: the backend is cleared and rebuilt with the test's count). The
parallel runner hands out whole files, and each file's marked tests run after its others,
so a worker switches at most twice per file. One device where a test does not test
sharding: the 8 fake devices are 8 partitions of every step on two cores, about a fifth of
a training-heavy file's time (tests/test_finetune.py and tests/test_record_finetune.py,
cold cache, runs minutes apart: 146 s -> 122-128 s).
"""
import os
import re

# Tests compile hundreds of small programs that then run for milliseconds: LLVM at -O0
# compiles them about a third faster (tests/test_train_step.py: 38 s -> 24 s cold), and the
# longest-running test (multimodal retrieval, 250 steps) takes no longer. XLA:CPU's older
# fusion emitters compile a multimodal train step in half the time of the new MLIR ones
# (configs/multimodal_fusion.py:tiny: 9.6 s -> 4.1 s; the step runs as fast). One LLVM
# module per program rather than several compiled in parallel: with two workers on two cores
# there is no core to spare, and the split only adds work (tests/test_finetune.py alone,
# cold cache: 79 s -> 75 s).
FAST_COMPILE = ("--xla_backend_optimization_level=0 --xla_cpu_use_fusion_emitters=false "
                "--xla_cpu_parallel_codegen_split_count=1")
DEVICE_COUNT_FLAG = "--xla_force_host_platform_device_count"
DEFAULT_DEVICES = 1
# The flag is for the subprocesses tests start (they inherit it, and `use_devices` keeps it
# at the count of the file that starts them); this process's count is jax_num_cpu_devices.
os.environ["XLA_FLAGS"] = (re.sub(rf"{DEVICE_COUNT_FLAG}=\d+", "", os.environ.get("XLA_FLAGS", ""))
                           + f" {FAST_COMPILE} {DEVICE_COUNT_FLAG}={DEFAULT_DEVICES}").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Two pytest workers share two cores: OpenMP's spinning threads in scikit-learn (KMeans,
# gradient boosting) then run 100x slower than one thread per worker.
os.environ.setdefault("OMP_NUM_THREADS", "1")
# Many tests compile the same tiny programs (a resumed run recompiles its first run's
# step); a persistent compilation cache, inherited by subprocesses, compiles each once.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(os.path.dirname(__file__), "..", ".jax_cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

from biofm_jax.host_memory import keep_freed_host_memory  # noqa: E402

keep_freed_host_memory()  # as the commands do: steps stop page-faulting their buffers in

import pathlib  # noqa: E402

import jax  # noqa: E402
import pytest  # noqa: E402
from jax.extend import backend as jax_backend  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parent.parent
jax.config.update("jax_num_cpu_devices", DEFAULT_DEVICES)
_devices = [DEFAULT_DEVICES]


def use_devices(count: int) -> None:
  """This process's CPU device count from now on (and its subprocesses'): the backend, its
  compiled programs and every array on the old devices are dropped when it changes."""
  if count == _devices[0]:
    return
  jax_backend.clear_backends()
  jax.config.update("jax_num_cpu_devices", count)
  os.environ["XLA_FLAGS"] = re.sub(rf"{DEVICE_COUNT_FLAG}=\d+", f"{DEVICE_COUNT_FLAG}={count}",
                                   os.environ["XLA_FLAGS"])
  _devices[0] = count


def devices_of(item) -> int:
  marker = item.get_closest_marker("devices")
  return int(marker.args[0]) if marker else DEFAULT_DEVICES


def pytest_configure(config):
  config.addinivalue_line("markers", f"devices(n): the test runs with n CPU devices (default {DEFAULT_DEVICES})")


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
  """Before a test's fixtures are set up, its device count. Arrays a module fixture holds do
  not survive a switch: a file that mixes counts keeps its fixtures on disk."""
  use_devices(devices_of(item))


@pytest.fixture(scope="session")
def synthetic_meds(tmp_path_factory):
  """A small synthetic MEDS cohort shared by the tests of one worker process."""
  from biofm_jax.modalities.ehr.synthetic import write_synthetic_meds
  return write_synthetic_meds(tmp_path_factory.mktemp("meds") / "cohort", num_subjects=300, seed=0)


# The files that take longest on a cold compile cache, longest first (seconds of one worker,
# measured on the 2-core machine). The parallel runner hands out whole files in collection
# order when told not to reorder them by test count (pytest.ini: --no-loadscope-reorder), so
# starting these first keeps one worker from running a three-minute file alone at the end.
SLOW_FILES = ("test_multimodal_training.py",  # ~400 s
              "test_omics_training.py",  # ~250 s (its learning checks train in optimised subprocesses)
              "test_finetune.py",  # ~240 s
              "test_fused_finetune.py", "test_record_finetune.py",  # ~120 s, ~180 s
              "test_multimodal_retrieval.py",  # ~170 s, one test in a subprocess
              "test_resume.py", "test_multiprocess.py", "test_notebooks.py", "test_imaging_training.py",
              "test_tabular_training.py", "test_meds_tools.py", "test_parallel.py", "test_learning.py",
              "test_time_to_event.py", "test_export.py", "test_ecg.py", "test_zero_shot.py", "test_generate.py",
              "test_ehr_order_trend.py")


def pytest_collection_modifyitems(items):
  first = {}
  for i, item in enumerate(items):
    first.setdefault(item.path, i)

  def rank(item):
    name = item.path.name
    return (SLOW_FILES.index(name) if name in SLOW_FILES else len(SLOW_FILES), first[item.path],
            devices_of(item) != DEFAULT_DEVICES)  # within a file, the tests on other device counts last
  items.sort(key=rank)  # stable: otherwise each file keeps its own order


# Where a test's time goes: with BIOFM_TEST_TIMING=<folder>, each worker writes one JSON line
# per test with its seconds of tracing, lowering, backend compilation and compilation-cache
# reads (jax's own monitoring events; the rest is running, data and Python). Programs that
# subprocesses compile are not counted here.
if os.environ.get("BIOFM_TEST_TIMING"):
  import collections
  import json
  import time

  _TIMED_EVENTS = {"/jax/core/compile/jaxpr_trace_duration": "trace",
                   "/jax/core/compile/jaxpr_to_mlir_module_duration": "lower",
                   "/jax/core/compile/backend_compile_duration": "compile",
                   "/jax/compilation_cache/cache_retrieval_time_sec": "cache_read"}
  _spent: collections.Counter = collections.Counter()

  def _listen(event, duration, **_):
    if event in _TIMED_EVENTS:
      _spent[_TIMED_EVENTS[event]] += duration

  from jax._src import monitoring as _monitoring
  _monitoring.register_event_duration_secs_listener(_listen)

  @pytest.hookimpl(hookwrapper=True)
  def pytest_runtest_protocol(item, nextitem):
    _spent.clear()
    start = time.perf_counter()
    yield
    row = {"test": item.nodeid, "total": round(time.perf_counter() - start, 2),
           **{k: round(v, 2) for k, v in _spent.items()}}
    folder = pathlib.Path(os.environ["BIOFM_TEST_TIMING"])
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / f"{os.environ.get('PYTEST_XDIST_WORKER', 'main')}.jsonl", "a") as f:
      f.write(json.dumps(row) + "\n")
