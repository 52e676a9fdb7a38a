"""The sequence modality's data module: DNA and protein tokenizers, masking, `SequenceData`.

This module owns how one FASTA record (see `fasta.py`) becomes the token-sequence
arrays named in `batch.py` (`batch.token_sequence_spec(max_len, with_values=False, ...)`):

* `SequenceTokenizer`: a fixed vocabulary (nothing is learnt from data), saved as a JSON
  artifact beside the checkpoint so a resumed or downstream run reads the same ids.
  "nucleotide" with k=1 is one token per base; k>1 is non-overlapping k-mers as in the
  Nucleotide Transformer. "amino_acid" is one token per residue.
* `TokenizeSequence`: a Grain `RandomMap` from a record to TOKENS and TOKEN_MASK (CLS
  first, at most `max_len - 1` sequence tokens, padding). Longer sequences are cropped to
  a random window of tokens (training) or to their first tokens (evaluation).
* `MaskTokens`: BERT-style masking with targets, `data/masking.py`'s rule (as EHR's) applied to
  tokens that carry no value bins.
* `SequenceData`: what the pipeline and the training loop use (sources, transforms, spec).
"""
from __future__ import annotations

import dataclasses
import functools
import itertools
import logging
import os
from pathlib import Path
from typing import Any, Mapping

import grain
import numpy as np

from biofm_jax.data import artifacts, batch, object_state
from biofm_jax.data.module import MASKED, DataModuleDefaults, check_targets, KeyByModality
from biofm_jax.data.config_fields import config_field, require
from biofm_jax.data.masking import bert_masking, check_masking_args
from biofm_jax.data.masking import prediction_slots
from biofm_jax.modalities.sequence import fasta as fasta
from biofm_jax.modalities.sequence.synthetic import write_synthetic_fasta

TOKENIZER_FORMAT = "biofm_jax.sequence_tokenizer"
TOKENIZER_FORMAT_VERSION = 1
_TOKENIZER_HEADER = {"format": TOKENIZER_FORMAT, "format_version": TOKENIZER_FORMAT_VERSION,
                     "special_tokens": list(batch.SPECIAL_TOKENS)}
TOKENIZER_FILENAME = "sequence_tokenizer.json"
SYNTHETIC_FILENAME = "synthetic_sequences.fa"
# Tokenizer kind -> the FASTA alphabet it reads.
TOKENIZER_ALPHABETS = {"nucleotide": "dna", "amino_acid": "protein"}
CROPS = ("random", "start")
TARGETS = (MASKED,)  # what its examples can carry for an objective (data/module.py)
MAX_KMER = 8  # 4**8 = 65,536 k-mer tokens; beyond that the embedding table dominates
_BASES = "ACGT"
_SINGLE_BASES = _BASES + "N"
_IUPAC_AMBIGUITY = "RYSWKMBDHV"  # read as N, as the FASTA reader does
# standard, then ambiguous and rare: the letters the FASTA reader accepts for proteins
_AMINO_ACIDS = (fasta.AMINO_ACIDS + fasta.AMBIGUOUS_AMINO_ACIDS + fasta.RARE_AMINO_ACIDS).decode()
_CONFIG_PREFIX = "config.data.sequence"

log = logging.getLogger(__name__)


# ================================================================ tokenizer
@object_state.storable
@dataclasses.dataclass(frozen=True)
class SequenceTokenizer:
  """A deterministic vocabulary: SPECIAL_TOKENS, then the kind's tokens.

  nucleotide, k=1: A C G T N (IUPAC ambiguity codes read as N).
  nucleotide, k>1: the 4**k k-mers of ACGT in lexicographic order, then A C G T N for the
    tail of fewer than k bases at a sequence's end. A k-mer holding anything but ACGT
    (an N) is UNK, so `decode` writes it back as k N's.
  amino_acid: the 20 standard amino acids, then X B Z U O.
  Other characters are UNK.
  """
  kind: str
  k: int = 1

  def __post_init__(self):
    if self.kind not in TOKENIZER_ALPHABETS:
      raise ValueError(f"SequenceTokenizer: kind {self.kind!r}, expected one of "
                       f"{tuple(TOKENIZER_ALPHABETS)}")
    limit = MAX_KMER if self.kind == "nucleotide" else 1
    if not (isinstance(self.k, int) and 1 <= self.k <= limit):
      raise ValueError(f"SequenceTokenizer: k {self.k!r} for {self.kind}, expected an "
                       f"integer in [1, {limit}]")

  @functools.cached_property
  def tokens(self) -> tuple[str, ...]:
    if self.kind == "amino_acid":
      return batch.SPECIAL_TOKENS + tuple(_AMINO_ACIDS)
    if self.k == 1:
      return batch.SPECIAL_TOKENS + tuple(_SINGLE_BASES)
    kmers = ("".join(p) for p in itertools.product(_BASES, repeat=self.k))
    return batch.SPECIAL_TOKENS + tuple(kmers) + tuple(_SINGLE_BASES)

  @property
  def vocab_size(self) -> int:
    return len(self.tokens)

  @property
  def alphabet(self) -> str:
    return TOKENIZER_ALPHABETS[self.kind]

  @functools.cached_property
  def _residue_ids(self) -> np.ndarray:
    """int32 [256]: the id of one residue byte (either case) as a single-residue token."""
    table = np.full(256, batch.UNK_ID, np.int32)
    first = self.vocab_size - len(_SINGLE_BASES if self.kind == "nucleotide" else _AMINO_ACIDS)
    letters = _SINGLE_BASES if self.kind == "nucleotide" else _AMINO_ACIDS
    for offset, letter in enumerate(letters):
      table[[ord(letter), ord(letter.lower())]] = first + offset
    if self.kind == "nucleotide":
      n_id = table[ord("N")]
      for letter in _IUPAC_AMBIGUITY:
        table[[ord(letter), ord(letter.lower())]] = n_id
    return table

  @functools.cached_property
  def _base_codes(self) -> np.ndarray:
    """int64 [256]: A C G T -> 0..3 (either case), anything else 4 (not in any k-mer)."""
    table = np.full(256, 4, np.int64)
    for code, letter in enumerate(_BASES):
      table[[ord(letter), ord(letter.lower())]] = code
    return table

  @functools.cached_property
  def _decoded(self) -> np.ndarray:
    """object [vocab_size]: the text of each id; structure tokens (PAD, CLS) read as ""."""
    text = list(self.tokens)
    text[batch.PAD_ID] = text[batch.CLS_ID] = ""
    if self.kind == "nucleotide":
      text[batch.UNK_ID] = "N" * self.k  # UNK only ever stands for a k-mer holding an N
    return np.array(text, dtype=object)

  def num_tokens(self, length):
    """Tokens `encode` gives for `length` residues (an int or an int array)."""
    return length if self.k == 1 else length // self.k + length % self.k

  def residue_span(self, first_token: int, num_tokens: int, length: int) -> tuple[int, int]:
    """The residues [start, end) of tokens [first_token, first_token + num_tokens) of a
    sequence of `length`: encoding just them gives those tokens."""
    full = length // self.k  # tokens 0..full-1 are k-mers, the rest single-base tails
    position = lambda t: self.k * t if t <= full else self.k * full + (t - full)  # noqa: E731
    return position(first_token), position(first_token + num_tokens)

  def encode(self, sequence: str) -> np.ndarray:
    """int32 token ids of `sequence` (any case), no special tokens."""
    raw = np.frombuffer(sequence.encode("ascii", errors="replace"), np.uint8)
    if self.k == 1:
      return self._residue_ids[raw]
    full = len(raw) // self.k
    codes = self._base_codes[raw[: full * self.k]].reshape(full, self.k)
    powers = 4 ** np.arange(self.k - 1, -1, -1, dtype=np.int64)
    kmer_ids = (batch.NUM_SPECIAL + codes @ powers).astype(np.int32)
    kmer_ids[(codes == 4).any(axis=1)] = batch.UNK_ID
    return np.concatenate([kmer_ids, self._residue_ids[raw[full * self.k:]]])

  def decode(self, ids: np.ndarray) -> str:
    """The text of `ids`; round-trips `encode` for sequences without N or ambiguity codes.
    PAD and CLS are dropped, MASK reads "[MASK]"."""
    ids = np.asarray(ids, dtype=np.int64).reshape(-1)
    if ids.size and (ids.min() < 0 or ids.max() >= self.vocab_size):
      raise ValueError(f"SequenceTokenizer.decode: ids must be in [0, {self.vocab_size}), "
                       f"got [{ids.min()}, {ids.max()}]")
    return "".join(self._decoded[ids].tolist())

  # -------------------------------------------------------------- artifact
  def _fields(self) -> dict:
    return {"kind": self.kind, "k": self.k, "vocab_size": self.vocab_size, "tokens": list(self.tokens)}

  def to_json(self) -> str:
    return artifacts.to_json(_TOKENIZER_HEADER, self._fields())

  @classmethod
  def from_json(cls, text: str, where: str = "sequence tokenizer JSON") -> SequenceTokenizer:
    """Rebuilds the tokenizer and checks that its token list is the one saved."""
    payload = artifacts.parse_json(text, _TOKENIZER_HEADER, where)
    try:
      tokenizer = cls(kind=payload["kind"], k=payload["k"])
    except KeyError as e:
      raise ValueError(f"{where}: missing field {e}") from None
    if payload.get("tokens") != list(tokenizer.tokens):
      raise ValueError(f"{where}: its token list differs from the {tokenizer.kind} k="
                       f"{tokenizer.k} vocabulary of this version of biofm_jax")
    return tokenizer

  def save(self, path: str | os.PathLike) -> None:
    """Writes the JSON atomically (`data/artifacts.py`)."""
    artifacts.write_json(path, _TOKENIZER_HEADER, self._fields())

  @classmethod
  def load(cls, path: str | os.PathLike) -> SequenceTokenizer:
    path = Path(path)
    try:
      text = path.read_text()
    except OSError as e:
      raise ValueError(f"sequence tokenizer {path}: cannot read ({e})") from None
    return cls.from_json(text, where=f"sequence tokenizer {path}")


# ================================================================ tokenisation
def crop_stats(token_counts: np.ndarray, max_len: int) -> dict[str, int]:
  """What cropping to `max_len - 1` tokens (CLS takes one slot) leaves out, as counts."""
  counts = np.asarray(token_counts, dtype=np.int64)
  dropped = np.maximum(counts - (max_len - 1), 0)
  return {"records": int(len(counts)), "tokens": int(counts.sum()),
          "records_cropped": int((dropped > 0).sum()), "tokens_cropped": int(dropped.sum())}


def _sequence_of(record: Mapping[str, Any]) -> str:
  sequence = record.get("sequence")
  if not isinstance(sequence, str):
    raise ValueError(f"sequence record (id {record.get('id', '?')!r}): field 'sequence' is "
                     f"{type(sequence).__name__}, expected str")
  return sequence


class TokenizeSequence(grain.transforms.RandomMap):
  """Record -> TOKENS and TOKEN_MASK of shape (max_len,).

  crop="random" takes a uniformly drawn window of `max_len - 1` tokens from a longer
  sequence (one draw per record, whatever its length); crop="start" takes the first ones
  and draws nothing, so it gives the same example under any seed (use `map` directly, or
  let the pipeline seed it). Cropping happens in token space but only the window's
  residues are encoded, so long records cost no more than short ones.
  """

  def __init__(self, tokenizer: SequenceTokenizer, max_len: int, crop: str = "random"):
    if max_len < 2:
      raise ValueError(f"TokenizeSequence: max_len {max_len} must be >= 2 (CLS plus one token)")
    if crop not in CROPS:
      raise ValueError(f"TokenizeSequence: crop {crop!r}, expected one of {CROPS}")
    self.tokenizer, self.max_len, self.crop = tokenizer, max_len, crop

  def random_map(self, record: Mapping[str, Any], rng: np.random.Generator) -> dict:
    return self._example(record, rng)

  def map(self, record: Mapping[str, Any]) -> dict:
    if self.crop == "random":
      raise ValueError("TokenizeSequence.map: crop='random' needs an rng; call random_map")
    return self._example(record, None)

  def _example(self, record: Mapping[str, Any], rng: np.random.Generator | None) -> dict:
    sequence = _sequence_of(record)
    total = int(self.tokenizer.num_tokens(len(sequence)))
    keep = min(total, self.max_len - 1)
    first = int(rng.integers(0, total - keep + 1)) if self.crop == "random" else 0
    start, end = self.tokenizer.residue_span(first, keep, len(sequence))
    ids = self.tokenizer.encode(sequence[start:end])
    spec = batch.token_sequence_spec(self.max_len, with_values=False, with_targets=False)
    out = {name: np.zeros(shape, dtype) for name, (shape, dtype) in spec.items()}
    out[batch.TOKENS][0] = batch.CLS_ID  # the rest stays PAD_ID (0)
    out[batch.TOKENS][1:1 + keep] = ids
    out[batch.TOKEN_MASK][:1 + keep] = True
    return out


# ================================================================ masking
class MaskTokens(grain.transforms.RandomMap):
  """BERT-style masking (80% MASK, 10% random token, 10% kept) of sequence tokens.

  Adds TARGET_TOKENS and TARGET_MASK. The rule and its random draws are `data/masking.py`'s
  `bert_masking`, as the EHR's masking uses it: never CLS, PAD or UNK, at least one target
  per example, a fixed number of draws.
  """

  def __init__(self, vocab_size: int, mask_rate: float = 0.15):
    check_masking_args("MaskTokens", vocab_size, mask_rate)
    self.vocab_size, self.mask_rate = vocab_size, mask_rate

  def random_map(self, example: Mapping[str, np.ndarray], rng: np.random.Generator) -> dict:
    tokens = example[batch.TOKENS]
    candidates = example[batch.TOKEN_MASK] & (tokens != batch.CLS_ID) & (tokens != batch.UNK_ID)
    selected, masked = bert_masking(tokens, candidates, rng, mask_rate=self.mask_rate, vocab_size=self.vocab_size)
    out = dict(example)
    out[batch.TOKENS], out[batch.TARGET_TOKENS], out[batch.TARGET_MASK] = masked, tokens.copy(), selected
    return out


# ================================================================ data module
_field = functools.partial(config_field, prefix=_CONFIG_PREFIX)

_require = functools.partial(require, prefix=_CONFIG_PREFIX)


def tokenizer_from_config(cfg: Any) -> SequenceTokenizer:
  """The tokenizer `cfg` (= config.data.sequence) asks for; errors name the config field."""
  alphabet, kind, k = _field(cfg, "alphabet"), _field(cfg, "tokenizer"), _field(cfg, "kmer")
  _require(alphabet in fasta.ALPHABETS, "alphabet", alphabet, f"one of {fasta.ALPHABETS}")
  _require(kind in TOKENIZER_ALPHABETS, "tokenizer", kind, f"one of {tuple(TOKENIZER_ALPHABETS)}")
  _require(TOKENIZER_ALPHABETS[kind] == alphabet, "tokenizer", kind,
           f"the tokenizer of alphabet {alphabet!r}: "
           f"{[t for t, a in TOKENIZER_ALPHABETS.items() if a == alphabet][0]!r}")
  limit = MAX_KMER if kind == "nucleotide" else 1
  _require(isinstance(k, int) and 1 <= k <= limit, "kmer", k,
           f"an integer in [1, {limit}] for the {kind} tokenizer")
  return SequenceTokenizer(kind, k)


@object_state.storable
class SequenceData(DataModuleDefaults):
  """DNA or protein sequences from FASTA as the pipeline and training loop see them."""
  name = "sequence"

  def __init__(self, dataset: fasta.FastaDataset, tokenizer: SequenceTokenizer, *,
               max_len: int, mask_rate: float, targets: str):
    check_targets("SequenceData", targets, TARGETS)
    if dataset.alphabet != tokenizer.alphabet:
      raise ValueError(f"SequenceData: the {tokenizer.kind} tokenizer reads "
                       f"{tokenizer.alphabet!r}, but {dataset.path} was read as "
                       f"{dataset.alphabet!r}")
    self.dataset, self.tokenizer = dataset, tokenizer
    self.max_len, self.mask_rate, self.targets = max_len, mask_rate, targets

  @classmethod
  def from_config(cls, cfg: Any, *, targets: str,
                  artifacts_dir: str | os.PathLike) -> SequenceData:
    """Opens the FASTA named by `cfg` (= config.data.sequence); synthetic when path is ""."""
    check_targets("SequenceData", targets, TARGETS)  # before any data is generated or read
    tokenizer = tokenizer_from_config(cfg)
    max_len, mask_rate = _field(cfg, "max_len"), _field(cfg, "mask_rate")
    _require(isinstance(max_len, int) and max_len >= 2, "max_len", max_len,
             "an integer >= 2 (CLS plus one token)")
    _require(0.0 < mask_rate <= 1.0, "mask_rate", mask_rate, "in (0, 1]")
    artifacts_dir = Path(artifacts_dir)
    artifacts_dir.mkdir(parents=True, exist_ok=True)
    path = Path(cfg.path) if _field(cfg, "path") else _synthetic_fasta(cfg, artifacts_dir)
    dataset = fasta.FastaDataset(path, alphabet=tokenizer.alphabet,
                                 label_pattern=_field(cfg, "label_pattern") or None)
    _load_or_save_tokenizer(tokenizer, artifacts_dir / TOKENIZER_FILENAME)
    return cls(dataset, tokenizer, max_len=max_len, mask_rate=mask_rate, targets=targets)

  def source(self, split: str) -> fasta.FastaSource:
    return self.dataset.source(split)

  def transforms(self, train: bool, mask: bool = True) -> list:
    """Training crops a random window, evaluation the start; eval masking is made
    repeatable by the pipeline's fixed seed. `mask=False` (embeddings, probes) leaves the
    masking out."""
    tokenize = TokenizeSequence(self.tokenizer, self.max_len, "random" if train else "start")
    masking = [MaskTokens(self.tokenizer.vocab_size, self.mask_rate)] if mask else []
    return [tokenize, *masking, KeyByModality(self.name)]

  def example_spec(self) -> dict:
    return {self.name: batch.token_sequence_spec(self.max_len, with_values=False, with_targets=True)}

  def embedding_spec(self) -> dict:
    """The example spec without masking targets (see `transforms(mask=False)`)."""
    return {self.name: batch.token_sequence_spec(self.max_len, with_values=False, with_targets=False)}

  def model_info(self) -> dict[str, dict[str, int]]:
    return {self.name: {"vocab_size": self.tokenizer.vocab_size, "num_value_bins": 0, "max_len": self.max_len,
                        "prediction_slots": prediction_slots(self.max_len, self.mask_rate)}}

  def summary(self) -> dict[str, int]:
    """Counts for the logs, from the FASTA index alone (no sequence is read)."""
    out = {f"records_{split}": int(len(rows)) for split, rows in self.dataset.splits.items()}
    out["vocab_size"] = self.tokenizer.vocab_size
    out["labels"] = len(self.dataset.label_names)
    if "train" in self.dataset.splits:
      lengths = self.dataset.lengths[self.dataset.splits["train"]]
      counts = self.tokenizer.num_tokens(lengths)
      out.update({f"train_{k}": v for k, v in crop_stats(counts, self.max_len).items()})
    out.update({f"fasta_{k}": v for k, v in self.dataset.stats.items()})
    return out

  def labels(self, split: str) -> tuple[np.ndarray, tuple[str, ...]]:
    """float32 [records, len(label_names)] of `split` in source order (NaN = missing),
    and the label names; reads no sequences."""
    return self.source(split).labels.astype(np.float32), tuple(self.dataset.label_names)


def _synthetic_fasta(cfg: Any, artifacts_dir: Path) -> Path:
  """The synthetic FASTA under artifacts_dir, written once (reused on resume)."""
  path = artifacts_dir / SYNTHETIC_FILENAME
  # write_synthetic_fasta renames a finished file into place: if it is there, it is whole.
  if not path.exists():
    records = int(_field(cfg, "synthetic_records"))
    log.info("sequence: writing %d synthetic %s records", records, cfg.alphabet)
    write_synthetic_fasta(path, num_records=records, alphabet=cfg.alphabet,
                          seed=int(_field(cfg, "synthetic_seed")))
  return path


def _load_or_save_tokenizer(tokenizer: SequenceTokenizer, path: Path) -> None:
  """A resumed run must read the ids it was trained with."""
  if not path.exists():
    tokenizer.save(path)
    log.info("sequence: saved a %s tokenizer of %d tokens", tokenizer.kind, tokenizer.vocab_size)
    return
  saved = SequenceTokenizer.load(path)
  if saved != tokenizer:
    raise ValueError(f"sequence tokenizer {path}: saved as {saved.kind} k={saved.k}, but the "
                     f"config asks for tokenizer={tokenizer.kind!r}, kmer={tokenizer.k}; use a "
                     f"new workdir or match the config")
