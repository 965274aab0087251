"""A plain folder of studies -> a converter ``Plan``, decided the way the converters decide.

Layout: one sub-folder per study (``ROOT/<study>/`` or ``ROOT/<patient>/<study>/``;
any folder that directly holds files is a study), holding DICOM / PNG / JPEG
views and an optional report (``report.txt``, else the folder's only ``.txt``).

* Study id: the folder's path relative to ROOT ("/"-separated).
* Patient and date: DICOM ``PatientID`` and ``StudyDate`` (the first DICOM of
  the folder, by file name, that has them); without tags the patient is the
  parent folder (nested layout) or the study itself, and the study is undated.
* Views: DICOM ``ViewPosition``, else the file name ("...-PA", "lateral.png"),
  else the pixels (``studies_lib.content_view``), else rejected as ``unknown_view``.
  One view of each kind per study (lowest file name), priors by
  ``studies_lib.PRIOR_RULE``: all through ``studies_lib.assemble_studies``.
* Rejects (``rows`` are files, relative to ROOT): empty folders, files that are
  not images or reports, unreadable DICOM headers, and what the converters
  reject while loading pixels (``bad_image``, ``missing_view``).

``known`` lists studies an index already holds, so appending plans only the new
studies; known studies of the new studies' patients still take part, so a new
study finds its prior among them.
"""

from __future__ import annotations

import dataclasses
import datetime
import os
import re
from collections.abc import Mapping
from typing import Optional

from clinvla_jax.data import images as images_lib
from clinvla_jax.data import text as text_lib
from clinvla_jax.data import studies as studies_lib

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg") + images_lib.DICOM_EXTENSIONS
REPORT_EXTENSION = ".txt"
REPORT_NAME = "report.txt"
SPLIT = "index"
_FRONTAL_WORDS = {"pa", "ap", "frontal"}
_LATERAL_WORDS = {"l", "ll", "lat", "lateral"}


class IngestError(ValueError):
  """The input folder cannot be read as a folder of studies."""


@dataclasses.dataclass(frozen=True)
class StudyFolder:
  study_id: str
  path: str  # absolute
  images: tuple[str, ...]  # absolute, sorted by name
  reports: tuple[str, ...]
  others: tuple[str, ...]  # files that are neither


@dataclasses.dataclass(frozen=True)
class StudyInfo:
  """What the index keeps about a study besides its embeddings."""

  study_id: str
  patient_id: str
  path: str
  date: str  # ISO date, "" when unknown


@dataclasses.dataclass(frozen=True)
class FolderPlan:
  plan: studies_lib.Plan
  info: dict[str, StudyInfo]  # study id -> info, for the planned studies
  known_skipped: int  # known studies left out


def _rel(root: str, path: str) -> str:
  return os.path.relpath(path, root).replace(os.sep, "/")


def _is_image(path: str) -> bool:
  return path.lower().endswith(IMAGE_EXTENSIONS) or images_lib.is_dicom(path)


def find_study_folders(root: str) -> tuple[list[StudyFolder], list[studies_lib.Reject]]:
  """Every folder under ``root`` that holds files; empty folders and files in ``root`` itself are rejects."""
  root = os.path.abspath(root)
  if not os.path.isdir(root):
    raise IngestError(f"{root}: not a folder")
  folders, rejects = [], []
  for here, dirs, files in os.walk(root):
    dirs.sort()
    files = sorted(f for f in files if not f.startswith("."))
    if here == root:
      rejects += [
        studies_lib.Reject(f, "outside_study_folder", "files must sit in one sub-folder per study") for f in files
      ]
      continue
    if not files:
      if not dirs:
        rejects.append(studies_lib.Reject(_rel(root, here) + "/", "empty_folder", "no files in this study folder"))
      continue
    paths = [os.path.join(here, f) for f in files]
    reports = tuple(p for p in paths if p.lower().endswith(REPORT_EXTENSION))
    images = tuple(p for p in paths if p not in reports and _is_image(p))
    others = tuple(p for p in paths if p not in reports and p not in images)
    folders.append(StudyFolder(_rel(root, here), here, images, reports, others))
  return folders, rejects


def dicom_tags(path: str) -> dict[str, str]:
  """PatientID, StudyDate and ViewPosition of a DICOM file ("" where absent); raises ImageError."""
  import pydicom  # pylint: disable=g-import-not-at-top

  try:
    ds = pydicom.dcmread(path, stop_before_pixels=True)
  except Exception as e:  # pydicom raises several unrelated types here
    raise images_lib.ImageError(path, f"unreadable DICOM ({type(e).__name__}: {e})") from e
  return {k: str(ds.get(k, "") or "").strip() for k in ("PatientID", "StudyDate", "ViewPosition")}


def parse_dicom_date(value: str) -> Optional[datetime.date]:
  """A DICOM DA value (YYYYMMDD) as a date; None when blank or malformed."""
  try:
    return datetime.datetime.strptime(value.strip()[:8], "%Y%m%d").date()
  except ValueError:
    return None


def filename_view(path: str) -> Optional[str]:
  """ "frontal" / "lateral" from the file name's last word ("chest-PA.png", "lateral.dcm"); None if silent."""
  words = re.split(r"[^a-z0-9]+", os.path.splitext(os.path.basename(path))[0].lower())
  last = next((w for w in reversed(words) if w), "")
  if last in _FRONTAL_WORDS:
    return "frontal"
  if last in _LATERAL_WORDS:
    return "lateral"
  return None


def read_report(folder: StudyFolder) -> tuple[str, list[str]]:
  """(cleaned report text or "", the .txt files not used)."""
  if not folder.reports:
    return "", []
  named = [p for p in folder.reports if os.path.basename(p).lower() == REPORT_NAME]
  chosen = named[0] if named else (folder.reports[0] if len(folder.reports) == 1 else None)
  if chosen is None:
    return "", list(folder.reports)
  with open(chosen, encoding="utf-8", errors="replace") as f:
    raw = f.read()
  return text_lib.report_text(full_report=raw).text, [p for p in folder.reports if p != chosen]


def _folder_tags(folder: StudyFolder) -> tuple[dict[str, dict[str, str]], dict[str, str]]:
  """(tags per readable DICOM, problem per unreadable DICOM)."""
  tags, problems = {}, {}
  for path in folder.images:
    if images_lib.is_dicom(path):
      try:
        tags[path] = dicom_tags(path)
      except images_lib.ImageError as e:
        problems[path] = e.problem
  return tags, problems


def _first_tag(tags: Mapping[str, Mapping[str, str]], key: str) -> str:
  return next((t[key] for _, t in sorted(tags.items()) if t.get(key)), "")


def _default_patient(study_id: str) -> str:
  return study_id.rsplit("/", 1)[0] if "/" in study_id else study_id


def describe_folder(folder: StudyFolder) -> tuple[StudyInfo, Optional[datetime.date], dict[str, dict], dict]:
  """(info, date, tags per DICOM, problem per unreadable DICOM) from headers only."""
  tags, problems = _folder_tags(folder)
  date = parse_dicom_date(_first_tag(tags, "StudyDate"))
  patient = _first_tag(tags, "PatientID") or _default_patient(folder.study_id)
  info = StudyInfo(folder.study_id, patient, folder.path, date.isoformat() if date else "")
  return info, date, tags, problems


def _decide_view(path: str, tags: Mapping[str, str]) -> tuple[Optional[str], str, str]:
  """(view or None, how it was decided, why unknown)."""
  view = studies_lib.view_from_tag(tags.get("ViewPosition", ""))
  if view is not None:
    return view, "DICOM ViewPosition", ""
  view = filename_view(path)
  if view is not None:
    return view, "file name", ""
  view, score = studies_lib.content_view(path)
  if view is not None:
    return view, "pixel content", ""
  return None, "", f"no view tag or name, pixels ambiguous (frontal score {score:+.3f})"


def _split_known(
  root: str, folders: list[StudyFolder], known: Mapping[str, StudyInfo]
) -> tuple[list[StudyFolder], list[StudyFolder], list[studies_lib.Reject]]:
  """(new folders, known folders at the same path, rejects for known ids at another path)."""
  new, old, rejects = [], [], []
  for folder in folders:
    prev = known.get(folder.study_id)
    if prev is None:
      new.append(folder)
    elif os.path.abspath(prev.path) == folder.path:
      old.append(folder)
    else:
      rejects += [
        studies_lib.Reject(
          _rel(root, p), "duplicate_study_id", f"study {folder.study_id} is already indexed from {prev.path}"
        )
        for p in folder.images
      ]
  return new, old, rejects


def _describe_studies(
  new: list[StudyFolder], old: list[StudyFolder], known: Mapping[str, StudyInfo]
) -> tuple[dict[str, tuple], set[str]]:
  """({study id: (folder, info, date, tags, problems)}, the ids of known studies taking part as context)."""
  described = {f.study_id: (f, *describe_folder(f)) for f in new}
  new_patients = {d[1].patient_id for d in described.values()}
  # Known studies of the new studies' patients join the plan only to serve as priors.
  context = [f for f in old if known[f.study_id].patient_id in new_patients]
  for f in context:
    info, date, tags, problems = describe_folder(f)
    described[f.study_id] = (
      f,
      dataclasses.replace(info, patient_id=known[f.study_id].patient_id),
      date,
      tags,
      problems,
    )
  return described, {f.study_id for f in context}


def _folder_rejects(root: str, folder: StudyFolder, study_id: str, unused: list[str]) -> list[studies_lib.Reject]:
  """The folder's files that are no view and not its report, and the folder itself when it has no view."""
  rejects = [
    studies_lib.Reject(_rel(root, p), "unsupported_file", "not an image or a .txt report") for p in folder.others
  ]
  rejects += [
    studies_lib.Reject(_rel(root, p), "extra_report", f"study {study_id}: several .txt files and none is {REPORT_NAME}")
    for p in unused
  ]
  if not folder.images:
    rejects.append(
      studies_lib.Reject(_rel(root, folder.path) + "/", "no_images", "no DICOM/PNG/JPEG view in the folder")
    )
  return rejects


def _image_rows(
  root: str, study_id: str, described: tuple, view_methods: dict[str, int]
) -> tuple[list[studies_lib.Row], list[studies_lib.Reject]]:
  """(a row per image whose view was tried, rejects for unreadable images); ``view_methods`` counts the methods."""
  folder, info, date, tags, problems = described
  rows, rejects = [], []
  for path in folder.images:
    row_id = _rel(root, path)
    if path in problems:
      rejects.append(studies_lib.Reject(row_id, "bad_image", problems[path]))
      continue
    try:
      view, method, why = _decide_view(path, tags.get(path, {}))
    except images_lib.ImageError as e:
      rejects.append(studies_lib.Reject(row_id, "bad_image", e.problem))
      continue
    view_methods[method or "undecided"] = view_methods.get(method or "undecided", 0) + 1
    rows.append(
      studies_lib.Row(
        row_id=row_id,
        patient_id=info.patient_id,
        study_key=study_id,
        view=view,
        path=path,
        image_id=row_id,
        rank=os.path.basename(path),
        time=float(date.toordinal()) if date else None,
        why_unknown=why,
      )
    )
  return rows, rejects


def _study_rows(
  root: str, described: dict[str, tuple], context_ids: set[str]
) -> tuple[list[studies_lib.Row], dict[str, str], dict[str, int], list[studies_lib.Reject]]:
  """(image rows, report per study, view decisions, rejects).

  The context studies' files are rows of the index already, not of this plan, so their rejects are dropped.
  """
  rows: list[studies_lib.Row] = []
  rejects: list[studies_lib.Reject] = []
  reports: dict[str, str] = {}
  view_methods: dict[str, int] = {}
  for study_id, entry in described.items():
    own = study_id not in context_ids
    report, unused = read_report(entry[0])
    reports[study_id] = report
    if own:
      rejects += _folder_rejects(root, entry[0], study_id, unused)
    study_rows, image_rejects = _image_rows(root, study_id, entry, view_methods)
    rows += study_rows
    if own:
      rejects += image_rejects
  return rows, reports, view_methods, rejects


def _folder_plan(
  studies: list[studies_lib.Study], rejects: list[studies_lib.Reject], view_methods: dict[str, int]
) -> studies_lib.Plan:
  return studies_lib.Plan(
    dataset="study_folders",
    input_rows=sum(len(s.rows) for s in studies) + len(rejects),
    row_unit="file",
    studies=studies,
    rejects=rejects,
    label_names=[],
    notes={
      "study_definition": "a folder holding files; its id is its path under the input folder",
      "views_decided_by": "DICOM ViewPosition, else the file name's last word, else pixel content, else rejected",
      "view_decisions": view_methods,
      "prior_definition": studies_lib.PRIOR_RULE,
      "patient_and_date": "DICOM PatientID / StudyDate; else the parent folder (nested layout) or the study, undated",
      "text_source": f"{REPORT_NAME}, else the folder's only .txt file (optional)",
    },
  )


def plan_folder(root: str, known: Optional[Mapping[str, StudyInfo]] = None) -> FolderPlan:
  """The studies of ``root`` not in ``known`` as a converter plan (see module docstring).

  A study id in ``known`` with the same folder is skipped; with another folder
  (a second archive using the same names) its files are rejected as
  ``duplicate_study_id``.
  """
  root = os.path.abspath(root)
  known = dict(known or {})
  folders, rejects = find_study_folders(root)
  if not folders and not rejects:
    raise IngestError(f"{root}: no study folders (expected one sub-folder per study)")
  new, old, duplicates = _split_known(root, folders, known)
  rejects += duplicates
  described, context_ids = _describe_studies(new, old, known)
  rows, reports, view_methods, study_rejects = _study_rows(root, described, context_ids)
  rejects += study_rejects

  def describe(study: studies_lib.StudyRows) -> studies_lib.Described:
    return studies_lib.Described(study.study_key, rows=tuple(study.views.values()), text=reports[study.study_key])

  studies, assembly_rejects = studies_lib.assemble_studies(rows, describe, split_of=lambda _: SPLIT)
  context_rows = {r.row_id for r in rows if r.study_key in context_ids}
  studies = [s for s in studies if s.study_id not in context_ids]
  rejects += [r for r in assembly_rejects if r.row not in context_rows]
  info = {sid: d[1] for sid, d in described.items() if sid not in context_ids}
  return FolderPlan(_folder_plan(studies, rejects, view_methods), info, len(old))
