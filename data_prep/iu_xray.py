r"""Converts IU X-ray (Open-I, NLMCXR) reports + PNG images to ClinVLA records.

Inputs (under ``--input``; each can be overridden):

* reports: ``NLMCXR_reports.tgz`` or an extracted ``ecgen-radiology/`` folder of
  ``N.xml`` files (FINDINGS, IMPRESSION, MeSH major terms, parentImage ids);
* images: a folder searched recursively, in either layout
  - Open-I export: ``<parentImage id>.png`` (e.g. ``CXR54_IM-2145-1001.png``),
  - R2Gen layout: ``<study key>/<k>.png`` where ``k`` indexes the report's
    parentImage list in XML order;
* optional ``nlmcxr_dicom_metadata.csv.gz`` (DICOM "View Position" per image).

One record per report (a report is one study; IU has no patient timeline, so
prior views are always empty).  Input rows are reports; reports without any
image file are rejected as ``no_images``.

Views: the DICOM view tag is blank for ~35 % of images and wrong for some, and
the R2Gen order is not frontal-first, so each image gets a score

  frontal_score(pixels)                      (bright central spine column)
  + 0.05 if height/width < 1.1 else - 0.05    (Open-I laterals are portrait)
  + 0.05 / - 0.05 for a frontal / lateral DICOM tag
  + 0.02 for the first image in XML order     (tie-break only)

Within a report the highest-scoring image is the frontal view and the lowest
scoring of the others the lateral view if its score is negative; a single image
is frontal if its score is >= 0.  Further images are rejected as extra views.

Labels: first component of each MeSH major term ("Pulmonary Atelectasis/base/
right" -> "Pulmonary Atelectasis"), for terms in at least ``--min_label_count``
reports; "No Indexing" is not a label.

Usage:
  python -m data_prep.iu_xray --input=/path/to/iu_xray --output=OUT
"""

import collections
import csv
import gzip
import io
import os
import re
import tarfile
import xml.etree.ElementTree as ET

from absl import app
from absl import flags

from clinvla_jax.data import images as images_lib
from clinvla_jax.data import text as text_lib
from clinvla_jax.data import studies as studies_lib
from data_prep import common

_IMAGE_EXT = (".png", ".jpg", ".jpeg")
_UID_RE = re.compile(r"^CXR(\d+)_")
_NOT_LABELS = {"No Indexing"}


def _parse_report(data: bytes, name: str) -> dict:
  root = ET.fromstring(data)
  uid_el = root.find("uId")
  uid = uid_el.get("id") if uid_el is not None else "CXR" + os.path.splitext(os.path.basename(name))[0]
  sections = {(a.get("Label") or "").upper(): (a.text or "") for a in root.iter("AbstractText")}
  return {
    "uid": uid,
    "file": os.path.basename(name),
    "findings": sections.get("FINDINGS", ""),
    "impression": sections.get("IMPRESSION", ""),
    "mesh_major": [(m.text or "").strip() for m in root.iter("major") if (m.text or "").strip()],
    "images": [p.get("id") for p in root.findall("parentImage") if p.get("id")],
  }


def read_reports(path: str) -> list[dict]:
  """All reports from the tgz or an extracted folder, sorted by report number."""
  out = []
  if os.path.isdir(path):
    for root, _, files in os.walk(path):
      for fn in files:
        if fn.endswith(".xml"):
          with open(os.path.join(root, fn), "rb") as f:
            out.append(_parse_report(f.read(), fn))
  elif os.path.isfile(path):
    with tarfile.open(path) as tar:
      for m in tar:
        if m.isfile() and m.name.endswith(".xml"):
          out.append(_parse_report(tar.extractfile(m).read(), m.name))
  else:
    raise studies_lib.ConversionError(f"{path}: no IU reports (tgz or folder of XML) found")
  key = lambda r: int(re.sub(r"\D", "", r["file"]) or 0)
  return sorted(out, key=key)


def read_view_tags(path: str) -> dict[str, str]:
  if not path or not os.path.isfile(path):
    return {}
  opener = gzip.open if path.endswith(".gz") else open
  with opener(path, "rb") as f:
    reader = csv.DictReader(io.TextIOWrapper(f, encoding="utf-8"))
    return {r["imageid"]: r.get("View Position", "") for r in reader}


def find_images(image_dir: str, reports: list[dict]) -> tuple[dict[str, str], list[str]]:
  """Maps parentImage id -> file, over both layouts; returns unmatched files too."""
  by_uid = {r["uid"]: r for r in reports}
  known = {i for r in reports for i in r["images"]}
  found, orphans = {}, []
  for root, _, files in os.walk(image_dir):
    for fn in sorted(files):
      if not fn.lower().endswith(_IMAGE_EXT):
        continue
      path = os.path.join(root, fn)
      stem = os.path.splitext(fn)[0]
      if stem in known:
        found.setdefault(stem, path)
        continue
      folder = os.path.basename(root)
      m = _UID_RE.match(folder)
      if stem.isdigit() and m and f"CXR{m.group(1)}" in by_uid:
        ids = by_uid[f"CXR{m.group(1)}"]["images"]
        k = int(stem)
        if k < len(ids):
          found.setdefault(ids[k], path)
          continue
      orphans.append(path)
  return found, orphans


def _score(path: str, tag: str, first: bool) -> float:
  arr = images_lib.load_image(path)
  h, w = arr.shape
  s = images_lib.frontal_score(arr)
  s += 0.05 if h / w < 1.1 else -0.05
  tag_view = studies_lib.view_from_tag(tag)
  s += {"frontal": 0.05, "lateral": -0.05}.get(tag_view, 0.0)
  return s + (0.02 if first else 0.0)


def assign_views(paths: list[tuple[str, str]], tags: dict[str, str]):
  """[(image id, path)] in XML order -> (frontal, lateral, extras, problems, scores)."""
  scored, problems = [], []
  for k, (iid, path) in enumerate(paths):
    try:
      scored.append((_score(path, tags.get(iid, ""), k == 0), iid, path))
    except images_lib.ImageError as e:
      problems.append((iid, path, e.problem))
  frontal = lateral = None
  extras = []
  if scored:
    order = sorted(scored, key=lambda t: -t[0])
    if len(order) == 1:
      if order[0][0] >= 0:
        frontal = order[0]
      else:
        lateral = order[0]
    else:
      frontal = order[0]
      if order[-1][0] < 0:
        lateral = order[-1]
      extras = [t for t in order[1:] if t is not lateral]
  return frontal, lateral, extras, problems, {iid: s for s, iid, _ in scored}


def _default_reports_path(input_dir: str) -> str:
  return next(
    (
      p
      for p in (os.path.join(input_dir, "NLMCXR_reports.tgz"), os.path.join(input_dir, "ecgen-radiology"))
      if os.path.exists(p)
    ),
    os.path.join(input_dir, "NLMCXR_reports.tgz"),
  )


def _mesh_terms(report: dict) -> set[str]:
  return {m.split("/")[0].strip() for m in report["mesh_major"]}


def _label_names(reports: list[dict], min_label_count: int) -> list[str]:
  counts = collections.Counter(t for r in reports for t in _mesh_terms(r))
  return sorted(t for t, c in counts.items() if c >= min_label_count and t not in _NOT_LABELS)


def _count_decisions(frontal, lateral, extras, tags: dict[str, str], decisions: collections.Counter):
  for t in (frontal, lateral):
    if t is not None:
      tag_view = studies_lib.view_from_tag(tags.get(t[1], ""))
      decisions["agrees with DICOM tag" if tag_view else "no DICOM tag"] += 1
      if tag_view and tag_view != ("frontal" if t is frontal else "lateral"):
        decisions["overrode DICOM tag"] += 1
        decisions["agrees with DICOM tag"] -= 1
  decisions["extra images not used"] += len(extras)


def _report_study(
  r: dict,
  found: dict[str, str],
  tags: dict[str, str],
  label_names: list[str],
  val_percent: float,
  decisions: collections.Counter,
) -> studies_lib.Study | studies_lib.Reject:
  """The report's study, or why it is rejected; ``decisions`` counts the view choices of the study."""
  row_id = f"{r['file']} ({r['uid']})"
  paths = [(iid, found[iid]) for iid in r["images"] if iid in found]
  if not paths:
    why = "report lists no images" if not r["images"] else (f"no image file for {', '.join(r['images'])}")
    return studies_lib.Reject(row_id, "no_images", why)
  cleaned = text_lib.report_text(findings=r["findings"], impression=r["impression"]).text
  if not cleaned:
    return studies_lib.Reject(row_id, "empty_report", "no FINDINGS or IMPRESSION text")
  frontal, lateral, extras, problems, _ = assign_views(paths, tags)
  if frontal is None and lateral is None:
    return studies_lib.Reject(row_id, "bad_image", "; ".join(p for _, _, p in problems))
  _count_decisions(frontal, lateral, extras, tags, decisions)
  ref = lambda t: None if t is None else studies_lib.ViewRef(t[2], t[1], row_id)
  return studies_lib.Study(
    study_id=r["uid"],
    patient_id=r["uid"],
    split=studies_lib.hash_split(r["uid"], val_percent),
    text=cleaned,
    labels=studies_lib.multi_hot(_mesh_terms(r), label_names),
    views=(ref(frontal), ref(lateral), None, None),
    rows=(row_id,),
  )


def _plan_notes(
  decisions: collections.Counter,
  found: dict[str, str],
  orphans: list[str],
  image_dir: str,
  min_label_count: int,
  val_percent: float,
) -> dict:
  return {
    "views_decided_by": (
      "per image score = pixel frontal_score (bright central spine/mediastinum column) "
      "+/-0.05 aspect ratio (portrait = lateral) +/-0.05 DICOM View Position tag "
      "+0.02 first in XML order; per report the top score is frontal and the lowest "
      "other image is lateral if its score < 0; a lone image is frontal if score >= 0"
    ),
    "view_decisions": dict(decisions),
    "images_found": len(found),
    "image_files_not_matched": [os.path.relpath(p, image_dir) for p in orphans][:50],
    "label_source": f"MeSH major terms, first component, in >= {min_label_count} reports",
    "text_source": "FINDINGS + IMPRESSION",
    "split_rule": f"sha256(report uid) -> val {val_percent}%, rest train",
    "licence": "CC BY-NC-ND 4.0 (Indiana University / NLM Open-I)",
  }


def build_plan(
  input_dir: str,
  reports_path: str = "",
  image_dir: str = "",
  metadata_path: str = "",
  min_label_count: int = 20,
  val_percent: float = 20.0,
) -> studies_lib.Plan:
  reports_path = reports_path or _default_reports_path(input_dir)
  image_dir = image_dir or os.path.join(input_dir, "images")
  metadata_path = metadata_path or os.path.join(input_dir, "nlmcxr_dicom_metadata.csv.gz")
  reports = read_reports(reports_path)
  tags = read_view_tags(metadata_path)
  found, orphans = find_images(image_dir, reports) if os.path.isdir(image_dir) else ({}, [])
  label_names = _label_names(reports, min_label_count)

  studies, rejects = [], []
  decisions = collections.Counter()
  for r in reports:
    study = _report_study(r, found, tags, label_names, val_percent, decisions)
    if isinstance(study, studies_lib.Reject):
      rejects.append(study)
    else:
      studies.append(study)
  return studies_lib.Plan(
    dataset="iu_xray",
    input_rows=len(reports),
    row_unit="report (XML)",
    studies=studies,
    rejects=rejects,
    label_names=label_names,
    notes=_plan_notes(decisions, found, orphans, image_dir, min_label_count, val_percent),
  )


if __name__ == "__main__":
  common.define_flags()
  flags.DEFINE_string("reports", "", "NLMCXR_reports.tgz or ecgen-radiology/ (default: in --input).")
  flags.DEFINE_string("images", "", "Image folder (default: --input/images).")
  flags.DEFINE_string("metadata", "", "nlmcxr_dicom_metadata.csv.gz (optional).")
  flags.DEFINE_integer("min_label_count", 20, "Keep MeSH terms seen in at least this many reports.")
  flags.DEFINE_float("val_percent", 20.0, "Percent of reports in the val split.")
  app.run(
    lambda argv: common.main_for(
      lambda d: build_plan(
        d,
        flags.FLAGS.reports,
        flags.FLAGS.images,
        flags.FLAGS.metadata,
        flags.FLAGS.min_label_count,
        flags.FLAGS.val_percent,
      )
    )(argv)
  )
