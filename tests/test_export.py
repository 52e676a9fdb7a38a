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
