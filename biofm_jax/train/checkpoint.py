"""Orbax checkpoints of train state, data-iterator state and config, saved together.

One checkpoint step holds three items:
  state  - the TrainState arrays (restored onto whatever mesh the restoring run uses),
  data   - the Grain iterator's position, so a resumed run sees exactly the data order
           of an uninterrupted one,
  config - the resolved config as JSON, for the record.
Orbax writes a step into a temporary directory and renames it only when complete, so a
write interrupted by a crash or kill -9 is never taken as the latest step. A step written
by N processes resumes with M: the state restores onto any mesh, and the data position is
the same for every process (see `restore`).

Once a step is complete on disk, the size of every file in it is recorded beside it
(`<step>.sizes.json`), and every read first checks them: a file cut short (a full disk, a
killed copy) is named before TensorStore reads garbage. A step that is on disk but cannot be
read (a truncated array file, a cut JSON file) is set aside as `<step>.unreadable` with a
warning naming it and the error, and the run resumes from the newest step before it that
reads (`restore_latest`): the previous step was complete on disk, so nothing is lost but the
steps since.

A run that selects its best step (`checkpoint.best_metric`, e.g. the tuning split's loss:
early stopping's model selection) saves a step at every evaluation with that figure beside
it; the newest `keep` steps and the best one are kept, training resumes from the newest, and
whatever reads the finished run's parameters (`chosen_step`: scoring, export, prediction,
fine-tuning from it) reads the best.
"""
from __future__ import annotations

import json
import logging
import os
import pathlib
from typing import Any, Callable

import grain
import jax
import ml_collections
import orbax.checkpoint as ocp

from biofm_jax.config import config_to_dict
from jax.experimental import multihost_utils
from orbax.checkpoint._src.metadata import array_metadata_store  # the default handler's store (no public alias)
from orbax.checkpoint.checkpoint_managers import preservation_policy

UNREADABLE_SUFFIX = ".unreadable"
SIZES_SUFFIX = ".sizes.json"
# Orbax splits the write of a replicated array among its replicas. Each slice is an op
# dispatched (and on first use compiled) per array and replica, so for small arrays the
# split costs more than the parallel write saves: a tiny model's step took 4.7 s to save
# on 8 CPU devices the first time and 1.3 s after, against 0.1 s unsplit. Arrays whose
# slices stay under this many bytes are written whole by their first replica.
MIN_REPLICA_SLICE_BYTES = 1 << 20


def state_handler(compress: bool = True) -> ocp.PyTreeCheckpointHandler:
  """The handler of the train state: Orbax's standard handlers, with `jax.Array`s written
  as `MIN_REPLICA_SLICE_BYTES` says (a registry of its own: Orbax's global one is left as
  it is). The files are those of `StandardCheckpointHandler`, which reads them too.
  `compress=False` writes arrays without zstd: Orbax then writes each array from its own
  buffer, where compressing holds about two more copies of the state while it writes (a
  650M-parameter import, benchmarks/import_memory.py). Reading takes either."""
  arrays = ocp.type_handlers.ArrayHandler(array_metadata_store=array_metadata_store.Store(),
                                          min_slice_bytes_for_replica_parallel=MIN_REPLICA_SLICE_BYTES)
  registry = ocp.type_handlers.create_type_handler_registry(*[
      (kind, arrays if kind is jax.Array else ocp.type_handlers.get_type_handler(kind))
      for kind in ocp.type_handlers.supported_types()])
  return ocp.PyTreeCheckpointHandler(type_handler_registry=registry, use_compression=compress)


def restore_args(abstract_state: Any) -> ocp.args.PyTreeRestore:
  """Restores onto `abstract_state`'s shapes, dtypes and shardings."""
  return ocp.args.PyTreeRestore(item=abstract_state,
                                restore_args=ocp.checkpoint_utils.construct_restore_args(abstract_state))


class Checkpointer:
  """A thin wrapper over `ocp.CheckpointManager` with the three items above."""

  def __init__(self, directory: str | os.PathLike, *, keep: int, async_save: bool = True, compress: bool = True,
               best_metric: str = "", best_mode: str = "min"):
    """`compress`: see `state_handler`. `best_metric`: the figure saved beside a step
    (`save(..., metrics=)`) whose best step is kept beside the newest `keep`."""
    if best_metric:  # the newest `keep` steps, and the best of those saved with the figure
      figure = lambda metrics: metrics[best_metric]  # noqa: E731
      policy = preservation_policy.AnyPreservationPolicy([
          preservation_policy.LatestN(keep),
          preservation_policy.BestN(get_metric_fn=figure, reverse=best_mode == "min", n=1,
                                    keep_checkpoints_without_metrics=False)])
      # best_fn only makes Orbax write the figure into the step (read back by `recorded`).
      options = ocp.CheckpointManagerOptions(preservation_policy=policy, best_fn=figure, best_mode=best_mode,
                                             enable_async_checkpointing=async_save, create=True)
    else:
      options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save,
                                             create=True)
    self.directory = os.path.abspath(directory)  # Orbax requires absolute paths
    self._manager = ocp.CheckpointManager(self.directory, options=options,
                                          item_handlers={"state": state_handler(compress),
                                                         "data": grain.checkpoint.CheckpointHandler(),
                                                         "config": ocp.JsonCheckpointHandler()})

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._manager.all_steps())

  def save(self, step: int, state: Any, data_iterator: Any, config: ml_collections.ConfigDict,
           *, force: bool = False, metrics: dict[str, float] | None = None) -> bool:
    """Starts an (async) save of step `step` (with `metrics` beside it, which choose the best
    step); returns whether a save was started."""
    args = ocp.args.Composite(state=ocp.args.PyTreeSave(state),
                              data=grain.checkpoint.CheckpointSave(data_iterator),
                              config=ocp.args.JsonSave(config_to_dict(config)))
    self._record_sizes()  # of the steps an earlier (async) save has finished
    saved = self._manager.save(step, args=args, force=force, metrics=metrics)
    if saved:
      logging.info("checkpoint: saving step %d to %s", step, self.directory)
    return saved

  def restore_latest(self, abstract_state: Any, data_iterator: Any,
                     check_config: Callable[[dict, int], None] | None = None) -> tuple[int | None, Any]:
    """(step, state) of the newest step that reads, restored as `restore` does; (None, None)
    when there is no step. Unreadable steps are set aside; `check_config(saved, step)` runs
    on the step's config outside the fallback, so a config that does not fit stays an error."""
    failures = []
    for step in sorted(self.all_steps(), reverse=True):
      try:
        saved = self.restore_config(step)
      except Exception as e:  # noqa: BLE001 - Orbax and TensorStore raise many types for one bad file
        failures.append(self._set_aside(step, e))
        continue
      if check_config is not None:
        check_config(saved, step)
      if self.holds_params_only(step):  # an error, not a step to set aside: the folder is the user's
        raise ValueError(f"checkpoint step {step} in {self.directory} holds parameters only (public weights from "
                         f"experiments/import_weights.py): start a new run from it with "
                         f"--config.train.init_from={pathlib.Path(self.directory).parent}")
      try:
        return step, self.restore(step, abstract_state, data_iterator)
      except Exception as e:  # noqa: BLE001
        failures.append(self._set_aside(step, e))
    if failures:
      raise ValueError(f"checkpoints in {self.directory}: no step can be read (" + "; ".join(failures) + "); "
                       "they were set aside, so the next run starts from scratch")
    return None, None

  def newest_readable(self, read: Callable[[int], Any], at_most: int | None = None) -> tuple[int, Any]:
    """(step, read(step)) for the newest step (up to `at_most`) that `read` succeeds on. Steps
    it fails on are logged and skipped, not moved (a finished run is only read here); none
    readable, or no step at all, is a ValueError naming the directory."""
    failures = []
    for step in sorted((s for s in self.all_steps() if at_most is None or s <= at_most), reverse=True):
      try:
        return step, read(step)
      except Exception as e:  # noqa: BLE001 - Orbax and TensorStore raise many types for one bad file
        failures.append(_describe(step, e))
        logging.warning("checkpoint %s/%d cannot be read (%s); trying the previous step", self.directory, step,
                        failures[-1])
    if failures:
      raise ValueError(f"checkpoints in {self.directory}: no step can be read (" + "; ".join(failures) + ")")
    raise ValueError(f"no checkpoint in {self.directory}")

  def chosen_step(self, saved_config: dict) -> int | None:
    """The step whose parameters stand for the finished run: the best by the run's
    `checkpoint.best_metric` among the steps saved with it, or None (the newest stands)."""
    section = saved_config.get("checkpoint") or {}
    name, mode = section.get("best_metric") or "", section.get("best_mode") or "min"
    best = self.best_recorded(name, mode) if name else None
    return None if best is None else best[0]

  def best_recorded(self, name: str, mode: str) -> tuple[int, float] | None:
    """(step, figure) of the best figure `name` saved beside a step on disk ("min" or "max";
    ties: the earliest step), or None where no step holds it."""
    scored = self.recorded(name)
    if not scored:
      return None
    step = (min if mode == "min" else max)(sorted(scored), key=scored.__getitem__)
    return step, scored[step]

  def recorded(self, name: str) -> dict[int, float]:
    """{step: figure `name` saved beside it} over the steps on disk that hold it."""
    scored = {}
    for step in self.all_steps():
      value = (self._manager.metrics(step) or {}).get(name)
      if value is not None:
        scored[step] = float(value)
    return scored

  def _set_aside(self, step: int, error: Exception) -> str:
    """Renames an unreadable step out of Orbax's sight (process 0; every process waits)."""
    what = _describe(step, error)
    logging.warning("checkpoint %s/%d cannot be read (%s); setting it aside as %d%s and falling back to the "
                    "previous step", self.directory, step, what, step, UNREADABLE_SUFFIX)
    path = pathlib.Path(self.directory) / str(step)
    if jax.process_index() == 0:
      aside = path.with_name(f"{step}{UNREADABLE_SUFFIX}")
      if aside.exists():
        aside = path.with_name(f"{step}{UNREADABLE_SUFFIX}.{os.getpid()}")
      path.rename(aside)
      if self._sizes_path(step).exists():  # the record goes with its step; a new step gets its own
        self._sizes_path(step).rename(aside.with_name(aside.name + SIZES_SUFFIX))
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices(f"checkpoint_set_aside_{step}")
    self._manager.reload()
    return what

  def _sizes_path(self, step: int) -> pathlib.Path:
    return pathlib.Path(self.directory) / f"{step}{SIZES_SUFFIX}"

  def _record_sizes(self) -> None:
    """Writes `<step>.sizes.json` (relative path -> bytes) for complete steps without one."""
    if jax.process_index() != 0:
      return
    steps = self.all_steps()  # finalized steps only: Orbax renames a step into place when complete
    for stale in pathlib.Path(self.directory).glob(f"*{SIZES_SUFFIX}"):
      name = stale.name[:-len(SIZES_SUFFIX)]
      if name.isdigit() and int(name) not in steps:  # a step Orbax removed (max_to_keep)
        stale.unlink(missing_ok=True)
    for step in steps:
      target = self._sizes_path(step)
      if target.exists():
        continue
      root = pathlib.Path(self.directory) / str(step)
      sizes = {str(p.relative_to(root)): p.stat().st_size for p in sorted(root.rglob("*")) if p.is_file()}
      tmp = target.with_name(target.name + ".tmp")
      tmp.write_text(json.dumps(sizes, sort_keys=True))
      tmp.replace(target)

  def check_sizes(self, step: int) -> None:
    """ValueError naming the first file of `step` that is missing or not the size it had when
    the step was complete (steps written before sizes were recorded pass)."""
    path = self._sizes_path(step)
    if not path.exists():
      return
    root = pathlib.Path(self.directory) / str(step)
    for relative, size in json.loads(path.read_text()).items():
      file = root / relative
      actual = file.stat().st_size if file.exists() else None
      if actual != size:
        state = "is missing" if actual is None else f"has {actual} bytes"
        raise ValueError(f"{file} {state}; it had {size} when step {step} was written (cut short or changed)")

  def restore(self, step: int, abstract_state: Any, data_iterator: Any) -> Any:
    """Restores `step` into `abstract_state`'s shardings; sets `data_iterator`'s position.

    Written by another number of processes, the step has no data state for this process:
    every process's stream is its share of one global stream (`data/pipeline.py`), so all
    of them stood at the same position, which this process then takes."""
    self.check_sizes(step)
    if self._data_state_path(step, jax.process_index(), jax.process_count()).exists():
      args = ocp.args.Composite(state=restore_args(abstract_state),
                                data=grain.checkpoint.CheckpointRestore(data_iterator))
      return self._manager.restore(step, args=args).state
    data_iterator.set_state(self._shared_data_state(step))
    return self.restore_state(step, abstract_state)

  def _data_state_path(self, step: int, index: int, count: int) -> pathlib.Path:
    return pathlib.Path(self.directory) / str(step) / "data" / f"process_{index}-of-{count}.json"

  def _shared_data_state(self, step: int) -> dict:
    files = sorted((pathlib.Path(self.directory) / str(step) / "data").glob("process_*-of-*.json"))
    states = [json.loads(f.read_text()) for f in files]
    if not states or any(state != states[0] for state in states):
      raise ValueError(f"checkpoint step {step} in {self.directory}: written by another number of processes "
                       f"({[f.name for f in files]}) whose data positions differ or are missing; it cannot "
                       f"resume with {jax.process_count()} process(es)")
    logging.info("checkpoint: step %d was written by %d process(es); resuming its data position with %d",
                 step, len(files), jax.process_count())
    return states[0]

  def restore_state(self, step: int, abstract_state: Any) -> Any:
    """Only the train state (e.g. to evaluate or fine-tune from a checkpoint)."""
    self.check_sizes(step)
    return self._manager.restore(step, args=ocp.args.Composite(state=restore_args(abstract_state))).state

  def state_metadata(self, step: int) -> Any:
    """The saved state's tree of array metadata (no array is read)."""
    saved = ocp.PyTreeCheckpointer().metadata(pathlib.Path(self.directory) / str(step) / "state")
    return getattr(saved, "item_metadata", saved)

  def holds_params_only(self, step: int) -> bool:
    """Whether `step` holds parameters without an optimiser state (an imported run's)."""
    try:
      tree = self.state_metadata(step)
      keys = tree.keys() if isinstance(tree, dict) else tree.tree.keys()
    except Exception:  # noqa: BLE001 - unreadable metadata: the restore that follows says what is wrong
      return False
    return "params" in keys and "opt_state" not in keys

  def restore_params(self, step: int, target: Any, where: str | os.PathLike = "") -> Any:
    """Only the parameters of `step`, restored into `target`'s shapes and shardings (the
    whole model's, or a part such as a task model's backbone); every parameter whose shape
    differs, or that the step lacks, is named in one error."""
    self.check_sizes(step)
    saved = self.state_metadata(step)
    saved_params = saved["params"] if isinstance(saved, dict) else saved.tree["params"]
    _check_param_shapes(saved_params, target, where or pathlib.Path(self.directory).parent)
    item = pathlib.Path(self.directory) / str(step) / "state"
    return ocp.PyTreeCheckpointer().restore(item, args=ocp.args.PyTreeRestore(
        item={"params": target}, restore_args={"params": ocp.checkpoint_utils.construct_restore_args(target)},
        partial_restore=True))["params"]

  def restore_config(self, step: int) -> dict:
    self.check_sizes(step)
    return self._manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore())).config

  def wait(self) -> None:
    self._manager.wait_until_finished()
    self._record_sizes()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._record_sizes()
    self._manager.close()


def _describe(step: int, error: Exception) -> str:
  """"step N: Type: first line of the message" (TensorStore's messages run to pages)."""
  message = str(error).strip()
  return f"step {step}: {type(error).__name__}: {message.splitlines()[0][:300] if message else ''}"


# ------------------------------------------------------------------ another run's parameters
def pretrained_checkpoint(workdir: str | os.PathLike) -> tuple[pathlib.Path, int, dict]:
  """(checkpoints directory, latest step, saved config) of a run: pre-training, imported
  public weights (`experiments/import_weights.py`) or fine-tuning."""
  directory = pathlib.Path(workdir).absolute() / "checkpoints"
  if not directory.exists():
    raise ValueError(f"pretrained run {workdir}: no checkpoints directory {directory}")
  checkpointer = Checkpointer(directory, keep=1000, async_save=False)
  try:
    step, saved = checkpointer.newest_readable(checkpointer.restore_config)
    return directory, step, saved
  except ValueError as e:
    raise ValueError(f"pretrained run {workdir}: {e}") from None
  finally:
    checkpointer.close()


def restore_run_params(workdir: str | os.PathLike, target: Any) -> tuple[int, Any]:
  """(step, parameters) of a run's newest readable checkpoint (its best, where the run chose
  one: `Checkpointer.chosen_step`), restored into `target`'s
  shapes and shardings (abstract arrays: the whole model's parameters, or the part that
  the run's model is, such as a task model's backbone). Every parameter whose shape
  differs, or that the checkpoint lacks, is named in one error."""
  directory, newest, saved = pretrained_checkpoint(workdir)
  checkpointer = Checkpointer(directory, keep=1000, async_save=False)
  try:  # a step whose arrays were cut short falls back to the one before
    chosen = checkpointer.chosen_step(saved)
    return checkpointer.newest_readable(lambda step: checkpointer.restore_params(step, target, workdir),
                                        at_most=newest if chosen is None else chosen)
  finally:
    checkpointer.close()


def _check_param_shapes(saved: Any, target: Any, workdir: str | os.PathLike) -> None:
  def shapes(tree):
    return {jax.tree_util.keystr(p): tuple(getattr(x, "shape", ())) for p, x in
            jax.tree_util.tree_leaves_with_path(tree)}
  have, want = shapes(saved), shapes(target)
  problems = [f"{k}: missing from the checkpoint" for k in sorted(set(want) - set(have))]
  problems += [f"{k}: checkpoint {have[k]}, model {want[k]}" for k in sorted(set(want) & set(have))
               if have[k] != want[k]]
  if problems:
    raise ValueError(f"the pretrained checkpoint in {workdir} does not match the model's "
                     f"({len(problems)} parameters differ): " + "; ".join(problems[:8]))
