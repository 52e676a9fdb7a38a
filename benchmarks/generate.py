"""Decoding speed: simulated futures of a next-event EHR model beside its own matmuls and
beside the same-size GPT-2 in `transformers` with its key/value cache.

  python benchmarks/generate.py --preset=demo [--rows=8 --prompt=96 --new=32 --threads=2]
  python benchmarks/generate.py --preset=base --rows=8 --prompt=384 --new=128 [--sides=ours]

Each side runs in a subprocess of its own, pinned to the same `--threads` CPUs (torch and
jax never share a process), float32, untrained weights (they do not change the cost):
  - ours: `biofm_jax.generate.generate` (prefill of right-aligned prompts, then one jitted
    `lax.scan` of decode steps, each sampling a code and a gap); the decode step's time is
    the difference between `--new` and `--new / 2` events over the difference in steps, so
    the prefill and the call's fixed cost drop out; the median of `--repeats` second calls.
    In the same process, "matmul-bound": one jitted function holding only the decode step's
    matmuls at its shapes (q/k/v/out projections, the MLP, the code and gap heads over the
    batch's rows, and attention's scores and sums over a cache of `--prompt + --new` slots),
    each layer's weights and cache in buffers of their own, timed the same way; the step's
    ratio to it is the figure the decoding target reads.
  - peer: `transformers.GPT2LMHeadModel` of the same depth, width, heads, MLP width,
    vocabulary and positions, `generate(use_cache=True)` greedy and sampled, `min_new_tokens`
    = `max_new_tokens` so every row decodes every step; its step time read the same way
    (difference between `--new` and `--new / 2` tokens).
With `--profile`, ours also traces one call (`jax.profiler`, one event per executed op, as
`benchmarks/profile_step.py` reads them) and prints the slowest ops, per decode step.
Tokens per second = rows x steps / step time. Our step also samples the gap head and
carries the time and age features; GPT-2 adds a learned position table and biases. Prints
one JSON line per side and one comparing them; figures go to benchmarks/RESULTS.md. The
compute dtype is float32 (`--dtype`) unless asked: `base` is an accelerator preset in
bfloat16, which a CPU emulates.
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import subprocess
import sys
import time

BENCHMARKS = pathlib.Path(__file__).resolve().parent
REPO = BENCHMARKS.parent
sys.path.insert(0, str(BENCHMARKS))
from peer import pin_cpus  # noqa: E402  (benchmarks/peer.py: the same pinning as the training peer comparison)

EDGES = (0.0, 1 / 24, 1.0, 7.0, 30.0, 90.0, 365.0)  # configs/ehr_gpt.py's gap classes


def _timed(call, repeats: int) -> float:
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    call()
    times.append(time.perf_counter() - start)
  return statistics.median(times)


# ------------------------------------------------------------------ ours (jax only)
def build_model(args):
  sys.path.insert(0, str(REPO))
  from biofm_jax.config import load_config
  from biofm_jax.modalities.ehr.encoder import EHREncoder
  from biofm_jax.models.description import TokenModality
  from biofm_jax.models.layers import transformer_config
  from biofm_jax.models.model import SingleModalityModel
  # The compute dtype is --dtype's (float32 by default: a CPU computes in it; `base` is an
  # accelerator preset whose bfloat16 a CPU emulates with conversions).
  config = load_config(f"{REPO / 'configs/ehr_gpt.py'}:{args.preset}", {"model.dtype": args.dtype})
  cfg = transformer_config(config.model, max_len=args.prompt + args.new, causal=True)
  model = SingleModalityModel(cfg, TokenModality("ehr", args.vocab, config.data.ehr.num_value_bins,
                                                 args.prompt + args.new, encoder=EHREncoder,
                                                 time_classes=len(EDGES) + 1))
  return config, cfg, model


def prompts(args, rows: int):
  import numpy as np
  from biofm_jax.data import batch as B
  rng = np.random.default_rng(0)
  length = args.prompt
  out = {name: np.zeros((rows, length), dtype) for name, (_, dtype) in B.ehr_example_spec(length, False).items()}
  out[B.EHR_CODES][:, 0] = B.CLS_ID
  out[B.EHR_CODES][:, 1:] = rng.integers(B.NUM_SPECIAL, args.vocab, (rows, length - 1))
  times = np.sort(rng.uniform(0, 3000, (rows, length - 1)), axis=1)
  out[B.EHR_TIME][:, 1:] = times - times[:, :1]
  out[B.EHR_TIME_KNOWN][:, 1:] = True
  out[B.EHR_AGE][:, 1:] = 50 + out[B.EHR_TIME][:, 1:] / 365.25
  out[B.EHR_AGE_KNOWN][:, 1:] = True
  out[B.EHR_MASK][:] = True
  return out


def matmul_bound_step(cfg, rows: int, slots: int, vocab: int, repeats: int) -> float:
  """Seconds of the decode step's matmuls alone, at its shapes, in one jitted function: each
  layer's weights in arrays of their own (read once, no slicing), the cache laid out
  [rows, heads, slots, kv] for attention's two batched matmuls, every slot attended."""
  import jax
  import jax.numpy as jnp
  d, h, k, f = cfg.embed_dim, cfg.num_heads, cfg.kv_dim, cfg.mlp_dim
  keys = iter(jax.random.split(jax.random.key(1), 8 * cfg.num_layers + 2))
  normal = lambda shape: jax.random.normal(next(keys), shape) * 0.02  # noqa: E731
  layers = [dict(qkv=normal((d, 3 * h * k)), o=normal((h * k, d)), wi=normal((d, f)), wo=normal((f, d)),
                 keys=normal((rows, h, slots, k)), values=normal((rows, h, slots, k))) for _ in range(cfg.num_layers)]
  heads = normal((d, vocab + len(EDGES) + 1))
  x0 = normal((rows, d))

  @jax.jit
  def step(x, layers, heads):
    for layer in layers:
      q = (x @ layer["qkv"])[:, :h * k].reshape(rows, h, 1, k)
      scores = jnp.einsum("bhtk,bhsk->bhts", q, layer["keys"])  # [rows, h, 1, slots]
      attended = jnp.matmul(scores, layer["values"]).reshape(rows, h * k)
      x = x + attended @ layer["o"]
      x = x + jnp.maximum(x @ layer["wi"], 0) @ layer["wo"]
    return x @ heads

  step(x0, layers, heads).block_until_ready()
  return _timed(lambda: step(x0, layers, heads).block_until_ready(), repeats)


def measure_ours(args) -> dict:
  sys.path.insert(0, str(REPO))
  from biofm_jax import cli  # noqa: F401  (before jax: the CPU platform and host memory, as every command)
  import jax
  import jax.numpy as jnp
  import numpy as np
  from biofm_jax.generate import GenerationSettings, _generate, right_align
  _, cfg, model = build_model(args)
  if args.rows % args.samples:
    raise ValueError(f"--rows={args.rows} is not a multiple of --samples={args.samples}")
  batch = prompts(args, args.rows // args.samples)  # each history continued --samples times
  sources = jnp.asarray(np.repeat(np.arange(args.rows // args.samples), args.samples), jnp.int32)
  params = jax.jit(model.init)(jax.random.key(0), {"ehr": {k: jnp.asarray(v[:, :8]) for k, v in batch.items()}})["params"]
  params = jax.device_put(params)
  n_params = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(params))

  def run(new: int):
    settings = GenerationSettings(max_new=new, horizon_days=1e9)
    aligned = {k: jnp.asarray(v) for k, v in right_align(batch, args.prompt).items()}
    call = lambda: jax.device_get(_generate(  # noqa: E731  (what generate() runs, the cache form chosen)
        model, params, aligned, jax.random.key(0), jnp.asarray(EDGES, jnp.float32), jnp.full(args.rows, -1.0),
        sources, settings=settings, modality="ehr", stacked_cache=args.stacked_cache))
    start = time.perf_counter()
    out = call()
    first = time.perf_counter() - start
    assert out["generated"].all(), "every row should decode every step (horizon and stop codes off)"
    return first, _timed(call, args.repeats)

  half = args.new // 2
  _, short = run(half)
  compile_and_run, full = run(args.new)
  step = (full - short) / (args.new - half)
  bound = matmul_bound_step(cfg, args.rows, args.prompt + args.new, args.vocab, args.repeats * 4)
  if args.profile:
    profile_decoding(model, params, batch, args)
  return {"side": "ours", "framework": f"jax {jax.__version__}", "preset": args.preset, "dtype": args.dtype,
          "rows": args.rows, "samples": args.samples,
          "prompt": args.prompt, "new": args.new, "vocab": args.vocab, "num_params": n_params,
          "layer_loop": cfg.layer_loop, "cache": "stacked" if args.stacked_cache else "per_layer",
          "first_call_s": round(compile_and_run, 3), "call_s": round(full, 4),
          "step_s": round(step, 5), "tokens_per_s": round(args.rows / step, 1),
          "matmul_bound_step_s": round(bound, 5), "step_over_matmul_bound": round(step / bound, 2)}


def profile_decoding(model, params, batch, args) -> None:
  """Prints the slowest ops of one traced call, in ms per decode step (prefill included)."""
  import tempfile

  import jax
  import jax.numpy as jnp
  import numpy as np
  from biofm_jax.generate import GenerationSettings, _generate, right_align
  settings = GenerationSettings(max_new=args.new, horizon_days=1e9)
  aligned = {k: jnp.asarray(v) for k, v in right_align(batch, args.prompt).items()}
  sources = jnp.asarray(np.repeat(np.arange(args.rows // args.samples), args.samples), jnp.int32)
  call_args = (model, params, aligned, jax.random.key(0), jnp.asarray(EDGES, jnp.float32), jnp.full(args.rows, -1.0),
               sources)
  options = dict(settings=settings, modality="ehr", stacked_cache=args.stacked_cache)
  # The executable whose program is read runs the traced call (a second compile may number
  # its ops differently).
  compiled = _generate.lower(*call_args, **options).compile()
  hlo_text = compiled.as_text()
  dynamic = call_args[1:]  # the model is static
  jax.block_until_ready(compiled(*dynamic))
  with tempfile.TemporaryDirectory() as tmp:
    with jax.profiler.trace(tmp):
      jax.block_until_ready(compiled(*dynamic))
    sys.path.insert(0, str(BENCHMARKS))
    import profile_step  # benchmarks/profile_step.py: its trace reader and per-op summary
    events = profile_step.op_events(pathlib.Path(tmp), profile_step.instructions(hlo_text)[0])
  summary, rows = profile_step.summarise(events, hlo_text, args.new, args.top)
  print("slowest ops of one call (ms per decode step, summed over threads; kind, part, op, output):", file=sys.stderr)
  print("\n".join(rows), file=sys.stderr)
  print(json.dumps(summary), file=sys.stderr)


# ------------------------------------------------------------------ peer (torch only)
def measure_peer(args, spec: dict) -> dict:
  import torch
  import transformers
  torch.set_num_threads(args.threads)
  torch.manual_seed(0)
  config = transformers.GPT2Config(vocab_size=args.vocab, n_positions=args.prompt + args.new, n_embd=spec["embed_dim"],
                                   n_layer=spec["num_layers"], n_head=spec["num_heads"], n_inner=spec["mlp_dim"],
                                   resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=1,
                                   pad_token_id=0)
  model = transformers.GPT2LMHeadModel(config).eval()
  ids = torch.randint(4, args.vocab, (args.rows, args.prompt))
  out = {"side": "peer", "framework": f"torch {torch.__version__}, transformers {transformers.__version__}",
         "num_params": sum(p.numel() for p in model.parameters())}
  for mode, sample in (("greedy", False), ("sampled", True)):
    def call(new):
      with torch.no_grad():
        return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, min_new_tokens=new,
                              do_sample=sample, top_k=0, use_cache=True, eos_token_id=None)
    half = args.new // 2
    call(half)
    short = _timed(lambda: call(half), args.repeats)
    full = _timed(lambda: call(args.new), args.repeats)
    step = (full - short) / (args.new - half)
    out[mode] = {"call_s": round(full, 4), "step_s": round(step, 5), "tokens_per_s": round(args.rows / step, 1)}
  return out


def run_side(args, side: str, spec: dict | None = None) -> dict:
  command = [sys.executable, __file__, f"--side={side}", f"--preset={args.preset}", f"--rows={args.rows}",
             f"--prompt={args.prompt}", f"--new={args.new}", f"--dtype={args.dtype}", f"--samples={args.samples}", f"--vocab={args.vocab}", f"--threads={args.threads}",
             f"--repeats={args.repeats}", f"--top={args.top}"] + (["--profile"] if args.profile else []) + (
                 ["--stacked_cache"] if args.stacked_cache else [])
  if spec:
    command.append(f"--spec={json.dumps(spec)}")
  done = subprocess.run(command, capture_output=True, text=True, check=False)
  if done.returncode:
    raise SystemExit(f"{side} failed:\n{done.stderr[-4000:]}")
  if args.profile and side == "ours":
    print(done.stderr[done.stderr.find("slowest ops"):], file=sys.stderr)
  return json.loads(done.stdout.strip().splitlines()[-1])


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--preset", default="demo")
  parser.add_argument("--rows", type=int, default=8)
  parser.add_argument("--prompt", type=int, default=96)
  parser.add_argument("--new", type=int, default=32)
  parser.add_argument("--vocab", type=int, default=4096, help="codes in the vocabulary (a cohort's own size)")
  parser.add_argument("--samples", type=int, default=1,
                      help="futures per history: --rows / --samples histories, each prefilled once")
  parser.add_argument("--dtype", default="float32", help="the model's compute dtype (float32 or bfloat16)")
  parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--sides", default="ours,peer")
  parser.add_argument("--stacked_cache", action="store_true",
                      help="ours with the cache stacked on a layers axis (the layout before the per-layer one)")
  parser.add_argument("--profile", action="store_true", help="trace our decoding and print its slowest ops")
  parser.add_argument("--top", type=int, default=20, help="slowest ops to print with --profile")
  parser.add_argument("--side", default="", help=argparse.SUPPRESS)
  parser.add_argument("--spec", default="", help=argparse.SUPPRESS)
  args = parser.parse_args()
  pin_cpus(args.threads)
  if args.side == "ours":
    if args.profile:  # one trace event per executed op on the CPU: read when XLA starts
      os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_cpu_enable_xprof_traceme=true").strip()
    print(json.dumps(measure_ours(args)))
    return
  if args.side == "peer":
    print(json.dumps(measure_peer(args, json.loads(args.spec))))
    return
  sys.path.insert(0, str(REPO))
  from biofm_jax.config import load_config
  model = load_config(f"{REPO / 'configs/ehr_gpt.py'}:{args.preset}").model
  spec = dict(embed_dim=model.embed_dim, num_layers=model.num_layers, num_heads=model.num_heads, mlp_dim=model.mlp_dim)
  results = {}
  for side in args.sides.split(","):
    results[side] = run_side(args, side, spec if side == "peer" else None)
    print(json.dumps(results[side]), flush=True)
  if "ours" in results and "peer" in results:
    ours, peer = results["ours"], results["peer"]
    print(json.dumps({"compare": args.preset, "tokens_per_s_ours_over_peer_greedy":
                      round(ours["tokens_per_s"] / peer["greedy"]["tokens_per_s"], 2),
                      "tokens_per_s_ours_over_peer_sampled":
                      round(ours["tokens_per_s"] / peer["sampled"]["tokens_per_s"], 2),
                      "step_over_matmul_bound": ours["step_over_matmul_bound"]}))


if __name__ == "__main__":
  main()
