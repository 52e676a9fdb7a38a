"""The library beside the MEDS tools people already use, each run as its users run it.

A MEDS dataset from meds-testing-helpers' generator; task labels from ACES (`aces-cli`, with
the task config in tests/data/aces_task.yaml, whose input window includes the trigger); a
model pre-trained, fine-tuned (`experiments/finetune.py`) and evaluated on that ACES output
folder as written; and meds-evaluation (`meds-evaluation-cli`) scoring the predictions the
library writes, agreeing with the library's own report.
"""
import json
import pathlib
import shutil
import subprocess
import sys

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

import helpers
from biofm_jax.config import load_config
from biofm_jax.eval.downstream import EvaluationOptions, evaluate_task
from biofm_jax.eval.model_card import fingerprint
from biofm_jax.eval.predict_meds import score_meds
from biofm_jax.export import export_run
from biofm_jax.train.finetune import finetune_config, open_labeled_data
from biofm_jax.train.loop import train_and_evaluate

BIN = pathlib.Path(sys.executable).parent
TASK = "outcome_within_10y"


def generate_meds(out: pathlib.Path, num_subjects: int, seed: int) -> pathlib.Path:
  """meds-testing-helpers' sample dataset, through its own hydra config."""
  import hydra
  from hydra import compose, initialize_config_dir
  from meds_testing_helpers.dataset_generator import GEN_YAML
  with initialize_config_dir(config_dir=str(GEN_YAML.parent), version_base=None):
    cfg = compose(config_name=GEN_YAML.stem, overrides=[f"N_subjects={num_subjects}", f"seed={seed}"])
  generator = hydra.utils.instantiate(cfg.dataset_spec)
  generator.sample(num_subjects, np.random.default_rng(seed)).write(out)
  return out


def run_aces(meds_root: pathlib.Path, cohort_dir: pathlib.Path) -> pathlib.Path:
  """ACES on every data shard; returns its output folder `cohort_dir/TASK/`."""
  cohort_dir.mkdir(parents=True)
  shutil.copyfile(helpers.REPO / "tests" / "data" / "aces_task.yaml", cohort_dir / f"{TASK}.yaml")
  shards = ",".join(sorted(p.stem for p in (meds_root / "data").glob("*.parquet")))
  subprocess.run([str(BIN / "aces-cli"), f"cohort_dir={cohort_dir}", f"cohort_name={TASK}", "data=sharded",
                  "data.standard=meds", f"data.root={meds_root / 'data'}", f"data.shard={shards}", "-m"],
                 cwd=cohort_dir, check=True, capture_output=True, text=True, timeout=300)
  return cohort_dir / TASK


def meds_evaluation_auroc(predictions: pathlib.Path, out: pathlib.Path) -> float:
  subprocess.run([str(BIN / "meds-evaluation-cli"), f"predictions_path={predictions}", f"output_file={out}"],
                 cwd=out.parent, check=True, capture_output=True, text=True, timeout=300)
  return json.loads(out.read_text())["samples_equally_weighted"]["roc_auc_score"]


@pytest.fixture(scope="module")
def aces_cohort(tmp_path_factory):
  root = tmp_path_factory.mktemp("meds_tools")
  meds_root = generate_meds(root / "meds", num_subjects=500, seed=1)
  labels = run_aces(meds_root, root / "aces")
  pretrained = root / "pretrained"
  train_and_evaluate(helpers.config_for("configs/ehr_bert.py:tiny", data__ehr__path=str(meds_root),
                                        train__num_steps=20, train__eval_every=20, checkpoint__every_steps=20),
                     pretrained)
  return meds_root, labels, pretrained


@pytest.fixture(scope="module")
def finetuned(aces_cohort, tmp_path_factory):
  """`experiments/finetune.py` on the ACES output folder as written."""
  _, labels, pretrained = aces_cohort
  tuned = tmp_path_factory.mktemp("finetuned") / "run"
  result = subprocess.run(
      [sys.executable, "experiments/finetune.py", "--config=configs/finetune.py:binary,tiny",
       f"--pretrained={pretrained}", f"--workdir={tuned}", f"--config.task.labels={labels}",
       "--config.train.num_steps=20", "--config.train.eval_every=20", "--config.checkpoint.every_steps=20",
       "--config.train.peak_flops_per_device=1e9"],
      cwd=helpers.REPO, capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  return tuned


def task_config(pretrained, labels, **overrides):
  flat = {**helpers.QUIET, "task.labels": str(labels), **{k.replace("__", "."): v for k, v in overrides.items()}}
  return finetune_config(load_config(str(helpers.REPO / "configs" / "finetune.py") + ":binary,tiny", flat),
                         pretrained)


def test_aces_labels_as_written_keep_their_trigger_event_as_history(aces_cohort, tmp_path):
  meds_root, labels, pretrained = aces_cohort
  table = pq.read_table(labels)  # ACES's own columns, all-null value columns included
  assert {"subject_id", "prediction_time", "boolean_value", "integer_value"} <= set(table.column_names)
  data = open_labeled_data(task_config(pretrained, labels), tmp_path / "inclusive")
  assert data.dropped["total"] == 0  # every ACES row's trigger is an event at its prediction time
  assert sum(len(data.split_labels(s)) for s in data.splits()) == len(table)
  source = data.source("train")
  for i in range(0, len(source), 7):
    times = source[i]["times"]
    assert times[~np.isnat(times)].max() == source.labels.prediction_times[i]

  # With the strict cut, the rows whose trigger is the subject's first timed event lose all history:
  # counted from the raw MEDS files, independently of the library.
  events = pq.read_table(meds_root / "data").filter(pc.is_valid(pq.read_table(meds_root / "data")["time"]))
  first = {}
  for subject, time in zip(events["subject_id"].to_pylist(), events["time"].to_pylist()):
    first[subject] = min(first.get(subject, time), time)
  at_first = sum(first[s] == t for s, t in zip(table["subject_id"].to_pylist(), table["prediction_time"].to_pylist()))
  assert at_first > 0
  strict = open_labeled_data(task_config(pretrained, labels, task__prediction_time_cut="strict"), tmp_path / "strict")
  assert strict.dropped["total"] == at_first


def test_fine_tune_and_evaluate_on_aces_labels_and_meds_evaluation_agrees_with_the_report(aces_cohort, finetuned,
                                                                                         tmp_path):
  meds_root, labels, pretrained = aces_cohort
  tuned = finetuned
  assert (tuned / "predictions" / "finetuned" / "held_out.parquet").exists()
  options = EvaluationOptions(finetuned_workdir=str(tuned), few_shot_ks=(1, 4), few_shot_seeds=(0,),
                              bootstrap_samples=20)
  report = evaluate_task(task_config(pretrained, labels), tmp_path / "report", options)
  saved = json.loads((tmp_path / "report" / "report.json").read_text())
  assert saved["task"]["name"] == TASK  # titled by the ACES task, not a preset
  assert f"Validation report: {TASK}" in (tmp_path / "report" / "report.md").read_text()
  assert saved["task"]["rows_dropped"]["total"] == 0
  assert saved["held_out"]["auroc"] == pytest.approx(report["splits"]["held_out"]["metrics"]["auroc"])
  # meds-evaluation reads our files unchanged and gets the report's numbers.
  for model, auroc in (("finetuned", saved["held_out"]["auroc"]),
                       ("probe", saved["baselines"]["probe"]["held_out"]["metrics"]["auroc"])):
    theirs = meds_evaluation_auroc(tmp_path / "report" / "predictions" / model / "held_out.parquet",
                                   tmp_path / f"{model}.json")
    assert np.isfinite(theirs) and theirs == pytest.approx(auroc, abs=1e-9), model
  # The fine-tuning run's own predictions are the evaluation's (same checkpoint, same rows).
  ours = pq.read_table(tuned / "predictions" / "finetuned" / "held_out.parquet")
  theirs = pq.read_table(tmp_path / "report" / "predictions" / "finetuned" / "held_out.parquet")
  np.testing.assert_allclose(ours["predicted_boolean_probability"].to_numpy(),
                             theirs["predicted_boolean_probability"].to_numpy(), atol=1e-6)

  # Exported with the report, the model card carries the report's held-out figures, a
  # fingerprint of the data it was trained on, and the limits the figures show; no subject id.
  export_dir, _ = export_run(tuned, tmp_path / "export", report=tmp_path / "report")
  card = json.loads((export_dir / "export.json").read_text())["model_card"]
  held_out = report["splits"]["held_out"]
  assert card["performance"]["source"] == "evaluation report"
  assert card["performance"]["held_out"]["metrics"]["auroc"] == pytest.approx(held_out["metrics"]["auroc"])
  assert card["performance"]["held_out"]["intervals"]["auroc"] == pytest.approx(held_out["intervals"]["auroc"])
  assert card["performance"]["baselines"]["probe"]["held_out"]["auroc"] == pytest.approx(
      saved["baselines"]["probe"]["held_out"]["metrics"]["auroc"])
  assert card["training_data"]["cohort"]["labelled_rows"]["held_out"] == held_out["n"]
  sources = card["training_data"]["sources"]
  assert sources["data.ehr.path"] == {"path": str(meds_root), **fingerprint(meds_root)}
  assert sources["task.labels"]["sha256"] == fingerprint(labels)["sha256"]
  assert card["intended_use"]["type"] == "binary" and card["intended_use"]["prediction_time_cut"] == "inclusive"
  assert any(limit.startswith(f"The held-out set has {held_out['n']} rows") for limit in card["known_limits"])
  # Every baseline at or above the model on held-out rows is named among the limits, and only those.
  ours = held_out["metrics"]["auroc"]
  above = {name for name, b in saved["baselines"].items() if b["held_out"]["metrics"]["auroc"] >= ours}
  assert above == {limit.split()[2] for limit in card["known_limits"] if limit.startswith("The baseline ")}
  markdown = (export_dir / "MODEL_CARD.md").read_text()
  assert f"| auroc | {held_out['metrics']['auroc']:.4g} |" in markdown and "## Known limits" in markdown
  # This cohort's subject ids are 0..499, numbers any count may equal, so the card is checked
  # for its shape: no field holds subject ids, and no list is long enough to hold one per row.
  def walk(value, key=""):
    assert key.lower() not in ("subject_id", "subject_ids", "subjects"), key
    if isinstance(value, dict):
      for k, v in value.items():
        walk(v, k)
    elif isinstance(value, list):
      assert len(value) <= 16, (key, len(value))
      for v in value:
        walk(v, key)
  walk(card)


def _link_only(distributions: list[str], site: pathlib.Path) -> list[str]:
  """Links the installed files of `distributions` and everything they require (extras
  aside) into `site`; returns the distributions linked."""
  from importlib import metadata

  from packaging.requirements import Requirement
  todo, seen = list(distributions), []
  while todo:
    name = todo.pop()
    dist = metadata.distribution(name)
    if dist.metadata["Name"].lower() in seen:
      continue
    seen.append(dist.metadata["Name"].lower())
    todo += [r.name for r in map(Requirement, dist.requires or ()) if not r.marker or r.marker.evaluate()]
    for top in {pathlib.PurePath(f).parts[0] for f in dist.files or ()}:
      origin = pathlib.Path(dist.locate_file(top))
      if origin.exists() and not (site / top).exists() and not top.startswith(".."):
        (site / top).symlink_to(origin)
  return sorted(seen)


def test_an_exported_model_scores_new_meds_records_without_the_library(aces_cohort, finetuned, tmp_path):
  meds_root, labels, _ = aces_cohort
  export = tmp_path / "export"
  result = subprocess.run([sys.executable, "experiments/export.py", f"--workdir={finetuned}", f"--out={export}"],
                          cwd=helpers.REPO, capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  info = json.loads((export / "export.json").read_text())
  assert info["data"]["ehr"]["max_len"] > 0 and info["task"]["prediction_time_cut"] == "inclusive"
  assert (export / "artifacts" / "ehr_vocab.json").exists() and (export / "loader.py").exists()

  predict = [sys.executable, "experiments/predict.py", f"--exported={export}", f"--meds={meds_root}",
             f"--labels={labels}", f"--out={tmp_path / 'scored.parquet'}"]
  result = subprocess.run(predict, cwd=helpers.REPO, capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  scored = pq.read_table(tmp_path / "scored.parquet")
  assert scored.column_names == ["subject_id", "prediction_time", "boolean_value", "predicted_boolean_value",
                                 "predicted_boolean_probability"]
  # The held-out rows score as the fine-tuned run scored them, through tokeniser + export alone.
  held_out = pq.read_table(finetuned / "predictions" / "finetuned" / "held_out.parquet")
  key = lambda t: list(zip(t["subject_id"].to_pylist(), t["prediction_time"].to_pylist()))  # noqa: E731
  index = {k: i for i, k in enumerate(key(scored))}
  rows = [index[k] for k in key(held_out)]
  np.testing.assert_allclose(scored["predicted_boolean_probability"].to_numpy()[rows],
                             held_out["predicted_boolean_probability"].to_numpy(), atol=1e-5)
  again = subprocess.run(predict, cwd=helpers.REPO, capture_output=True, text=True, timeout=600)
  assert again.returncode == 2 and "exists: pass --overwrite" in again.stderr

  # Records whose codes the vocabulary has never seen: scored, and counted as such.
  unknown_root = tmp_path / "renamed"
  shutil.copytree(meds_root, unknown_root)
  for path in (unknown_root / "data").glob("*.parquet"):
    table = pq.read_table(path)
    renamed = pc.binary_join_element_wise("OTHER//", table["code"], "")
    pq.write_table(table.set_column(table.schema.get_field_index("code"), "code", renamed), path)
  unknown = score_meds(export, unknown_root, labels)
  assert unknown.scored == len(scored) and unknown.no_known_code == len(scored)

  # The loader copied into the export runs in a fresh virtualenv that holds only jax (with what
  # it requires), numpy and flatbuffers: no library, no pyarrow, no flax.
  venv = tmp_path / "venv"
  subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
  site = next(venv.glob("lib/python*/site-packages"))
  linked = _link_only(["jax", "numpy", "flatbuffers"], site)
  assert "biofm_jax" not in linked and "flax" not in linked and "pyarrow" not in linked
  first = {name: np.asarray(v)[:5] for name, v in _held_out_batch(export, meds_root, labels).items()}
  np.savez(tmp_path / "batch.npz", **first)
  # Loaded as the README says, by the loader's path: a module planted in a shared export folder
  # (a numpy.py) is never imported in place of the installed one.
  (export / "numpy.py").write_text("raise SystemExit('planted numpy.py was imported')\n")
  script = ("import sys, importlib.util; spec = importlib.util.spec_from_file_location('biofm_export_loader', "
            "sys.argv[1] + '/loader.py'); loader = importlib.util.module_from_spec(spec); "
            "spec.loader.exec_module(loader); import numpy as np\n"
            "m = loader.load_exported(sys.argv[1]); b = dict(np.load(sys.argv[2])); np.save(sys.argv[3], m({'ehr': b}))\n"
            "try:\n import biofm_jax\nexcept ImportError: print('no library')\n")
  result = subprocess.run([str(venv / "bin" / "python"), "-c", script, str(export), str(tmp_path / "batch.npz"),
                           str(tmp_path / "logits.npy")], capture_output=True, text=True, timeout=300,
                          cwd=tmp_path, env={"PATH": "/usr/bin:/bin", "JAX_PLATFORMS": "cpu"})
  assert result.returncode == 0, result.stderr[-3000:]
  assert "no library" in result.stdout
  from biofm_jax.export import load_exported
  # 1e-5, the export's promise elsewhere: this process compiles with the suite's XLA flags (fast
  # compile, 8 host devices) and the clean one with none, which may sum float32 in another
  # order (seen: 1.3e-6 on logits near 1 after the binary preset's LP-FT).
  np.testing.assert_allclose(np.load(tmp_path / "logits.npy"), load_exported(export)({"ehr": first}), atol=1e-5)


def _held_out_batch(export, meds_root, labels) -> dict:
  """A tokenised batch of records, made with the export's own vocabulary and window rule."""
  from biofm_jax.modalities.ehr.data import EHRVocab, TokenizeEHR
  from biofm_jax.modalities.ehr.meds import MEDSDataset
  info = json.loads((export / "export.json").read_text())
  tokenize = TokenizeEHR(EHRVocab.load(export / "artifacts" / "ehr_vocab.json"), info["data"]["ehr"]["max_len"],
                         info["data"]["ehr"]["window"])
  source = MEDSDataset(meds_root).source("held_out")
  examples = [tokenize.map(source[i]) for i in range(8)]
  return {name: np.stack([e[name] for e in examples]) for name in info["inputs"]["ehr"]}
