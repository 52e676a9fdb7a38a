"""A synthetic multimodal cohort: one latent state per subject shapes every modality.

This module owns `write_synthetic_multimodal`, which writes under `out_dir`:

  ehr/              a MEDS dataset (synthetic.py's writer; int64 subject_id; splits in
                    metadata/subject_splits.parquet)
  imaging/          manifest.csv (subject_id, path, split, modality, lesion, lesion_size,
                    lesion_intensity) and images/<subject_id>.npy (synthetic_imaging.py)
  omics.h5ad        one expression profile per subject, like bulk RNA: obs_names and obs
                    `subject_id` are the ids, obs `split`, obs `cell_type` (the subtype)
  tabular/data.parquet  radiomics-like features (synthetic_tabular.py) with `subject_id`,
                    `split` and the label `malignant` (= the planted lesion)
  latents.csv       the planted truth: subject_id, split, risk, subtype, female, lesion,
                    program, outcome, aggressive and has_<modality> (0/1) for every subject
  cohort.json       the arguments, to refuse reusing a cohort written with others

A subject's id is an int in MEDS and its decimal string elsewhere; its split (80/10/10
train/tuning/held_out over all subjects) is the same in every modality.

The latent state: risk r ~ N(0, 1), a subtype s in {0, 1, 2, 3}, sex (52% female), a
lesion drawn with probability sigmoid(1.5 r), and a tumour expression program t ~ N(0, 1)
that only the expression profile shows. `aggressive` (a lesion whose program is on: lesion
and t > 0) is a label that needs two modalities together: the image tells the lesion, the
expression profile the program. How each modality shows the latent state:

* EHR: r drives the cardiometabolic conditions, labs, visits and death as in synthetic.py;
  s decides which of asthma, mood, musculoskeletal or GERD the subject has (those four
  follow s instead of r here); sex is the GENDER code. `outcome` (heart failure or death)
  comes from this timeline.
* imaging: the body's soft-tissue density rises 30 HU per unit of r; the lesion is
  planted when present; s sets the organs' contrast (bit 0: hypo- or hyperdense) and the
  body's habitus (bit 1: elongated along H or along W); female bodies are 10% smaller.
  Organ contrast and body aspect survive the crops, flips and intensity jitter of MAE
  training; the density shift is absolute, so intensity jitter blurs it (the lesion
  still tells r).
* omics: s is the profile's dominant cell type (its marker genes); r scales a program of
  genes up and down (log fold 0.5 r), t another program of as many genes (log fold 0.5 t);
  sex genes (Y-linked ones in males, an XIST-like one in females); sequenced deeper than a
  single cell.
* tabular: the feature factors are f_size = 0.9 r + noise and (f_intensity,
  f_heterogeneity) = a corner of the square per s + noise; `malignant` is the lesion; a
  `sex` column (F/M).

Each modality is missing for a share of the subjects (`missing`, exact counts, chosen
independently of the latent); every subject keeps at least one. Deterministic given the
arguments, and a subject's data do not depend on which modalities the others have. The
whole cohort is written to a hidden sibling and renamed into place (atomic_directory);
calling again on a finished cohort only checks cohort.json and returns its paths.

CLI:
  python -m biofm_jax.modalities.synthetic_cohort --out /tmp/cohort \
      --num_subjects 400 --seed 0 [--spatial_dims 2 --image_size 32 --num_genes 300 \
      --missing ehr=0.1,imaging=0.3,omics=0.4,tabular=0.2]
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import pathlib
from typing import Any, Mapping, NamedTuple, Sequence

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import scipy.sparse as sp

from biofm_jax.data.sources.atomic import atomic_directory
from biofm_jax.data.sources.splits import STANDARD_SPLITS
from biofm_jax.modalities.ehr import synthetic as synthetic
from biofm_jax.modalities.ehr.synthetic_catalogue import CONDITION_INDEX, CONDITIONS
from biofm_jax.modalities.imaging import synthetic as synthetic_imaging
from biofm_jax.modalities.omics import synthetic as synthetic_omics
from biofm_jax.modalities.tabular import table_files
from biofm_jax.modalities.tabular import synthetic as synthetic_tabular

MODALITIES = ("ehr", "imaging", "omics", "tabular")
DEFAULT_MISSING = {"ehr": 0.1, "imaging": 0.3, "omics": 0.4, "tabular": 0.2}
LATENTS_FILENAME = "latents.csv"
SYNTHETIC_DIRNAME = "synthetic_multimodal"  # under a run's artifacts
COHORT_FILENAME = "cohort.json"
OMICS_FILENAME = "omics.h5ad"
NUM_SUBTYPES = 4
_VERSION = 2  # bump when the same arguments would give a different cohort (2: the tumour program)

# EHR: the condition each subtype carries, and logit shifts that make these four follow
# the subtype (near-certain for its own condition, rare otherwise) instead of the risk.
SUBTYPE_CONDITIONS = ("asthma", "mood", "musculoskeletal", "gerd")
_OWN_CONDITION_LOGIT, _OTHER_CONDITION_LOGIT = 5.0, -3.0
_MAX_EVENTS = 400  # rows per timeline at most, as synthetic.py's default
# Imaging: HU per unit of risk and around it; organ contrast and body radii by subtype bit.
_TISSUE_HU, _TISSUE_HU_PER_RISK, _TISSUE_HU_SD = 40.0, 30.0, 6.0
_ORGAN_CONTRASTS = ((-100.0,), (110.0,))  # bit 0 of the subtype: hypo- or hyperdense organs
_BODY_RADII = ((0.82, 0.62), (0.62, 0.82))  # bit 1: (H, W) radii, elongated along H or W
_FEMALE_BODY_SCALE = 0.9
_LESION_LOGIT_PER_RISK = 1.5
# Omics: the risk program's genes (half up, half down with risk) and sequencing depth; the
# tumour program has as many genes and the same fold per unit.
_PROGRAM_GENES, _PROGRAM_LOG_FOLD, _BULK_DEPTH = 40, 0.5, 10.0
_SEX_GENES, _SEX_LOG_FOLD = 4, np.log(30.0)  # the first is XIST-like, the others Y-linked
# Tabular: factor loadings of the latent and the noise around them.
_SIZE_PER_RISK, _SUBTYPE_CORNER, _FACTOR_NOISE = 0.9, 1.0, 0.45


class _Latents(NamedTuple):
  """The planted truth of every subject, in subject order (ids ascending)."""
  subject_ids: np.ndarray  # int64 [N]
  splits: np.ndarray  # object [N] of split names
  risk: np.ndarray  # float [N]
  subtype: np.ndarray  # int [N]
  female: np.ndarray  # bool [N]
  lesion: np.ndarray  # bool [N]
  program: np.ndarray  # float [N]: the tumour expression program
  has: np.ndarray  # bool [N, len(MODALITIES)]

  @property
  def aggressive(self) -> np.ndarray:
    """bool [N]: a lesion whose tumour program is on (image and expression together)."""
    return self.lesion & (self.program > 0)


# ---------------------------------------------------------------- the latent state
def _missing_fractions(missing: Mapping[str, float] | None) -> dict[str, float]:
  fractions = dict(DEFAULT_MISSING)
  for name, value in (missing or {}).items():
    if name not in MODALITIES or not 0.0 <= float(value) < 1.0:
      raise ValueError(f"write_synthetic_multimodal: missing[{name!r}] = {value!r}; expected "
                       f"modalities among {list(MODALITIES)} with fractions in [0, 1)")
    fractions[name] = float(value)
  return fractions


def _presence(num_subjects: int, fractions: dict[str, float],
              rng: np.random.Generator) -> np.ndarray:
  """bool [N, modality]: exactly round(fraction * N) subjects lack each modality, and
  every subject keeps at least one."""
  has = np.ones((num_subjects, len(MODALITIES)), bool)
  for j, name in enumerate(MODALITIES):
    has[rng.permutation(num_subjects)[:round(fractions[name] * num_subjects)], j] = False
  # A subject left with nothing swaps a modality with a subject that has several, so
  # every modality keeps its exact count.
  for i in np.flatnonzero(~has.any(axis=1)):
    for j in rng.permutation(len(MODALITIES)):
      donors = np.flatnonzero(has[:, j] & (has.sum(axis=1) > 1))
      if len(donors):
        has[i, j], has[donors[rng.integers(len(donors))], j] = True, False
        break
    else:  # nobody has two modalities (tiny cohorts): give it one, counts shift by one
      has[i, rng.integers(len(MODALITIES))] = True
  return has


def _draw_latents(num_subjects: int, seed: int, fractions: dict[str, float]) -> _Latents:
  rng = np.random.default_rng([seed, 0])
  subject_ids = np.sort(rng.choice(np.arange(10_000, 10_000 + 20 * num_subjects),
                                   num_subjects, replace=False)).astype(np.int64)
  splits = synthetic.split_names(num_subjects, rng)
  risk = rng.standard_normal(num_subjects)
  subtype = rng.integers(0, NUM_SUBTYPES, num_subjects)
  female = rng.random(num_subjects) < 0.52
  lesion = rng.random(num_subjects) < 1.0 / (1.0 + np.exp(-_LESION_LOGIT_PER_RISK * risk))
  # Drawn last, so the latent of a subject does not depend on `missing`.
  has = _presence(num_subjects, fractions, rng)
  # A stream of its own, so the latents above are those of cohorts written before it.
  program = np.random.default_rng([seed, 5]).standard_normal(num_subjects)
  return _Latents(subject_ids, splits, risk, subtype, female, lesion, program, has)


# ---------------------------------------------------------------- one modality each
def _condition_shift(risk: float, subtype: int) -> np.ndarray:
  """Logit shifts that let the subtype, not the risk, decide the four subtype conditions."""
  shift = np.zeros(len(CONDITIONS))
  for k, name in enumerate(SUBTYPE_CONDITIONS):
    c = CONDITION_INDEX[name]
    shift[c] = (-CONDITIONS[c].risk_slope * risk
                + (_OWN_CONDITION_LOGIT if k == subtype else _OTHER_CONDITION_LOGIT))
  return shift


def _write_ehr(root: pathlib.Path, latents: _Latents, seed: int) -> np.ndarray:
  """Writes the MEDS dataset of the subjects with EHR; returns every subject's outcome."""
  subjects = []
  for i, (risk, subtype) in enumerate(zip(latents.risk.tolist(), latents.subtype.tolist())):
    # Every subject, not only those with EHR: `outcome` is planted truth for everyone.
    subjects.append(synthetic._simulate_subject(
        np.random.default_rng([seed, 1, i]), _MAX_EVENTS, risk=risk,
        female=bool(latents.female[i]), condition_shift=_condition_shift(risk, subtype)))
  keep = np.flatnonzero(latents.has[:, MODALITIES.index("ehr")])
  ids, kept = latents.subject_ids[keep], [subjects[i] for i in keep]
  synthetic._write_data(root, ids, kept, latents.splits[keep], num_shards=2, nested=False)
  synthetic._write_metadata(root, ids, kept, latents.splits[keep], seed)
  return np.array([s.outcome for s in subjects], bool)


def _write_imaging(root: pathlib.Path, latents: _Latents, seed: int, spatial_dims: int,
                   image_size: int) -> None:
  (root / "images").mkdir(parents=True)
  rows = []
  for i in np.flatnonzero(latents.has[:, MODALITIES.index("imaging")]):
    rng = np.random.default_rng([seed, 2, i])
    subtype = int(latents.subtype[i])
    # The depth radius (3D) is free; H and W carry bit 1 of the subtype.
    radii = np.concatenate([rng.uniform(0.6, 0.85, spatial_dims - 2),
                            np.array(_BODY_RADII[subtype >> 1]) + rng.uniform(-0.02, 0.02, 2)])
    radii *= _FEMALE_BODY_SCALE if latents.female[i] else 1.0
    tissue = _TISSUE_HU + _TISSUE_HU_PER_RISK * latents.risk[i] + rng.normal(0.0, _TISSUE_HU_SD)
    image, size, contrast = synthetic_imaging._simulate_image(
        rng, spatial_dims, image_size, bool(latents.lesion[i]), soft_tissue=float(tissue),
        body_radii=radii, organ_contrasts=_ORGAN_CONTRASTS[subtype & 1])
    subject_id = str(latents.subject_ids[i])
    relative = f"images/{subject_id}.npy"
    synthetic_imaging._write_image(root / relative, image, "npy")
    rows.append((subject_id, relative, latents.splits[i], "CT", int(latents.lesion[i]),
                 f"{size:.3f}", f"{contrast:.1f}"))
  with open(root / "manifest.csv", "w", newline="") as f:
    writer = csv.writer(f)
    writer.writerow(synthetic_imaging.MANIFEST_COLUMNS)
    writer.writerows(rows)


def _log_effects(num_genes: int, latents: _Latents, rng: np.random.Generator) -> np.ndarray:
  """float [N, genes] log effects: deeper sequencing, genes that follow the risk and the
  tumour program, and sex genes (off, as Y-linked genes in females, or far up)."""
  genes = rng.permutation(num_genes)
  program, sex = genes[:_PROGRAM_GENES], genes[_PROGRAM_GENES:_PROGRAM_GENES + _SEX_GENES]
  tumour = genes[_PROGRAM_GENES + _SEX_GENES:2 * _PROGRAM_GENES + _SEX_GENES]
  direction = np.where(np.arange(len(program)) % 2 == 0, 1.0, -1.0)
  effects = np.full((len(latents.risk), num_genes), np.log(_BULK_DEPTH))
  effects[:, program] += _PROGRAM_LOG_FOLD * latents.risk[:, None] * direction[None, :]
  effects[:, tumour] += _PROGRAM_LOG_FOLD * latents.program[:, None] * direction[None, :]
  female = latents.female[:, None]
  effects[:, sex[:1]] += np.where(female, _SEX_LOG_FOLD, -_SEX_LOG_FOLD)
  effects[:, sex[1:]] += np.where(female, -4 * _SEX_LOG_FOLD, _SEX_LOG_FOLD)
  return effects


def _write_omics(path: pathlib.Path, latents: _Latents, seed: int, num_genes: int) -> None:
  import anndata  # heavy; only writing a synthetic .h5ad needs it

  n = len(latents.risk)
  rng = np.random.default_rng([seed, 3])
  log_effects = _log_effects(num_genes, latents, rng)
  counts, _ = synthetic_omics.synthetic_counts(
      n, num_genes, NUM_SUBTYPES, int(rng.integers(2**31)), cell_types=latents.subtype,
      log_effects=log_effects)  # for every subject, so nobody's profile depends on `missing`
  keep = np.flatnonzero(latents.has[:, MODALITIES.index("omics")])
  ids = [str(i) for i in latents.subject_ids[keep]]
  # `cell_type` names the subtype so the omics config's default probe label finds it.
  obs = pd.DataFrame({
      "subject_id": ids,
      "split": pd.Categorical(latents.splits[keep], categories=list(STANDARD_SPLITS)),
      "cell_type": pd.Categorical.from_codes(
          latents.subtype[keep], categories=[f"type_{k}" for k in range(NUM_SUBTYPES)]),
  }, index=pd.Index(ids))
  var = pd.DataFrame(index=[f"GENE{j + 1:04d}" for j in range(num_genes)])
  anndata.AnnData(X=sp.csr_matrix(counts[keep]), obs=obs, var=var).write_h5ad(path)


def _write_tabular(root: pathlib.Path, latents: _Latents, seed: int) -> None:
  n = len(latents.risk)
  rng = np.random.default_rng([seed, 4])
  corners = np.array([[(-1) ** (k & 1), (-1) ** (k >> 1)] for k in range(NUM_SUBTYPES)])
  factors = np.column_stack([_SIZE_PER_RISK * latents.risk,
                             _SUBTYPE_CORNER * corners[latents.subtype]])
  factors = factors + _FACTOR_NOISE * rng.standard_normal((n, 3))
  table = synthetic_tabular.synthetic_table(n, int(rng.integers(2**31)),
                                            malignant=latents.lesion, factors=factors)
  keep = np.flatnonzero(latents.has[:, MODALITIES.index("tabular")])
  table = table.take(pa.array(keep))
  ids = [str(i) for i in latents.subject_ids[keep]]
  for name, values in ((synthetic_tabular.ID_COLUMN, ids), ("split", latents.splits[keep])):
    table = table.set_column(table.schema.get_field_index(name), name,
                             pa.array(list(values), pa.string()))
  sex = pa.array(np.where(latents.female[keep], "F", "M").tolist(), pa.string())
  table = table.add_column(table.schema.get_field_index(synthetic_tabular.LABEL_COLUMN) + 1,
                           "sex", sex)
  root.mkdir(parents=True)
  table = table_files.declare_label_columns(table, [synthetic_tabular.LABEL_COLUMN])
  pq.write_table(table, root / synthetic_tabular.DATA_FILENAME)


def _write_latents(path: pathlib.Path, latents: _Latents, outcome: np.ndarray) -> None:
  with open(path, "w", newline="") as f:
    writer = csv.writer(f)
    writer.writerow(["subject_id", "split", "risk", "subtype", "female", "lesion", "program", "outcome",
                     "aggressive", *(f"has_{name}" for name in MODALITIES)])
    aggressive = latents.aggressive
    for i, subject_id in enumerate(latents.subject_ids):
      writer.writerow([int(subject_id), latents.splits[i], f"{latents.risk[i]:.6f}",
                       int(latents.subtype[i]), int(latents.female[i]), int(latents.lesion[i]),
                       f"{latents.program[i]:.6f}", int(outcome[i]), int(aggressive[i]),
                       *latents.has[i].astype(int).tolist()])


# ---------------------------------------------------------------- the cohort
def cohort_paths(out_dir: str | os.PathLike) -> dict[str, pathlib.Path]:
  """Modality -> the path its reader (and data module's `path`) takes."""
  out = pathlib.Path(out_dir)
  return {"ehr": out / "ehr", "imaging": out / "imaging", "omics": out / OMICS_FILENAME,
          "tabular": out / "tabular"}


def _check_existing(out: pathlib.Path, arguments: dict) -> None:
  with open(out / COHORT_FILENAME) as f:
    found = json.load(f)
  if found != arguments:
    found, wanted = (json.dumps(a, sort_keys=True) for a in (found, arguments))
    raise ValueError(f"{out}: holds a synthetic cohort written with {found}, not {wanted}; "
                     "choose a new path or matching arguments")


def write_synthetic_multimodal(out_dir: str | os.PathLike, *, num_subjects: int = 400,
                               seed: int = 0, spatial_dims: int = 2, image_size: int = 32,
                               num_genes: int = 300, missing: Mapping[str, float] | None = None,
                               ) -> dict[str, pathlib.Path]:
  """Writes the cohort to `out_dir` (absent or empty) once; returns `cohort_paths(out_dir)`.

  The planted truth is `out_dir`/latents.csv. A finished cohort with the same arguments is
  returned as it is (nothing rewritten); one with other arguments is an error.
  """
  fractions = _missing_fractions(missing)
  if num_subjects < 20 or spatial_dims not in (2, 3) or image_size < 16 or num_genes < 100:
    raise ValueError(f"write_synthetic_multimodal: num_subjects={num_subjects}, spatial_dims="
                     f"{spatial_dims}, image_size={image_size}, num_genes={num_genes}; expected "
                     ">= 20, 2 or 3, >= 16, >= 100")
  arguments = {"version": _VERSION, "num_subjects": int(num_subjects), "seed": int(seed),
               "spatial_dims": int(spatial_dims), "image_size": int(image_size),
               "num_genes": int(num_genes), "missing": fractions}
  out = pathlib.Path(out_dir)
  if (out / COHORT_FILENAME).exists():  # renamed into place whole: if it is there, it is done
    _check_existing(out, arguments)
    return cohort_paths(out)
  if out.exists() and (not out.is_dir() or any(out.iterdir())):
    raise ValueError(f"{out}: exists and is not an empty directory or a synthetic cohort; "
                     "choose a new path")
  latents = _draw_latents(num_subjects, seed, fractions)
  lacking = [name for j, name in enumerate(MODALITIES) if latents.has[:, j].sum() < 10]
  if lacking:
    raise ValueError(f"write_synthetic_multimodal: fewer than 10 subjects have {lacking}; "
                     "lower `missing` or raise num_subjects")
  try:
    with atomic_directory(out) as staging:
      outcome = _write_ehr(staging / "ehr", latents, seed)
      _write_imaging(staging / "imaging", latents, seed, spatial_dims, image_size)
      _write_omics(staging / OMICS_FILENAME, latents, seed, num_genes)
      _write_tabular(staging / "tabular", latents, seed)
      _write_latents(staging / LATENTS_FILENAME, latents, outcome)
      with open(staging / COHORT_FILENAME, "w") as f:
        json.dump(arguments, f, indent=2, sort_keys=True)
  except OSError:
    if not (out / COHORT_FILENAME).exists():
      raise
    _check_existing(out, arguments)  # another process finished the same cohort first
  return cohort_paths(out)


def run_cohort_paths(data_cfg: Any, artifacts_dir: pathlib.Path, modalities: Sequence[str]) -> dict[str, str]:
  """A run's cohort paths for `modalities` (`data/multimodal.py`'s `synthetic_paths`): the
  cohort of `data_cfg.multimodal`'s size and seed, written once under artifacts_dir."""
  missing = [m for m in modalities if m not in MODALITIES]
  if missing:
    raise ValueError(f"data.multimodal.modalities names {missing}, which the synthetic cohort does not have "
                     f"({list(MODALITIES)}); give every listed modality's data.<modality>.path")
  imaging = data_cfg.get("imaging")
  paths = write_synthetic_multimodal(
      artifacts_dir / SYNTHETIC_DIRNAME, num_subjects=int(data_cfg.multimodal.synthetic_subjects),
      seed=int(data_cfg.multimodal.synthetic_seed),
      spatial_dims=int(imaging.spatial_dims) if imaging is not None else 2,
      image_size=max(imaging.image_size) if imaging is not None else 32)
  return {m: str(paths[m]) for m in modalities}


def _parse_missing(text: str) -> dict[str, float]:
  """"ehr=0.1,imaging=0.3" -> {"ehr": 0.1, "imaging": 0.3}."""
  pairs = [item.split("=", 1) for item in text.split(",") if item.strip()]
  if any(len(pair) != 2 for pair in pairs):
    raise argparse.ArgumentTypeError(f"--missing {text!r}: expected modality=fraction,...")
  return {name.strip(): float(value) for name, value in pairs}


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--out", required=True, help="new or empty directory to write")
  parser.add_argument("--num_subjects", type=int, default=400)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--spatial_dims", type=int, choices=(2, 3), default=2)
  parser.add_argument("--image_size", type=int, default=32)
  parser.add_argument("--num_genes", type=int, default=300)
  parser.add_argument("--missing", type=_parse_missing, default=None,
                      help="fractions of subjects lacking a modality, e.g. ehr=0.1,omics=0.4")
  args = parser.parse_args(argv)
  paths = write_synthetic_multimodal(args.out, num_subjects=args.num_subjects, seed=args.seed,
                                     spatial_dims=args.spatial_dims, image_size=args.image_size,
                                     num_genes=args.num_genes, missing=args.missing)
  with open(pathlib.Path(args.out) / LATENTS_FILENAME, newline="") as f:
    rows = list(csv.DictReader(f))
  counts = ", ".join(f"{name} {sum(int(r[f'has_{name}']) for r in rows)}" for name in paths)
  print(f"wrote {args.out}: {len(rows)} subjects; with each modality: {counts}")


if __name__ == "__main__":
  main()
