"""Where a train step's time goes: a `jax.profiler` trace of the jitted step, per XLA op.

  python benchmarks/profile_step.py --config=configs/ehr_bert.py:demo [--steps=5] [--top=25] \
      [--override=data.batch_size=4] [--trace_dir=/tmp/step_trace]

Builds the step exactly as training does (`build_training`, a batch from the training
stream), compiles and warms it up, then traces `--steps` steps. On the CPU, XLA is asked for
one trace event per executed op (`--xla_cpu_enable_xprof_traceme`, set here before jax
starts); each event is matched to its instruction in the compiled program, which gives its
kind and the model code it came from (the op's `op_name`). Prints the slowest ops, then one
JSON line: milliseconds of op time per step by kind (matmul, elementwise and reductions,
copies and layout changes, other) and by part of the model (attention, MLP, norms, the
encoder and heads, the optimiser update), and how much of the step's wall time some op was
running. Op times are summed over the runtime's threads, so they can exceed the wall time
when two ops run at once. On an accelerator the device's "XLA Ops" trace line is read
instead (not yet run on one: no GPU was at hand); the trace directory can also be opened
in TensorBoard or XProf (`--trace_dir`).
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import pathlib
import re
import sys
import tempfile
import time

REPO = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
# One trace event per executed op on the CPU: read when XLA starts, so set before jax is imported.
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_cpu_enable_xprof_traceme=true").strip()

from biofm_jax import cli  # noqa: E402,F401  (CPU settings and host memory, as every command)

import jax  # noqa: E402

from biofm_jax import parallel  # noqa: E402
from biofm_jax.config import load_config  # noqa: E402
from biofm_jax.train.build import build_training  # noqa: E402
from biofm_jax.train.loop import make_train_iterator, open_data_module  # noqa: E402

# Parts of the model, matched in this order against an op's `op_name` (the Flax module path).
PARTS = (("attention projections", re.compile(r"/attention/(query|key|value|out)/")), ("attention", "/attention/"), ("mlp", "/mlp/"), ("norm", "norm/"), ("loss", "objective"),
         ("heads", "head/"), ("encoder", "encoder/"), ("embedding", "embed"))
# Trace events that are the runtime's own bookkeeping, not an op.
RUNTIME_EVENTS = ("ThunkExecutor", "Slinky", "end:", "ThreadpoolListener")
LAYOUT_OPS = ("copy", "transpose", "concatenate", "bitcast", "slice", "pad", "broadcast", "reshape")


def instructions(hlo_text: str) -> tuple[dict, dict]:
  """(instruction name -> its line, computation name -> its body) of a compiled HLO module."""
  lines, bodies, current = {}, collections.defaultdict(list), None
  for line in hlo_text.splitlines():
    header = re.match(r"\s*(?:ENTRY )?%([\w.\-]+) \(.*\{\s*$", line)
    if header:
      current = header.group(1)
      continue
    if line.strip() == "}":
      current = None
      continue
    match = re.match(r"\s*(?:ROOT )?%([\w.\-]+) = (.*)", line)
    if match:
      lines.setdefault(match.group(1), match.group(2))
      if current:
        bodies[current].append(match.group(2))
  return lines, {name: "\n".join(body) for name, body in bodies.items()}


def op_kind(name: str, line: str, bodies: dict) -> str:
  """matmul (a dot or a fusion holding one), layout (copies, transposes, concatenations),
  compute (other elementwise and reduction fusions) or other."""
  called = re.search(r"calls=%([\w.\-]+)", line)
  body = bodies.get(called.group(1), "") if called else ""
  if " dot(" in line or " dot(" in body or " convolution(" in line + body:
    return "matmul"
  if " fusion(" in line or name.startswith("wrapped_") or " copy(" in line or " transpose(" in line:
    ops = set(re.findall(r"= \S+ (\w[\w-]*)\(", body)) | {re.sub(r"[._]\d+$", "", name)}
    pieces = {piece for op in ops for piece in op.split("_")}
    if pieces and all(any(piece.startswith(layout) for layout in LAYOUT_OPS) or piece in ("fusion", "wrapped")
                      for piece in pieces):
      return "layout"
    return "compute"
  return "other"


def op_part(line: str) -> str:
  op_name = re.search(r'op_name="([^"]*)"', line)
  op_name = op_name.group(1) if op_name else ""
  for part, key in PARTS:
    if (key.search(op_name) if isinstance(key, re.Pattern) else key in op_name):
      return part
  # Outside the differentiated model function: the optimiser update and the step's bookkeeping.
  return "model, other" if "jvp(" in op_name else "optimiser and step"


def op_events(trace_dir: pathlib.Path, instruction_names) -> list[tuple[str, int, int]]:
  """(op name, start ns, duration ns) of every op event of the newest trace in `trace_dir`.

  On the CPU an op may run on any of the runtime's threads (the intra-op pool, or the
  client's own threads when the pool is busy, as it is on a loaded machine), so every host
  line is read and an event counts as an op when it names an instruction of the compiled
  program; on an accelerator, its "XLA Ops" line (not the module and step lines, which span the ops).
  """
  from jax._src.lib import _profile_data  # jax's reader of its own trace files
  path = sorted(trace_dir.rglob("*.xplane.pb"), key=lambda p: p.stat().st_mtime)[-1]
  data = _profile_data.ProfileData.from_file(str(path))
  device_planes = [p for p in data.planes if p.name.startswith("/device:")]
  events = []
  for plane in device_planes or [p for p in data.planes if p.name.startswith("/host:")]:
    for line in plane.lines:
      if device_planes and not line.name.startswith("XLA Ops"):
        continue
      for event in line.events:
        if event.name.startswith(RUNTIME_EVENTS):
          continue
        if device_planes or event.name in instruction_names:
          events.append((event.name, event.start_ns, event.duration_ns))
  return events


def covered_ns(events) -> int:
  """Wall time during which at least one op ran (the union of their intervals)."""
  total, end = 0, None
  for _, start, duration in sorted(events, key=lambda e: e[1]):
    stop = start + duration
    if end is None or start >= end:
      total += duration
      end = stop
    elif stop > end:
      total += stop - end
      end = stop
  return total


def summarise(events, hlo_text: str, steps: int, top: int) -> tuple[dict, list[str]]:
  lines, bodies = instructions(hlo_text)
  per_op = collections.Counter()
  calls = collections.Counter()
  for name, _, duration in events:
    per_op[name] += duration
    calls[name] += 1
  by_kind, by_part = collections.Counter(), collections.Counter()
  rows = []
  for name, ns in per_op.most_common():
    line = lines.get(name, "")
    kind, part = op_kind(name, line, bodies), op_part(line)
    by_kind[kind] += ns
    by_part[part] += ns
    if len(rows) < top:
      shape = line.split(" ", 1)[0] if line else "?"
      rows.append(f"{ns / 1e6 / steps:8.2f} ms {calls[name] // steps:3d}x  {kind:8s} {part:18s} {name[:32]:32s} {shape[:40]}")
  ms = lambda counter: {k: round(v / 1e6 / steps, 2) for k, v in counter.most_common()}  # noqa: E731
  return {"op_ms_per_step": round(sum(per_op.values()) / 1e6 / steps, 2), "by_kind_ms": ms(by_kind),
          "by_part_ms": ms(by_part), "ops_covered_wall_ms": round(covered_ns(events) / 1e6 / steps, 2)}, rows


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--config", default="configs/ehr_bert.py:demo")
  parser.add_argument("--steps", type=int, default=5, help="traced steps (after the compile and two warm-up steps)")
  parser.add_argument("--top", type=int, default=25, help="slowest ops to list")
  parser.add_argument("--trace_dir", default=None, help="keep the trace here (default: a temporary folder)")
  parser.add_argument("--override", action="append", default=[], help="config overrides as field=value")
  args = parser.parse_args()
  config = load_config(str(REPO / args.config), dict(o.split("=", 1) for o in args.override))
  with tempfile.TemporaryDirectory() as tmp:
    data = open_data_module(config, pathlib.Path(tmp))
    batch = next(make_train_iterator(data, config))
    setup = build_training(config, data)
    state = setup.init_state(config.seed)
    device_batch = parallel.make_global_batch(batch, setup.mesh)
    hlo_text = setup.train_step.lower(state, device_batch).compile().as_text()
    for _ in range(3):  # the compile, then the host heap reaches its working size
      state, metrics = setup.train_step(state, device_batch)
    jax.block_until_ready(metrics)
    start = time.perf_counter()
    for _ in range(args.steps):
      state, metrics = setup.train_step(state, device_batch)
    jax.block_until_ready(metrics)
    step_s = (time.perf_counter() - start) / args.steps  # untraced: tracing adds its own cost
    trace_dir = pathlib.Path(args.trace_dir or tmp) / "trace"
    with jax.profiler.trace(str(trace_dir)):
      for _ in range(args.steps):
        state, metrics = setup.train_step(state, device_batch)
      jax.block_until_ready(metrics)
    summary, rows = summarise(op_events(trace_dir, instructions(hlo_text)[0]), hlo_text, args.steps, args.top)
  print(f"slowest ops of {args.config} (ms per step, summed over threads; kind, part, op, output):")
  print("\n".join(rows))
  print(json.dumps({"config": args.config, "backend": jax.default_backend(), "step_ms_untraced": round(step_s * 1e3, 2),
                    **summary}))


if __name__ == "__main__":
  main()
