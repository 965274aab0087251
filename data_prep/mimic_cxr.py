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
LL); the patient's previous study by (StudyDate, StudyTime) supplies the prior
frontal and lateral; ``prior_days`` is the time between them.  Text: FINDINGS +
IMPRESSION of the report, cleaned.  Splits: official ("validate" -> "val").
Input rows are the metadata rows (images); images not used as a current view
are rejected as ``extra_view`` / ``unknown_view``.

Usage:
  python -m data_prep.mimic_cxr --input=/data/mimic-cxr-jpg/2.0.0 --output=OUT
"""

import collections
import datetime
import math
import os

from absl import app
from absl import flags

from clinvla_jax.data import text as text_lib
from data_prep import common

LABELS = (
    "Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Enlarged Cardiomediastinum",
    "Fracture", "Lung Lesion", "Lung Opacity", "No Finding", "Pleural Effusion",
    "Pleural Other", "Pneumonia", "Pneumothorax", "Support Devices",
)
# Preference order within a study: a PA film is the better frontal when both exist.
_FRONTAL_RANK = {"PA": 0, "AP": 1}
_LATERAL_RANK = {"LATERAL": 0, "LL": 1}
_SPLITS = {"train": "train", "validate": "val", "val": "val", "test": "test"}


def _table(input_dir: str, stem: str) -> str:
  return common.find_first(os.path.join(input_dir, f"{stem}.csv.gz"),
                           os.path.join(input_dir, f"{stem}.csv"))


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


def build_plan(input_dir: str, reports_dir: str = "") -> common.Plan:
  reports_dir = reports_dir or input_dir
  meta = common.read_table(_table(input_dir, "mimic-cxr-2.0.0-metadata"))
  splits = {r["dicom_id"]: r["split"] for r in common.read_table(
      _table(input_dir, "mimic-cxr-2.0.0-split"))}
  labels = {(r["subject_id"], r["study_id"]): tuple(_label(r.get(n, "")) for n in LABELS)
            for r in common.read_table(_table(input_dir, "mimic-cxr-2.0.0-chexpert"))}
  rejects = []
  studies_rows = collections.defaultdict(list)
  seen = set()
  for r in meta:
    did, subj, stud = r["dicom_id"].strip(), r["subject_id"].strip(), r["study_id"].strip()
    row_id = f"dicom_id {did}"
    if did in seen:
      rejects.append(common.Reject(row_id, "duplicate_row", "dicom_id listed twice"))
      continue
    seen.add(did)
    studies_rows[(subj, stud)].append((row_id, r))

  def pick_views(items):
    frontal = sorted((it for it in items if it[1]["ViewPosition"].strip() in _FRONTAL_RANK),
                     key=lambda it: (_FRONTAL_RANK[it[1]["ViewPosition"].strip()], it[1]["dicom_id"]))
    lateral = sorted((it for it in items if it[1]["ViewPosition"].strip() in _LATERAL_RANK),
                     key=lambda it: (_LATERAL_RANK[it[1]["ViewPosition"].strip()], it[1]["dicom_id"]))
    return (frontal[0] if frontal else None), (lateral[0] if lateral else None)

  chosen = {k: pick_views(v) for k, v in studies_rows.items()}
  timeline = collections.defaultdict(list)
  for (subj, stud), items in studies_rows.items():
    t = _time(items[0][1])
    if t is not None:
      timeline[subj].append((t, stud))
  for subj in timeline:
    timeline[subj].sort()

  def ref(it, own):
    if it is None:
      return None
    row_id, r = it
    path = os.path.join(_study_dir(input_dir, r["subject_id"].strip(), r["study_id"].strip()),
                        f"{r['dicom_id'].strip()}.jpg")
    return common.ViewRef(path, r["dicom_id"].strip(), row_id if own else None)

  studies = []
  for (subj, stud) in sorted(studies_rows):
    items = studies_rows[(subj, stud)]
    frontal, lateral = chosen[(subj, stud)]
    used = [it for it in (frontal, lateral) if it is not None]
    for it in items:
      if it in used:
        continue
      vp = it[1]["ViewPosition"].strip()
      known = vp in _FRONTAL_RANK or vp in _LATERAL_RANK
      rejects.append(common.Reject(it[0], "extra_view" if known else "unknown_view",
                                   f"study s{stud}: ViewPosition {vp or '(blank)'}"
                                   + (" already covered" if known else " is not PA/AP/LATERAL/LL")))
    if not used:
      continue
    split = {_SPLITS.get(splits.get(it[1]["dicom_id"].strip(), ""), "") for it in used} - {""}
    if len(split) != 1:
      for it in used:
        rejects.append(common.Reject(it[0], "missing_metadata",
                                     f"study s{stud}: official split {sorted(split) or 'missing'}"))
      continue
    report_path = _study_dir(reports_dir, subj, stud) + ".txt"
    text = ""
    if os.path.isfile(report_path):
      with open(report_path, encoding="utf-8", errors="replace") as f:
        text = text_lib.report_text(full_report=f.read()).text
    if not text:
      why = "report file missing" if not os.path.isfile(report_path) else "no usable text"
      for it in used:
        rejects.append(common.Reject(it[0], "empty_report", f"{report_path}: {why}"))
      continue
    prior_f = prior_l = None
    prior_days = math.nan
    t = _time(items[0][1])
    if t is not None:
      earlier = [(pt, ps) for pt, ps in timeline[subj] if pt < t]
      if earlier:
        pt, ps = earlier[-1]
        prior_f, prior_l = chosen[(subj, ps)]
        prior_days = (t - pt).total_seconds() / 86400.0
    studies.append(common.Study(
        study_id=f"s{stud}", patient_id=f"p{subj}", split=split.pop(), text=text,
        labels=labels.get((subj, stud), (math.nan,) * len(LABELS)),
        views=(ref(frontal, True), ref(lateral, True), ref(prior_f, False), ref(prior_l, False)),
        rows=tuple(it[0] for it in used), prior_days=prior_days))
  notes = {
      "views_decided_by": "metadata ViewPosition (PA preferred over AP; LATERAL over LL)",
      "prior_definition": "previous study of the subject by StudyDate/StudyTime",
      "text_source": "FINDINGS + IMPRESSION of files/pXX/pSUBJECT/sSTUDY.txt",
      "split_rule": "official mimic-cxr-2.0.0-split (validate -> val)",
  }
  return common.Plan(dataset="mimic_cxr", input_rows=len(meta), row_unit="metadata row (image)",
                     studies=studies, rejects=rejects, label_names=list(LABELS), notes=notes)


if __name__ == "__main__":
  common.define_flags()
  flags.DEFINE_string("reports", "", "Root holding files/pXX/.../sSTUDY.txt (default: --input).")
  app.run(lambda argv: common.main_for(
      lambda d: build_plan(d, flags.FLAGS.reports))(argv))
