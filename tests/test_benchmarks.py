"""The step profiler (`benchmarks/profile_step.py`) reads this jax's traces: it finds the
train step's ops, sorts them into kinds and model parts, and its sums add up. The decoding
benchmark (`benchmarks/generate.py`) runs both sides and profiles ours."""
from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

REPO = pathlib.Path(__file__).resolve().parent.parent
# The suite's quick-compiling flags (conftest.py) on one CPU device, as the benchmarks run:
# these checks read the shape of the output, not its speed (the decoding benchmark's check
# takes 11 s so instead of 20 s with fully optimised code).
ONE_DEVICE = {**os.environ, "XLA_FLAGS": os.environ["XLA_FLAGS"].replace("device_count=8", "device_count=1")}


def test_profile_step_attributes_the_step_s_time_to_its_ops():
  out = subprocess.run([sys.executable, str(REPO / "benchmarks/profile_step.py"), "--config=configs/ehr_bert.py:tiny",
                        "--steps=2", "--top=5"], cwd=REPO, env=ONE_DEVICE, stdout=subprocess.PIPE, text=True, check=True,
                       timeout=300).stdout
  lines = out.splitlines()
  summary = json.loads(lines[-1])
  assert len([line for line in lines if " ms " in line]) == 5  # the five slowest ops are listed
  kinds, parts = summary["by_kind_ms"], summary["by_part_ms"]
  assert kinds["matmul"] > 0 and kinds["compute"] > 0
  assert {"attention", "attention projections", "mlp", "norm", "optimiser and step"} <= set(parts)
  # every op counted once in each breakdown; the ops run within the step's wall time on 2 threads
  assert abs(sum(kinds.values()) - summary["op_ms_per_step"]) < 0.05
  assert abs(sum(parts.values()) - summary["op_ms_per_step"]) < 0.05
  assert 0 < summary["ops_covered_wall_ms"] <= summary["op_ms_per_step"] + 1e-6


def test_the_decoding_benchmark_times_both_sides_and_profiles_ours():
  done = subprocess.run([sys.executable, str(REPO / "benchmarks/generate.py"), "--preset=tiny", "--rows=4",
                         "--prompt=8", "--new=8", "--repeats=1", "--vocab=64", "--profile", "--top=3"], cwd=REPO, env=ONE_DEVICE,
                        capture_output=True, text=True, check=True, timeout=300)
  ours, peer, compare = (json.loads(line) for line in done.stdout.splitlines()[-3:])
  # (a step is a difference of two short calls: at this size a busy machine can make it any sign)
  assert ours["cache"] == "per_layer" and ours["call_s"] > 0 and ours["matmul_bound_step_s"] > 0
  assert peer["greedy"]["call_s"] > 0 and peer["sampled"]["call_s"] > 0
  assert compare["tokens_per_s_ours_over_peer_greedy"] == round(
      ours["tokens_per_s"] / peer["greedy"]["tokens_per_s"], 2)
  profile = done.stderr[done.stderr.index("slowest ops"):].splitlines()
  assert len([line for line in profile if " ms " in line]) == 3
  assert json.loads([line for line in profile if line.strip()][-1])["by_kind_ms"]["matmul"] > 0
