"""Metric writers (JSON lines + TensorBoard), throughput, ETA and MFU.

`W/metrics.jsonl` holds one JSON object per logged step (`step`, `train/loss`, ...: the
means over the steps since the previous line, `MetricMeans`; evaluations add `eval/...`
keys). On resume, records past the restored step (written
by the interrupted run after its last checkpoint) are dropped, so the file always reads
as one consistent run. Only process 0 writes.
"""
from __future__ import annotations

import json
import math
import os
import pathlib
import re
import sys
import time
from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np


def _summary_writer_class():
  """tensorboardX's SummaryWriter, imported without torch: tensorboardX imports torch whenever
  it is installed, only to accept torch tensors, which we never pass. That import cost every
  command 1.8 s and torch's memory once torch was installed beside us (the public-weights
  tests need it): a suite whose commands start subprocesses ran 25% longer. torch stays
  importable afterwards for code that wants it."""
  blocked = "torch" not in sys.modules
  if blocked:
    sys.modules["torch"] = None  # type: ignore[assignment]  # `import torch` raises ImportError
  try:
    from tensorboardX import SummaryWriter  # here, with torch blocked: see above
  finally:
    if blocked:
      del sys.modules["torch"]
  return SummaryWriter


SummaryWriter = _summary_writer_class()


class MetricWriter:
  def __init__(self, workdir: str | os.PathLike, *, resume_step: int = 0, enabled: bool = True):
    self.enabled = enabled
    self.path = pathlib.Path(workdir) / "metrics.jsonl"
    self._tb = None
    if not enabled:
      return
    self._truncate_after(resume_step)
    self._tb = SummaryWriter(os.fspath(pathlib.Path(workdir) / "tensorboard"), purge_step=resume_step + 1,
                             flush_secs=10)

  def _truncate_after(self, step: int) -> None:
    if not self.path.exists():
      return
    kept = []
    for line in self.path.read_text().splitlines():
      try:
        record = json.loads(line)
      except json.JSONDecodeError:
        continue  # a line cut short by a kill
      if record.get("step", 0) <= step:
        kept.append(line)
    tmp = self.path.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(line + "\n" for line in kept))
    os.replace(tmp, self.path)

  def write(self, step: int, metrics: Mapping[str, float]) -> None:
    if not self.enabled:
      return
    record = {"step": int(step), **{k: _to_float(v) for k, v in metrics.items()}}
    with self.path.open("a") as f:
      f.write(json.dumps(record) + "\n")
    for name, value in record.items():
      if name != "step" and math.isfinite(value):
        self._tb.add_scalar(tensorboard_tag(name), value, step)

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()


# TensorBoard tags allow letters, digits, "_", "-", "." and "/"; tensorboardX rewrites any
# other character to "_" and logs a line for each. Retrieval metrics read better spelt out.
_TAG_WORDS = (("->", "_to_"), ("@", "_at_"))
_TAG_OTHER = re.compile(r"[^-/\w.]")


def tensorboard_tag(name: str) -> str:
  """"retrieval/ehr->imaging/recall@10" -> "retrieval/ehr_to_imaging/recall_at_10"."""
  for old, new in _TAG_WORDS:
    name = name.replace(old, new)
  return _TAG_OTHER.sub("_", name)


def _to_float(value) -> float:
  return float(np.asarray(value))


def read_metrics(workdir: str | os.PathLike) -> list[dict]:
  path = pathlib.Path(workdir) / "metrics.jsonl"
  return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


class Throughput:
  """Examples/s, tokens/s and MFU over the interval since the last report.

  The loop `count`s each step's tokens and model FLOPs (they differ between batches that
  hold different modalities); steps before `start` (the compiling one) are not counted.
  """

  def __init__(self, *, examples_per_step: int, peak_flops: float, total_steps: int):
    self.examples_per_step, self.peak_flops, self.total_steps = examples_per_step, peak_flops, total_steps
    self._last_time, self._last_step = None, None
    self._tokens = self._flops = 0.0

  def start(self, step: int) -> None:
    self._last_time, self._last_step = time.perf_counter(), step
    self._tokens = self._flops = 0.0

  def count(self, tokens: float, flops: float) -> None:
    """One step's token slots and model FLOPs."""
    self._tokens += tokens
    self._flops += flops

  def report(self, step: int) -> dict[str, float]:
    now = time.perf_counter()
    steps, seconds = step - self._last_step, max(now - self._last_time, 1e-9)
    tokens, flops = self._tokens, self._flops
    self._last_time, self._last_step = now, step
    self._tokens = self._flops = 0.0
    if steps <= 0:
      return {}
    step_time = seconds / steps
    return {"perf/step_time_s": step_time,
            "perf/examples_per_s": self.examples_per_step / step_time,
            "perf/tokens_per_s": tokens / seconds,
            "perf/mfu": flops / seconds / self.peak_flops if self.peak_flops else 0.0,
            "perf/eta_s": step_time * (self.total_steps - step)}


class MetricMeans:
  """The train step's metrics averaged over the steps since the last log line.

  One step's values say little when consecutive batches differ (batches by availability
  pattern hold different modalities, and a loss term is reported only by the batches that
  hold it), so each metric is logged as its mean over the steps that reported it since the
  last `pop`. Sums stay on the device (one small jitted add per step, no host sync).
  `learning_rate` is the logged step's own. After a restart, the first mean covers the
  steps since the restart."""

  LAST = ("learning_rate",)

  def __init__(self):
    self._windows: dict[tuple[str, ...], tuple[dict, int]] = {}  # metric names -> (sums, steps)
    self._last: Mapping[str, jax.Array] = {}

  def add(self, metrics: Mapping[str, jax.Array]) -> None:
    names = tuple(sorted(metrics))
    sums, steps = self._windows.get(names, (None, 0))
    self._windows[names] = (dict(metrics) if sums is None else _add_metrics(sums, dict(metrics)), steps + 1)
    self._last = metrics

  def pop(self) -> dict[str, float]:
    totals: dict[str, float] = {}
    counts: dict[str, int] = {}
    windows = list(self._windows.values())
    for sums, steps in zip(jax.device_get([sums for sums, _ in windows]), (steps for _, steps in windows)):
      for name, value in sums.items():
        totals[name] = totals.get(name, 0.0) + float(value)
        counts[name] = counts.get(name, 0) + steps
    means = {name: totals[name] / counts[name] for name in totals}
    means.update({name: float(jax.device_get(self._last[name])) for name in self.LAST if name in self._last})
    self._windows, self._last = {}, {}
    return means


_add_metrics = jax.jit(lambda sums, metrics: jax.tree.map(jnp.add, sums, metrics))


def measure_peak_flops(size: int = 2048, repeats: int = 5) -> float:
  """The whole machine's float32 matmul FLOP/s, measured now (best of `repeats`).

  On CPU there is no datasheet peak to divide by; a large matmul is the best
  achievable rate, so MFU against it is an honest "fraction of what this machine can do".
  """
  x = jnp.ones((size, size), jnp.float32)
  matmul = jax.jit(lambda a: a @ a)
  matmul(x).block_until_ready()
  best = math.inf
  for _ in range(repeats):
    start = time.perf_counter()
    matmul(x).block_until_ready()
    best = min(best, time.perf_counter() - start)
  return 2 * size ** 3 / best


def format_duration(seconds: float) -> str:
  seconds = int(max(seconds, 0))
  hours, rest = divmod(seconds, 3600)
  return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"
