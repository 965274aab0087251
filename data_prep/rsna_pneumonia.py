r"""Converts the RSNA Pneumonia Detection Challenge (stage 2) to ClinVLA records.

Input: ``--input`` holding ``stage_2_train_images/<patientId>.dcm`` (or any
folder given by ``--images``) and the label table ``stage_2_train_labels.csv``
(plain or ``.zip``; several rows per patient when there are several boxes).
``--test_list`` (one patientId per line, or a CSV with a ``patientId`` column)
names the evaluation images (e.g. the 3,000-image zero-shot list): those go to
split "test" and the rest to "train".

One record per patientId (the input row unit), image as current frontal
(RSNA images are frontal; DICOM rescale and MONOCHROME1 are applied), label
``Pneumonia`` = Target, empty text.

Usage:
  python -m data_prep.rsna_pneumonia --input=DIR --output=OUT [--test_list=FILE]
"""

import collections
import os

from absl import app
from absl import flags

from data_prep import common

LABELS = ("Pneumonia",)


def read_test_list(path: str) -> set[str]:
  if not path:
    return set()
  if not os.path.isfile(path):
    raise common.ConversionError(f"{path}: test list not found")
  with open(path, encoding="utf-8") as f:
    first = f.readline()
  if "patientId" in first:
    return {r["patientId"].strip() for r in common.read_table(path)}
  with open(path, encoding="utf-8") as f:
    return {os.path.splitext(os.path.basename(l.strip()))[0] for l in f if l.strip()}


def build_plan(input_dir: str, labels_csv: str = "", images: str = "", test_list: str = "") -> common.Plan:
  labels_csv = labels_csv or common.find_first(
    os.path.join(input_dir, "stage_2_train_labels.csv"),
    os.path.join(input_dir, "stage_2_train_labels.csv.zip"),
    os.path.join(input_dir, "kaggle_stage_2_train_labels.csv.zip"),
  )
  images = images or common.find_first(os.path.join(input_dir, "stage_2_train_images"), input_dir)
  rows = common.read_table(labels_csv)
  tests = read_test_list(test_list)
  by_patient = collections.OrderedDict()
  rejects = []
  for r in rows:
    pid = (r.get("patientId") or "").strip()
    by_patient.setdefault(pid, []).append(r)
  studies = []
  for pid, rs in by_patient.items():
    row_id = f"patientId {pid or '(blank)'}"
    targets = {(r.get("Target") or "").strip() for r in rs}
    if not pid:
      rejects.append(common.Reject(row_id, "missing_metadata", "blank patientId"))
      continue
    if not targets <= {"0", "1"} or len(targets) != 1:
      rejects.append(common.Reject(row_id, "unknown_label", f"Target values {sorted(targets)}"))
      continue
    path = os.path.join(images, f"{pid}.dcm")
    studies.append(
      common.Study(
        study_id=pid,
        patient_id=pid,
        split="test" if pid in tests else "train",
        text="",
        labels=(float(targets.pop()),),
        views=(common.ViewRef(path, pid, row_id), None, None, None),
        rows=(row_id,),
      )
    )
  missing_tests = sorted(tests - set(by_patient))
  notes = {
    "views_decided_by": "all RSNA images are frontal (PA/AP)",
    "label_rows": len(rows),
    "test_list": test_list or None,
    "test_ids_not_in_labels": missing_tests[:20],
    "num_test_ids_not_in_labels": len(missing_tests),
  }
  return common.Plan(
    dataset="rsna_pneumonia",
    input_rows=len(by_patient),
    row_unit="patientId",
    studies=studies,
    rejects=rejects,
    label_names=list(LABELS),
    notes=notes,
  )


if __name__ == "__main__":
  common.define_flags()
  flags.DEFINE_string("labels_csv", "", "stage_2_train_labels.csv(.zip) (default: in --input).")
  flags.DEFINE_string("images", "", "DICOM folder (default: --input/stage_2_train_images).")
  flags.DEFINE_string("test_list", "", "patientIds of the test split (optional).")
  app.run(
    lambda argv: common.main_for(
      lambda d: build_plan(d, flags.FLAGS.labels_csv, flags.FLAGS.images, flags.FLAGS.test_list), require_text=False
    )(argv)
  )
