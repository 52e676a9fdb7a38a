"""Versioned JSON artifacts (vocabularies, statistics, tokenizers): one way to write and read them.

An artifact is a JSON object whose header names its format and version (and for token
vocabularies the special tokens its ids assume). It is written to a temporary file and
renamed into place, so a crash never leaves half a file; reading checks the header and
names the file, the field and both values when they differ. JSON only: nothing read from
disk is unpickled.

It also owns how files move between shared folders (a prepared dataset, a run, an export):
only named regular files are copied, never a link, and a stored relative path must stay
inside its folder, so a folder received from someone else cannot pull a file from outside
it (a link `artifacts/x -> ~/.ssh/id_rsa`) into a run or on into an export.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any, Iterable, Mapping


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


def path_inside(folder: str | os.PathLike, relative: str | os.PathLike, what: str) -> Path:
  """`folder/relative`, refused (ValueError naming `what`) when it leaves `folder`: an
  absolute path, `..`, or a link anywhere on the way that points out of it."""
  folder = Path(folder)
  if Path(relative).is_absolute():
    raise ValueError(f"{what}: {str(relative)!r} is an absolute path; a stored path must be relative to {folder}")
  path = folder / relative
  if not path.resolve().is_relative_to(folder.resolve()):
    raise ValueError(f"{what}: {str(relative)!r} leads out of {folder} (through '..' or a link); refused")
  return path


def check_no_links(folder: str | os.PathLike, what: str) -> None:
  """Refuses a folder holding any symbolic link (ValueError naming it): a link in a shared
  folder would make a reader of that folder read, or a copier copy, a file outside it."""
  for root, dirs, files in os.walk(folder):  # os.walk does not descend into linked folders
    for name in dirs + files:
      if os.path.islink(os.path.join(root, name)):
        raise ValueError(f"{what}: {os.path.join(root, name)} is a symbolic link; a shared folder must hold "
                         f"regular files only")


def copy_regular_files(src_dir: str | os.PathLike, dst_dir: str | os.PathLike, names: Iterable[str],
                       what: str) -> list[str]:
  """Copies `names` (paths relative to `src_dir`) to the same places under `dst_dir`: each
  must be a regular file inside `src_dir`, not a link; every name is checked before any is
  copied, so a refused one leaves nothing behind. Returns the names copied."""
  names = [str(name) for name in names]
  sources = [path_inside(src_dir, name, what) for name in names]
  for source in sources:
    if source.is_symlink() or not source.is_file():
      raise ValueError(f"{what}: {source} is {'a symbolic link' if source.is_symlink() else 'not a regular file'}; "
                       f"only regular files are copied")
  for name, source in zip(names, sources):
    target = path_inside(dst_dir, name, what)
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source, target, follow_symlinks=False)
  return names
