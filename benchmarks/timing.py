"""Step timing shared by the benchmarks, free of any framework import (the peer's process
imports torch only)."""
from __future__ import annotations

import time

CHUNK_STEPS = 5


def median_step_time(run_step, steps: int, wait, chunk: int = CHUNK_STEPS) -> tuple[float, float]:
  """(median, fastest) seconds per step over chunks of `chunk` steps (`run_step(i)`
  returns what `wait` blocks on). A shared or virtual machine stalls now and then; a mean
  over one block of steps moves with every stall, the median chunk does not. Steps that
  differ (batches of different modalities) take a chunk of one cycle through them."""
  chunks = []
  for first in range(0, max(steps, chunk), chunk):
    start = time.perf_counter()
    for i in range(first, first + chunk):
      out = run_step(i)
    wait(out)
    chunks.append((time.perf_counter() - start) / chunk)
  chunks.sort()
  return chunks[len(chunks) // 2], chunks[0]
