r"""Converts the RSNA Pneumonia Detection Challenge (stage 2) to ClinVLA records.

Input: ``--input`` holding ``stage_2_train_images/<patientId>.dcm`` (or any
folder given by ``--images``) and the label table ``stage_2_train_labels.csv``
(plain or ``.zip``; several rows per patient when there are several boxes).
``--test_list`` names the evaluation images: those go to split "test" and the
rest to "train".  It is ALTA's list format (``test_list.txt`` /
``val_list.txt``: ``<folder>/<patientId>.dcm <label>`` a line), a patientId a
line, or a CSV with a ``patientId`` column.  A listed image with a label that
the label table lacks (the published 3,000-image test list names
``stage_2_test_images``, which have no public labels) is read from
``--input/<folder>/<patientId>.dcm`` with the list's label; a listed label
that contradicts the table rejects the image (``label_conflict``).

One record per patientId (the input row unit), image as current frontal
(RSNA images are frontal; DICOM rescale and MONOCHROME1 are applied, or ALTA's
scaling with ``--dicom_scaling=alta``), label ``Pneumonia`` = Target, empty
text.

Usage:
  python -m data_prep.rsna_pneumonia --input=DIR --output=OUT [--test_list=FILE]
"""

import collections
import os

from absl import app
from absl import flags

from clinvla_jax.evaluate import lists
from clinvla_jax import files
from clinvla_jax.data import studies as studies_lib
from data_prep import common

LABELS = ("Pneumonia",)


def read_test_list(path: str) -> dict[str, lists.ListEntry]:
  """{patientId: the list's entry (its name and, where given, its Pneumonia label)}, in list order."""
  if not path:
    return {}
  try:
    published = lists.read_list(path, "rsna")
  except lists.ListError as e:
    raise studies_lib.ConversionError(str(e)) from e
  return {e.key: e for e in published.entries}


def _rows_by_patient(rows: list[dict[str, str]]) -> collections.OrderedDict:
  """{patientId: its rows}, in table order: the table has one row per box."""
  by_patient = collections.OrderedDict()
  for r in rows:
    pid = (r.get("patientId") or "").strip()
    by_patient.setdefault(pid, []).append(r)
  return by_patient


def _study(pid: str, path: str, label: float, row_id: str, tests: dict[str, lists.ListEntry]) -> studies_lib.Study:
  return studies_lib.Study(
    study_id=pid,
    patient_id=pid,
    split="test" if pid in tests else "train",
    text="",
    labels=(label,),
    views=(studies_lib.ViewRef(path, pid, row_id), None, None, None),
    rows=(row_id,),
  )


def _patient_target(
  pid: str, rs: list[dict[str, str]], row_id: str, tests: dict[str, lists.ListEntry], labels_csv: str, test_list: str
) -> float | studies_lib.Reject:
  """The patient's Target, or why the patient is rejected."""
  targets = {(r.get("Target") or "").strip() for r in rs}
  if not pid:
    return studies_lib.Reject(row_id, "missing_metadata", "blank patientId")
  if not targets <= {"0", "1"} or len(targets) != 1:
    return studies_lib.Reject(row_id, "unknown_label", f"Target values {sorted(targets)}")
  target = float(targets.pop())
  listed = tests[pid].labels.get("Pneumonia") if pid in tests else None
  if listed is not None and listed != target:
    detail = f"Target {target:g} in {os.path.basename(labels_csv)}, {listed:g} in {test_list}"
    return studies_lib.Reject(row_id, "label_conflict", detail)
  return target


def _table_studies(
  by_patient: collections.OrderedDict,
  tests: dict[str, lists.ListEntry],
  images: str,
  labels_csv: str,
  test_list: str,
) -> tuple[list[studies_lib.Study], list[studies_lib.Reject]]:
  studies, rejects = [], []
  for pid, rs in by_patient.items():
    row_id = f"patientId {pid or '(blank)'}"
    target = _patient_target(pid, rs, row_id, tests, labels_csv, test_list)
    if isinstance(target, studies_lib.Reject):
      rejects.append(target)
      continue
    studies.append(_study(pid, os.path.join(images, f"{pid}.dcm"), target, row_id, tests))
  return studies, rejects


def _list_only_studies(
  list_only: list[lists.ListEntry], tests: dict[str, lists.ListEntry], input_dir: str, images: str, test_list: str
) -> tuple[list[studies_lib.Study], list[studies_lib.Reject]]:
  studies, rejects = [], []
  for e in list_only:
    row_id = f"{os.path.basename(test_list)}: {e.name}"
    if e.labels["Pneumonia"] not in (0.0, 1.0):
      rejects.append(studies_lib.Reject(row_id, "unknown_label", f"label {e.labels['Pneumonia']:g}"))
      continue
    parts = e.name.replace("\\", "/").split("/")
    path = common.find_first(
      os.path.join(input_dir, *parts),
      os.path.join(os.path.dirname(os.path.abspath(input_dir)), *parts),
      os.path.join(images, f"{e.key}.dcm"),
    )
    studies.append(_study(e.key, path, e.labels["Pneumonia"], row_id, tests))
  return studies, rejects


def _plan_notes(num_label_rows: int, test_list: str, missing_tests: list[str], num_list_only: int) -> dict:
  notes = {
    "views_decided_by": "all RSNA images are frontal (PA/AP)",
    "label_rows": num_label_rows,
    "test_list": test_list or None,
    "test_ids_not_in_labels": missing_tests[:20],
    "num_test_ids_not_in_labels": len(missing_tests),
  }
  if test_list:
    notes.update(
      selection="published_list",
      selection_split="test",
      list_sha256=files.sha256_file(test_list),
      test_labels_from_list=num_list_only,
    )
  return notes


def build_plan(input_dir: str, labels_csv: str = "", images: str = "", test_list: str = "") -> studies_lib.Plan:
  labels_csv = labels_csv or common.find_first(
    os.path.join(input_dir, "stage_2_train_labels.csv"),
    os.path.join(input_dir, "stage_2_train_labels.csv.zip"),
    os.path.join(input_dir, "kaggle_stage_2_train_labels.csv.zip"),
  )
  images = images or common.find_first(os.path.join(input_dir, "stage_2_train_images"), input_dir)
  rows = common.read_table(labels_csv)
  tests = read_test_list(test_list)
  by_patient = _rows_by_patient(rows)
  studies, rejects = _table_studies(by_patient, tests, images, labels_csv, test_list)
  # Listed images the table lacks, with the list's label (the published test list's stage_2_test_images).
  list_only = [e for pid, e in tests.items() if pid not in by_patient and "Pneumonia" in e.labels]
  listed_studies, listed_rejects = _list_only_studies(list_only, tests, input_dir, images, test_list)
  studies += listed_studies
  rejects += listed_rejects
  missing_tests = sorted(set(tests) - set(by_patient) - {e.key for e in list_only})
  return studies_lib.Plan(
    dataset="rsna_pneumonia",
    input_rows=len(by_patient) + len(list_only),
    row_unit="patientId",
    studies=studies,
    rejects=rejects,
    label_names=list(LABELS),
    notes=_plan_notes(len(rows), test_list, missing_tests, len(list_only)),
  )


if __name__ == "__main__":
  common.define_flags()
  flags.DEFINE_string("labels_csv", "", "stage_2_train_labels.csv(.zip) (default: in --input).")
  flags.DEFINE_string("images", "", "DICOM folder (default: --input/stage_2_train_images).")
  flags.DEFINE_string("test_list", "", "Images of the test split, e.g. the published test_list.txt (optional).")
  app.run(
    lambda argv: common.main_for(
      lambda d: build_plan(d, flags.FLAGS.labels_csv, flags.FLAGS.images, flags.FLAGS.test_list), require_text=False
    )(argv)
  )
