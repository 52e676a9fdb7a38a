"""Synthetic DNA and protein FASTA files with a planted motif, for tests, demos and benchmarks.

This module owns `write_synthetic_fasta`, which writes one FASTA file (gzip when the name
ends in .gz) that `fasta.FastaDataset` reads:

  >seq0000 motif=1
  ACGTTGCA... (60 residues a line)

Every record has a random length in [min_length, max_length]. DNA records draw bases
with a per-record GC content between 0.35 and 0.65 (a GC bias that varies, so base
composition alone says nothing about the label) and carry a few N bases. Protein records
draw amino acids with natural background frequencies and carry a few X residues. Exactly
half the records (label `motif=1`) carry 3 to 6 copies of a planted motif (DNA_MOTIF, a
12-mer, or PROTEIN_MOTIF) at random places; the others (`motif=0`) never contain it. A
masked language model can learn the motif, and a linear probe on its embeddings can
find which records carry it. The output is a pure function of the arguments.

CLI:
  python -m biofm_jax.modalities.sequence.synthetic --out /tmp/seqs.fa --alphabet dna
"""
from __future__ import annotations

import argparse
import gzip
import os
import pathlib

import numpy as np

from biofm_jax.modalities.sequence import fasta

DNA_MOTIF = "TATAGCGCATGC"
PROTEIN_MOTIF = "WCHMYWKPCW"
LINE_WIDTH = 60
_DNA_LETTERS = np.array(list("ACGT"))
_AMINO_ACIDS = np.array(list(fasta.AMINO_ACIDS.decode()))
# Approximate amino-acid frequencies in UniProt, in the order of _AMINO_ACIDS.
_AMINO_ACID_FREQUENCIES = np.array([8.3, 1.4, 5.5, 6.8, 3.9, 7.1, 2.3, 5.9, 5.8, 9.7, 2.4,
                                    4.1, 4.7, 3.9, 5.5, 6.6, 5.3, 6.9, 1.1, 2.9])
_MOTIF_COPIES = (3, 6)
_AMBIGUOUS_RESIDUES = (0, 3)  # N (DNA) or X (protein) per record, inclusive


def _background(rng: np.random.Generator, length: int, alphabet: str) -> np.ndarray:
  """One record's residues as an array of one-letter strings."""
  if alphabet == "dna":
    gc = rng.uniform(0.35, 0.65)
    return rng.choice(_DNA_LETTERS, size=length, p=[(1 - gc) / 2, gc / 2, gc / 2, (1 - gc) / 2])
  frequencies = _AMINO_ACID_FREQUENCIES / _AMINO_ACID_FREQUENCIES.sum()
  return rng.choice(_AMINO_ACIDS, size=length, p=frequencies)


def _plant(rng: np.random.Generator, residues: np.ndarray, motif: str) -> None:
  """Writes 3-6 non-overlapping copies of `motif` into `residues` in place, at any offset
  (so k-mer tokenisers see the motif in every reading frame)."""
  width = len(motif)
  copies = int(rng.integers(_MOTIF_COPIES[0], _MOTIF_COPIES[1] + 1))
  # Sorted draws in the room left over, shifted by the copies before: no two overlap.
  room = len(residues) - copies * width
  offsets = np.sort(rng.integers(0, room + 1, size=copies))
  for j, offset in enumerate(offsets.tolist()):
    start = offset + j * width
    residues[start:start + width] = list(motif)


def _remove_motif(rng: np.random.Generator, residues: np.ndarray, motif: str,
                  alphabet_letters: np.ndarray) -> None:
  """Background that spells the motif by chance gets one residue changed: motif=0 means none."""
  while motif in "".join(residues):
    at = "".join(residues).index(motif) + int(rng.integers(0, len(motif)))
    residues[at] = alphabet_letters[(list(alphabet_letters).index(residues[at]) + 1)
                                    % len(alphabet_letters)]


def synthetic_record(rng: np.random.Generator, *, alphabet: str, has_motif: bool,
                     min_length: int, max_length: int) -> str:
  motif, letters, unknown = ((DNA_MOTIF, _DNA_LETTERS, "N") if alphabet == "dna"
                             else (PROTEIN_MOTIF, _AMINO_ACIDS, "X"))
  length = int(rng.integers(min_length, max_length + 1))
  residues = _background(rng, length, alphabet)
  _remove_motif(rng, residues, motif, letters)
  if has_motif:
    _plant(rng, residues, motif)
  # Ambiguous residues away from the motif copies, so every planted copy stays whole.
  unknown_count = int(rng.integers(_AMBIGUOUS_RESIDUES[0], _AMBIGUOUS_RESIDUES[1] + 1))
  text = "".join(residues)
  protected = np.zeros(length, bool)
  for start in [i for i in range(length) if text.startswith(motif, i)]:
    protected[start:start + len(motif)] = True
  free = np.flatnonzero(~protected)
  residues[rng.choice(free, size=min(unknown_count, len(free)), replace=False)] = unknown
  return "".join(residues)


def write_synthetic_fasta(path: str | os.PathLike, *, num_records: int = 400,
                          alphabet: str = "dna", seed: int = 0, min_length: int = 200,
                          max_length: int = 600) -> pathlib.Path:
  """Writes the FASTA file atomically (a temporary file renamed into place); returns the path."""
  if alphabet not in ("dna", "protein"):
    raise ValueError(f"write_synthetic_fasta: alphabet {alphabet!r}, expected 'dna' or 'protein'")
  motif_width = len(DNA_MOTIF if alphabet == "dna" else PROTEIN_MOTIF)
  if num_records < 2 or not motif_width * _MOTIF_COPIES[1] <= min_length <= max_length:
    raise ValueError(f"write_synthetic_fasta: num_records {num_records} must be >= 2 and "
                     f"{motif_width * _MOTIF_COPIES[1]} <= min_length {min_length} <= "
                     f"max_length {max_length}")
  rng = np.random.default_rng(seed)
  carries = np.zeros(num_records, bool)
  carries[rng.permutation(num_records)[: num_records // 2]] = True
  width = max(4, len(str(num_records - 1)))
  lines = []
  for i, has_motif in enumerate(carries.tolist()):
    sequence = synthetic_record(rng, alphabet=alphabet, has_motif=has_motif,
                                min_length=min_length, max_length=max_length)
    lines.append(f">seq{i:0{width}d} motif={int(has_motif)}")
    lines += [sequence[j:j + LINE_WIDTH] for j in range(0, len(sequence), LINE_WIDTH)]
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
  data = ("\n".join(lines) + "\n").encode("ascii")
  try:
    # mtime=0 keeps a .gz byte-identical between runs.
    tmp.write_bytes(gzip.compress(data, mtime=0) if path.name.endswith(".gz") else data)
    os.replace(tmp, path)
  finally:
    tmp.unlink(missing_ok=True)
  return path


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--out", required=True, help="FASTA file to write (.gz to compress)")
  parser.add_argument("--alphabet", default="dna", choices=("dna", "protein"))
  parser.add_argument("--num_records", type=int, default=400)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--min_length", type=int, default=200)
  parser.add_argument("--max_length", type=int, default=600)
  args = parser.parse_args()
  out = write_synthetic_fasta(args.out, num_records=args.num_records, alphabet=args.alphabet,
                              seed=args.seed, min_length=args.min_length,
                              max_length=args.max_length)
  print(f"wrote {args.num_records} {args.alphabet} records to {out}")


if __name__ == "__main__":
  main()
