"""The clinical code catalogue of the synthetic cohort: every code it can emit, and how.

This module owns the visit types and their billing procedures, the conditions (how risk and
age drive them, their diagnoses and medications), the background diagnoses and medications
anyone may get, the labs (reference distributions, shifts while a condition is active), the
lab panels and other procedures, the static codes; the vocabulary `CODES` with its ids
`CODE_ID` and `description`s; and the numpy tables derived from all of it that
synthetic.py samples from. It is data only: no randomness and no I/O.
"""
from __future__ import annotations

from typing import NamedTuple

import meds
import numpy as np

VISITS = ("VISIT//OUTPATIENT", "VISIT//INPATIENT", "VISIT//ED")
OUTPATIENT, INPATIENT, ED = range(3)
# The evaluation-and-management procedure billed for each visit type, in VISITS order.
VISIT_PROCEDURES = ("CPT//99213", "CPT//99223", "CPT//99284")


class _Condition(NamedTuple):
  name: str
  intercept: float
  risk_slope: float  # > 0: the high-risk cluster; < 0: the low-risk cluster
  age_slope: float  # per decade above 50
  after: tuple[tuple[str, float], ...]  # earlier conditions that raise the logit
  diagnoses: tuple[tuple[str, float], ...]  # (code, chance per visit while active)
  medications: tuple[str, ...]


CONDITIONS = (
    _Condition("diabetes", -1.5, 2.2, 0.3, (), (("ICD10CM//E11.9", .75), ("ICD10CM//E11.65", .3)),
               ("RXNORM//6809", "RXNORM//274783", "RXNORM//1545653")),
    _Condition("hypertension", -0.6, 1.8, 0.4, (), (("ICD10CM//I10", .75),),
               ("RXNORM//29046", "RXNORM//17767")),
    _Condition("hyperlipidemia", -0.8, 1.6, 0.3, (), (("ICD10CM//E78.5", .65),),
               ("RXNORM//83367",)),
    _Condition("obesity", -1.2, 1.4, 0.0, (), (("ICD10CM//E66.9", .5),), ()),
    _Condition("ckd", -3.2, 2.0, 0.3, (("diabetes", 1.5), ("hypertension", 0.8)),
               (("ICD10CM//N18.3", .65), ("ICD10CM//N18.4", .12), ("ICD10CM//E11.22", .1)), ()),
    _Condition("cad", -2.8, 1.6, 0.4, (("hyperlipidemia", 1.0),), (("ICD10CM//I25.10", .65),),
               ("RXNORM//1191", "RXNORM//32968")),
    _Condition("heart_failure", -4.6, 2.0, 0.4,
               (("diabetes", 1.0), ("ckd", 1.2), ("hypertension", 0.6), ("cad", 1.0)),
               (("ICD10CM//I50.9", .75), ("ICD10CM//I50.22", .25)),
               ("RXNORM//4603", "RXNORM//6918", "RXNORM//9997")),
    _Condition("afib", -3.6, 1.4, 0.5, (("heart_failure", 1.5),), (("ICD10CM//I48.91", .6),),
               ("RXNORM//1364430",)),
    _Condition("asthma", -1.2, -2.0, -0.2, (),
               (("ICD10CM//J45.909", .7), ("ICD10CM//J30.9", .35)),
               ("RXNORM//435", "RXNORM//41126", "RXNORM//20610")),
    _Condition("mood", -1.2, -1.6, -0.2, (), (("ICD10CM//F41.1", .6), ("ICD10CM//F32.9", .3)),
               ("RXNORM//36437",)),
    _Condition("musculoskeletal", -0.9, -1.6, -0.3, (),
               (("ICD10CM//M54.50", .55), ("ICD10CM//G43.909", .25), ("ICD10CM//L70.0", .15),
                ("ICD10CM//S93.401A", .1)), ("RXNORM//5640", "RXNORM//37418")),
    _Condition("gerd", -1.5, 0.0, 0.1, (), (("ICD10CM//K21.9", .45),), ("RXNORM//7646",)),
)
CONDITION_INDEX = {c.name: i for i, c in enumerate(CONDITIONS)}
HEART_FAILURE, CKD = CONDITION_INDEX["heart_failure"], CONDITION_INDEX["ckd"]

# Diagnoses and medications anyone may get, most common first (drawn with Zipf weights).
_BACKGROUND_DIAGNOSES = (
    "ICD10CM//Z00.00", "ICD10CM//Z23", "ICD10CM//J06.9", "ICD10CM//R05.9", "ICD10CM//R51.9",
    "ICD10CM//R10.9", "ICD10CM//R53.83", "ICD10CM//N39.0", "ICD10CM//K59.00",
    "ICD10CM//B34.9", "ICD10CM//R42", "ICD10CM//L30.9", "ICD10CM//R07.9", "ICD10CM//M79.1",
    "ICD10CM//H10.9", "ICD10CM//H66.90", "ICD10CM//R73.03", "ICD10CM//W19.XXXA",
    "ICD10CM//T78.40XA", "ICD10CM//A41.9")
_BACKGROUND_MEDICATIONS = ("RXNORM//723", "RXNORM//18631", "RXNORM//8640", "RXNORM//26225")


def _zipf(n: int, exponent: float = 1.4) -> np.ndarray:
  weights = 1.0 / np.arange(1, n + 1) ** exponent
  return weights / weights.sum()


class _Lab(NamedTuple):
  code: str
  name: str
  mean: float  # in log space when log_scale
  sd: float
  log_scale: bool
  decimals: int
  low: float
  high: float
  effects: tuple[tuple[str, float], ...]  # condition -> shift of the mean while active


LABS = (
    _Lab("LOINC//4548-4", "Hemoglobin A1c [%]", 5.4, .35, False, 1, 4., 15.,
         (("diabetes", 2.3), ("obesity", .3))),
    _Lab("LOINC//2345-7", "Glucose [mg/dL]", 95., 12., False, 0, 45., 500., (("diabetes", 70.),)),
    _Lab("LOINC//2160-0", "Creatinine [mg/dL]", np.log(.9), .15, True, 2, .3, 12.,
         (("ckd", .75), ("heart_failure", .15))),
    _Lab("LOINC//33914-3", "eGFR [mL/min/1.73m2]", 95., 12., False, 0, 5., 140., ()),
    _Lab("LOINC//42637-9", "BNP [pg/mL]", np.log(40.), .6, True, 0, 5., 5000.,
         (("heart_failure", 2.5), ("ckd", .4), ("afib", .5))),
    _Lab("LOINC//2823-3", "Potassium [mmol/L]", 4.2, .3, False, 1, 2.8, 6.8, (("ckd", .5),)),
    _Lab("LOINC//2951-2", "Sodium [mmol/L]", 140., 2.3, False, 0, 120., 155.,
         (("heart_failure", -3.),)),
    _Lab("LOINC//718-7", "Hemoglobin [g/dL]", 13.8, 1.2, False, 1, 6., 19., (("ckd", -1.8),)),
    _Lab("LOINC//6690-2", "Leukocytes [10*3/uL]", np.log(7.), .25, True, 1, 1., 40., ()),
    _Lab("LOINC//777-3", "Platelets [10*3/uL]", 250., 50., False, 0, 40., 700., ()),
    _Lab("LOINC//13457-7", "LDL cholesterol [mg/dL]", 105., 25., False, 0, 30., 260.,
         (("hyperlipidemia", 45.),)),
    _Lab("LOINC//2085-9", "HDL cholesterol [mg/dL]", 55., 12., False, 0, 15., 110.,
         (("diabetes", -8.), ("obesity", -6.))),
    _Lab("LOINC//2571-8", "Triglycerides [mg/dL]", np.log(120.), .35, True, 0, 30., 1500.,
         (("diabetes", .35), ("obesity", .25))),
    _Lab("LOINC//1742-6", "ALT [U/L]", np.log(24.), .4, True, 0, 5., 600., (("obesity", .3),)),
    _Lab("LOINC//3016-3", "TSH [mIU/L]", np.log(1.8), .5, True, 2, .05, 40., ()),
)
_LAB_INDEX = {lab.code: i for i, lab in enumerate(LABS)}
EGFR, CREATININE = _LAB_INDEX["LOINC//33914-3"], _LAB_INDEX["LOINC//2160-0"]
LAB_MEANS, LAB_SDS, LAB_LOW, LAB_HIGH = (
    np.array([getattr(lab, field) for lab in LABS]) for field in ("mean", "sd", "low", "high"))
LAB_LOG_SCALE = np.array([lab.log_scale for lab in LABS])


class _Panel(NamedTuple):
  labs: tuple[str, ...]
  chance: tuple[float, float, float]  # per visit, by visit type (outpatient, inpatient, ED)
  boosts: tuple[tuple[str, float], ...]  # condition -> added chance while active


PANELS = (
    _Panel(("LOINC//2345-7", "LOINC//2160-0", "LOINC//33914-3", "LOINC//2823-3",
            "LOINC//2951-2"), (.3, .95, .7), (("ckd", .3), ("diabetes", .15))),
    _Panel(("LOINC//718-7", "LOINC//6690-2", "LOINC//777-3"), (.25, .95, .7), ()),
    _Panel(("LOINC//13457-7", "LOINC//2085-9", "LOINC//2571-8"), (.1, .02, 0.),
           (("hyperlipidemia", .25), ("diabetes", .1))),
    _Panel(("LOINC//4548-4",), (.04, .1, 0.), (("diabetes", .55),)),
    _Panel(("LOINC//42637-9",), (.02, .3, .15), (("heart_failure", .5),)),
    _Panel(("LOINC//1742-6",), (.08, .3, .1), ()),
    _Panel(("LOINC//3016-3",), (.05, .05, 0.), ()),
)

# Other procedures: (code, chance by visit type, condition boosts).
_PROCEDURES = (
    ("CPT//93000", (.06, .5, .4), (("cad", .25), ("afib", .3), ("heart_failure", .2))),
    ("CPT//71046", (.03, .5, .3), (("heart_failure", .2),)),
    ("CPT//93306", (.01, .2, .02), (("heart_failure", .3),)),
    ("CPT//90935", (0., .05, 0.), (("ckd", .05),)),
    ("CPT//90471", (.08, 0., 0.), ()),
)

STATIC_CODES = ("GENDER//F", "GENDER//M")
CODES = tuple(dict.fromkeys(
    STATIC_CODES + (meds.birth_code, meds.death_code) + VISITS + VISIT_PROCEDURES
    + tuple(code for c in CONDITIONS for code, _ in c.diagnoses)
    + tuple(code for c in CONDITIONS for code in c.medications)
    + _BACKGROUND_DIAGNOSES + _BACKGROUND_MEDICATIONS + tuple(lab.code for lab in LABS)
    + tuple(p[0] for p in _PROCEDURES)))
CODE_ID = {code: i for i, code in enumerate(CODES)}


def _ids(codes) -> np.ndarray:
  return np.array([CODE_ID[c] for c in codes], np.int32)


def _effects(rows) -> np.ndarray:
  """[condition, K] matrix from K lists of (condition name, effect while active)."""
  matrix = np.zeros((len(CONDITIONS), len(rows)))
  for k, row in enumerate(rows):
    for name, effect in row:
      matrix[CONDITION_INDEX[name], k] = effect
  return matrix


VISIT_IDS, VISIT_PROCEDURE_IDS = _ids(VISITS), _ids(VISIT_PROCEDURES)
DX_CONDITION, DX_CODE, DX_CHANCE = map(np.array, zip(*[
    (i, CODE_ID[code], chance)
    for i, c in enumerate(CONDITIONS) for code, chance in c.diagnoses]))
MED_CONDITION, MED_CODE = map(np.array, zip(*[
    (i, CODE_ID[code]) for i, c in enumerate(CONDITIONS) for code in c.medications]))
BACKGROUND = [(_ids(catalogue), _zipf(len(catalogue)), rate) for catalogue, rate in
               ((_BACKGROUND_DIAGNOSES, 0.6), (_BACKGROUND_MEDICATIONS, 0.2))]
LAB_IDS, LAB_EFFECTS = _ids(lab.code for lab in LABS), _effects([lab.effects for lab in LABS])
PANEL_LABS = [[_LAB_INDEX[code] for code in p.labs] for p in PANELS]
PANEL_CHANCE, PANEL_BOOSTS = np.array([p.chance for p in PANELS]).T, _effects(
    [p.boosts for p in PANELS])  # [visit type, panel], [condition, panel]
PROCEDURE_IDS = _ids(p[0] for p in _PROCEDURES)
PROCEDURE_CHANCE, PROCEDURE_BOOSTS = np.array([p[1] for p in _PROCEDURES]).T, _effects(
    [p[2] for p in _PROCEDURES])
_DESCRIPTIONS = {lab.code: lab.name for lab in LABS} | {
    meds.birth_code: "Birth", meds.death_code: "Death"}


def description(code: str) -> str:
  return _DESCRIPTIONS.get(code, code.replace("//", " ").replace("_", " ").title())
