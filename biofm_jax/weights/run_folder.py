"""Converted public weights written as an ordinary biofm_jax run folder.

The folder is what a pre-training run leaves at step 0: `checkpoints/0` (the imported
parameters, without an optimiser state: a run that starts from them makes its own; the data
position; the config),
`artifacts/` (the vocabulary in our format) and `run_info.json`, plus `imported.json`
saying where the weights came from. So every command that takes a run folder takes it:
`--config.train.init_from` (continued pre-training), `--pretrained` (probes, fine-tuning,
evaluation), `export.py`.

It is written into a hidden sibling folder and renamed into place only when complete: a
conversion that fails on any tensor leaves nothing at `out`.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import pathlib
import shutil
from typing import Any, Callable, Iterator, Mapping

import jax
import ml_collections
import numpy as np

from biofm_jax.config import write_run_info
from biofm_jax.weights.conversion import ParamPath
from biofm_jax.train import loop
from biofm_jax.train.build import build_training
from biofm_jax.train.checkpoint import Checkpointer

log = logging.getLogger("biofm_jax")
IMPORT_RECORD = "imported.json"


def check_out(out: pathlib.Path) -> None:
  """`out` must not exist yet, or be an empty folder (nothing of a user's is overwritten)."""
  if out.is_symlink() or (out.exists() and (not out.is_dir() or any(out.iterdir()))):
    raise ValueError(f"--out {out}: exists and is not an empty folder; choose a new run folder")


@contextlib.contextmanager
def written_whole(out: pathlib.Path, suffix: str) -> Iterator[pathlib.Path]:
  """A hidden sibling of `out` to write into, renamed to `out` when the block ends without
  an error and removed when it raises: `out` holds a whole folder or nothing. `out` must
  be new or an empty folder (`check_out`)."""
  check_out(out)
  staging = out.parent / f".{out.name}.{suffix}"
  shutil.rmtree(staging, ignore_errors=True)
  staging.mkdir(parents=True)
  try:
    yield staging
    if out.exists():
      out.rmdir()  # empty (check_out)
    os.replace(staging, out)
  except BaseException:
    shutil.rmtree(staging, ignore_errors=True)
    raise


def param_paths(tree: Any) -> dict[ParamPath, Any]:
  """{(key, ...): leaf} of a nested parameter dict."""
  out = {}
  for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
    out[tuple(getattr(k, "key", getattr(k, "name", str(k))) for k in path)] = leaf
  return out


def nested(flat: dict[ParamPath, Any]) -> dict:
  """{(a, b): x} -> {a: {b: x}}."""
  tree: dict = {}
  for path, value in flat.items():
    node = tree
    for key in path[:-1]:
      node = node.setdefault(key, {})
    node[path[-1]] = value
  return tree


def check_against_model(params: dict[ParamPath, np.ndarray], abstract: Any,
                        fresh: tuple[ParamPath, ...] = ()) -> None:
  """The converted parameters are exactly the model's: every path, every shape; those under
  a `fresh` prefix excepted (a part the format does not hold, initialised afresh)."""
  want = {p: tuple(leaf.shape) for p, leaf in param_paths(abstract).items()
          if not any(p[:len(f)] == f for f in fresh)}
  have = {p: tuple(a.shape) for p, a in params.items()}
  problems = [f"{'/'.join(p)}: not converted" for p in sorted(set(want) - set(have))]
  problems += [f"{'/'.join(p)}: converted but not in the model" for p in sorted(set(have) - set(want))]
  problems += [f"{'/'.join(p)}: converted {have[p]}, model {want[p]}" for p in sorted(set(want) & set(have))
               if have[p] != want[p]]
  if problems:
    raise ValueError(f"the converted weights do not fit the model ({len(problems)} parameters): "
                     + "; ".join(problems[:8]))


def write_run_folder(config: ml_collections.ConfigDict, params: dict[ParamPath, np.ndarray],
                     out: str | os.PathLike, record: dict[str, Any],
                     artifacts: Mapping[str, Callable[[pathlib.Path], None]] | None = None,
                     fresh: tuple[ParamPath, ...] = ()) -> pathlib.Path:
  """Writes the run folder `out` (see the module docstring); `record` goes to imported.json.
  `artifacts` ({file name: writer}) are written into `artifacts/` before the data module
  opens, which then reads them rather than building its own (a gene vocabulary). Parameters
  under a `fresh` path prefix keep their new initialisation (a part the format lacks)."""
  out = pathlib.Path(out).absolute()
  with written_whole(out, "importing") as staging:
    (staging / "artifacts").mkdir()
    for name, write in (artifacts or {}).items():
      write(staging / "artifacts" / name)
    data = loop.open_data_module(config, staging / "artifacts")
    setup = build_training(config, data)
    abstract = setup.abstract_state.params
    check_against_model(params, abstract, fresh)
    if fresh:  # a part the format lacks: this run's own initialisation of it
      initial = param_paths(jax.device_get(setup.init_state(config.seed).params))
      params = {**{path: np.asarray(value) for path, value in initial.items()
                   if any(path[:len(f)] == f for f in fresh)}, **params}
    # The converted arrays as they are, on one host device (jax aliases a numpy buffer there
    # rather than copying it; not the mesh's shardings, which would replicate them), without
    # an optimiser state (a run started from this one makes its own), and written without
    # compression, which would hold two more copies while writing: the folder is written
    # holding the converted model about once (benchmarks/import_memory.py).
    dtypes = {path: leaf.dtype for path, leaf in param_paths(abstract).items()}
    device = jax.local_devices(backend="cpu")[0]
    tree = nested({path: jax.device_put(np.asarray(value, dtype=dtypes[path]), device)
                   for path, value in params.items()})
    checkpointer = Checkpointer(staging / "checkpoints", keep=1, async_save=False, compress=False)
    try:
      checkpointer.save(0, {"params": tree, "step": np.zeros((), np.int32)}, loop.make_train_iterator(data, config),
                        config, force=True)
    finally:
      checkpointer.close()
    write_run_info(config, staging)
    (staging / IMPORT_RECORD).write_text(json.dumps(record, indent=2, sort_keys=True))
  log.info("imported weights written to %s", out)
  return out
