"""Keeps freed host memory inside the process, so XLA:CPU steps stop paying page faults.

XLA:CPU allocates each execution's temporary buffer (130 MB for `ehr_bert.py:demo`'s train
step) from one of its worker threads. glibc serves a request that large from a thread's
arena with a fresh `mmap` whatever its thresholds say, and unmaps it when the step ends, so
every step page-faults the whole buffer in again: 33,500 faults and about a third of the
demo step on this kind of machine (benchmarks/RESULTS.md). With one arena, no `mmap` and no
trimming, the buffer is reused from the heap at no cost; the process keeps its peak memory.

Only for processes that compute on the CPU, and only before jax starts its threads (arenas
already handed out keep their settings). No jax import here, for that reason. Set
BIOFM_JAX_MALLOC=default to leave glibc's defaults (a process that must hand memory back).
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

# mallopt(3) parameters, from glibc's malloc.h.
M_TRIM_THRESHOLD, M_MMAP_MAX, M_ARENA_MAX = -1, -4, -8
# The trim threshold is a size_t set through an int: -1 is the largest size, "never trim".
# A finite one (2 GB) is not enough: `ehr_bert.py:base`'s step frees a larger buffer, which
# was handed back and faulted in again every step (1.1 million faults, half the step).
KEEP_FREED_MEMORY = ((M_ARENA_MAX, 1), (M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, -1))


def keep_freed_host_memory() -> bool:
  """Sets glibc's allocator to keep freed memory (see the module docstring); True when it
  took effect; False where the C library is not glibc or BIOFM_JAX_MALLOC=default (nothing changes)."""
  if os.environ.get("BIOFM_JAX_MALLOC") == "default" or not sys.platform.startswith("linux"):
    return False
  try:
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    libc.gnu_get_libc_version  # glibc only: other C libraries' mallopt means something else
  except (OSError, AttributeError):
    return False
  return all(libc.mallopt(option, value) == 1 for option, value in KEEP_FREED_MEMORY)
