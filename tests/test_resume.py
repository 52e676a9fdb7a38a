"""Resume: a stopped or killed run continues exactly as if it had never stopped."""
import dataclasses
import json
import shutil
import signal
import time
import types

import jax
import numpy as np
import pytest

import helpers
from biofm_jax.train import finetune
from biofm_jax.train.checkpoint import Checkpointer
from biofm_jax.train.runs import open_run

SPEC = "configs/ehr_bert.py:tiny"
# Checkpoints every 10 steps: a kill after step 30 leaves most of the run still to come.
STEPS = 100


def overrides(meds_path, **extra):
  # A constant learning rate after warm-up: the first k steps do not depend on num_steps.
  base = dict(data__ehr__path=str(meds_path), train__log_every=1, train__eval_every=1000,
              train__final_lr_fraction=1.0, checkpoint__every_steps=10, model__dropout_rate=0.1)
  return {**base, **extra}


@pytest.fixture(scope="module")
def reference(synthetic_meds, tmp_path_factory):
  """An uninterrupted run of STEPS steps."""
  workdir = tmp_path_factory.mktemp("reference")
  config = helpers.config_for(SPEC, **overrides(synthetic_meds, train__num_steps=STEPS))
  helpers.train(config, workdir)
  return workdir, config


def test_stop_and_resume_in_process_reproduces_the_run(reference, synthetic_meds, tmp_path):
  helpers.assert_resume_reproduces(SPEC, tmp_path / "resumed", stop_at=STEPS // 2, num_steps=STEPS, reference_dir=reference[0],
                                   data__ehr__path=str(synthetic_meds), model__dropout_rate=0.1)


def test_sigkill_mid_run_then_rerun_reproduces_the_run(reference, synthetic_meds, tmp_path):
  ref_dir, ref_config = reference
  args = {k.replace("__", "."): v for k, v in overrides(synthetic_meds, train__num_steps=STEPS).items()}
  process = helpers.start_pretrain(SPEC, tmp_path, args, tmp_path / "first.log")
  killed_after = helpers.wait_for_checkpoint(tmp_path, 30, process)
  assert helpers.kill(process, signal.SIGKILL) == -signal.SIGKILL, "the run finished before it could be killed"
  assert killed_after < STEPS
  rerun = helpers.start_pretrain(SPEC, tmp_path, args, tmp_path / "second.log")
  assert rerun.wait(timeout=300) == 0, (tmp_path / "second.log").read_text()[-3000:]
  log = (tmp_path / "second.log").read_text()
  assert "resumed from checkpoint step" in log
  helpers.assert_curves_close(helpers.train_losses(tmp_path), helpers.train_losses(ref_dir), atol=1e-6)
  helpers.assert_trees_close(helpers.final_params(tmp_path, ref_config), helpers.final_params(ref_dir, ref_config),
                             atol=1e-6)


def test_sigterm_saves_a_checkpoint_before_exiting(synthetic_meds, tmp_path):
  args = {k.replace("__", "."): v for k, v in overrides(
      synthetic_meds, train__num_steps=100_000, checkpoint__every_steps=100_000).items()}
  process = helpers.start_pretrain(SPEC, tmp_path, args, tmp_path / "run.log")
  metrics = tmp_path / "metrics.jsonl"
  deadline = time.time() + 240
  while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 5):
    assert time.time() < deadline and process.poll() is None, (tmp_path / "run.log").read_text()[-3000:]
    time.sleep(0.1)
  # Checkpointed, not finished: 143 (128 + SIGTERM) tells a scheduler to requeue the run.
  assert helpers.kill(process, signal.SIGTERM) == 143, (tmp_path / "run.log").read_text()[-3000:]
  saved = Checkpointer(tmp_path / "checkpoints", keep=2).latest_step()
  last_logged = json.loads(metrics.read_text().splitlines()[-1])["step"]
  assert saved is not None and saved == last_logged
  assert "saving a checkpoint and stopping" in (tmp_path / "run.log").read_text()


def test_an_interrupted_checkpoint_write_is_never_the_latest(reference, tmp_path):
  ref_dir, _ = reference
  workdir = tmp_path / "copy"
  shutil.copytree(ref_dir, workdir)
  # What a write killed mid-way leaves behind: a temporary directory of a later step.
  partial = workdir / "checkpoints" / "400.orbax-checkpoint-tmp-1234"
  (partial / "state").mkdir(parents=True)
  (partial / "state" / "garbage").write_bytes(b"\x00" * 10)
  assert Checkpointer(workdir / "checkpoints", keep=2).latest_step() == STEPS


def test_resuming_with_other_data_settings_fails_naming_them(reference, synthetic_meds, tmp_path):
  ref_dir, _ = reference
  workdir = tmp_path / "copy"
  shutil.copytree(ref_dir, workdir)
  changed = helpers.config_for(SPEC, **overrides(synthetic_meds, train__num_steps=STEPS + 10, data__ehr__max_len=64))
  with pytest.raises(ValueError, match=r"data\.ehr\.max_len: 32 -> 64"):
    helpers.train(changed, workdir)


def test_a_run_resumes_with_its_layers_scanned_instead_of_unrolled(reference, synthetic_meds, tmp_path):
  """How stacked layers run (`model.layer_loop`) is not a setting of the checkpoint: a run
  written where they unroll (this CPU) resumes where they scan, with the same parameters."""
  ref_dir, ref_config = reference
  workdir = tmp_path / "copy"
  shutil.copytree(ref_dir, workdir)
  scanned = helpers.config_for(SPEC, **overrides(synthetic_meds, train__num_steps=STEPS + 10, model__layer_loop="scan"))
  helpers.train(scanned, workdir)
  losses = helpers.train_losses(workdir)
  before = np.mean([losses[s] for s in range(STEPS - 9, STEPS + 1)])
  after = [losses[s] for s in range(STEPS + 1, STEPS + 11)]
  # It goes on from the trained parameters (a fresh model starts near losses[1]).
  assert max(losses) == STEPS + 10 and abs(np.mean(after) - before) < 0.3 and max(after) < losses[1] - 1.0


@pytest.mark.parametrize("damage", ["array", "json"])
def test_an_unreadable_newest_checkpoint_is_set_aside_and_the_previous_step_resumes_exactly(
    reference, synthetic_meds, tmp_path, damage):
  ref_dir, ref_config = reference
  workdir = tmp_path / "copy"
  shutil.copytree(ref_dir, workdir)
  newest = workdir / "checkpoints" / str(STEPS)
  # The state's array data files cut in half (OCDBT keeps them under d/ folders; which of them
  # a restore reads varies, so all are cut), or the data iterator's JSON position cut short.
  targets = ([p for p in (newest / "state").rglob("*") if p.is_file() and p.parent.name == "d"]
             if damage == "array" else [newest / "data" / "process_0-of-1.json"])
  assert targets
  for target in targets:
    target.write_bytes(target.read_bytes()[: target.stat().st_size // 2])
  config = helpers.config_for(SPEC, **overrides(synthetic_meds, train__num_steps=STEPS))
  helpers.train(config, workdir)
  assert (workdir / "checkpoints" / f"{STEPS}.unreadable").is_dir()
  assert Checkpointer(workdir / "checkpoints", keep=2).latest_step() == STEPS  # written again
  # The last 10 steps were trained again from the step before, exactly as the first time.
  helpers.assert_curves_close(helpers.train_losses(workdir), helpers.train_losses(ref_dir), atol=1e-6)
  helpers.assert_trees_close(helpers.final_params(workdir, config), helpers.final_params(ref_dir, ref_config),
                             atol=1e-6)


def test_reading_a_finished_run_falls_back_past_a_cut_step_and_leaves_it_in_place(reference, tmp_path):
  ref_dir, ref_config = reference
  workdir = tmp_path / "copy"
  shutil.copytree(ref_dir, workdir)
  for target in [p for p in (workdir / "checkpoints" / str(STEPS) / "state").rglob("*")
                 if p.is_file() and p.parent.name == "d"]:
    target.write_bytes(target.read_bytes()[: target.stat().st_size // 2])
  _, _, _, params, step = open_run(workdir)
  assert step == STEPS - 10 and (workdir / "checkpoints" / str(STEPS)).is_dir()  # read past, not moved
  assert not (workdir / "checkpoints" / f"{STEPS}.unreadable").exists()
  # Fine-tuning's restore of the backbone falls back the same way.
  @dataclasses.dataclass
  class State:
    params: dict

    def replace(self, **fields):
      return dataclasses.replace(self, **fields)
  setup = types.SimpleNamespace(abstract_state=types.SimpleNamespace(
      params={"backbone": jax.eval_shape(lambda: params)}))
  backbone = finetune.load_pretrained(State({"backbone": None}), setup, workdir).params["backbone"]
  helpers.assert_trees_close(backbone, params, atol=0)
  missing = tmp_path / "no_such_run"
  with pytest.raises(FileNotFoundError, match="no checkpoints directory"):
    open_run(missing)
  assert not missing.exists()  # a mistyped workdir is not created


def test_every_file_of_a_step_is_checked_against_its_recorded_size(reference, tmp_path):
  ref_dir, _ = reference
  workdir = tmp_path / "copy"
  shutil.copytree(ref_dir / "checkpoints", workdir)
  checkpointer = Checkpointer(workdir, keep=2, async_save=False)
  try:
    assert {p.name for p in workdir.glob("*.sizes.json")} == {f"{STEPS - 10}.sizes.json", f"{STEPS}.sizes.json"}
    files = [p for p in (workdir / str(STEPS)).rglob("*") if p.is_file()]
    kinds = {p.parent.name if p.parent.name in ("d", "data", "config") else p.name for p in files}
    assert {"d", "data", "config"} <= kinds and len(files) >= 5  # arrays, data position, config, Orbax metadata
    for file in files:  # each kind of file, cut in turn, is named before anything reads it
      original = file.read_bytes()
      file.write_bytes(original[:-1])
      with pytest.raises(ValueError, match=rf"{file.name} has {len(original) - 1} bytes; it had {len(original)}"):
        checkpointer.check_sizes(STEPS)
      with pytest.raises(ValueError, match=file.name):
        checkpointer.restore_config(STEPS)
      file.write_bytes(original)
    checkpointer.check_sizes(STEPS)
  finally:
    checkpointer.close()
