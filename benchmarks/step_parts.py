"""The rates of a training step's big parts in isolation, in XLA and, beside it, in PyTorch.

  python benchmarks/step_parts.py [--preset=base|demo] [--batch=4 --length=512 --heads=12 \
      --head_dim=64 --mlp=3072] [--frameworks=jax,torch] [--threads=2]

Times, in float32 at `ehr_bert.py`'s shapes (`--preset` base: batch 4 x 512 tokens, 12 heads
of 64, MLP 3072, as `benchmarks/peer.py` runs it; demo: 32 x 64, 4 heads of 32, MLP 512):
  - one tokens x embed x mlp matmul (forward only: the kernel's rate),
  - the MLP block forward + backward (two matmuls and tanh-GELU),
  - attention forward + backward, in jax as the model's "heads_first" form,
    `jax.nn.dot_product_attention` ("xla") and the blocked online softmax ("blocked", in
    tiles of `--attention_blocks` queries,keys); in torch as `scaled_dot_product_attention`,
    the peer's fused CPU kernel. `--causal` adds the causal mask to every form.
Each framework runs in its own process pinned to the same `--threads` CPUs (as peer.py);
torch is timed only where it is installed (the `peer` extra). The figures say how much of
the gap between our step and the peer's (RESULTS.md) is the kernels' own speed on this
machine. Prints one JSON line per framework.
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys

BENCHMARKS = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(BENCHMARKS))

from timing import median_step_time  # noqa: E402  (benchmarks/timing.py)

PRESETS = {"base": dict(batch=4, length=512, heads=12, head_dim=64, mlp=3072),
           "demo": dict(batch=32, length=64, heads=4, head_dim=32, mlp=512)}


def flops(s: dict) -> dict:
  tokens, embed = s["batch"] * s["length"], s["heads"] * s["head_dim"]
  matmul = 2 * tokens * embed * s["mlp"]
  return {"dense_matmul": matmul, "mlp_fwd_bwd": 3 * 2 * matmul,  # two matmuls, forward + 2x backward
          "attention_fwd_bwd": 3 * 4 * s["batch"] * s["heads"] * s["length"] ** 2 * s["head_dim"]}


def rates(seconds: dict, s: dict) -> dict:
  count = flops(s)
  return {name: {"ms": round(t * 1e3, 3), "gflops_per_s": round(count[name.split(":")[0]] / t / 1e9, 1)}
          for name, t in seconds.items()}


def lengths_mask(s: dict):
  """Per-row lengths between half and all of the sequence (padding, as real batches have)."""
  import numpy as np
  lengths = np.random.default_rng(0).integers(s["length"] // 2, s["length"] + 1, s["batch"])
  return np.arange(s["length"])[None, :] < lengths[:, None]  # [B, S]


def time_jax(s: dict, steps: int, blocks: tuple[int, int], causal: bool) -> dict:
  sys.path.insert(0, str(BENCHMARKS.parent))
  from biofm_jax import cli  # noqa: F401  (CPU settings and host memory, as every command)
  import jax
  import jax.numpy as jnp
  from biofm_jax.models.blocked_attention import blocked_attention
  from biofm_jax.models.layers import heads_first_attention
  keys = jax.random.split(jax.random.key(0), 6)
  shape = (s["batch"], s["length"], s["heads"], s["head_dim"])
  q, k, v = (jax.random.normal(key, shape, jnp.float32) for key in keys[:3])
  real = jnp.asarray(lengths_mask(s))
  mask = real[:, None, None, :] & (jnp.tril(jnp.ones((s["length"],) * 2, bool)) if causal else True)
  embed = s["heads"] * s["head_dim"]
  x = jax.random.normal(keys[3], (s["batch"] * s["length"], embed), jnp.float32)
  wi = jax.random.normal(keys[4], (embed, s["mlp"]), jnp.float32) * embed ** -0.5
  wo = jax.random.normal(keys[5], (s["mlp"], embed), jnp.float32) * s["mlp"] ** -0.5
  timed = {
      "dense_matmul": (jax.jit(lambda x, w: x @ w), (x, wi)),
      "mlp_fwd_bwd": (jax.jit(jax.grad(lambda x, wi, wo: (jax.nn.gelu(x @ wi) @ wo).sum(), argnums=(0, 1, 2))),
                      (x, wi, wo)),
  }
  for name, attend in (("heads_first", heads_first_attention),
                       ("xla", lambda q, k, v, m: jax.nn.dot_product_attention(q, k, v, mask=m, implementation="xla")),
                       ("blocked", lambda q, k, v, m: blocked_attention(q, k, v, real, blocks=blocks))):
    if name == "blocked" and causal:
      attend = lambda q, k, v, m: blocked_attention(q, k, v, real, is_causal=True, blocks=blocks)  # noqa: E731
    step = jax.jit(jax.grad(lambda q, k, v, attend=attend: attend(q, k, v, mask).sum(), argnums=(0, 1, 2)))
    timed[f"attention_fwd_bwd:{name}"] = (step, (q, k, v))
  seconds = {}
  for name, (fn, args) in timed.items():
    jax.block_until_ready(fn(*args))
    seconds[name], _ = median_step_time(lambda i, fn=fn, args=args: fn(*args), steps, jax.block_until_ready)
  return {"framework": "jax", "version": jax.__version__, "backend": jax.default_backend(), **rates(seconds, s)}


def time_torch(s: dict, steps: int, threads: int, causal: bool) -> dict:
  import torch
  torch.set_num_threads(threads)
  torch.manual_seed(0)
  embed = s["heads"] * s["head_dim"]
  x = torch.randn(s["batch"] * s["length"], embed, requires_grad=True)
  wi = (torch.randn(embed, s["mlp"]) * embed ** -0.5).requires_grad_()
  wo = (torch.randn(s["mlp"], embed) * s["mlp"] ** -0.5).requires_grad_()
  q, k, v = (torch.randn(s["batch"], s["heads"], s["length"], s["head_dim"], requires_grad=True) for _ in range(3))
  mask = torch.from_numpy(lengths_mask(s))[:, None, None, :]
  if causal:
    mask = mask & torch.ones(s["length"], s["length"], dtype=torch.bool).tril()
  gelu = torch.nn.GELU(approximate="tanh")

  def backward(out):
    for leaf in (x, wi, wo, q, k, v):  # fresh gradients each call, as jax.grad returns
      leaf.grad = None
    out.sum().backward()
    return out

  timed = {
      "dense_matmul": lambda: x.detach() @ wi.detach(),
      "mlp_fwd_bwd": lambda: backward(gelu(x @ wi) @ wo),
      "attention_fwd_bwd:sdpa": lambda: backward(
          torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)),
  }
  seconds = {}
  for name, fn in timed.items():
    fn(), fn()  # warm-up: allocator and kernel selection
    seconds[name], _ = median_step_time(lambda i, fn=fn: fn(), steps, lambda out: None)
  return {"framework": "torch", "version": torch.__version__, **rates(seconds, s)}


def torch_installed() -> bool:
  import importlib.util
  return importlib.util.find_spec("torch") is not None


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--preset", choices=sorted(PRESETS), default="base")
  for name in PRESETS["base"]:
    parser.add_argument(f"--{name}", type=int, default=None, help="overrides the preset's value")
  parser.add_argument("--steps", type=int, default=10)
  parser.add_argument("--attention_blocks", default="512,256", help="queries,keys per tile of the blocked attention")
  parser.add_argument("--causal", action="store_true", help="a causal mask on every attention")
  parser.add_argument("--frameworks", default="jax,torch", help="comma-separated; torch is skipped where not installed")
  parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
  parser.add_argument("--side", choices=("jax", "torch"), help=argparse.SUPPRESS)
  args = parser.parse_args()
  shapes = {name: getattr(args, name) or value for name, value in PRESETS[args.preset].items()}
  if args.side:  # a subprocess: pinned, one framework imported
    from peer import pin_cpus  # benchmarks/peer.py: the same pinning as the peer comparison
    pin_cpus(args.threads)
    result = (time_jax(shapes, args.steps, tuple(map(int, args.attention_blocks.split(","))), args.causal)
              if args.side == "jax" else time_torch(shapes, args.steps, args.threads, args.causal))
    print(json.dumps({"preset": args.preset, "shape": shapes, "causal": args.causal, "cpu_threads": args.threads, **result}))
    return
  for framework in args.frameworks.split(","):
    if framework == "torch" and not torch_installed():
      print(json.dumps({"framework": "torch", "skipped": "not installed (pip install -e .[peer])"}))
      continue
    command = [sys.executable, __file__, f"--side={framework}", f"--preset={args.preset}", f"--steps={args.steps}",
               f"--threads={args.threads}", f"--attention_blocks={args.attention_blocks}",
               *(["--causal"] if args.causal else []), *(f"--{name}={value}" for name, value in shapes.items())]
    out = subprocess.run(command, stdout=subprocess.PIPE, text=True, check=True).stdout
    print([line for line in out.splitlines() if line.startswith("{")][-1])


if __name__ == "__main__":
  main()
