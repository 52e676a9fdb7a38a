"""The rates of a training step's two big parts in isolation: attention and the dense matmuls.

  python benchmarks/step_parts.py [--batch=4 --length=512 --heads=12 --head_dim=64 --mlp=3072]

Times, jitted, forward + backward of one attention call at `ehr_bert.py:base`'s shapes in
float32 (the model's `jax.nn.dot_product_attention`, "xla", and an einsum form with heads
before the sequence axis), and one tokens x embed x mlp matmul: what the step's time can be
compared against (benchmarks/RESULTS.md). Prints one JSON line.
"""
from __future__ import annotations

import argparse
import json
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

from biofm_jax import cli  # noqa: E402,F401  (CPU settings and host memory, as every command)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from timing import median_step_time  # noqa: E402  (benchmarks/timing.py)


def model_attention(q, k, v, mask):
  return jax.nn.dot_product_attention(q, k, v, mask=mask)


def heads_first_attention(q, k, v, mask):
  q, k, v = (x.transpose(0, 2, 1, 3) for x in (q, k, v))
  scores = jnp.einsum("bhqd,bhkd->bhqk", q, k) / jnp.sqrt(q.shape[-1]).astype(q.dtype)
  weights = jax.nn.softmax(jnp.where(mask, scores, jnp.finfo(scores.dtype).min), axis=-1)
  return jnp.einsum("bhqk,bhkd->bhqd", weights, v).transpose(0, 2, 1, 3)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  for name, default in (("batch", 4), ("length", 512), ("heads", 12), ("head_dim", 64), ("mlp", 3072), ("steps", 10)):
    parser.add_argument(f"--{name}", type=int, default=default)
  a = parser.parse_args()
  keys = jax.random.split(jax.random.key(0), 3)
  q, k, v = (jax.random.normal(key, (a.batch, a.length, a.heads, a.head_dim), jnp.float32) for key in keys)
  mask = jnp.ones((a.batch, 1, 1, a.length), bool)
  attention_flops = 3 * 4 * a.batch * a.heads * a.length ** 2 * a.head_dim  # QK^T and PV, fwd + 2x bwd
  result = {"backend": jax.default_backend(), "shape": [a.batch, a.length, a.heads, a.head_dim]}
  for name, attend in (("attention_xla", model_attention), ("attention_heads_first", heads_first_attention)):
    step = jax.jit(jax.grad(lambda q, k, v, attend=attend: attend(q, k, v, mask).sum(), argnums=(0, 1, 2)))
    jax.block_until_ready(step(q, k, v))
    seconds, _ = median_step_time(lambda i: step(q, k, v), a.steps, jax.block_until_ready)
    result[name] = {"seconds": seconds, "gflops_per_s": attention_flops / seconds / 1e9}
  x = jnp.ones((a.batch * a.length, a.heads * a.head_dim), jnp.float32)
  w = jnp.ones((a.heads * a.head_dim, a.mlp), jnp.float32)
  matmul = jax.jit(lambda x, w: x @ w)
  jax.block_until_ready(matmul(x, w))
  seconds, _ = median_step_time(lambda i: matmul(x, w), a.steps, jax.block_until_ready)
  result["dense_matmul"] = {"shape": [x.shape[0], x.shape[1], a.mlp],
                            "gflops_per_s": 2 * x.shape[0] * x.shape[1] * a.mlp / seconds / 1e9}
  print(json.dumps(result))


if __name__ == "__main__":
  main()
