"""Exported models run without the library's model code and match it to 1e-5."""
import subprocess
import sys

import numpy as np
import pytest

import helpers
from biofm_jax import parallel
from biofm_jax.data import pipeline
from biofm_jax.export import export_embedding_model, load_exported
from biofm_jax.modalities import registry
from biofm_jax.train import step as step_lib


def path_head(output) -> str:
  return output if isinstance(output, str) else output[0]


@pytest.mark.parametrize("spec, output", [("configs/ehr_bert.py:tiny", "ehr"),
                                          ("configs/multimodal_fusion.py:tiny", ("fused", "embedding"))])
def test_export_round_trip_matches_the_library_model(spec, output, tmp_path):
  config, data, setup, params, _ = helpers.pretrain_and_restore(spec, tmp_path / "run", train__num_steps=2,
                                                                train__eval_every=0)  # params only
  artifacts = tmp_path / "run" / "artifacts"
  out = export_embedding_model(setup.model, params, data.embedding_spec(), tmp_path / "export",
                               output=output, artifacts_dir=artifacts,
                               artifact_files=registry.model_artifact_files(artifacts), metadata={"config": spec})
  # The vocabularies and statistics only (per modality for a join); never the generated cohort.
  expected = {"ehr": ["ehr_vocab.json"],
              "fused": ["ehr/ehr_vocab.json", "omics/gene_vocab.json", "tabular/tabular_stats.json"]}[path_head(output)]
  assert sorted(p.relative_to(out / "artifacts").as_posix() for p in (out / "artifacts").rglob("*.*")) == expected
  dataset = pipeline.make_eval_dataset(data.source("tuning"), data.transforms(train=False, mask=False),
                                       global_batch_size=16, seed=0, example_spec=data.embedding_spec())
  batch = next(iter(pipeline.make_iterator(dataset)))
  embed = step_lib.jit_embed_step(setup.model, output, setup.state_shardings.params, setup.mesh, setup.rules)
  expected = np.asarray(embed(params, parallel.make_global_batch(batch, setup.mesh)))

  model = load_exported(out)
  np.testing.assert_allclose(model(batch), expected, atol=1e-5)
  # Any batch size: the export's batch dimension is symbolic.
  first_three = {m: {k: v[:3] for k, v in fields.items()} for m, fields in batch.items()}
  np.testing.assert_allclose(model(first_three), expected[:3], atol=1e-5)
  modality = sorted(batch)[0]
  field = sorted(batch[modality])[0]
  wrong = {m: dict(fields) for m, fields in batch.items()}
  wrong[modality][field] = wrong[modality][field].astype(np.float64)
  with pytest.raises(ValueError, match=f"batch\\['{modality}'\\]\\['{field}'\\]"):
    model(wrong)
  with pytest.raises(ValueError, match="not empty"):
    export_embedding_model(setup.model, params, data.embedding_spec(), out, output=output)


def test_export_command_writes_a_model_that_loads(tmp_path):
  spec = "configs/ehr_bert.py:tiny"
  helpers.train(helpers.config_for(spec, train__num_steps=2, train__eval_every=0), tmp_path / "run")
  command = [sys.executable, str(helpers.REPO / "experiments" / "export.py"), f"--config={helpers.REPO / spec}",
             f"--workdir={tmp_path / 'run'}", f"--out={tmp_path / 'export'}", "--config.train.num_steps=2"]
  result = subprocess.run(command, capture_output=True, text=True, cwd=helpers.REPO, timeout=300)
  assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
  model = load_exported(tmp_path / "export")
  assert model.info["step"] == 2 and model.info["output"] == ["ehr", "embedding"]
  assert (tmp_path / "export" / "artifacts").is_dir()
  missing = subprocess.run([*command[:3], f"--workdir={tmp_path / 'nothing'}", f"--out={tmp_path / 'x'}"],
                           capture_output=True, text=True, cwd=helpers.REPO, timeout=300)
  assert missing.returncode == 2 and "no checkpoint" in missing.stderr


# ---------------------------------------------------------------- damaged export files
def _small_export(out):
  """An export folder as `export_embedding_model` writes one, of a two-parameter affine map
  (built here with jax.export: a damaged file is the point, not the model)."""
  import json
  import jax
  from biofm_jax import export_loader
  params = [np.arange(12, dtype=np.float32).reshape(3, 4), np.ones(4, np.float32)]
  (batch,) = jax.export.symbolic_shape("batch")
  exported = jax.export.export(jax.jit(lambda p, b: b["m"]["x"] @ p[0] + p[1]))(
      [jax.ShapeDtypeStruct(p.shape, p.dtype) for p in params], {"m": {"x": jax.ShapeDtypeStruct((batch, 3), np.float32)}})
  out.mkdir()
  (out / export_loader.MODEL_FILE).write_bytes(exported.serialize())
  np.savez(out / export_loader.PARAMS_FILE, *params)
  (out / export_loader.INFO_FILE).write_text(json.dumps({"format_version": export_loader.FORMAT_VERSION,
                                                         "inputs": {"m": {"x": {"shape": [3], "dtype": "float32"}}}}))
  return out


def _cut(path, keep: float):
  data = path.read_bytes()
  path.write_bytes(data[:int(len(data) * keep)])


def _damage_stablehlo(path):
  """Inverts 32 bytes inside the serialised StableHLO (after its `ML\\xefR` magic): the
  container still parses, the module does not."""
  data = bytearray(path.read_bytes())
  start = data.find(b"ML\xefR") + 64
  data[start:start + 32] = bytes(b ^ 0xFF for b in data[start:start + 32])
  path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage, message", [
    (lambda d: _cut(d / "params.npz", 0.5),
     r"params\.npz: cannot read the parameters \(npz\): the file is damaged or truncated \(zipfile\.BadZipFile"),
    (lambda d: np.savez(d / "params.npz", np.ones((2, 2), np.float32), np.ones(4, np.float32)),
     r"params\.npz: arr_0 is float32\[2, 2\], the exported model takes float32\[3, 4\]"),
    (lambda d: _cut(d / "model.jax_export", 0.5),
     r"model\.jax_export: cannot read the serialised model: the file is damaged or truncated \(struct\.error"),
    (lambda d: _damage_stablehlo(d / "model.jax_export"),
     r"model\.jax_export: cannot read the serialised model: the file is damaged or truncated \(.*StableHLO"),
    (lambda d: _cut(d / "export.json", 0.5), r"export\.json: cannot read the export's description \(JSON\)"),
], ids=["params_cut", "params_of_another_shape", "model_cut", "model_stablehlo_damaged", "description_cut"])
def test_a_damaged_export_file_is_one_line_naming_it(tmp_path, capfd, damage, message):
  intact = load_exported(_small_export(tmp_path / "intact"))
  np.testing.assert_allclose(intact({"m": {"x": np.ones((2, 3), np.float32)}}), [[13, 16, 19, 22]] * 2)
  damaged = _small_export(tmp_path / "damaged")
  damage(damaged)
  capfd.readouterr()
  with pytest.raises(ValueError, match=message) as error:
    load_exported(damaged)
  assert "\n" not in str(error.value)
  assert capfd.readouterr().err == ""  # nothing printed by the StableHLO parser either


def test_predict_command_on_a_truncated_export_is_one_line(tmp_path):
  export = _small_export(tmp_path / "export")
  _cut(export / "params.npz", 0.5)
  command = [sys.executable, str(helpers.REPO / "experiments" / "predict.py"), f"--exported={export}",
             f"--meds={tmp_path / 'meds'}", f"--labels={tmp_path / 'labels.parquet'}", f"--out={tmp_path / 'p.parquet'}"]
  result = subprocess.run(command, capture_output=True, text=True, cwd=helpers.REPO, timeout=300)
  assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
  errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
  assert len(errors) == 1 and f"{export / 'params.npz'}: cannot read the parameters" in errors[0], result.stderr


# ---------------------------------------------------------------- serving reads training's rows
def _token_counting_export(out, drop_duplicates):
  """A binary-task export whose logit is 0.1 x the tokens of the record (CLS included), with
  export.json's data config as experiments/export.py writes it."""
  import json
  import jax
  import jax.numpy as jnp
  from biofm_jax import export_loader
  from biofm_jax.modalities.ehr.vocab import EHRVocab
  params = [np.full((1,), 0.1, np.float32)]
  (batch,) = jax.export.symbolic_shape("batch")
  exported = jax.export.export(jax.jit(lambda p, b: jnp.sum(b["ehr"]["mask"], -1, dtype=jnp.float32)[:, None] * p[0]))(
      [jax.ShapeDtypeStruct((1,), np.float32)], {"ehr": {"mask": jax.ShapeDtypeStruct((batch, 16), np.bool_)}})
  (out / export_loader.ARTIFACTS_DIR).mkdir(parents=True)
  (out / export_loader.MODEL_FILE).write_bytes(exported.serialize())
  np.savez(out / export_loader.PARAMS_FILE, *params)
  EHRVocab.from_counts({"A": 3, "B": 2}, {}, min_count=1, num_value_bins=2).save(
      out / export_loader.ARTIFACTS_DIR / "ehr_vocab.json")
  ehr = {"max_len": 16, "window": "recent"}
  if drop_duplicates is not None:
    ehr["drop_duplicates"] = drop_duplicates
  (out / export_loader.INFO_FILE).write_text(json.dumps({
      "format_version": export_loader.FORMAT_VERSION, "inputs": {"ehr": {"mask": {"shape": [16], "dtype": "bool"}}},
      "task": {"type": "binary", "num_outputs": 1, "config": {"type": "binary"}, "prediction_time_cut": "inclusive"},
      "data": {"ehr": ehr}}))
  return out


def test_scoring_an_export_reads_the_rows_training_read(tmp_path):
  import pyarrow as pa
  import pyarrow.parquet as pq
  from biofm_jax.eval.predict_meds import score_meds
  day = lambda d: np.datetime64("2020-01-01", "us") + np.timedelta64(d, "D")  # noqa: E731
  (tmp_path / "meds" / "data").mkdir(parents=True)
  # Subject 1: A on day 1 written twice (a duplicate row), B on day 2.
  pq.write_table(pa.table({"subject_id": pa.array([1, 1, 1], pa.int64()),
                           "time": pa.array([day(1), day(1), day(2)], pa.timestamp("us")),
                           "code": ["A", "A", "B"], "numeric_value": pa.array([None] * 3, pa.float32())}),
                 tmp_path / "meds" / "data" / "0.parquet")
  labels = tmp_path / "labels.parquet"
  pq.write_table(pa.table({"subject_id": pa.array([1], pa.int64()),
                           "prediction_time": pa.array([day(3)], pa.timestamp("us")), "boolean_value": [True]}), labels)
  sigmoid = lambda z: 1 / (1 + np.exp(-z))  # noqa: E731
  for setting, tokens in ((True, 3), (False, 4), (None, 3)):  # None: an export from before the setting: the default
    export = _token_counting_export(tmp_path / f"export_{setting}", setting)
    scored = score_meds(export, tmp_path / "meds", labels)
    np.testing.assert_allclose(scored.table["predicted_boolean_probability"].to_numpy(), [sigmoid(0.1 * tokens)],
                               rtol=1e-5)
