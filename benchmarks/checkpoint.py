"""Checkpoint cost: save and restore time, and the share of training time async saving takes.

  python benchmarks/checkpoint.py --config=configs/ehr_bert.py:demo [--steps=200] [--every=100]

Measures, in one process, with the training loop's own `Checkpointer` and train step:
  - steps/s with no checkpoints, and with an async save every `--every` steps (the
    difference is what saving costs training; Orbax writes in a background thread);
  - one blocking save and one restore of the same state (seconds, and bytes on disk).
`--steps=0` times the save and restore only. Prints one JSON line; add it to
benchmarks/RESULTS.md with the machine it ran on.
"""
from __future__ import annotations

import argparse
import json
import pathlib
import platform
import sys
import tempfile
import time

import jax

REPO = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from biofm_jax import parallel  # noqa: E402
from biofm_jax.config import load_config  # noqa: E402
from biofm_jax.train.checkpoint import Checkpointer  # noqa: E402
from biofm_jax.train.loop import make_train_iterator, open_data_module  # noqa: E402
from biofm_jax.train import state as state_lib  # noqa: E402
from biofm_jax.train.build import build_training  # noqa: E402


def timed_run(setup, state, iterator, config, steps: int, checkpointer: Checkpointer | None, every: int):
  """(seconds for `steps` steps, state), saving asynchronously every `every` steps if given."""
  start = time.perf_counter()
  for step in range(1, steps + 1):
    state, metrics = setup.train_step(state, parallel.make_global_batch(next(iterator), setup.mesh))
    if checkpointer is not None and step % every == 0:
      checkpointer.save(int(jax.device_get(state.step)), state, iterator, config, force=True)
  jax.block_until_ready(metrics)
  if checkpointer is not None:
    checkpointer.wait()  # a save still in flight is part of the cost
  return time.perf_counter() - start, state


def directory_bytes(path: pathlib.Path) -> int:
  return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--config", default="configs/ehr_bert.py:demo")
  parser.add_argument("--steps", type=int, default=200)
  parser.add_argument("--every", type=int, default=100)
  args = parser.parse_args()
  config = load_config(str(REPO / args.config), {"train.peak_flops_per_device": 1e9})
  with tempfile.TemporaryDirectory() as tmp:
    tmp = pathlib.Path(tmp)
    data = open_data_module(config, tmp / "artifacts")
    iterator = make_train_iterator(data, config)
    setup = build_training(config, data)
    state = setup.init_state(config.seed)
    plain = with_saves = None
    if args.steps:  # --steps=0: save and restore only (a state too big to train on this machine)
      _, state = timed_run(setup, state, iterator, config, 3, None, args.every)  # compile
      plain, state = timed_run(setup, state, iterator, config, args.steps, None, args.every)
      async_ckpt = Checkpointer(tmp / "async", keep=2, async_save=True)
      with_saves, state = timed_run(setup, state, iterator, config, args.steps, async_ckpt, args.every)
      async_ckpt.close()

    sync_ckpt = Checkpointer(tmp / "sync", keep=1, async_save=False)
    start = time.perf_counter()
    sync_ckpt.save(int(jax.device_get(state.step)), state, iterator, config, force=True)
    sync_ckpt.wait()
    save_s = time.perf_counter() - start
    step = sync_ckpt.latest_step()
    start = time.perf_counter()
    jax.block_until_ready(sync_ckpt.restore(step, setup.abstract_state, iterator))
    restore_s = time.perf_counter() - start
    size = directory_bytes(tmp / "sync" / str(step))
    sync_ckpt.close()
  print(json.dumps({
      "config": args.config, "backend": jax.default_backend(), "devices": jax.device_count(),
      "machine": platform.processor() or platform.machine(),
      "num_params": state_lib.param_count(state.params), "checkpoint_bytes": size,
      "steps": args.steps, "save_every": args.every, "train_s_without_saves": plain,
      "train_s_with_async_saves": with_saves,
      "async_save_share": (with_saves - plain) / plain if args.steps else None,
      "blocking_save_s": save_s, "restore_s": restore_s}))


if __name__ == "__main__":
  main()
