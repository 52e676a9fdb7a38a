"""Read-time skips (`data/sources/read_skips.py`): when every record a split offers fails to
read, the error counts the distinct records tried, never more than the split holds."""
import numpy as np
import pytest

from biofm_jax.data import pipeline
from biofm_jax.data.module import KeyByModality
from biofm_jax.data.sources import read_skips


class _UnreadableSource:
  """A split whose records' files all fail to read (counting the reads of each)."""

  def __init__(self, paths, skip_file=""):
    self.paths, self.skip_file, self._known_bad = list(paths), skip_file, set()
    self.reads = {}

  def __len__(self):
    return len(self.paths)

  def __getitem__(self, index):
    return read_skips.read_or_replace(int(index), self.paths, self._read, on_error="skip",
                                      skip_file=self.skip_file, known_bad=self._known_bad)

  def _read(self, i):
    self.reads[i] = self.reads.get(i, 0) + 1
    raise ValueError(f"{self.paths[i]}: field 'signal' is not finite")


@pytest.mark.parametrize("paths, message", [
    (["ecg/r0"], r"^none of the 1 record of this split could be read, starting at ecg/r0 \(on_error='skip'\)"),
    (["ecg/r0", "ecg/r1", "ecg/r2"], r"^none of the 3 records of this split could be read, starting at ecg/r0"),
    (["ecg/r0", "ecg/r0", "ecg/r1"], r"^none of the 3 records of this split could be read \(2 distinct files\)"),
    ([f"ecg/r{i}" for i in range(100)], r"^ecg/r0 and the 63 records after it could not be read \(on_error"),
])
def test_an_unreadable_split_counts_the_distinct_records_it_tried(paths, message):
  source = _UnreadableSource(paths)
  with pytest.raises(ValueError, match=message):
    source[0]
  assert all(count == 1 for count in source.reads.values())  # each file read once, then known bad


def test_an_evaluation_split_of_one_unreadable_record_says_one_record(tmp_path):
  """The reported case: an eval pass over a one-record split whose record fails to read."""
  skip_file = str(tmp_path / read_skips.SKIP_FILE)
  source = _UnreadableSource(["ecg/only"], skip_file=skip_file)
  spec = {"ecg": {"signal": ((4,), np.float32)}}
  dataset = pipeline.make_eval_dataset(source, [KeyByModality("ecg")], global_batch_size=4, seed=0,
                                       example_spec=spec, process_index=0, process_count=1)
  with pytest.raises(ValueError, match="none of the 1 record of this split could be read, starting at ecg/only"):
    next(iter(dataset))
  assert read_skips.listed(skip_file) == {"ecg/only"}
