r"""Converts MIMIC-CXR-JPG 2.x to ClinVLA records (the paper's training data).

Input (``--input`` = the MIMIC-CXR-JPG root):

* ``mimic-cxr-2.0.0-metadata.csv(.gz)``: dicom_id, subject_id, study_id,
  ViewPosition, StudyDate, StudyTime, ...
* ``mimic-cxr-2.0.0-split.csv(.gz)``: official train / validate / test per image;
* ``mimic-cxr-2.0.0-chexpert.csv(.gz)``: 14 CheXpert labels per study;
* images ``files/pXX/pSUBJECT/sSTUDY/DICOM_ID.jpg``;
* reports ``files/pXX/pSUBJECT/sSTUDY.txt`` (from mimic-cxr-reports.zip; another
  root can be given with ``--reports``).

Per study: current frontal (PA preferred, then AP) and lateral (LATERAL, then
LL); the patient's previous study by (StudyDate, StudyTime) with a usable view
supplies the prior frontal and lateral (``studies_lib.PRIOR_RULE``); ``prior_days``
is the time between them.  Text: FINDINGS +
IMPRESSION of the report, cleaned.  Splits: official ("validate" -> "val").
Input rows are the metadata rows (images); images not used as a current view
are rejected as ``extra_view`` / ``unknown_view``.

Usage:
  python -m data_prep.mimic_cxr --input=/data/mimic-cxr-jpg/2.0.0 --output=OUT
"""

import datetime
import math
import os

from absl import app
from absl import flags

from clinvla_jax.data import text as text_lib
from clinvla_jax.data import studies as studies_lib
from data_prep import common

LABELS = (
  "Atelectasis",
  "Cardiomegaly",
  "Consolidation",
  "Edema",
  "Enlarged Cardiomediastinum",
  "Fracture",
  "Lung Lesion",
  "Lung Opacity",
  "No Finding",
  "Pleural Effusion",
  "Pleural Other",
  "Pneumonia",
  "Pneumothorax",
  "Support Devices",
)
# Preference order within a study: a PA film is the better frontal when both exist.
_FRONTAL_RANK = {"PA": 0, "AP": 1}
_LATERAL_RANK = {"LATERAL": 0, "LL": 1}
_SPLITS = {"train": "train", "validate": "val", "val": "val", "test": "test"}


def _table(input_dir: str, stem: str) -> str:
  return common.find_first(os.path.join(input_dir, f"{stem}.csv.gz"), os.path.join(input_dir, f"{stem}.csv"))


def _time(row: dict) -> datetime.datetime | None:
  date, tm = (row.get("StudyDate") or "").strip(), (row.get("StudyTime") or "0").strip()
  try:
    day = datetime.datetime.strptime(date[:8], "%Y%m%d")
  except ValueError:
    return None
  try:
    secs = float(tm)
  except ValueError:
    secs = 0.0
  hh, rest = divmod(int(secs), 10000)
  mm, ss = divmod(rest, 100)
  return day + datetime.timedelta(hours=hh, minutes=mm, seconds=ss)


def _study_dir(root: str, subject: str, study: str) -> str:
  return os.path.join(root, "files", f"p{subject[:2]}", f"p{subject}", f"s{study}")


def _label(raw: str) -> float:
  raw = (raw or "").strip()
  return math.nan if raw == "" else float(raw)


def build_plan(input_dir: str, reports_dir: str = "") -> studies_lib.Plan:
  reports_dir = reports_dir or input_dir
  meta = common.read_table(_table(input_dir, "mimic-cxr-2.0.0-metadata"))
  splits = {r["dicom_id"]: r["split"] for r in common.read_table(_table(input_dir, "mimic-cxr-2.0.0-split"))}
  labels = {
    (r["subject_id"], r["study_id"]): tuple(_label(r.get(n, "")) for n in LABELS)
    for r in common.read_table(_table(input_dir, "mimic-cxr-2.0.0-chexpert"))
  }
  rejects = []
  rows: list[studies_lib.Row] = []
  seen = set()
  epoch = datetime.datetime(1970, 1, 1)
  for r in meta:
    did, subj, stud = r["dicom_id"].strip(), r["subject_id"].strip(), r["study_id"].strip()
    row_id = f"dicom_id {did}"
    if did in seen:
      rejects.append(studies_lib.Reject(row_id, "duplicate_row", "dicom_id listed twice"))
      continue
    seen.add(did)
    vp = r["ViewPosition"].strip()
    view = "frontal" if vp in _FRONTAL_RANK else "lateral" if vp in _LATERAL_RANK else None
    t = _time(r)
    rows.append(
      studies_lib.Row(
        row_id=row_id,
        patient_id=f"p{subj}",
        study_key=f"s{stud}",
        view=view,
        path=os.path.join(_study_dir(input_dir, subj, stud), f"{did}.jpg"),
        image_id=did,
        # A PA film is the better frontal when both exist, LATERAL the better lateral.
        rank=({**_FRONTAL_RANK, **_LATERAL_RANK}.get(vp, 9), did),
        time=None if t is None else (t - epoch).total_seconds() / 86400.0,
        split=_SPLITS.get(splits.get(did, ""), ""),
        why_unknown=f"study s{stud}: ViewPosition {vp or '(blank)'} is not PA/AP/LATERAL/LL",
        data=r,
      )
    )

  def describe(study: studies_lib.StudyRows) -> studies_lib.Described:
    first = next(iter(study.views.values())).data
    subj, stud = first["subject_id"].strip(), first["study_id"].strip()
    used = tuple(study.views.values())
    report_path = _study_dir(reports_dir, subj, stud) + ".txt"
    text = ""
    if os.path.isfile(report_path):
      with open(report_path, encoding="utf-8", errors="replace") as f:
        text = text_lib.report_text(full_report=f.read()).text
    if not text:
      why = "report file missing" if not os.path.isfile(report_path) else "no usable text"
      return studies_lib.Described(
        study.study_key,
        rejects=tuple(studies_lib.Reject(r.row_id, "empty_report", f"{report_path}: {why}") for r in used),
      )
    return studies_lib.Described(
      study.study_key, rows=used, text=text, labels=labels.get((subj, stud), (math.nan,) * len(LABELS))
    )

  studies, assembly_rejects = studies_lib.assemble_studies(rows, describe)
  rejects.extend(assembly_rejects)
  notes = {
    "views_decided_by": "metadata ViewPosition (PA preferred over AP; LATERAL over LL)",
    "prior_definition": studies_lib.PRIOR_RULE + " (dates: StudyDate/StudyTime)",
    "text_source": "FINDINGS + IMPRESSION of files/pXX/pSUBJECT/sSTUDY.txt",
    "split_rule": "official mimic-cxr-2.0.0-split (validate -> val)",
  }
  return studies_lib.Plan(
    dataset="mimic_cxr",
    input_rows=len(meta),
    row_unit="metadata row (image)",
    studies=studies,
    rejects=rejects,
    label_names=list(LABELS),
    notes=notes,
  )


if __name__ == "__main__":
  common.define_flags()
  flags.DEFINE_string("reports", "", "Root holding files/pXX/.../sSTUDY.txt (default: --input).")
  app.run(lambda argv: common.main_for(lambda d: build_plan(d, flags.FLAGS.reports))(argv))
