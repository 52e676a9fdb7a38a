"""Reading a modality's config section with errors that name the field.

Every data module validates `config.data.<modality>` the same way: a missing field or a
value out of range is a ValueError that names `config.data.<modality>.<field>`, the value
found and what was expected. Modules bind their prefix once with functools.partial.
"""
from __future__ import annotations

from typing import Any


def config_field(cfg: Any, name: str, *, prefix: str) -> Any:
  try:
    return cfg[name]
  except (KeyError, AttributeError) as e:
    raise ValueError(f"{prefix}.{name} is missing") from e


def require(ok: bool, name: str, value: Any, expected: str, *, prefix: str) -> None:
  if not ok:
    raise ValueError(f"{prefix}.{name} is {value!r}, expected {expected}")
