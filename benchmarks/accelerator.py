"""The figures only an accelerator shows, in one run of a few minutes, into one JSON file.

  python benchmarks/accelerator.py [--out=benchmarks/accelerator.json] [--steps=20]
  python benchmarks/accelerator.py --smoke   # the same sections at `tiny`, on any backend

`make bench-accelerator` runs it. Sections (each its own entry in the JSON; one that fails
records its error and the others still run):
  - mfu: the masked EHR model at `ehr_bert.py:base` (bf16 compute, packed rows) with its
    stacked layers scanned and unrolled (`model.layer_loop`), step time, tokens/s and MFU
    against the device's datasheet bf16 peak (`hardware.py`) and against a bf16 matmul
    measured in this process;
  - packing: real (non-padding) EHR tokens/s with `data.ehr.pack` off and on, same model;
  - attention: `jax.nn.dot_product_attention` forward + backward at the base shapes, for
    each implementation this backend accepts ("xla", "cudnn");
  - peer: `benchmarks/peer.py`'s BERT in eager PyTorch and under `torch.compile` on the same
    device, when torch with that device is installed (the device machine may not have it:
    the entry then says so);
  - images: the 2D and 3D MAE pipelines against their steps at `demo`, with augmentation on
    the host and in the step (`data.imaging.augment`);
  - fusion: `multimodal_fusion.py:demo` with mixed batches and batches by availability
    pattern (`data.multimodal.batching`): subjects/s and MFU of the present modalities' work.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import pathlib
import subprocess
import sys
import tempfile
import time
import traceback

BENCHMARKS = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(BENCHMARKS))

import throughput  # noqa: E402  benchmarks/throughput.py: it puts the repository on sys.path first

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from biofm_jax import hardware  # noqa: E402
from biofm_jax.config import load_config  # noqa: E402
from biofm_jax.train.loop import make_train_iterator, open_data_module  # noqa: E402
from timing import median_step_time  # noqa: E402

def datasheet_peak() -> float | None:
  """Dense bf16 FLOP/s of this device from its kind (`hardware.py`'s table), or None."""
  tflops = hardware.gpu_peak_tflops(jax.devices()[0].device_kind)
  return None if tflops is None else tflops * 1e12


def measured_matmul_peak(size: int) -> float:
  """bf16 matmul FLOP/s of one device, measured now (median of 5 chunks of 5)."""
  x = jnp.ones((size, size), jnp.bfloat16)
  matmul = jax.jit(lambda a: a @ a)
  matmul(x).block_until_ready()
  seconds, _ = median_step_time(lambda i: matmul(x), 25, jax.block_until_ready)
  return 2 * size ** 3 / seconds


def train_step_figures(config_spec: str, overrides: dict, steps: int) -> dict:
  """Step time, padded and real tokens/s and model FLOP/s of one config."""
  config = load_config(str(throughput.REPO / config_spec), overrides)
  with tempfile.TemporaryDirectory() as tmp:
    data = open_data_module(config, pathlib.Path(tmp))
    iterator = make_train_iterator(data, config)
    batches = [next(iterator) for _ in range(2)]
    real_tokens = float(np.mean([np.asarray(b[data.name]["mask"]).sum() for b in batches]))
    step = throughput.time_train_step(config, data, batches, steps)
  return {"config": config_spec, "overrides": overrides, **step,
          "real_tokens_per_s": real_tokens / step["step_time_s"],
          "model_flops_per_s": step["model_flops_per_step"] / step["step_time_s"]}


def section_mfu(preset: str, steps: int, matmul_size: int) -> dict:
  peak, measured = datasheet_peak(), measured_matmul_peak(matmul_size)
  out = {"datasheet_bf16_flops": peak, "measured_bf16_matmul_flops": measured}
  for loop in ("scan", "unroll"):
    figures = train_step_figures(f"configs/ehr_bert.py:{preset}", {"model.layer_loop": loop}, steps)
    figures["mfu_datasheet"] = figures["model_flops_per_s"] / peak if peak else None
    figures["fraction_of_measured_matmul"] = figures["model_flops_per_s"] / measured
    out[loop] = figures
  return out


def section_packing(preset: str, steps: int) -> dict:
  return {f"pack_{pack}": train_step_figures(f"configs/ehr_bert.py:{preset}", {"data.ehr.pack": pack}, steps)
          for pack in (False, True)}


def section_attention(batch: int, length: int, heads: int, head_dim: int, steps: int) -> dict:
  """Forward + backward of one attention call with padded keys, per implementation."""
  keys = jax.random.split(jax.random.key(0), 3)
  q, k, v = (jax.random.normal(key, (batch, length, heads, head_dim), jnp.bfloat16) for key in keys)
  lengths = jnp.asarray(np.linspace(length // 4, length, batch).astype(np.int32))
  out = {}
  for implementation in ("xla", "cudnn"):
    def loss(q, k, v, implementation=implementation):
      attended = jax.nn.dot_product_attention(q, k, v, key_value_seq_lengths=lengths, implementation=implementation)
      return attended.astype(jnp.float32).sum()
    try:
      step = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
      jax.block_until_ready(step(q, k, v))
      seconds, _ = median_step_time(lambda i: step(q, k, v), steps, jax.block_until_ready)
      flops = 3 * 4 * batch * heads * length * length * head_dim  # QK^T and PV, forward + 2x backward
      out[implementation] = {"step_time_s": seconds, "flops_per_s": flops / seconds}
    except Exception as e:  # an implementation this backend lacks (cudnn off GPU) is a figure too
      out[implementation] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"}
  return {"shape": [batch, length, heads, head_dim], **out}


def section_peer(preset: str, steps: int) -> dict:
  """The BERT peer on this device, eager and compiled, in its own process (torch only)."""
  if importlib.util.find_spec("torch") is None:
    return {"skipped": "torch is not installed here (pip install -e .[peer] with a build for this device)"}
  command = [sys.executable, str(BENCHMARKS / "peer.py"), f"--config=configs/ehr_bert.py:{preset}",
             f"--steps={steps}", "--device=auto", "--compile_peer"]
  done = subprocess.run(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  if done.returncode:
    return {"error": done.stderr.strip().splitlines()[-1] if done.stderr.strip() else f"exit {done.returncode}"}
  return {"lines": [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]}


def pipeline_and_step(config_spec: str, overrides: dict, steps: int, batches: int = 40,
                      step_batches: int = 2) -> dict:
  """`benchmarks/throughput.py`'s two measurements of one config: the input pipeline alone
  and the step cycling through `step_batches` of its batches."""
  config = load_config(str(throughput.REPO / config_spec), overrides)
  with tempfile.TemporaryDirectory() as tmp:
    data = open_data_module(config, pathlib.Path(tmp))
    pipe, kept = throughput.time_pipeline(config, data, batches_to_read=batches, workers=0, keep=max(2, step_batches))
    step = throughput.time_train_step(config, data, kept, steps)
  return {"config": config_spec, "overrides": overrides, **pipe, **step,
          "pipeline_over_step": pipe["pipeline_examples_per_s"] / step["examples_per_s"]}


def section_images(preset: str, steps: int) -> dict:
  return {f"{dims}_{augment}": pipeline_and_step(f"configs/{name}:{preset}", {"data.imaging.augment": augment}, steps)
          for name, dims in (("imaging_mae.py", "2d"), ("imaging_mae3d.py", "3d")) for augment in ("host", "device")}


def section_fusion(preset: str, steps: int) -> dict:
  peak = datasheet_peak()
  out = {}
  for batching in ("mixed", "by_pattern"):
    figures = pipeline_and_step(f"configs/multimodal_fusion.py:{preset}", {"data.multimodal.batching": batching},
                                max(steps, 20), batches=20, step_batches=20)
    figures["present_mfu_datasheet"] = (figures["present_flops_per_step"] / figures["step_time_s"] / peak
                                        if peak else None)
    out[batching] = figures
  return out


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", default=str(BENCHMARKS / "accelerator.json"))
  parser.add_argument("--steps", type=int, default=20)
  parser.add_argument("--smoke", action="store_true", help="every section at `tiny` sizes, for any backend")
  parser.add_argument("--sections", default="mfu,packing,attention,peer,images,fusion")
  args = parser.parse_args()
  preset = "tiny" if args.smoke else "base"
  steps = 5 if args.smoke else args.steps
  sections = {
      "mfu": lambda: section_mfu(preset, steps, 256 if args.smoke else 8192),
      "packing": lambda: section_packing(preset, steps),
      "attention": lambda: (section_attention(2, 32, 2, 16, steps) if args.smoke
                            else section_attention(32, 512, 12, 64, steps)),
      "peer": lambda: section_peer(preset, steps),
      "images": lambda: section_images("tiny" if args.smoke else "demo", steps),
      "fusion": lambda: section_fusion("tiny" if args.smoke else "demo", steps),
  }
  result = {"backend": jax.default_backend(), "device_kind": jax.devices()[0].device_kind,
            "devices": jax.device_count(), "jax": jax.__version__, "preset": preset, "steps": steps}
  for name in args.sections.split(","):
    start = time.perf_counter()
    try:
      result[name] = sections[name]()
    except Exception as e:  # noqa: BLE001  one failed section still leaves the others' figures
      result[name] = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-2000:]}
    result[name + "_seconds"] = time.perf_counter() - start
    print(json.dumps({name: result[name]}, default=str), flush=True)
  pathlib.Path(args.out).write_text(json.dumps(result, indent=1, default=str) + "\n")
  print(f"wrote {args.out}")


if __name__ == "__main__":
  main()
