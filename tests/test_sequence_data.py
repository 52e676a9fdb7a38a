"""Tests of the sequence modality's data side: FASTA reader, tokenizers, masking, SequenceData."""
from __future__ import annotations

import gzip
import pickle

import ml_collections
import numpy as np
import pytest

from biofm_jax.data import batch, pipeline
from biofm_jax.modalities.sequence import data as sequence
from biofm_jax.data.sources import splits
from biofm_jax.modalities.sequence import fasta as fasta
from biofm_jax.modalities.sequence import synthetic as synthetic_sequences

MULTI_LINE = (">r1 first record motif=1\n"
              "ACGTACGTAC\n"
              "gtnnRYacgt\r\n"
              "\n"
              "AC\n"
              ">r2 motif=0 split=tuning\n"
              "TTTT\n"
              ">r3\n"
              "  GGGG  \n"
              "CC\n")


def reference_parse(text: str) -> dict[str, str]:
  """The obvious whole-file parse that the lazy index must agree with."""
  records, current = {}, None
  for line in text.splitlines():
    if line.startswith(">"):
      current = line[1:].split()[0]
      records[current] = ""
    elif line.strip():
      records[current] += line.strip().upper()
  return {k: v.translate(str.maketrans("RYSWKMBDHV", "N" * 10)) for k, v in records.items()}


def all_records(dataset):
  out = {}
  for split in dataset.splits:
    source = dataset.source(split)
    out.update({source[i]["id"]: source[i]["sequence"] for i in range(len(source))})
  return out


@pytest.fixture(scope="module")
def dna_fasta(tmp_path_factory):
  return synthetic_sequences.write_synthetic_fasta(
      tmp_path_factory.mktemp("dna") / "seqs.fa", num_records=120, seed=1)


# ================================================================ FASTA reader
def test_multi_line_records_stats_and_labels(tmp_path):
  path = tmp_path / "x.fa"
  path.write_text(MULTI_LINE)
  dataset = fasta.FastaDataset(path, alphabet="dna", label_pattern=r"motif=(\d+)")
  assert dataset.ids == ["r1", "r2", "r3"]
  assert dataset.lengths.tolist() == [22, 4, 6]
  assert all_records(dataset) == reference_parse(MULTI_LINE)
  assert reference_parse(MULTI_LINE)["r1"] == "ACGTACGTACGTNNNNACGTAC"
  s = dataset.stats
  assert (s["records"], s["residues"], s["min_length"], s["max_length"]) == (3, 32, 4, 22)
  assert (s["ambiguous_residues"], s["iupac_codes_as_n"], s["records_with_ambiguity"]) == (4, 2, 1)
  assert s["lowercase_residues"] == 8 and s["records_without_label"] == 1
  assert dataset.label_names == ("motif",)
  np.testing.assert_array_equal(dataset.labels[:2, 0], [1.0, 0.0])
  assert np.isnan(dataset.labels[2, 0])
  rows = {dataset.ids[i]: split for split, idx in dataset.splits.items() for i in idx}
  buckets = splits.hash_split_buckets(np.array(dataset.ids, dtype=object))
  assert rows == {i: splits.STANDARD_SPLITS[b] for i, b in zip(dataset.ids, buckets)}
  source = dataset.source(rows["r1"])
  record = source[source.ids.index("r1")]
  assert record["id"] == "r1" and record["sequence"] == "ACGTACGTACGTNNNNACGTAC"
  assert record["labels"].dtype == np.float32 and record["labels"].tolist() == [1.0]


def test_split_from_header(tmp_path):
  path = tmp_path / "x.fa"
  path.write_text(MULTI_LINE.replace(">r1 ", ">r1 split=train ").replace(">r3", ">r3 split=extra"))
  dataset = fasta.FastaDataset(path, alphabet="dna", split_from_header=True)
  assert {k: v.tolist() for k, v in dataset.splits.items()} == {
      "train": [0], "tuning": [1], "extra": [2]}
  assert dataset.stats["fallback_split"] == 0 and dataset.labels.shape == (3, 0)
  path.write_text(MULTI_LINE)
  dataset = fasta.FastaDataset(path, alphabet="dna", split_from_header=True)
  assert dataset.stats["records_without_split"] == 2 and list(dataset.splits) == ["tuning"]


def test_gz_directory_and_lazy_reads_equal_a_full_parse(dna_fasta, tmp_path):
  text = dna_fasta.read_text()
  plain = fasta.FastaDataset(dna_fasta, alphabet="dna")
  assert all_records(plain) == reference_parse(text)
  folder = tmp_path / "folder"
  folder.mkdir()
  cut = text.index(">seq0060")
  (folder / "b.fasta").write_text(text[cut:])
  (folder / "a.fa.gz").write_bytes(gzip.compress(text[:cut].encode()))
  (folder / "notes.txt").write_text("not a FASTA file")
  dataset = fasta.FastaDataset(folder, alphabet="dna")
  assert [f.name for f in dataset.files] == ["a.fa.gz", "b.fasta"]
  assert dataset.ids == plain.ids and dataset.stats["residues"] == plain.stats["residues"]
  source = dataset.source("train")
  expected = reference_parse(text)
  order = np.random.default_rng(0).permutation(len(source))  # backward seeks in the .gz too
  assert all(source[i]["sequence"] == expected[source.ids[i]] for i in order.tolist())
  clone = pickle.loads(pickle.dumps(source))  # as Grain's worker processes receive it
  assert clone[-1]["sequence"] == source[-1]["sequence"] and clone[0]["id"] == source[0]["id"]
  with pytest.raises(IndexError):
    source[len(source)]


@pytest.mark.parametrize("text, alphabet, message", [
    (">a\nACGU\n", "dna", r"x.fa, line 2, column 4: character 'U'"),
    (">a\nACGT\n>b\nAC-T\n", "dna", r"x.fa, line 4, column 3: character '-'"),
    (">a\nMKV*\n", "protein", r"x.fa, line 2, column 4: character '\*'"),
    (">a\nACGT\n>b\n\n>c\nAC\n", "dna", r"x.fa, line 3: record 'b' has an empty sequence"),
    (">a\nACGT\n>b\nAC\n>a more\nAC\n", "dna",
     r"x.fa, line 5: duplicate id 'a', first seen at .*x.fa, line 1"),
    ("ACGT\n>a\nACGT\n", "dna", r"x.fa, line 1: sequence before the first header"),
    (">\nACGT\n", "dna", r"x.fa, line 1: header has no id"),
    (">a motif=yes\nACGT\n", "dna", r"x.fa, line 1: label 'yes' of record 'a' is not a number"),
    ("", "dna", r"no FASTA records"),
])
def test_bad_input_names_file_line_and_what_was_expected(tmp_path, text, alphabet, message):
  path = tmp_path / "x.fa"
  path.write_text(text)
  with pytest.raises(ValueError, match=message):
    fasta.FastaDataset(path, alphabet=alphabet, label_pattern=r"motif=(\S+)")


def test_protein_alphabet_and_argument_errors(tmp_path):
  path = tmp_path / "p.faa"
  path.write_text(">p1\nMKVLA\nXBZUOw\n")
  dataset = fasta.FastaDataset(path, alphabet="protein")
  assert all_records(dataset) == {"p1": "MKVLAXBZUOW"}
  s = dataset.stats
  assert (s["ambiguous_residues"], s["rare_residues"], s["lowercase_residues"]) == (3, 2, 1)
  with pytest.raises(ValueError, match="alphabet 'rna'"):
    fasta.FastaDataset(path, alphabet="rna")
  with pytest.raises(ValueError, match="exactly one"):
    fasta.FastaDataset(path, alphabet="protein", label_pattern="motif=1")
  (tmp_path / "empty").mkdir()
  with pytest.raises(ValueError, match="empty: folder holds no FASTA files"):
    fasta.FastaDataset(tmp_path / "empty", alphabet="dna")
  with pytest.raises(ValueError, match="missing.fa: does not exist"):
    fasta.FastaDataset(tmp_path / "missing.fa", alphabet="dna")


def test_synthetic_fasta_is_deterministic_with_planted_motif(dna_fasta, tmp_path):
  again = synthetic_sequences.write_synthetic_fasta(tmp_path / "again.fa", num_records=120, seed=1)
  assert again.read_bytes() == dna_fasta.read_bytes()
  assert list(tmp_path.iterdir()) == [again]  # no temporary file left behind
  dataset = fasta.FastaDataset(dna_fasta, alphabet="dna", label_pattern=r"motif=(\d+)")
  assert dataset.labels.sum() == 60 and dataset.stats["ambiguous_residues"] > 0
  assert 200 <= dataset.stats["min_length"] <= dataset.stats["max_length"] <= 600
  records, labels = all_records(dataset), dict(zip(dataset.ids, dataset.labels[:, 0]))
  assert all((synthetic_sequences.DNA_MOTIF in seq) == bool(labels[i]) for i, seq in records.items())
  protein = synthetic_sequences.write_synthetic_fasta(tmp_path / "p.fa.gz", num_records=20,
                                                      alphabet="protein")
  proteins = fasta.FastaDataset(protein, alphabet="protein", label_pattern=r"motif=(\d+)")
  carriers = [synthetic_sequences.PROTEIN_MOTIF in s for s in all_records(proteins).values()]
  assert sum(carriers) == 10 == proteins.labels.sum()


# ================================================================ tokenizers
def random_bases(rng, length, letters="ACGT"):
  return "".join(rng.choice(list(letters), size=length))


@pytest.mark.parametrize("k, vocab_size", [(1, 4 + 5), (3, 4 + 64 + 5), (6, 4 + 4096 + 5)])
def test_nucleotide_round_trip_and_vocab(k, vocab_size):
  tokenizer = sequence.SequenceTokenizer("nucleotide", k)
  assert tokenizer.vocab_size == vocab_size
  assert tokenizer.tokens[:4] == batch.SPECIAL_TOKENS and tokenizer.tokens[-5:] == tuple("ACGTN")
  rng = np.random.default_rng(k)
  for length in (0, 1, k - 1, k, 5 * k + k - 1, 301):
    seq = random_bases(rng, length)
    ids = tokenizer.encode(seq)
    assert ids.dtype == np.int32 and len(ids) == tokenizer.num_tokens(length)
    assert tokenizer.decode(ids) == seq and np.array_equal(tokenizer.encode(seq.lower()), ids)
  assert tokenizer.decode([batch.CLS_ID, *tokenizer.encode("ACGT"), batch.PAD_ID]) == "ACGT"


def test_kmer_ids_n_and_tails():
  k3 = sequence.SequenceTokenizer("nucleotide", 3)
  assert k3.encode("AAAAACTTTG").tolist() == [4, 4 + 1, 4 + 63, 4 + 64 + 2]  # AAA AAC TTT | G
  ids = k3.encode("ACGANTTTTN")
  assert ids.tolist() == [4 + 6, batch.UNK_ID, 4 + 63, 4 + 64 + 4]  # ACG ANT TTT | N
  assert k3.decode(ids) == "ACGNNNTTTN"  # an UNK k-mer reads as k N's: lengths are kept
  k1 = sequence.SequenceTokenizer("nucleotide", 1)
  assert k1.encode("ACGTNRy*").tolist() == [4, 5, 6, 7, 8, 8, 8, batch.UNK_ID]


def test_amino_acid_tokenizer_and_json(tmp_path):
  tokenizer = sequence.SequenceTokenizer("amino_acid")
  assert tokenizer.vocab_size == 4 + 20 + 5
  letters = "ACDEFGHIKLMNPQRSTVWYXBZUO"
  assert tokenizer.encode(letters).tolist() == list(range(4, 29))
  assert tokenizer.decode(tokenizer.encode(letters)) == letters
  assert tokenizer.encode("M*J").tolist() == [tokenizer.encode("M")[0], 1, 1]
  assert tokenizer.decode([batch.MASK_ID]) == "[MASK]"
  for t in (tokenizer, sequence.SequenceTokenizer("nucleotide", 6)):
    path = tmp_path / f"{t.kind}.json"
    t.save(path)
    assert sequence.SequenceTokenizer.load(path) == t
  text = (tmp_path / "amino_acid.json").read_text().replace('"Y"', '"J"')
  with pytest.raises(ValueError, match="token list differs"):
    sequence.SequenceTokenizer.from_json(text)
  for kind, k in (("rna", 1), ("nucleotide", 0), ("nucleotide", 9), ("amino_acid", 2)):
    with pytest.raises(ValueError, match="SequenceTokenizer"):
      sequence.SequenceTokenizer(kind, k)
  with pytest.raises(ValueError, match="ids must be in"):
    tokenizer.decode([29])


@pytest.mark.parametrize("k", [1, 3, 6])
def test_residue_span_encodes_exactly_the_token_window(k):
  tokenizer = sequence.SequenceTokenizer("nucleotide", k)
  rng = np.random.default_rng(0)
  for length in (0, 5, 17, 40):
    seq = random_bases(rng, length, "ACGTN")
    full = tokenizer.encode(seq)
    for first in range(len(full) + 1):
      for n in range(len(full) - first + 1):
        start, end = tokenizer.residue_span(first, n, length)
        assert np.array_equal(tokenizer.encode(seq[start:end]), full[first:first + n])


# ================================================================ cropping
def test_random_crop_is_seeded_and_in_bounds():
  tokenizer = sequence.SequenceTokenizer("nucleotide", 3)
  seq = random_bases(np.random.default_rng(0), 100) + "AC"  # 33 k-mers + 2 tail bases
  full = tokenizer.encode(seq)
  crop = sequence.TokenizeSequence(tokenizer, max_len=11)
  starts = set()
  for seed in range(200):
    out = crop.random_map({"id": "x", "sequence": seq}, np.random.default_rng(seed))
    again = crop.random_map({"id": "x", "sequence": seq}, np.random.default_rng(seed))
    assert all(np.array_equal(out[f], again[f]) for f in out)
    batch.check_example(out, batch.token_sequence_spec(11, with_values=False,
                                                       with_targets=False), "crop")
    assert out[batch.TOKENS][0] == batch.CLS_ID and out[batch.TOKEN_MASK].all()
    window = out[batch.TOKENS][1:]
    hits = [s for s in range(len(full) - 9) if np.array_equal(full[s:s + 10], window)]
    assert hits
    starts.add(hits[0])
  assert starts == set(range(len(full) - 9))  # every window, tail ones included


def test_start_crop_and_padding():
  tokenizer = sequence.SequenceTokenizer("amino_acid")
  start = sequence.TokenizeSequence(tokenizer, max_len=6, crop="start")
  out = start.map({"id": "p", "sequence": "MKVLAWY"})
  assert out[batch.TOKENS][1:].tolist() == tokenizer.encode("MKVLA").tolist()
  seeded = start.random_map({"id": "p", "sequence": "MKVLAWY"}, np.random.default_rng(3))
  assert np.array_equal(seeded[batch.TOKENS], out[batch.TOKENS])
  short = start.map({"id": "p", "sequence": "MK"})
  assert short[batch.TOKENS].tolist() == [batch.CLS_ID, *tokenizer.encode("MK"), 0, 0, 0]
  assert short[batch.TOKEN_MASK].tolist() == [True] * 3 + [False] * 3
  with pytest.raises(ValueError, match="id 'q'.*'sequence'"):
    start.map({"id": "q", "sequence": None})
  with pytest.raises(ValueError, match="needs an rng"):
    sequence.TokenizeSequence(tokenizer, 6).map({"id": "p", "sequence": "MK"})


# ================================================================ masking
def test_mask_statistics_and_targets(dna_fasta):
  tokenizer = sequence.SequenceTokenizer("nucleotide", 3)
  source = fasta.FastaDataset(dna_fasta, alphabet="dna").source("train")
  tokenize = sequence.TokenizeSequence(tokenizer, max_len=48, crop="start")
  examples = [tokenize.map(source[i]) for i in range(len(source))]
  assert any((e[batch.TOKENS] == batch.UNK_ID).any() for e in examples)  # k-mers with an N
  rate, mask = 0.15, sequence.MaskTokens(tokenizer.vocab_size, 0.15)
  spec = batch.token_sequence_spec(48, with_values=False, with_targets=True)
  rng = np.random.default_rng(0)
  selected = real_total = masked = swapped = kept = 0
  for i in range(1000):
    example = examples[i % len(examples)]
    out = mask.random_map(example, rng)
    batch.check_example(out, spec, "masked")
    assert set(out) == set(spec)
    tokens, sel = example[batch.TOKENS], out[batch.TARGET_MASK]
    real = example[batch.TOKEN_MASK] & (tokens != batch.CLS_ID) & (tokens != batch.UNK_ID)
    assert not (sel & ~real).any() and sel.sum() >= 1
    assert np.array_equal(out[batch.TARGET_TOKENS], tokens)
    assert np.array_equal(out[batch.TOKENS][~sel], tokens[~sel])
    selected, real_total = selected + sel.sum(), real_total + real.sum()
    masked += (out[batch.TOKENS][sel] == batch.MASK_ID).sum()
    changed = sel & (out[batch.TOKENS] != batch.MASK_ID) & (out[batch.TOKENS] != tokens)
    swapped += changed.sum()
    kept += (sel & (out[batch.TOKENS] == tokens)).sum()
    assert (out[batch.TOKENS][changed] >= len(batch.SPECIAL_TOKENS)).all()
  assert rate - 0.01 < selected / real_total < rate + 0.02
  assert abs(masked / selected - 0.8) < 0.03
  assert abs(swapped / selected - 0.1) < 0.03 and abs(kept / selected - 0.1) < 0.03
  a = mask.random_map(examples[0], np.random.default_rng(7))
  b = mask.random_map(examples[0], np.random.default_rng(7))
  assert all(np.array_equal(a[f], b[f]) for f in a)
  with pytest.raises(ValueError, match="mask_rate"):
    sequence.MaskTokens(tokenizer.vocab_size, 0.0)


# ================================================================ SequenceData
def sequence_config(**overrides):
  cfg = ml_collections.ConfigDict(dict(
      path="", alphabet="dna", tokenizer="nucleotide", kmer=1, max_len=64, mask_rate=0.15,
      label_pattern=r"motif=(\d+)", synthetic_records=60, synthetic_seed=0))
  cfg.update(overrides)
  return cfg


@pytest.mark.parametrize("overrides, vocab_size", [
    (dict(), 9), (dict(kmer=6), 4105),
    (dict(alphabet="protein", tokenizer="amino_acid"), 29)])
def test_sequence_data_from_synthetic_fasta(tmp_path, overrides, vocab_size):
  cfg = sequence_config(**overrides)
  data = sequence.SequenceData.from_config(cfg, targets="masked", artifacts_dir=tmp_path)
  assert (tmp_path / sequence.SYNTHETIC_FILENAME).exists()
  saved = sequence.SequenceTokenizer.load(tmp_path / sequence.TOKENIZER_FILENAME)
  assert saved == data.tokenizer and saved.vocab_size == vocab_size
  assert data.model_info() == {"sequence": {"vocab_size": vocab_size, "num_value_bins": 0, "max_len": 64,
                                            "prediction_slots": 32}}  # prediction_slots(64, 0.15)
  assert data.example_spec() == {"sequence": batch.token_sequence_spec(64, with_values=False, with_targets=True)}
  assert data.embedding_spec() == {"sequence": batch.token_sequence_spec(64, with_values=False,
                                                                         with_targets=False)}
  summary = data.summary()
  assert summary["records_train"] + summary["records_tuning"] + summary["records_held_out"] == 60
  train = data.source("train")
  tokens = [len(data.tokenizer.encode(train[i]["sequence"])) for i in range(len(train))]
  assert summary["train_tokens"] == sum(tokens)
  assert summary["train_records_cropped"] == sum(n > 63 for n in tokens) > 0
  assert summary["train_tokens_cropped"] == sum(max(n - 63, 0) for n in tokens)
  assert all(isinstance(v, int) for v in summary.values())
  labels, names = data.labels("train")
  assert names == ("motif",) and labels.shape == (summary["records_train"], 1)
  assert set(np.unique(labels).tolist()) == {0.0, 1.0}

  spec = data.example_spec()[data.name]
  ds = pipeline.make_train_dataset(data.source("train"), data.transforms(train=True),
                                   global_batch_size=4, seed=0,
                                   process_index=0, process_count=1)
  it = pipeline.make_iterator(ds)
  for _ in range(3):
    next(it)
  state = it.get_state()
  expected = [next(it) for _ in range(2)]
  resumed = pipeline.make_iterator(ds)
  resumed.set_state(state)
  for e in expected:
    got = next(resumed)
    assert set(got) == {"sequence"}
    assert all(np.array_equal(e["sequence"][f], got["sequence"][f]) for f in spec)
    assert all(got["sequence"][f].shape == (4,) + shape for f, (shape, _) in spec.items())
  eval_batches = list(pipeline.make_eval_dataset(
      data.source("tuning"), data.transforms(train=False, mask=False),
      global_batch_size=4, seed=0, example_spec=data.embedding_spec(), process_index=0,
      process_count=1))
  tuning = data.source("tuning")
  tokens = np.concatenate([b["sequence"][batch.TOKENS] for b in eval_batches])
  assert set(eval_batches[0]["sequence"]) == set(data.embedding_spec()["sequence"])
  for i in range(len(tuning)):  # evaluation sees each record's start, unmasked, in order
    ids = data.tokenizer.encode(tuning[i]["sequence"])[:63].tolist()
    assert tokens[i].tolist() == [batch.CLS_ID] + ids + [batch.PAD_ID] * (63 - len(ids))
  assert (tokens[len(tuning):] == batch.PAD_ID).all()


def test_sequence_data_config_errors(tmp_path):
  sequence.SequenceData.from_config(sequence_config(), targets="masked", artifacts_dir=tmp_path)
  with pytest.raises(ValueError, match="sequence_tokenizer.json.*kmer=3"):
    sequence.SequenceData.from_config(sequence_config(kmer=3), targets="masked",
                                      artifacts_dir=tmp_path)
  with pytest.raises(ValueError, match=r"^SequenceData: cannot make 'next' targets; it makes \['masked'\]$"):
    sequence.SequenceData.from_config(sequence_config(), targets="next",
                                      artifacts_dir=tmp_path)
  bad = [(dict(alphabet="protein"), r"config.data.sequence.tokenizer is 'nucleotide'"),
         (dict(kmer=0), r"config.data.sequence.kmer is 0"),
         (dict(alphabet="protein", tokenizer="amino_acid", kmer=3), r"sequence.kmer is 3"),
         (dict(max_len=1), r"config.data.sequence.max_len is 1"),
         (dict(mask_rate=1.5), r"config.data.sequence.mask_rate is 1.5")]
  for overrides, message in bad:
    with pytest.raises(ValueError, match=message):
      sequence.SequenceData.from_config(sequence_config(**overrides), targets="masked",
                                        artifacts_dir=tmp_path / "other")


def test_worker_processes_reopen_the_files_and_resume(dna_fasta, tmp_path):
  gz = tmp_path / "seqs.fa.gz"
  gz.write_bytes(gzip.compress(dna_fasta.read_bytes()))
  cfg = sequence_config(path=str(gz), kmer=3)
  data = sequence.SequenceData.from_config(cfg, targets="masked", artifacts_dir=tmp_path)
  ds = pipeline.make_train_dataset(data.source("train"), data.transforms(train=True),
                                   global_batch_size=4, seed=1,
                                   process_index=0, process_count=1)
  in_process = pipeline.make_iterator(ds)
  expected = [next(in_process) for _ in range(4)]
  it = pipeline.make_iterator(ds, num_workers=1)
  next(it), next(it)
  resumed = pipeline.make_iterator(ds, num_workers=1)
  resumed.set_state(it.get_state())
  try:
    for e in expected[2:]:
      got = next(resumed)
      assert all(np.array_equal(e["sequence"][f], got["sequence"][f]) for f in e["sequence"])
  finally:
    it.close()
    resumed.close()
