"""Versioned JSON artifacts (vocabularies, statistics, tokenizers): one way to write and read them.

An artifact is a JSON object whose header names its format and version (and for token
vocabularies the special tokens its ids assume). It is written to a temporary file and
renamed into place, so a crash never leaves half a file; reading checks the header and
names the file, the field and both values when they differ. JSON only: nothing read from
disk is unpickled.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping


def to_json(header: Mapping[str, Any], payload: Mapping[str, Any]) -> str:
  return json.dumps({**header, **payload}, indent=1) + "\n"


def write_json(path: str | os.PathLike, header: Mapping[str, Any], payload: Mapping[str, Any]) -> None:
  """`header` and `payload` as one JSON object at `path`, atomically (tmp file, then rename)."""
  path = Path(path)
  tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
  tmp.write_text(to_json(header, payload))
  os.replace(tmp, path)


def parse_json(text: str, header: Mapping[str, Any], where: str) -> dict:
  """The JSON object in `text`, its `header` fields checked; errors start with `where`."""
  try:
    payload = json.loads(text)
  except json.JSONDecodeError as e:
    raise ValueError(f"{where}: cannot read JSON ({e})") from None
  if not isinstance(payload, dict):
    raise ValueError(f"{where}: expected a JSON object")
  for key, expected in header.items():
    if payload.get(key) != expected:
      raise ValueError(f"{where}: {key} {payload.get(key)!r}, expected {expected!r}")
  return payload


def read_json(path: str | os.PathLike, header: Mapping[str, Any], what: str) -> dict:
  """The artifact at `path` (`what` names it in errors, e.g. "EHR vocabulary")."""
  path = Path(path)
  try:
    text = path.read_text()
  except OSError as e:
    raise ValueError(f"{what} {path}: cannot read JSON ({e})") from e
  return parse_json(text, header, f"{what} {path}")


def skip_generated_data(directory: str, names: list[str]) -> list[str]:
  """Vocabularies and statistics are small JSON files; generated cohorts and labels are
  data, not artifacts of the model."""
  return [name for name in names if name.startswith(("synthetic", "labels_"))]
