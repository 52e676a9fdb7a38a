"""Host memory of importing public weights: a random ESM-2-shaped checkpoint, generated here
(nothing downloads), converted by `experiments/import_weights.py` in a process of its own.

  python benchmarks/import_memory.py [--layers=33 --width=1280 --mlp=5120]   # esm2_t33_650M's shape
  python benchmarks/import_memory.py --layers=6 --width=320 --mlp=1280        # esm2_t6_8M's, quick

The folder is written tensor by tensor in safetensors (float32), as `save_pretrained` lays out
an `EsmForMaskedLM`. The import runs as the command a user runs; its peak resident memory
(the child's ru_maxrss) is compared with the model's size in float32 and with the peak of
the same process importing nothing but jax and the library (the interpreter's own share).
Prints one JSON line; add it to benchmarks/RESULTS.md with the machine it ran on.
"""
from __future__ import annotations

import argparse
import json
import pathlib
import platform
import subprocess
import sys
import tempfile
import time

import numpy as np

REPO = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from biofm_jax.weights import esm2  # noqa: E402


def write_random_esm2(folder: pathlib.Path, layers: int, width: int, mlp: int, heads: int) -> int:
  """A random EsmForMaskedLM-shaped folder (config.json, model.safetensors, vocab.txt);
  returns its parameter count. The tensors are generated and written one file at a time."""
  from safetensors.numpy import save_file
  vocab = len(esm2.ESM_TOKENS)
  shapes = {"esm.embeddings.word_embeddings.weight": (vocab, width),
            "esm.encoder.emb_layer_norm_after.weight": (width,), "esm.encoder.emb_layer_norm_after.bias": (width,),
            "lm_head.dense.weight": (width, width), "lm_head.dense.bias": (width,),
            "lm_head.layer_norm.weight": (width,), "lm_head.layer_norm.bias": (width,), "lm_head.bias": (vocab,)}
  for i in range(layers):
    prefix = f"esm.encoder.layer.{i}."
    for name in ("query", "key", "value"):
      shapes[prefix + f"attention.self.{name}.weight"] = (width, width)
      shapes[prefix + f"attention.self.{name}.bias"] = (width,)
    shapes.update({prefix + "attention.output.dense.weight": (width, width),
                   prefix + "attention.output.dense.bias": (width,),
                   prefix + "attention.LayerNorm.weight": (width,), prefix + "attention.LayerNorm.bias": (width,),
                   prefix + "intermediate.dense.weight": (mlp, width), prefix + "intermediate.dense.bias": (mlp,),
                   prefix + "output.dense.weight": (width, mlp), prefix + "output.dense.bias": (width,),
                   prefix + "LayerNorm.weight": (width,), prefix + "LayerNorm.bias": (width,)})
  rng = np.random.default_rng(0)
  tensors = {name: (rng.standard_normal(shape, dtype=np.float32) * 0.02) for name, shape in shapes.items()}
  save_file(tensors, str(folder / "model.safetensors"))
  (folder / "config.json").write_text(json.dumps({
      "model_type": "esm", "architectures": ["EsmForMaskedLM"], "vocab_size": vocab, "hidden_size": width,
      "num_hidden_layers": layers, "num_attention_heads": heads, "intermediate_size": mlp,
      "position_embedding_type": "rotary", "layer_norm_eps": 1e-5, "token_dropout": True,
      "emb_layer_norm_before": False, "max_position_embeddings": 1026, "pad_token_id": 1, "mask_token_id": 32}))
  (folder / "vocab.txt").write_text("\n".join(esm2.ESM_TOKENS) + "\n")
  return sum(int(np.prod(s)) for s in shapes.values())


# Runs a script as __main__ and prints, at exit, the process's own peak resident memory
# (VmHWM: the parent's ru_maxrss of children would count the pages a forked child shares
# with this process before it execs), and the peak of its anonymous share (RssAnon, sampled
# every 10 ms): the resident pages of memory-mapped files (safetensors reads its file that
# way) are page cache the kernel can drop, not memory the import holds.
_PEAK_WRAPPER = """
import atexit, runpy, sys, threading, time
peak_anon = [0]
def _status(field):
  for line in open("/proc/self/status"):
    if line.startswith(field):
      return int(line.split()[1])
  return 0
def _sample():
  while True:
    peak_anon[0] = max(peak_anon[0], _status("RssAnon:"))
    time.sleep(0.01)
threading.Thread(target=_sample, daemon=True).start()
def _peak():
  peak_anon[0] = max(peak_anon[0], _status("RssAnon:"))
  print("PEAK_KB", _status("VmHWM:"), peak_anon[0], file=sys.stderr, flush=True)
atexit.register(_peak)
script = sys.argv[1]
sys.argv = sys.argv[1:]
runpy.run_path(script, run_name="__main__")
"""


def run_child(command: list[str]) -> tuple[float, float, float]:
  """(peak resident GiB, peak anonymous resident GiB, seconds) of the child itself running
  the script `command[0]` with its arguments."""
  start = time.perf_counter()
  result = subprocess.run([sys.executable, "-c", _PEAK_WRAPPER, *command], cwd=REPO, capture_output=True, text=True)
  peaks = [line.split()[1:] for line in result.stderr.splitlines() if line.startswith("PEAK_KB")]
  if result.returncode or not peaks:
    raise SystemExit(result.stderr[-3000:])
  return int(peaks[-1][0]) / 2 ** 20, int(peaks[-1][1]) / 2 ** 20, time.perf_counter() - start


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--layers", type=int, default=33)
  parser.add_argument("--width", type=int, default=1280)
  parser.add_argument("--mlp", type=int, default=5120)
  parser.add_argument("--heads", type=int, default=20)
  parser.add_argument("--baseline", action="store_true", help=argparse.SUPPRESS)  # internal: the child's floor
  args = parser.parse_args()
  if args.baseline:  # what the import command holds before any tensor: jax, the library, the data module
    import biofm_jax.weights.formats  # noqa: F401
    import jax
    jax.numpy.zeros(1).block_until_ready()
    return
  with tempfile.TemporaryDirectory() as tmp:
    folder = pathlib.Path(tmp) / "esm2_random"
    folder.mkdir()
    params = write_random_esm2(folder, args.layers, args.width, args.mlp, args.heads)
    model_gib = params * 4 / 2 ** 30
    floor, floor_anon, _ = run_child([__file__, "--baseline"])
    peak, peak_anon, seconds = run_child(["experiments/import_weights.py", f"--from={folder}", "--format=esm2",
                               f"--out={pathlib.Path(tmp) / 'run'}", "--max_len=128"])
    on_disk = sum(f.stat().st_size for f in (pathlib.Path(tmp) / "run").rglob("*") if f.is_file()) / 2 ** 30
  print(json.dumps({
      "benchmark": "import_memory", "machine": platform.processor() or platform.machine(),
      "shape": {"layers": args.layers, "width": args.width, "mlp": args.mlp}, "parameters": params,
      "model_gib_float32": round(model_gib, 3), "import_peak_rss_gib": round(peak, 3),
      "peak_over_model": round(peak / model_gib, 2), "floor_rss_gib": round(floor, 3),
      "peak_above_floor_over_model": round((peak - floor) / model_gib, 2),
      "import_peak_anon_gib": round(peak_anon, 3), "floor_anon_gib": round(floor_anon, 3),
      "anon_peak_over_model": round(peak_anon / model_gib, 2), "run_folder_gib": round(on_disk, 3),
      "import_seconds": round(seconds, 1)}))


if __name__ == "__main__":
  main()
