r"""Converts the covid-chestxray-dataset (ieee8023) layout to ClinVLA records.

Input: ``DIR/metadata.csv`` (patientid, offset, finding, view, filename,
clinical_notes, ...) and ``DIR/images/``.

* One record per study = (patient, ``offset``); rows of a patient with a blank
  offset form one undated study.
* The patient's previous dated study (largest smaller offset) with a usable view
  supplies the prior frontal/lateral views (``studies_lib.PRIOR_RULE``, shared by the
  converters); ``prior_days`` is the offset difference.
* Text: the study's ``clinical_notes`` (deduplicated), cleaned like a report.
* Labels: ``finding``, split on "," and "/" (multi-label); ``todo`` and blank
  findings are rejected as unknown labels, unless ``--unlabelled=train``: then a
  study whose rows all lack a known finding but have clinical notes is kept
  with no positive label when its patient falls in the train split
  (contrastive training needs only the image-text pair; every val study keeps
  a label, and no patient straddles the splits).
* Views: the ``view`` column (PA/AP/AP Supine -> frontal, L -> lateral); blank or
  "?" views are decided from the file name ("-L", "-PA") and, failing that, from
  the pixels (``images.frontal_score``), or rejected when still ambiguous.
* Splits: no official split; patients are hashed into train/val (``--val_percent``),
  so a patient's studies (and its priors) never straddle the two.
* The same image listed under two patient ids: the first listing is kept, later
  ones are rejected as duplicates.

Usage:
  python -m data_prep.covid_cxr --input=DIR --output=OUT [--val_percent=20] [--unlabelled=reject|train]
"""

import collections
import csv
import math
import os
import re

from absl import app
from absl import flags

from clinvla_jax.data import images as images_lib
from clinvla_jax.data import text as text_lib
from clinvla_jax.data import studies as studies_lib
from data_prep import common

_UNKNOWN_FINDINGS = {"", "todo", "unknown", "?"}


def _label_parts(finding: str) -> list[str]:
  return [p.strip() for p in re.split(r"[,/]", finding or "") if p.strip()]


def _offset(value: str):
  try:
    x = float(value)
  except (TypeError, ValueError):
    return None
  return None if math.isnan(x) else x


def _filename_view(name: str):
  stem = os.path.splitext(os.path.basename(name))[0].lower()
  if re.search(r"(^|[-_ ])(l|lat|lateral)$", stem):
    return "lateral"
  if re.search(r"(^|[-_ ])(pa|ap)$", stem):
    return "frontal"
  return None


def read_metadata(path: str) -> list[dict[str, str]]:
  if not os.path.isfile(path):
    raise studies_lib.ConversionError(f"{path}: metadata.csv not found")
  with open(path, newline="", encoding="utf-8") as f:
    rows = list(csv.DictReader(f))
  need = {"patientid", "offset", "finding", "view", "filename", "clinical_notes"}
  if rows and not need <= set(rows[0]):
    raise studies_lib.ConversionError(f"{path}: missing columns {sorted(need - set(rows[0]))}")
  return rows


UNLABELLED_POLICIES = ("reject", "train")


def _known_findings(rows: list[studies_lib.Row]) -> set[str]:
  return {p for r in rows for p in _label_parts(r.data["finding"]) if p.lower() not in _UNKNOWN_FINDINGS}


def _has_unknown_finding(row: studies_lib.Row) -> bool:
  parts = _label_parts(row.data["finding"])
  return not parts or any(p.lower() in _UNKNOWN_FINDINGS for p in parts)


def _listing_reject(row_id: str, fn: str, pid: str, seen_files: dict[str, str]) -> studies_lib.Reject | None:
  if not fn or not pid:
    return studies_lib.Reject(row_id, "missing_metadata", "blank filename or patientid")
  if fn in seen_files:
    return studies_lib.Reject(row_id, "duplicate_row", f"image {fn} already listed under patient {seen_files[fn]}")
  return None


def _decide_view(row: dict[str, str], fn: str, path: str, row_id: str) -> tuple[str, str] | studies_lib.Reject:
  """(view, how it was decided), or the reject when no view can be decided."""
  view = studies_lib.view_from_tag(row["view"])
  if view is not None:
    return view, "metadata view tag"
  view = _filename_view(fn)
  if view is not None:
    return view, "file name"
  try:
    view, score = studies_lib.content_view(path)
  except images_lib.ImageError as e:
    return studies_lib.Reject(row_id, "bad_image", e.problem)
  if view is None:
    return studies_lib.Reject(
      row_id, "unknown_view", f"view {row['view']!r} and pixels ambiguous (frontal score {score:+.3f})"
    )
  return view, "pixel content"


def _usable_rows(
  rows: list[dict[str, str]], img_root: str
) -> tuple[list[studies_lib.Row], list[studies_lib.Reject], collections.Counter]:
  """(rows with a decided view, rejected rows, how many views each method decided), in metadata order."""
  rejects: list[studies_lib.Reject] = []
  view_method = collections.Counter()
  seen_files: dict[str, str] = {}
  usable: list[studies_lib.Row] = []
  for i, row in enumerate(rows, start=1):
    fn = row["filename"].strip()
    row_id = f"metadata.csv row {i} ({fn or 'no filename'})"
    pid = row["patientid"].strip()
    reject = _listing_reject(row_id, fn, pid, seen_files)
    if reject is not None:
      rejects.append(reject)
      continue
    seen_files[fn] = pid
    path = os.path.join(img_root, fn)
    decided = _decide_view(row, fn, path, row_id)
    if isinstance(decided, studies_lib.Reject):
      rejects.append(decided)
      continue
    view, method = decided
    view_method[method] += 1
    off = _offset(row["offset"])
    # Rows of a patient with a blank offset form one undated study.
    usable.append(
      studies_lib.Row(
        row_id=row_id,
        patient_id=pid,
        study_key="undated" if off is None else off,
        view=view,
        path=path,
        image_id=fn,
        rank=fn,
        time=off,
        data=row,
      )
    )
  return usable, rejects, view_method


def _notes_text(rows: list[studies_lib.Row]) -> str:
  """The rows' clinical notes, each once, cleaned like a report ("" when there are none)."""
  notes = []
  for r in rows:
    note = " ".join((r.data.get("clinical_notes") or "").split())
    if note and note not in notes:
      notes.append(note)
  return text_lib.report_text(full_report="\n".join(notes)).text if notes else ""


def _describe(study: studies_lib.StudyRows, label_names: list[str], unlabelled: str) -> studies_lib.Described:
  off = study.study_key
  study_id = f"{study.patient_id}_{'undated' if off == 'undated' else f'{off:g}'}"
  rows_here = list(study.views.values())
  unknown = [r for r in rows_here if _has_unknown_finding(r)]
  out_rejects = []
  # An unlabelled study of a val patient cannot be evaluated and must not
  # train (the patient is held out), so it is rejected.
  keep_unlabelled = unlabelled == "train" and study.split == "train" and len(unknown) == len(rows_here)
  if not keep_unlabelled:
    out_rejects += [studies_lib.Reject(r.row_id, "unknown_label", f"finding {r.data['finding']!r}") for r in unknown]
    rows_here = [r for r in rows_here if r not in unknown]
  if not rows_here:
    return studies_lib.Described(study_id, rejects=tuple(out_rejects))
  cleaned = _notes_text(rows_here)
  if not cleaned:
    out_rejects += [
      studies_lib.Reject(r.row_id, "empty_report", f"study {study_id}: no clinical notes") for r in rows_here
    ]
    return studies_lib.Described(study_id, rejects=tuple(out_rejects))
  return studies_lib.Described(
    study_id,
    rows=tuple(rows_here),
    text=cleaned,
    labels=studies_lib.multi_hot(_known_findings(rows_here), label_names),
    rejects=tuple(out_rejects),
  )


def _plan_notes(view_method: collections.Counter, val_percent: float, unlabelled: str) -> dict:
  return {
    "views_decided_by": (
      "metadata 'view' column (PA/AP/AP Supine -> frontal, L -> lateral); blank or '?' "
      "views from the file name suffix, else from pixel content (frontal_score: bright "
      "central spine/mediastinum column between dark lung fields = frontal), else rejected"
    ),
    "view_decisions": dict(view_method),
    "study_definition": "(patientid, offset); undated rows of a patient form one study",
    "prior_definition": studies_lib.PRIOR_RULE,
    "text_source": "clinical_notes",
    "label_source": "finding, split on ',' and '/'",
    "split_rule": f"sha256(patientid) -> val {val_percent}%, rest train"
    + ("; studies without a known finding: train patients only" if unlabelled == "train" else ""),
    "unlabelled": unlabelled,
  }


def build_plan(
  input_dir: str, val_percent: float = 20.0, image_dir: str = "images", unlabelled: str = "reject"
) -> studies_lib.Plan:
  """Reads metadata.csv and returns the studies to write (see module docstring)."""
  if unlabelled not in UNLABELLED_POLICIES:
    raise ValueError(f"unlabelled={unlabelled!r}: expected one of {UNLABELLED_POLICIES}")
  rows = read_metadata(os.path.join(input_dir, "metadata.csv"))
  usable, rejects, view_method = _usable_rows(rows, os.path.join(input_dir, image_dir))
  label_names = sorted(_known_findings(usable))
  studies, assembly_rejects = studies_lib.assemble_studies(
    usable,
    lambda study: _describe(study, label_names, unlabelled),
    split_of=lambda pid: studies_lib.hash_split(pid, val_percent),
  )
  rejects.extend(assembly_rejects)
  return studies_lib.Plan(
    dataset="covid_cxr",
    input_rows=len(rows),
    row_unit="metadata.csv row",
    studies=studies,
    rejects=rejects,
    label_names=label_names,
    notes=_plan_notes(view_method, val_percent, unlabelled),
  )


if __name__ == "__main__":
  common.define_flags()
  flags.DEFINE_float("val_percent", 20.0, "Percent of patients in the val split.")
  flags.DEFINE_enum(
    "unlabelled",
    "reject",
    list(UNLABELLED_POLICIES),
    "Studies without a known finding: reject them, or keep them (with notes) for training.",
  )
  app.run(
    lambda argv: common.main_for(
      lambda d: build_plan(d, val_percent=flags.FLAGS.val_percent, unlabelled=flags.FLAGS.unlabelled)
    )(argv)
  )
