"""Configs are locked and recorded; the command line names what is wrong."""
import json
import subprocess

import pytest

import helpers
from biofm_jax.config import load_config, set_field, write_run_info


def run_cli(tmp_path, *overrides):
  command = helpers.pretrain_command("configs/ehr_bert.py:tiny", tmp_path / "run", {})
  result = subprocess.run(command + list(overrides), capture_output=True, text=True, cwd=helpers.REPO,
                          timeout=300)
  return result.returncode, result.stdout + result.stderr


def test_unknown_field_on_the_command_line_is_named(tmp_path):
  code, output = run_cli(tmp_path, "--config.train.num_stepz=5")
  assert code == 2
  assert "train.num_stepz" in output and "Traceback" not in output
  assert not (tmp_path / "run" / "checkpoints").exists()  # nothing was started


def test_a_data_error_is_one_line_and_exit_status_2_with_the_traceback_only_when_verbose(tmp_path):
  code, output = run_cli(tmp_path, f"--config.data.ehr.path={tmp_path / 'no_such_dataset'}")
  assert code == 2 and "Traceback" not in output
  errors = [line for line in output.splitlines() if line.startswith("error:")]
  assert len(errors) == 1 and "no_such_dataset" in errors[0]
  code, output = run_cli(tmp_path, f"--config.data.ehr.path={tmp_path / 'no_such_dataset'}", "--verbose")
  assert code != 0 and "Traceback" in output and "no_such_dataset" in output


def test_a_config_error_is_one_line_and_exit_status_2(tmp_path):
  code, output = run_cli(tmp_path, "--config.train.learning_rate=fast")
  assert code == 2 and "Traceback" not in output and "error: in --config:" in output


@pytest.mark.parametrize("spec", ["configs/ehr_bert.py:tiny", "configs/ehr_bert.py:demo",
                                  "configs/ehr_bert.py:base", "configs/ehr_gpt.py:tiny",
                                  "configs/ehr_motor.py:base"])
def test_presets_load_and_are_locked(spec):
  config = load_config(str(helpers.REPO / spec))
  with pytest.raises(AttributeError, match="does not exist"):
    config.train.not_a_field = 1
  with pytest.raises(KeyError, match="model.widht"):
    set_field(config, "model.widht", 3)


def test_overrides_are_typed():
  config = load_config(str(helpers.REPO / "configs/ehr_bert.py:tiny"),
                       {"train.num_steps": "7", "model.dtype": "bfloat16", "mesh.fsdp": "2"})
  assert config.train.num_steps == 7 and config.model.dtype == "bfloat16" and config.mesh.fsdp == 2
  with pytest.raises(ValueError, match="train.learning_rate"):
    load_config(str(helpers.REPO / "configs/ehr_bert.py:tiny"), {"train.learning_rate": "fast"})
  with pytest.raises(ValueError, match="unknown preset"):
    load_config(str(helpers.REPO / "configs/ehr_bert.py:huge"))


def test_base_preset_is_about_100m_parameters():
  import jax
  from biofm_jax.data.batch import ehr_example_spec
  from biofm_jax.modalities.registry import build_model
  config = load_config(str(helpers.REPO / "configs/ehr_bert.py:base"))
  model = build_model(config, {"ehr": {"vocab_size": 15_000, "num_value_bins": 10, "max_len": 512}})
  batch = {"ehr": {name: jax.ShapeDtypeStruct((1, 512), dtype)
                   for name, (_, dtype) in ehr_example_spec(512, True).items()}}
  shapes = jax.eval_shape(lambda b: model.init(jax.random.key(0), b), batch)
  count = sum(x.size for x in jax.tree.leaves(shapes))
  assert 90e6 < count < 120e6, count


def test_run_info_records_config_versions_and_commit(tmp_path):
  config = load_config(str(helpers.REPO / "configs/ehr_bert.py:tiny"))
  write_run_info(config, tmp_path)
  write_run_info(config, tmp_path)  # a restart appends, it does not overwrite
  info = json.loads((tmp_path / "run_info.json").read_text())
  assert len(info["starts"]) == 2
  start = info["starts"][0]
  assert start["config"]["train"]["num_steps"] == config.train.num_steps
  assert start["versions"]["jax"] and start["versions"]["orbax-checkpoint"]
  assert start["git_commit"]
  assert "num_steps" in (tmp_path / "config.txt").read_text()


def test_packaged_configs_load_from_any_directory(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  config = load_config("configs/finetune.py:binary")
  assert config.task.type == "binary"
  from biofm_jax.configs import ecg_mae
  assert ecg_mae.get_config("tiny").data.ecg.length == 250
  with pytest.raises(FileNotFoundError, match="configs/nope.py"):
    load_config("configs/nope.py")


# ---------------------------------------------------------------- values out of range
@pytest.mark.parametrize("spec, field, value, message", [
    ("configs/ehr_bert.py:tiny", "data.ehr.max_len", "-8",
     "config.data.ehr.max_len must be an integer >= 2 (a CLS token plus one more), got -8"),
    ("configs/ehr_bert.py:tiny", "data.ehr.mask_rate", "1.5", "config.data.ehr.mask_rate must be a fraction in (0, 1], got 1.5"),
    ("configs/omics_sequence.py:tiny", "data.sequence.mask_rate", "0.0",
     "config.data.sequence.mask_rate must be a fraction in (0, 1], got 0.0"),
    ("configs/ehr_bert.py:tiny", "train.num_steps", "-5", "config.train.num_steps must be a positive integer, got -5"),
    ("configs/ehr_bert.py:tiny", "checkpoint.every_steps", "0",
     "config.checkpoint.every_steps must be a positive integer, got 0"),
    ("configs/ehr_bert.py:tiny", "train.log_every", "0", "config.train.log_every must be a positive integer, got 0"),
    ("configs/imaging_mae.py:tiny", "data.batch_size", "0", "config.data.batch_size must be a positive integer, got 0"),
])
def test_a_value_out_of_range_is_refused_on_loading_naming_the_field(spec, field, value, message):
  with pytest.raises(ValueError) as error:
    load_config(str(helpers.REPO / spec), {field: value})
  assert str(error.value) == message


def test_a_config_changed_in_code_is_checked_before_the_run_reads_or_writes_anything(tmp_path):
  from biofm_jax.train.loop import train_and_evaluate
  config = load_config(str(helpers.REPO / "configs/ehr_bert.py:tiny"))
  config.checkpoint.every_steps = 0  # a locked config still takes new values of its fields
  opened = []
  with pytest.raises(ValueError, match=r"^config\.checkpoint\.every_steps must be a positive integer, got 0$"):
    train_and_evaluate(config, tmp_path / "run", open_data=lambda artifacts: opened.append(artifacts))
  assert opened == [] and not (tmp_path / "run").exists()


def test_the_shipped_presets_pass_the_checks():
  from biofm_jax.config import check_config
  for spec in ("ehr_bert.py:tiny", "ehr_motor.py:base", "omics_expression.py:tiny", "omics_sequence.py:1b",
               "tabular_features.py:tiny", "multimodal_fusion.py:tiny", "ecg_mae.py:base", "finetune.py:binary"):
    check_config(load_config(str(helpers.REPO / "configs" / spec)))  # raises on any field out of range


def test_a_value_out_of_range_on_the_command_line_is_one_line_before_any_data_is_read(tmp_path):
  code, output = run_cli(tmp_path, "--config.checkpoint.every_steps=0",
                         f"--config.data.ehr.path={tmp_path / 'no_such_dataset'}")
  assert code == 2 and "Traceback" not in output, output
  errors = [line for line in output.splitlines() if line.startswith("error:")]
  assert errors == ["error: in --config: config.checkpoint.every_steps must be a positive integer, got 0"], output
  assert not (tmp_path / "run").exists()  # the dataset was never looked for, nothing was written


def test_masked_prediction_slots_name_their_arguments_out_of_range():
  from biofm_jax.data.masking import prediction_slots
  assert prediction_slots(128, 0.15) == 48
  for max_len, mask_rate in ((-8, 0.15), (128, 1.5), (128, float("nan"))):
    with pytest.raises(ValueError, match="prediction_slots: max_len must be a positive integer and mask_rate"):
      prediction_slots(max_len, mask_rate)


# ---------------------------------------------------------------- index_meds: the output folder first
def test_index_meds_refuses_a_non_empty_output_folder_before_indexing(tmp_path):
  import sys
  out = tmp_path / "events"
  out.mkdir()
  (out / "notes.txt").write_text("kept")
  command = [sys.executable, str(helpers.REPO / "experiments" / "index_meds.py"),
             f"--meds={tmp_path / 'no_such_meds'}", f"--out={out}"]  # the MEDS folder is never looked at
  result = subprocess.run(command, capture_output=True, text=True, cwd=helpers.REPO, timeout=300)
  assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
  assert result.stderr.strip().splitlines() == [
      f"error: --out={out}: the folder is not empty; name a new or empty folder for the event store"]
  assert [p.name for p in tmp_path.iterdir()] == ["events"] and (out / "notes.txt").read_text() == "kept"
