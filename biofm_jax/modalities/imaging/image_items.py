"""The per-item record and index-time error shared by imaging.py and its format readers.

`Item` is one candidate or validated image (a file, or the files of a DICOM series) with what
its header said; `ItemError` is an index-time problem with one item, whose `reason` names the
stats["skipped_<reason>"] counter that on_error="skip" adds to. The per-format readers
(dicom.py, image_files.py) fill and raise these; source.py collects them.
"""
from __future__ import annotations

import dataclasses


class ItemError(ValueError):
  """An index-time problem with one item; `reason` names its stats["skipped_*"] counter."""

  def __init__(self, reason: str, message: str):
    super().__init__(message)
    self.reason = reason


@dataclasses.dataclass
class Item:
  subject_id: str
  path: str  # the file, or the folder of a series
  # One of imaging._KINDS; before inspection also dicom_folder, series_folder, missing, ...
  kind: str
  files: tuple[str, ...] = ()  # files to read; a series in D order
  shape: tuple[int, ...] = ()  # spatial shape as stored, before squeezing to 2D
  channels: int = 1
  spacing: tuple[float, ...] = ()
  modality: str = ""
  split: str = ""
  labels: tuple[float, ...] = ()
  flags: tuple[str, ...] = ()  # stats counters this item adds to
  acquisition_time: object = None  # np.datetime64 from the manifest's acquisition_time, None: unknown
