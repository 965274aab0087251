"""Published evaluation lists: which images a protocol scores, with their labels.

Papers score CheXpert 5x200 and RSNA Pneumonia on fixed image lists; a number
compares with theirs only on the same images.  An evaluator given such a list
(``config.evals.<name>.list=PATH``) scores exactly the list's images that are
in its converted split, in list order, after checking that the list's labels
agree with the records':

  published = read_list(path, "rsna")       # or "chexpert"
  chosen = select_listed(published, record_keys, record_labels, label_names)
  chosen.rows      # record rows in list order
  chosen.set_info  # list_sha256, list_size, list_missing, selection

Formats:

* RSNA (ALTA's ``test_list.txt`` / ``val_list.txt``): one image a line,
  ``<folder>/<patientId>.dcm <label>`` (label 1 = pneumonia); a bare
  patientId without a label, or a CSV with a ``patientId`` column (and
  optionally ``Target``), is read too.  Images are matched by patientId.
* CheXpert (the 5x200 CSV): a ``Path`` column and label columns named as
  CheXpert's.  Images are matched by ``Path`` without its first folder when
  that is ``CheXpert-v1.0-small`` or ``CheXpert-v1.0``, so lists of either
  release match records converted from either.  A blank label counts as 0,
  as in the 5x200 rule.

This module imports no JAX.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import io
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any, Optional

import numpy as np

LIST_KINDS = ("rsna", "chexpert")
# Values of "<name>/selection": where the scored images came from.
PUBLISHED_LIST = "published_list"
SEEDED_RULE = "seeded_rule"
UNKNOWN_SELECTION = "unknown"
SELECTIONS = (PUBLISHED_LIST, SEEDED_RULE, UNKNOWN_SELECTION)
# How many missing / disagreeing images an error names.
SHOWN = 5


class ListError(ValueError):
  """A list does not parse, or does not match the converted records."""


@dataclasses.dataclass(frozen=True)
class ListEntry:
  """One image of a list.

  Attributes:
    key: what records are matched on (patientId, or the CheXpert path
      without its release folder).
    name: the image as the list writes it (for messages).
    labels: {label name: value} the list gives (NaN: blank).
  """

  key: str
  name: str
  labels: Mapping[str, float]


@dataclasses.dataclass(frozen=True)
class PublishedList:
  path: str
  kind: str
  sha256: str
  entries: tuple[ListEntry, ...]

  def __len__(self) -> int:
    return len(self.entries)


@dataclasses.dataclass(frozen=True)
class Selection:
  """The records a list selects.

  Attributes:
    rows: indices into the records, in list order.
    missing: entries without a record.
    unlisted: how many records the list does not name (not scored).
    set_info: {"list_sha256", "list_size", "list_missing", "selection"}.
  """

  rows: np.ndarray
  missing: tuple[ListEntry, ...]
  unlisted: int
  set_info: dict[str, Any]


def sha256_file(path: str | os.PathLike[str]) -> str:
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      h.update(block)
  return h.hexdigest()


def chexpert_key(path: str) -> str:
  """A CheXpert image path without its release folder: "CheXpert-v1.0-small/train/p/s/v.jpg" -> "train/p/s/v.jpg"."""
  parts = [p for p in path.strip().replace("\\", "/").split("/") if p]
  if parts and parts[0].lower().startswith("chexpert-v1.0"):
    parts = parts[1:]
  return "/".join(parts)


def rsna_key(name: str) -> str:
  """patientId of "stage_2_test_images/<patientId>.dcm", of a bare id, or of an image path."""
  base = os.path.basename(name.strip().replace("\\", "/"))
  stem, ext = os.path.splitext(base)
  return stem if ext.lower() in (".dcm", ".dicom", ".png", ".jpg", ".jpeg") else base


def record_key(kind: str, image_id: str) -> str:
  """The key a record of ``kind`` is matched on, from its current frontal image id."""
  return rsna_key(image_id) if kind == "rsna" else chexpert_key(image_id)


def _label(raw: Optional[str], where: str) -> float:
  raw = (raw or "").strip()
  if not raw:
    return math.nan
  try:
    return float(raw)
  except ValueError:
    raise ListError(f"{where}: label {raw!r} is not a number") from None


def _read_rsna(path: str, text: str) -> list[ListEntry]:
  lines = text.splitlines()
  first = lines[0] if lines else ""
  if "patientId" in first:
    out = []
    for i, row in enumerate(csv.DictReader(io.StringIO(text)), start=2):
      pid = (row.get("patientId") or "").strip()
      if not pid:
        raise ListError(f"{path} line {i}: blank patientId")
      labels = {}
      if "Target" in row:
        labels["Pneumonia"] = _label(row["Target"], f"{path} line {i}")
      out.append(ListEntry(pid, pid, labels))
    return out
  out = []
  for i, line in enumerate(lines, start=1):
    fields = line.split()
    if not fields:
      continue
    if len(fields) > 2:
      raise ListError(f"{path} line {i}: expected '<folder>/<patientId>.dcm <label>', got {line.strip()!r}")
    labels = {"Pneumonia": _label(fields[1], f"{path} line {i}")} if len(fields) == 2 else {}
    out.append(ListEntry(rsna_key(fields[0]), fields[0], labels))
  return out


def _read_chexpert(path: str, text: str, label_names: Optional[Sequence[str]]) -> list[ListEntry]:
  reader = csv.DictReader(io.StringIO(text))
  if not reader.fieldnames or "Path" not in reader.fieldnames:
    raise ListError(f"{path}: a CheXpert list needs a Path column (columns: {reader.fieldnames})")
  names = [c for c in (label_names or reader.fieldnames) if c in reader.fieldnames and c != "Path"]
  if label_names is None:
    # Without the record's label names, the CheXpert label columns are the numeric ones after the metadata.
    names = [c for c in names if c not in ("Sex", "Age", "Frontal/Lateral", "AP/PA")]
  out = []
  for i, row in enumerate(reader, start=2):
    name = (row.get("Path") or "").strip()
    if not name:
      raise ListError(f"{path} line {i}: blank Path")
    out.append(ListEntry(chexpert_key(name), name, {c: _label(row.get(c), f"{path} line {i} ({c})") for c in names}))
  return out


def read_list(path: str | os.PathLike[str], kind: str, label_names: Optional[Sequence[str]] = None) -> PublishedList:
  """Reads a published list of ``kind`` ("rsna" or "chexpert").

  Args:
    path: the list file.
    kind: its format, see the module docstring.
    label_names: CheXpert: the label columns to read (default: every column
      but Path and the demographics).

  Raises:
    ListError: the file is missing, empty, malformed, or names an image twice.
  """
  if kind not in LIST_KINDS:
    raise ValueError(f"list kind {kind!r}: use one of {LIST_KINDS}")
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise ListError(f"{path}: list not found")
  with open(path, "rb") as f:
    data = f.read()
  text = data.decode("utf-8-sig")
  entries = _read_rsna(path, text) if kind == "rsna" else _read_chexpert(path, text, label_names)
  if not entries:
    raise ListError(f"{path}: the list names no image")
  seen: dict[str, str] = {}
  for e in entries:
    if e.key in seen:
      raise ListError(f"{path}: {e.name} is listed twice (also as {seen[e.key]})")
    seen[e.key] = e.name
  return PublishedList(path, kind, hashlib.sha256(data).hexdigest(), tuple(entries))


def _same(listed: float, recorded: float) -> bool:
  # A blank counts as 0 on both sides: the published 5x200 list writes 0.0 where CheXpert's table is blank.
  a = 0.0 if math.isnan(listed) else listed
  b = 0.0 if math.isnan(recorded) else recorded
  return a == b


def select_listed(
  published: PublishedList,
  record_keys: Sequence[str],
  record_labels: np.ndarray,
  label_names: Sequence[str],
  *,
  allow_missing: bool = False,
  what: str = "the converted records",
) -> Selection:
  """The records ``published`` names, in list order, checked against the list's labels.

  Args:
    published: from `read_list`.
    record_keys: [N] key of each record (`record_key`).
    record_labels: [N, C] labels of the records.
    label_names: [C] their names; list labels of other names are not checked.
    allow_missing: list images without a record are counted instead of
      failing.
    what: the records' description in messages (e.g. the folder and split).

  Raises:
    ListError: a record's label disagrees with the list (naming the images),
      a listed image matches two records, or (without ``allow_missing``) list
      images have no record (naming the first few and the count).
  """
  by_key: dict[str, int] = {}
  for row, key in enumerate(record_keys):
    if key in by_key:
      raise ListError(f"{what}: two records ({by_key[key]} and {row}) are the image {key!r}")
    by_key[key] = row
  labels = np.asarray(record_labels, np.float64).reshape(len(record_keys), -1)
  column = {n: c for c, n in enumerate(label_names)}
  rows, missing, disagree = [], [], []
  for entry in published.entries:
    row = by_key.get(entry.key)
    if row is None:
      missing.append(entry)
      continue
    rows.append(row)
    for name, value in entry.labels.items():
      if name in column and not _same(value, labels[row, column[name]]):
        disagree.append(f"{entry.name}: {name} is {value:g} in the list, {labels[row, column[name]]:g} in the record")
  if disagree:
    raise ListError(
      f"{published.path}: {len(disagree)} label(s) of listed images disagree with {what}: "
      + "; ".join(disagree[:SHOWN])
      + ("; ..." if len(disagree) > SHOWN else "")
    )
  if missing and not allow_missing:
    names = ", ".join(e.name for e in missing[:SHOWN])
    raise ListError(
      f"{published.path}: {len(missing)} of its {len(published)} images are not in {what} "
      f"(first: {names}{', ...' if len(missing) > SHOWN else ''}); convert them, or set allow_missing=True to "
      "score the others (the count is then in <name>/list_missing)"
    )
  set_info = {
    "selection": PUBLISHED_LIST,
    "list_sha256": published.sha256,
    "list_size": len(published),
    "list_missing": len(missing),
  }
  return Selection(np.asarray(rows, np.int64), tuple(missing), len(record_keys) - len(rows), set_info)


def converter_selection(manifest: Optional[Mapping[str, Any]], split: str = "") -> str:
  """How the converter chose the images of a folder's ``split``, from its manifest: one of `SELECTIONS`."""
  notes = (manifest or {}).get("notes") or {}
  selection = notes.get("selection")
  # A selection that names its split (RSNA's test list) says nothing of the other splits.
  if notes.get("selection_split") and notes["selection_split"] != split:
    return UNKNOWN_SELECTION
  if selection in SELECTIONS:
    return selection
  # Manifests written before "selection" became a name said it in words.
  if isinstance(selection, str) and selection.startswith("5x200 rule"):
    return SEEDED_RULE
  if isinstance(selection, str) and selection.startswith("published list"):
    return PUBLISHED_LIST
  return UNKNOWN_SELECTION
