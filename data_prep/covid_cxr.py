r"""Converts the covid-chestxray-dataset (ieee8023) layout to ClinVLA records.

Input: ``DIR/metadata.csv`` (patientid, offset, finding, view, filename,
clinical_notes, ...) and ``DIR/images/``.

* One record per study = (patient, ``offset``); rows of a patient with a blank
  offset form one undated study.
* The patient's previous dated study (largest smaller offset) supplies the prior
  frontal/lateral views; ``prior_days`` is the offset difference.
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

from clinvla_jax.data import text as text_lib
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
    raise common.ConversionError(f"{path}: metadata.csv not found")
  with open(path, newline="", encoding="utf-8") as f:
    rows = list(csv.DictReader(f))
  need = {"patientid", "offset", "finding", "view", "filename", "clinical_notes"}
  if rows and not need <= set(rows[0]):
    raise common.ConversionError(f"{path}: missing columns {sorted(need - set(rows[0]))}")
  return rows


UNLABELLED_POLICIES = ("reject", "train")


def build_plan(input_dir: str, val_percent: float = 20.0,
               image_dir: str = "images", unlabelled: str = "reject") -> common.Plan:
  """Reads metadata.csv and returns the studies to write (see module docstring)."""
  if unlabelled not in UNLABELLED_POLICIES:
    raise ValueError(f"unlabelled={unlabelled!r}: expected one of {UNLABELLED_POLICIES}")
  rows = read_metadata(os.path.join(input_dir, "metadata.csv"))
  img_root = os.path.join(input_dir, image_dir)
  rejects: list[common.Reject] = []
  view_method = collections.Counter()
  seen_files: dict[str, str] = {}
  usable = []  # (row_id, row, view) for rows that may serve as current or prior views

  for i, row in enumerate(rows, start=1):
    fn = row["filename"].strip()
    row_id = f"metadata.csv row {i} ({fn or 'no filename'})"
    pid = row["patientid"].strip()
    if not fn or not pid:
      rejects.append(common.Reject(row_id, "missing_metadata", "blank filename or patientid"))
      continue
    if fn in seen_files:
      rejects.append(common.Reject(row_id, "duplicate_row",
                                   f"image {fn} already listed under patient {seen_files[fn]}"))
      continue
    seen_files[fn] = pid
    path = os.path.join(img_root, fn)
    view = common.view_from_tag(row["view"])
    method = "metadata view tag"
    if view is None:
      view, method = _filename_view(fn), "file name"
    if view is None:
      try:
        view, score = common.content_view(path)
      except common.images_lib.ImageError as e:
        rejects.append(common.Reject(row_id, "bad_image", e.problem))
        continue
      method = "pixel content"
      if view is None:
        rejects.append(common.Reject(row_id, "unknown_view",
                                     f"view {row['view']!r} and pixels ambiguous "
                                     f"(frontal score {score:+.3f})"))
        continue
    view_method[method] += 1
    usable.append((row_id, row, view))

  label_names = sorted({p for _, r, _ in usable for p in _label_parts(r["finding"])
                        if p.lower() not in _UNKNOWN_FINDINGS})

  # Group into studies: (patient, offset); undated rows form one study per patient.
  groups: dict[tuple[str, object], list] = collections.defaultdict(list)
  for item in usable:
    _, row, _ = item
    off = _offset(row["offset"])
    groups[(row["patientid"].strip(), "undated" if off is None else off)].append(item)

  def views_of(items):
    """First frontal and first lateral (by file name) of a study, and the extras."""
    chosen, extras = {}, []
    for item in sorted(items, key=lambda it: it[1]["filename"]):
      if item[2] in chosen:
        extras.append(item)
      else:
        chosen[item[2]] = item
    return chosen, extras

  timeline = collections.defaultdict(list)
  for (pid, off), items in groups.items():
    if off != "undated":
      timeline[pid].append((off, items))
  for pid in timeline:
    timeline[pid].sort(key=lambda t: t[0])

  studies = []
  for (pid, off), items in sorted(groups.items(), key=lambda kv: (kv[0][0], str(kv[0][1]))):
    chosen, extras = views_of(items)
    study_id = f"{pid}_{'undated' if off == 'undated' else f'{off:g}'}"
    for row_id, row, view in extras:
      rejects.append(common.Reject(row_id, "extra_view",
                                   f"study {study_id} already has a {view} view "
                                   f"({chosen[view][1]['filename']})"))
    rows_here = [it for it in chosen.values()]
    unknown = [it for it in rows_here
               if not _label_parts(it[1]["finding"]) or
               any(p.lower() in _UNKNOWN_FINDINGS for p in _label_parts(it[1]["finding"]))]
    split = common.hash_split(pid, val_percent)
    # An unlabelled study of a val patient cannot be evaluated and must not
    # train (the patient is held out), so it is rejected as before.
    keep_unlabelled = unlabelled == "train" and split == "train" and len(unknown) == len(rows_here)
    if not keep_unlabelled:
      for row_id, row, _ in unknown:
        rejects.append(common.Reject(row_id, "unknown_label", f"finding {row['finding']!r}"))
      rows_here = [it for it in rows_here if it not in unknown]
    if not rows_here:
      continue
    notes = []
    for _, row, _ in rows_here:
      note = " ".join((row.get("clinical_notes") or "").split())
      if note and note not in notes:
        notes.append(note)
    cleaned = text_lib.report_text(full_report="\n".join(notes)).text if notes else ""
    if not cleaned:
      for row_id, _, _ in rows_here:
        rejects.append(common.Reject(row_id, "empty_report",
                                     f"study {study_id}: no clinical notes"))
      continue
    found = {p for _, row, _ in rows_here for p in _label_parts(row["finding"])
             if p.lower() not in _UNKNOWN_FINDINGS}

    # The prior study: the latest dated study of this patient before this one.
    prior_views, prior_days = {}, math.nan
    if off != "undated":
      earlier = [(o, it) for o, it in timeline[pid] if o < off]
      if earlier:
        p_off, p_items = earlier[-1]
        prior_views, _ = views_of(p_items)
        prior_days = float(off - p_off)

    def ref(item, owned):
      if item is None:
        return None
      row_id, row, _ = item
      return common.ViewRef(os.path.join(img_root, row["filename"].strip()),
                            row["filename"].strip(), row_id if owned else None)

    cur = {v: it for v, it in chosen.items() if it in rows_here}
    studies.append(common.Study(
        study_id=study_id, patient_id=pid,
        split=split, text=cleaned,
        labels=common.multi_hot(found, label_names),
        views=(ref(cur.get("frontal"), True), ref(cur.get("lateral"), True),
               ref(prior_views.get("frontal"), False), ref(prior_views.get("lateral"), False)),
        rows=tuple(it[0] for it in rows_here), prior_days=prior_days))

  notes = {
      "views_decided_by": (
          "metadata 'view' column (PA/AP/AP Supine -> frontal, L -> lateral); blank or '?' "
          "views from the file name suffix, else from pixel content (frontal_score: bright "
          "central spine/mediastinum column between dark lung fields = frontal), else rejected"),
      "view_decisions": dict(view_method),
      "study_definition": "(patientid, offset); undated rows of a patient form one study",
      "prior_definition": "latest earlier dated study of the same patient",
      "text_source": "clinical_notes",
      "label_source": "finding, split on ',' and '/'",
      "split_rule": f"sha256(patientid) -> val {val_percent}%, rest train"
                    + ("; studies without a known finding: train patients only" if unlabelled == "train" else ""),
      "unlabelled": unlabelled,
  }
  return common.Plan(dataset="covid_cxr", input_rows=len(rows), row_unit="metadata.csv row",
                     studies=studies, rejects=rejects, label_names=label_names, notes=notes)


if __name__ == "__main__":
  common.define_flags()
  flags.DEFINE_float("val_percent", 20.0, "Percent of patients in the val split.")
  flags.DEFINE_enum("unlabelled", "reject", list(UNLABELLED_POLICIES),
                    "Studies without a known finding: reject them, or keep them (with notes) for training.")
  app.run(lambda argv: common.main_for(
      lambda d: build_plan(d, val_percent=flags.FLAGS.val_percent, unlabelled=flags.FLAGS.unlabelled))(argv))
