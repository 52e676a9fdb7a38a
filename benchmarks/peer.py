"""Training throughput of our masked EHR model beside the same-size Hugging Face BERT masked LM.

  python benchmarks/peer.py --config=configs/ehr_bert.py:demo [--steps=30] [--threads=2] \
      [--override=data.ehr.path=/data/meds]

Needs the `peer` extra (`pip install -e .[peer]`: torch and transformers); nothing else in
the library uses them. Measures, each in its own subprocess so that torch and jax never
share a process:
  - ours: the jitted train step on device-resident batches from the Grain pipeline,
    exactly as `benchmarks/throughput.py` times it (`time_train_step`: two warm-up steps
    excluded, the compile and one more; the median of chunks of 5 steps),
  - peer: `transformers.BertForMaskedLM` of the same width, depth, heads, MLP width,
    vocabulary, dropout, batch size and sequence length, trained eagerly in float32 with
    `torch.optim.AdamW` (our learning rate, betas, weight decay on matrices only) and
    `clip_grad_norm_` at our clip norm, after `--warmup` steps that are not timed (the
    median of chunks of 5 steps, as ours). Its
    batches are random token ids in our vocabulary, with the per-example lengths (padding)
    of our first batch and the same masking rate: labels are -100 except at masked positions.
Both processes are pinned to the same `--threads` CPUs (default: every CPU this process may
use); XLA sizes its thread pool from that affinity, torch gets `torch.set_num_threads`.
Prints one JSON line per side, then one comparing them (ours / peer). Timings are only
meaningful on an otherwise idle machine; add them to benchmarks/RESULTS.md with the machine.

How the two models differ (both are 4 x 128 for `demo`, 2 x 32 for `tiny`):
  - positions: ours rotates queries and keys (RoPE, no parameters); BERT adds a learned
    absolute position table (max_len x D) and a token-type table (2 x D) to its inputs.
  - norms: ours is pre-norm with RMSNorm (scale only) and a final norm; BERT is post-norm
    with LayerNorm (scale and bias) after each sub-layer and on the embeddings.
  - biases: our attention and MLP projections have none; BERT's all have biases.
  - GELU: ours uses flax's tanh approximation, BERT the exact erf form.
  - inputs: ours adds a value-bin embedding ((K+1) x D, K value bins) and 34 sinusoidal
    age/time features projected by a 34 x D dense layer to the code embedding; BERT embeds
    the token id only.
  - heads and loss: ours has an untied code head (D x V) and a value-bin head (D x (K+1)),
    loss = code cross-entropy + 0.5 x value-bin cross-entropy; BERT has a D x D dense +
    GELU + LayerNorm transform, then a decoder tied to the word embeddings (D x V), one
    cross-entropy. BERT computes its logits at every position; ours (since the masked
    objective's prediction slots) at P = `prediction_slots(L, mask_rate)` gathered masked
    positions per row, as BERT's own pre-training did (`max_predictions_per_seq`).
  - masking: ours is 80/10/10 [MASK]/random/kept in the input pipeline, BERT's batches put
    [MASK] at every selected position; neither is inside the timed step.
  - optimiser: ours follows a warm-up + cosine learning-rate schedule inside the jitted
    step; BERT's learning rate is constant (the schedule's cost is negligible either way).
  - execution: ours is one XLA program per step (fused, buffers donated); BERT runs
    eagerly (no torch.compile) with SDPA attention.
FLOPs per token, counted the same way for both (matmuls only, training = 3 x forward, see
`models/transformer.py:flops_per_token`): the stacks are identical; BERT adds 2 D^2 (the
MLM transform) and ours 2 D (K+1) (the value head; our 34 x D time projection is not
counted by our analytic count either). For `demo` (D = 128, mlp 512, L = 64, K = 10, V = 98
on the generated cohort) that is +32,768 forward FLOPs per token for BERT and +2,816 for
ours, against 1,703,936 for the stack and 25,088 for the code head: with heads at every
position ours did 0.983x BERT's work per example (0.973x for `tiny`); with prediction slots
the heads run at P of L positions, which the lines' own `model_flops_per_example` count. Parameters: 820,077 ours vs 831,202 BERT for
`demo`, 24,749 vs 22,594 for `tiny`. Each line reports its own `model_flops_per_example`
and `num_params`, and the comparison line their ratios.
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys
import tempfile

from timing import median_step_time  # benchmarks/timing.py, beside this script

BENCHMARKS = pathlib.Path(__file__).resolve().parent
REPO = BENCHMARKS.parent


def pin_cpus(threads: int) -> list[int]:
  """Restricts this process to `threads` of its allowed CPUs (call before importing jax)."""
  allowed = sorted(os.sched_getaffinity(0))
  if not 1 <= threads <= len(allowed):
    raise ValueError(f"--threads={threads}: this process may use {len(allowed)} CPUs")
  cpus = allowed[:threads]
  os.sched_setaffinity(0, cpus)
  return cpus


def bert_flops_per_example(spec: dict) -> float:
  """Training matmul FLOPs per example of `BertForMaskedLM`, counted as ours are."""
  d, mlp, length, vocab = spec["embed_dim"], spec["mlp_dim"], spec["seq_len"], spec["vocab_size"]
  per_layer = 2 * (4 * d * d) + 2 * (2 * d * mlp) + 2 * (2 * length * d)
  forward = spec["num_layers"] * per_layer + 2 * d * d + 2 * d * vocab  # + MLM transform and decoder
  return length * 3.0 * forward


# ------------------------------------------------------------------ ours (jax only)
def model_spec(config, info: dict, lengths: list[int]) -> dict:
  """Everything the peer process needs to build and train the same-size model."""
  model, train = config.model, config.train
  if model.head_dim and model.head_dim * model.num_heads != model.embed_dim:
    raise ValueError("BERT needs num_heads * head_dim == embed_dim; this config sets model.head_dim")
  from biofm_jax.data import batch as B
  return dict(
      vocab_size=info["vocab_size"], num_value_bins=info["num_value_bins"], seq_len=info["max_len"],
      batch_size=config.data.batch_size, num_layers=model.num_layers, embed_dim=model.embed_dim,
      num_heads=model.num_heads, mlp_dim=model.mlp_dim, dropout_rate=model.dropout_rate,
      position=model.position, norm=model.norm, dtype=model.dtype,
      mask_rate=config.data.ehr.mask_rate, lengths=lengths,
      pad_id=B.PAD_ID, mask_id=B.MASK_ID, cls_id=B.CLS_ID, num_special=len(B.SPECIAL_TOKENS),
      learning_rate=train.learning_rate, adam_b1=train.adam_b1, adam_b2=train.adam_b2,
      weight_decay=train.weight_decay, grad_clip_norm=train.grad_clip_norm)


def measure_ours(config_spec: str, overrides: list[str], steps: int) -> dict:
  import jax
  import numpy as np

  sys.path.insert(0, str(BENCHMARKS))
  import throughput  # benchmarks/throughput.py; it also puts the repository on sys.path
  from biofm_jax.config import load_config
  from biofm_jax.train.loop import make_train_iterator, open_data_module

  config = load_config(str(REPO / config_spec), dict(o.split("=", 1) for o in overrides))
  if config.objective.name != "masked" or "ehr" not in config.data:
    raise ValueError(f"{config_spec} is not a masked EHR config (the peer is a BERT masked LM)")
  with tempfile.TemporaryDirectory() as tmp:
    data = open_data_module(config, pathlib.Path(tmp))
    iterator = make_train_iterator(data, config)
    batches = [next(iterator) for _ in range(2)]
    step = throughput.time_train_step(config, data, batches, steps)
    lengths = np.asarray(batches[0][data.name]["mask"]).sum(axis=1).astype(int).tolist()
    spec = model_spec(config, data.model_info()[data.name], lengths)
  return {"side": "ours", "framework": f"jax {jax.__version__}", "backend": jax.default_backend(),
          "devices": jax.device_count(), "cpu_threads": len(os.sched_getaffinity(0)),
          "batch_size": spec["batch_size"], "seq_len": spec["seq_len"], "timed_steps": steps, "warmup_steps": 2,
          "examples_per_s": step["examples_per_s"], "step_time_s": step["step_time_s"],
          "step_time_min_s": step["step_time_min_s"],
          "num_params": int(step["num_params"]),
          "model_flops_per_example": step["model_flops_per_step"] / spec["batch_size"],
          "model_flops_per_s": step["model_flops_per_step"] / step["step_time_s"], "model": spec}


# ------------------------------------------------------------------ peer (torch only)
def bert_config(spec: dict):
  import transformers
  return transformers.BertConfig(
      vocab_size=spec["vocab_size"], hidden_size=spec["embed_dim"], num_hidden_layers=spec["num_layers"],
      num_attention_heads=spec["num_heads"], intermediate_size=spec["mlp_dim"],
      max_position_embeddings=spec["seq_len"], hidden_dropout_prob=spec["dropout_rate"],
      attention_probs_dropout_prob=spec["dropout_rate"], pad_token_id=spec["pad_id"])


def random_batch(spec: dict, generator) -> dict:
  """Random ids in our vocabulary at our lengths: [CLS] first, padding after each length,
  `mask_rate` of the other real tokens selected, [MASK]ed and labelled (-100 elsewhere)."""
  import torch
  shape = (spec["batch_size"], spec["seq_len"])
  lengths = torch.tensor(spec["lengths"])[:, None]
  real = torch.arange(spec["seq_len"])[None] < lengths
  ids = torch.randint(spec["num_special"], spec["vocab_size"], shape, generator=generator)
  ids[:, 0] = spec["cls_id"]
  selected = real & (torch.rand(shape, generator=generator) < spec["mask_rate"])
  selected[:, 0] = False
  labels = torch.where(selected, ids, torch.full_like(ids, -100))
  ids = torch.where(selected, spec["mask_id"], torch.where(real, ids, spec["pad_id"]))
  return {"input_ids": ids, "attention_mask": real.long(), "labels": labels}


def make_optimizer(model, spec: dict):
  """AdamW with weight decay on matrices and embeddings only, as ours (`train/state.py`)."""
  import torch
  decayed = [p for p in model.parameters() if p.dim() >= 2]
  others = [p for p in model.parameters() if p.dim() < 2]
  return torch.optim.AdamW([{"params": decayed, "weight_decay": spec["weight_decay"]},
                            {"params": others, "weight_decay": 0.0}],
                           lr=spec["learning_rate"], betas=(spec["adam_b1"], spec["adam_b2"]))


def peer_train_step(model, optimizer, batch: dict, clip_norm: float):
  import torch
  optimizer.zero_grad(set_to_none=True)
  loss = model(**batch).loss
  loss.backward()
  torch.nn.utils.clip_grad_norm_(model.parameters(), clip_norm)
  optimizer.step()
  return loss.detach()


def measure_peer(spec: dict, steps: int, warmup: int, threads: int, device: str = "cpu",
                 compiled: bool = False) -> dict:
  """The peer's training steps; `compiled` wraps the model in `torch.compile` (a reference
  point: the target is the eager peer, which is what most users run)."""
  import torch
  import transformers

  torch.set_num_threads(threads)
  torch.manual_seed(0)
  if device == "auto":
    device = "cuda" if torch.cuda.is_available() else "cpu"
  model = transformers.BertForMaskedLM(bert_config(spec)).train().to(device)
  optimizer = make_optimizer(model, spec)
  if compiled:
    model = torch.compile(model)
    warmup = max(warmup, 2)  # the first steps compile
  generator = torch.Generator().manual_seed(0)
  batches = [{k: v.to(device) for k, v in random_batch(spec, generator).items()}
             for _ in range(2)]  # two, as ours cycles two
  for i in range(warmup):
    peer_train_step(model, optimizer, batches[i % len(batches)], spec["grad_clip_norm"])
  step_time, fastest = median_step_time(
      lambda i: peer_train_step(model, optimizer, batches[i % len(batches)], spec["grad_clip_norm"]), steps,
      lambda loss: loss.item())
  flops = bert_flops_per_example(spec)
  return {"side": "peer_compiled" if compiled else "peer", "device": device,
          "framework": f"torch {torch.__version__}, transformers {transformers.__version__}",
          "model_class": type(model).__name__, "attn_implementation": model.config._attn_implementation,
          "cpu_threads": torch.get_num_threads(), "interop_threads": torch.get_num_interop_threads(),
          "batch_size": spec["batch_size"], "seq_len": spec["seq_len"], "timed_steps": steps,
          "warmup_steps": warmup, "examples_per_s": spec["batch_size"] / step_time, "step_time_s": step_time, "step_time_min_s": fastest,
          "num_params": sum(p.numel() for p in model.parameters()),  # tied decoder counted once
          "model_flops_per_example": flops, "model_flops_per_s": spec["batch_size"] * flops / step_time}


# ------------------------------------------------------------------ driver
def run_side(args, side: str, threads: int, spec: dict | None = None) -> dict:
  """Runs this script as `--side=...` in a fresh interpreter; returns its JSON line."""
  command = [sys.executable, __file__, f"--side={side}", f"--device={args.device}", f"--config={args.config}",
             f"--steps={args.steps}",
             f"--warmup={args.warmup}", f"--threads={threads}", f"--malloc={args.malloc}", *(f"--override={o}" for o in args.override)]
  if spec is not None:
    command.append(f"--spec={json.dumps(spec)}")
  env = {**os.environ, "BIOFM_JAX_MALLOC": args.malloc}  # our commands read it (biofm_jax/host_memory.py)
  out = subprocess.run(command, stdout=subprocess.PIPE, text=True, check=True, env=env).stdout
  return json.loads([line for line in out.splitlines() if line.startswith("{")][-1])


def compare(ours: dict, peer: dict) -> dict:
  return {"comparison": "ours / peer", "config": ours["config"],
          "examples_per_s_ratio": ours["examples_per_s"] / peer["examples_per_s"],
          "model_flops_per_s_ratio": ours["model_flops_per_s"] / peer["model_flops_per_s"],
          "model_flops_per_example_ratio": ours["model_flops_per_example"] / peer["model_flops_per_example"],
          "num_params_ours": ours["num_params"], "num_params_peer": peer["num_params"],
          "cpu_threads": [ours["cpu_threads"], peer["cpu_threads"]], "malloc": ours["malloc"]}


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--config", default="configs/ehr_bert.py:demo")
  parser.add_argument("--steps", type=int, default=30, help="timed steps per side")
  parser.add_argument("--warmup", type=int, default=3, help="untimed peer steps first (ours: the compile step)")
  parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)),
                      help="CPUs each side may use (default: all this process may use)")
  parser.add_argument("--override", action="append", default=[],
                      help="config overrides as field=value, e.g. data.ehr.path=/data/meds")
  parser.add_argument("--malloc", choices=("keep", "default"), default="keep",
                      help="keep: both sides keep freed host memory in the process, as our commands do "
                           "(biofm_jax/host_memory.py); default: glibc's defaults for both")
  parser.add_argument("--device", default="cpu", help="the peer's torch device: cpu, cuda or auto")
  parser.add_argument("--compile_peer", action="store_true",
                      help="also time the peer under torch.compile (a reference, not the target)")
  parser.add_argument("--side", choices=("ours", "peer", "peer_compiled"), help=argparse.SUPPRESS)
  parser.add_argument("--spec", help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.side:  # a subprocess: pin, import one framework, measure, print one line
    pin_cpus(args.threads)
    if args.malloc == "keep":  # both sides alike, before either framework starts its threads
      sys.path.insert(0, str(REPO))
      from biofm_jax.host_memory import keep_freed_host_memory
      keep_freed_host_memory()
    if args.side == "ours":
      result = {"config": args.config, "malloc": args.malloc, **measure_ours(args.config, args.override, args.steps)}
    else:
      result = {"config": args.config, "malloc": args.malloc,
                **measure_peer(json.loads(args.spec), args.steps, args.warmup, args.threads, args.device,
                               compiled=args.side == "peer_compiled")}
    print(json.dumps(result))
    return
  ours = run_side(args, "ours", args.threads)
  peer = run_side(args, "peer", args.threads, spec=ours["model"])
  lines = [ours, peer, compare(ours, peer)]
  if args.compile_peer:
    compiled = run_side(args, "peer_compiled", args.threads, spec=ours["model"])
    lines += [compiled, {**compare(ours, compiled), "comparison": "ours / peer under torch.compile"}]
  for line in lines:
    print(json.dumps(line))


if __name__ == "__main__":
  main()
