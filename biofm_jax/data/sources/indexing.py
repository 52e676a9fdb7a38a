"""The one index check every random-access source makes in `__getitem__`."""
from __future__ import annotations

import operator


def checked_index(index, length: int, what: str) -> int:
  """`index` as a position in [0, length), negative indices counting from the end; an
  `IndexError` naming the source (`what`, e.g. "MEDSSource ... subjects") otherwise."""
  i = operator.index(index)
  if i < 0:
    i += length
  if not 0 <= i < length:
    source, _, unit = what.partition(" ... ")
    raise IndexError(f"{source}: index {index} out of range for {length} {unit}")
  return i
