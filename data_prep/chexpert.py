r"""Converts CheXpert (v1.0 layout) to ClinVLA records, including the 5x200 / 8x200 sets.

Input: the folder holding ``train.csv`` / ``valid.csv`` and the images; CSV paths
such as ``CheXpert-v1.0-small/train/patient00001/study1/view1_frontal.jpg`` are
resolved against ``--input``, its parent, or with the first component dropped.
CheXpert has no public report text, so records carry empty text (evaluation
uses class prompts).

Modes (``--mode``):

* ``studies``: one record per study (train.csv -> train, valid.csv -> val),
  current frontal + lateral; the patient's previous study number gives the prior
  views.  Input rows are image rows of the CSVs.
* ``5x200``: the CheXpert 5x200 zero-shot / retrieval set, split "5x200".
  With ``--list_csv`` (the published list, e.g. GLoRIA's ``chexpert_5x200.csv``,
  whose numbers compare with the papers'): its images and labels, each row
  positive for exactly one of the five classes.  Without: a set built by a
  seeded rule from ``train.csv`` (manifest notes ``selection: seeded_rule``):
  frontal images; for each of Atelectasis, Cardiomegaly, Consolidation, Edema,
  Pleural Effusion, rows where that label is 1 and the 13 other labels are 0
  (blank counts as 0, uncertain -1 excluded); ``--per_class`` (200) per class
  drawn with ``--seed``.  Input rows are the selected images.
* ``list``: the images of a published list (``--list_csv``), e.g. the 8x200
  ``candidate.csv`` / ``query.csv`` or a 5x200 CSV; one record per row, split
  named by ``--split_name``.

Labels: the 14 CheXpert columns (1, 0, -1 uncertain, NaN blank).  For list rows
that only name a class (``Variable`` column), that class is 1, the rest NaN.

Usage:
  python -m data_prep.chexpert --input=DIR --output=OUT --mode=5x200 --list_csv=chexpert_5x200.csv
"""

import math
import os
import re

from absl import app
from absl import flags
import numpy as np

from clinvla_jax import files
from clinvla_jax.data import studies as studies_lib
from data_prep import common

LABELS = (
  "No Finding",
  "Enlarged Cardiomediastinum",
  "Cardiomegaly",
  "Lung Opacity",
  "Lung Lesion",
  "Edema",
  "Consolidation",
  "Pneumonia",
  "Atelectasis",
  "Pneumothorax",
  "Pleural Effusion",
  "Pleural Other",
  "Fracture",
  "Support Devices",
)
CLASSES_5X200 = ("Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Pleural Effusion")
_STUDY_RE = re.compile(r"(patient\d+)/study(\d+)/")


def label_value(raw: str) -> float:
  raw = (raw or "").strip()
  return math.nan if raw == "" else float(raw)


def is_5x200_row(row: dict, cls: str) -> bool:
  """The 5x200 rule for one class (blank counts as 0, any -1 excludes)."""
  if (row.get("Frontal/Lateral") or "").strip() != "Frontal":
    return False
  for name in LABELS:
    v = label_value(row.get(name, ""))
    v = 0.0 if math.isnan(v) else v
    if v != (1.0 if name == cls else 0.0):
      return False
  return True


def select_5x200(
  rows: list[dict], seed: int = 0, per_class: int = 200, classes=CLASSES_5X200
) -> list[tuple[str, dict]]:
  """[(class, row)] sorted by class then path; deterministic given ``seed``."""
  rng = np.random.default_rng(seed)
  out = []
  for cls in classes:
    pool = sorted((r for r in rows if is_5x200_row(r, cls)), key=lambda r: r["Path"])
    if len(pool) < per_class:
      raise studies_lib.ConversionError(f"5x200: only {len(pool)} rows qualify for {cls}")
    pick = sorted(rng.choice(len(pool), per_class, replace=False).tolist())
    out.extend((cls, pool[i]) for i in pick)
  return out


def resolve(input_dir: str, rel: str) -> str:
  parts = rel.replace("\\", "/").split("/")
  return common.find_first(
    os.path.join(input_dir, *parts),
    os.path.join(os.path.dirname(os.path.abspath(input_dir)), *parts),
    os.path.join(input_dir, *parts[1:]),
  )


def _labels(row: dict) -> tuple[float, ...]:
  if any(name in row for name in LABELS):
    return tuple(label_value(row.get(name, "")) for name in LABELS)
  cls = (row.get("Variable") or "").strip()
  return tuple(1.0 if name == cls else math.nan for name in LABELS)


def _patient(path: str) -> str:
  m = _STUDY_RE.search(path)
  return m.group(1) if m else path


def _single_image_plan(input_dir, items, split, row_unit, notes) -> studies_lib.Plan:
  studies = []
  for row_id, row in items:
    path = row["Path"]
    studies.append(
      studies_lib.Study(
        study_id=path,
        patient_id=_patient(path),
        split=split,
        text="",
        labels=_labels(row),
        views=(studies_lib.ViewRef(resolve(input_dir, path), path, row_id), None, None, None),
        rows=(row_id,),
      )
    )
  return studies_lib.Plan(
    dataset="chexpert",
    input_rows=len(items),
    row_unit=row_unit,
    studies=studies,
    rejects=[],
    label_names=list(LABELS),
    notes=notes,
  )


def plan_5x200(
  input_dir: str, labels_csv: str = "", seed: int = 0, per_class: int = 200, list_csv: str = ""
) -> studies_lib.Plan:
  if list_csv:
    plan = plan_list(input_dir, list_csv, "5x200")
    for study in plan.studies:
      positive = [c for c in CLASSES_5X200 if study.labels[LABELS.index(c)] == 1.0]
      if len(positive) != 1:
        raise studies_lib.ConversionError(
          f"{list_csv}: {study.study_id} is positive for {positive or 'none'} of {', '.join(CLASSES_5X200)}; "
          "a 5x200 list has exactly one per image"
        )
    plan.notes["classes"] = list(CLASSES_5X200)
    return plan
  labels_csv = labels_csv or os.path.join(input_dir, "train.csv")
  rows = common.read_table(labels_csv)
  chosen = select_5x200(rows, seed, per_class)
  items = [(f"{os.path.basename(labels_csv)}: {row['Path']}", row) for _, row in chosen]
  notes = {
    # Not the published list: numbers on this set do not compare with the papers'.
    "selection": "seeded_rule",
    "selection_detail": f"5x200 rule, seed {seed}, {per_class} per class from {len(rows)} rows",
    "classes": list(CLASSES_5X200),
    "views_decided_by": "Frontal/Lateral column",
  }
  return _single_image_plan(input_dir, items, "5x200", "selected image", notes)


def plan_list(input_dir: str, list_csv: str, split_name: str = "") -> studies_lib.Plan:
  rows = common.read_table(list_csv)
  if rows and "Path" not in rows[0]:
    raise studies_lib.ConversionError(f"{list_csv}: no Path column (text queries need no conversion)")
  split = split_name or os.path.splitext(os.path.basename(list_csv))[0]
  items = [(f"{os.path.basename(list_csv)} row {i}: {r['Path']}", r) for i, r in enumerate(rows, start=1)]
  notes = {
    "selection": "published_list",
    "selection_detail": f"published list {list_csv}",
    "list": list_csv,
    "list_sha256": files.sha256_file(list_csv),
    "views_decided_by": "list (frontal images)",
  }
  return _single_image_plan(input_dir, items, split, "list row", notes)


def plan_studies(input_dir: str) -> studies_lib.Plan:
  tables = [("train.csv", "train"), ("valid.csv", "val")]
  rows, rejects = [], []
  for name, split in tables:
    path = os.path.join(input_dir, name)
    if os.path.exists(path):
      rows.extend((f"{name}: {r['Path']}", r, split) for r in common.read_table(path))
  if not rows:
    raise studies_lib.ConversionError(f"{input_dir}: neither train.csv nor valid.csv found")
  mapped: list[studies_lib.Row] = []
  for row_id, row, split in rows:
    m = _STUDY_RE.search(row["Path"])
    if not m:
      rejects.append(studies_lib.Reject(row_id, "missing_metadata", "path has no patient/study"))
      continue
    fl = (row.get("Frontal/Lateral") or "").strip().lower()
    num = int(m.group(2))
    mapped.append(
      studies_lib.Row(
        row_id=row_id,
        patient_id=m.group(1),
        study_key=num,
        view=fl if fl in ("frontal", "lateral") else None,
        path=resolve(input_dir, row["Path"]),
        image_id=row["Path"],
        rank=row["Path"],
        time=num,
        split=split,
        why_unknown=f"Frontal/Lateral={fl!r}",
        data=row,
      )
    )

  def describe(study: studies_lib.StudyRows) -> studies_lib.Described:
    used = tuple(study.views.values())
    return studies_lib.Described(
      f"{study.patient_id}/study{study.study_key}", rows=used, text="", labels=_labels(used[0].data)
    )

  # Study numbers order a patient's studies but are not dates.
  studies, assembly_rejects = studies_lib.assemble_studies(mapped, describe, time_in_days=False)
  rejects.extend(assembly_rejects)
  notes = {
    "views_decided_by": "Frontal/Lateral column",
    "prior_definition": studies_lib.PRIOR_RULE + " (study numbers order the studies; no dates)",
  }
  return studies_lib.Plan(
    dataset="chexpert",
    input_rows=len(rows),
    row_unit="image row",
    studies=studies,
    rejects=rejects,
    label_names=list(LABELS),
    notes=notes,
  )


def build_plan(input_dir: str, mode: str = "studies", **kw) -> studies_lib.Plan:
  if mode == "studies":
    return plan_studies(input_dir)
  if mode == "5x200":
    return plan_5x200(input_dir, **kw)
  if mode == "list":
    return plan_list(input_dir, **kw)
  raise studies_lib.ConversionError(f"unknown mode {mode!r}")


def _main(argv):
  f = flags.FLAGS
  kw = {}
  if f.mode == "5x200":
    kw = dict(labels_csv=f.labels_csv, seed=f.seed, per_class=f.per_class, list_csv=f.list_csv)
  elif f.mode == "list":
    if not f.list_csv:
      raise app.UsageError("--mode=list needs --list_csv")
    kw = dict(list_csv=f.list_csv, split_name=f.split_name)
  common.main_for(lambda d: build_plan(d, f.mode, **kw), require_text=False)(argv)


if __name__ == "__main__":
  common.define_flags()
  flags.DEFINE_enum("mode", "studies", ["studies", "5x200", "list"], "What to convert.")
  flags.DEFINE_string("labels_csv", "", "Label table for 5x200 (default --input/train.csv).")
  flags.DEFINE_integer("seed", 0, "Seed of the 5x200 draw.")
  flags.DEFINE_integer("per_class", 200, "Images per class in 5x200.")
  flags.DEFINE_string(
    "list_csv", "", "Published list: the images of --mode=list, or of --mode=5x200 instead of the seeded rule."
  )
  flags.DEFINE_string("split_name", "", "Split name for --mode=list (default: list file stem).")
  app.run(_main)
