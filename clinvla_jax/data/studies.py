"""What a converter produces: typed input rows, studies, rejects, and the one study assembly every dataset shares.

A converter reads its dataset's official layout and maps each input image to a ``Row``; ``assemble_studies`` groups
rows into studies, chooses the views, assigns splits and links prior studies (one rule for every dataset,
``PRIOR_RULE``), asking the converter's ``describe`` callback for each study's id, text and labels. The result, with
the rows rejected while planning, is a ``Plan``, which ``clinvla_jax.data.writer.run`` turns into shards.

The search index (``clinvla_jax.search``) builds its studies from a plain folder of images with the same rows and
assembly, so an archive and a converted dataset follow the same prior rule.
"""

import collections
import dataclasses
import hashlib
import math
from typing import Any, Callable, Iterable, Optional, Sequence

from clinvla_jax.data import images as images_lib


class ConversionError(RuntimeError):
  """The conversion cannot start or continue (bad input directory, output clash)."""


@dataclasses.dataclass(frozen=True)
class Reject:
  row: str  # the input row/file it concerns, as the user would find it
  reason: str  # short code, e.g. "bad_image", "empty_report", "unknown_label"
  detail: str = ""


@dataclasses.dataclass(frozen=True)
class ViewRef:
  path: str
  image_id: str
  row: Optional[str] = None  # input row this image came from (None for priors)


@dataclasses.dataclass(frozen=True)
class Study:
  """One record to write, before images are loaded and text tokenised."""

  study_id: str
  patient_id: str
  split: str
  text: str  # cleaned report text (before truncation)
  labels: tuple[float, ...]
  views: tuple[Optional[ViewRef], ...]  # one per schema.VIEW_NAMES entry
  rows: tuple[str, ...]  # input rows this record accounts for
  prior_days: float = math.nan


@dataclasses.dataclass
class Plan:
  dataset: str
  input_rows: int  # what "rows" means is in row_unit
  row_unit: str
  studies: list[Study]
  rejects: list[Reject]  # rows rejected while planning
  label_names: list[str]
  notes: dict[str, Any] = dataclasses.field(default_factory=dict)  # e.g. how views were decided


@dataclasses.dataclass(frozen=True)
class Row:
  """One input image as a converter maps it; ``assemble_studies`` does the rest.

  Attributes:
    row_id: the input row as the user finds it (rejects.csv names it).
    patient_id: the patient.
    study_key: the study within the patient (any hashable; rows sharing it form
      one study).
    view: "frontal" or "lateral"; None is rejected as ``unknown_view``.
    path: the image file.
    image_id: the source's id of the image.
    rank: sort key among the rows of one view of one study; the lowest is used,
      the others are rejected as ``extra_view``.
    time: when the study was taken (any number that orders studies; None:
      undated, which neither has nor is a prior).
    split: the source's split of this row; None lets ``split_of`` decide.
    why_unknown: detail for an ``unknown_view`` reject.
    data: the converter's own fields (CSV row, ...), untouched.
  """

  row_id: str
  patient_id: str
  study_key: Any
  view: Optional[str]
  path: str
  image_id: str
  rank: Any = ()
  time: Optional[float] = None
  split: Optional[str] = None
  why_unknown: str = ""
  data: Any = None


@dataclasses.dataclass(frozen=True)
class StudyRows:
  """One study after view choice: what ``describe`` sees."""

  patient_id: str
  study_key: Any
  split: str
  views: dict[str, Row]  # "frontal" / "lateral" -> the chosen row
  time: Optional[float]


@dataclasses.dataclass(frozen=True)
class Described:
  """``describe``'s answer: the study to write, or why its rows are rejected.

  ``rows`` are the chosen rows kept as current views (the others must be in
  ``rejects``); an empty ``rows`` writes nothing.
  """

  study_id: str
  rows: tuple[Row, ...] = ()
  text: str = ""
  labels: tuple[float, ...] = ()
  rejects: tuple[Reject, ...] = ()


PRIOR_RULE = (
  "the prior is the latest earlier dated study of the same patient in the same split that has "
  "at least one usable frontal or lateral view, whether or not that study is written itself"
)


def assemble_studies(
  rows: Sequence[Row],
  describe: Callable[[StudyRows], Described],
  *,
  split_of: Optional[Callable[[str], str]] = None,
  time_in_days: bool = True,
) -> tuple[list[Study], list[Reject]]:
  """Groups rows into studies, chooses views, assigns splits and links priors.

  Rules, the same for every converter:

  * a study is the rows sharing (patient_id, study_key); per view the row of
    lowest ``rank`` is used, the others are rejected as ``extra_view``, rows
    without a view as ``unknown_view``;
  * split: ``split_of(patient_id)`` when given (every study of a patient in one
    split), else the rows' own split, which the chosen rows must agree on
    (otherwise they are rejected as ``missing_metadata``);
  * prior: see ``PRIOR_RULE``; ``prior_days`` is the time difference when
    ``time_in_days``, else NaN;
  * ``describe`` gives each study its id, text and labels and may reject rows.

  Returns:
    (studies sorted by patient and study key, rejects); every row is in
    exactly one of them.
  """
  rejects: list[Reject] = []
  groups = _group_rows(rows, rejects)
  order = sorted(groups, key=lambda k: (k[0], str(k[1])))
  chosen: dict[tuple[str, Any], StudyRows] = {}
  for key in order:
    study = _choose_views(key, groups[key], split_of, rejects)
    if study is not None:
      chosen[key] = study
  timelines = _dated_timelines(chosen.values())
  out: list[Study] = []
  for key in order:
    s = chosen.get(key)
    if s is None:
      continue
    d = describe(s)
    rejects.extend(d.rejects)
    if d.rows:
      out.append(_study_of(s, d, _prior_of(s, timelines), time_in_days))
  return out, rejects


def _group_rows(rows: Sequence[Row], rejects: list[Reject]) -> dict[tuple[str, Any], list[Row]]:
  """Rows per (patient, study key); rows without a usable view go to ``rejects``."""
  groups: dict[tuple[str, Any], list[Row]] = collections.defaultdict(list)
  for row in rows:
    if row.view not in ("frontal", "lateral"):
      rejects.append(Reject(row.row_id, "unknown_view", row.why_unknown or f"view {row.view!r}"))
      continue
    groups[(row.patient_id, row.study_key)].append(row)
  return groups


def _choose_views(
  key: tuple[str, Any], rows: list[Row], split_of: Optional[Callable[[str], str]], rejects: list[Reject]
) -> Optional[StudyRows]:
  """One row per view (the lowest rank) and the study's split; None when the rows disagree on the split."""
  views: dict[str, Row] = {}
  for row in sorted(rows, key=lambda r: r.rank):
    if row.view in views:
      rejects.append(
        Reject(row.row_id, "extra_view", f"study {key[1]} already has a {row.view} view ({views[row.view].image_id})")
      )
    else:
      views[row.view] = row
  used = list(views.values())
  if split_of is not None:
    split = split_of(key[0])
  else:
    splits = {r.split for r in used} - {None, ""}
    if len(splits) != 1:
      rejects.extend(
        Reject(r.row_id, "missing_metadata", f"study {key[1]}: split {sorted(splits) or 'missing'}") for r in used
      )
      return None
    split = splits.pop()
  times = {r.time for r in used}
  return StudyRows(key[0], key[1], split, views, times.pop() if len(times) == 1 else None)


def _dated_timelines(studies: Iterable[StudyRows]) -> dict[tuple[str, str], list[StudyRows]]:
  """The dated studies of each (patient, split), oldest first: where priors are looked up."""
  timelines: dict[tuple[str, str], list[StudyRows]] = collections.defaultdict(list)
  for s in studies:
    if s.time is not None:
      timelines[(s.patient_id, s.split)].append(s)
  for studies_of in timelines.values():
    studies_of.sort(key=lambda s: s.time)
  return timelines


def _prior_of(study: StudyRows, timelines: dict[tuple[str, str], list[StudyRows]]) -> Optional[StudyRows]:
  """``PRIOR_RULE``: the latest earlier dated study of the same patient and split."""
  if study.time is None:
    return None
  earlier = [p for p in timelines[(study.patient_id, study.split)] if p.time < study.time]
  return earlier[-1] if earlier else None


def _study_of(s: StudyRows, d: Described, prior: Optional[StudyRows], time_in_days: bool) -> Study:
  """The record to write: the described current views, then the prior's (which belong to another study's rows)."""
  prior_days = float(s.time - prior.time) if prior is not None and time_in_days else math.nan
  current = {r.view: r for r in d.rows}
  pv = prior.views if prior is not None else {}

  def ref(row: Optional[Row], own: bool) -> Optional[ViewRef]:
    return None if row is None else ViewRef(row.path, row.image_id, row.row_id if own else None)

  return Study(
    study_id=d.study_id,
    patient_id=s.patient_id,
    split=s.split,
    text=d.text,
    labels=d.labels,
    views=(
      ref(current.get("frontal"), True),
      ref(current.get("lateral"), True),
      ref(pv.get("frontal"), False),
      ref(pv.get("lateral"), False),
    ),
    rows=tuple(r.row_id for r in d.rows),
    prior_days=prior_days,
  )


# --- view tags, splits and labels ------------------------------------------------------------

_FRONTAL_TAGS = {
  "PA",
  "AP",
  "AP SUPINE",
  "AP ERECT",
  "AP SEMI ERECT",
  "AP AXIAL",
  "POSTERO_ANTERIOR",
  "ANTERO_POSTERIOR",
  "PA ERECT",
  "FRONTAL",
}
_LATERAL_TAGS = {"L", "LL", "RL", "LAT", "LATERAL", "LARGE LATERAL", "LEFT LATERAL", "RIGHT LATERAL", "LLD", "RLD"}


def view_from_tag(tag: Optional[str]) -> Optional[str]:
  """ "frontal" / "lateral" from a DICOM-style view tag, None if unknown."""
  t = " ".join((tag or "").replace("-", " ").upper().split())
  if t in _FRONTAL_TAGS:
    return "frontal"
  if t in _LATERAL_TAGS:
    return "lateral"
  return None


def hash_split(key: str, val_percent: float, test_percent: float = 0.0) -> str:
  """Deterministic train/val/test assignment of a patient id (stable across runs/parts)."""
  bucket = int(hashlib.sha256(key.encode("utf-8")).hexdigest()[:8], 16) % 10000 / 100.0
  if bucket < test_percent:
    return "test"
  if bucket < test_percent + val_percent:
    return "val"
  return "train"


def multi_hot(present: Iterable[str], names: Sequence[str]) -> tuple[float, ...]:
  present = set(present)
  return tuple(1.0 if n in present else 0.0 for n in names)


def content_view(path: str) -> tuple[Optional[str], float]:
  """View guessed from pixels (see ``images.frontal_score``); None if ambiguous."""
  score = images_lib.frontal_score(images_lib.load_image(path))
  if score >= 0.02:
    return "frontal", score
  if score <= -0.08:
    return "lateral", score
  return None, score
