"""Freed host memory stays in the process (biofm_jax/host_memory.py): a large buffer that a
worker thread frees and allocates again is not page-faulted in a second time."""
import os
import subprocess
import sys

import pytest

# In a fresh interpreter, as the commands do before jax starts: a worker thread (as XLA:CPU's
# are) allocates and frees a 96 MB buffer, larger than a thread arena's heap, then does it
# again; the second allocation's page faults are printed.
CHILD = """
import ctypes, resource, threading
from biofm_jax.host_memory import keep_freed_host_memory
kept = keep_freed_host_memory()
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
faults = []
def work():  # plain malloc, as XLA's buffers (numpy would ask for huge pages)
  for _ in range(2):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    buffer = libc.malloc(96 * 2**20)
    ctypes.memset(buffer, 1, 96 * 2**20)
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    libc.free(buffer)
thread = threading.Thread(target=work)
thread.start(); thread.join()
print(kept, faults[1])
"""
PAGES = 96 * 2**20 // 4096


def _second_allocation(malloc: str) -> tuple[str, int]:
  env = {**os.environ, "BIOFM_JAX_MALLOC": malloc}
  out = subprocess.run([sys.executable, "-c", CHILD], env=env, capture_output=True, text=True, check=True)
  kept, faults = out.stdout.split()
  return kept, int(faults)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator")
def test_a_freed_buffer_is_reused_without_page_faults():
  kept, faults = _second_allocation("keep")
  assert kept == "True"
  assert faults < PAGES // 20, faults
  default_kept, default_faults = _second_allocation("default")  # glibc's defaults: every page again
  assert default_kept == "False"
  assert default_faults > PAGES // 2, default_faults
