"""Machinery shared by the dataset converters.

A converter only has to describe its dataset: it reads the source metadata,
maps each input image to a ``Row`` and lets ``assemble_studies`` group rows into
studies, choose the views, assign splits and link prior studies (one rule for
every dataset, ``PRIOR_RULE``), giving each study its text and labels through a
small callback.  The result is a ``Plan`` (the studies to write plus the input
rows already rejected).  This module does the rest:

* splits the plan into ``--num_parts`` independent parts (study ``i`` goes to
  part ``i % num_parts``, so parts can run on different machines);
* loads and resizes images (``--image_transform``, ``--dicom_scaling``: see
  ``clinvla_jax.data.images``) and tokenises text in a process pool, with a tqdm bar;
* writes ArrayRecord shards of at most ``--shard_size`` records, per split, each
  to a temporary name, fsync'ed, then renamed, with a small JSON sidecar; a
  shard counts as done only when its sidecar exists, so ``--resume`` redoes just
  the missing shards;
* writes ``rejects.csv`` (every skipped input row with its reason) and
  ``manifest.json`` (counts, options, label names, versions, sha256 of shards),
  combining all parts once the last one finishes (or via ``combine``), and,
  unless ``--notfds``, the same records as a TFDS builder directory in the same
  folder (``clinvla_jax.data.tfds_format``).

Output layout::

  OUT/{split}-p{part:03d}-{chunk:05d}.array_record        (+ .json sidecar)
  OUT/part-{part:03d}-of-{num_parts:03d}.json             per-part summary
  OUT/manifest.json, OUT/rejects.csv                      when all parts are done
  OUT/{dataset}-{split}.array_record-00000-of-00001,       the TFDS copy, one shard per
  OUT/dataset_info.json, features.json, metadata.json, LICENSE        shard of ours
"""

import collections
import csv
import dataclasses
import glob
import hashlib
import importlib.metadata
import io
import json
import math
import multiprocessing
import os
import platform
import sys
import time
from typing import Any, Callable, Iterable, Optional, Sequence

from absl import flags
import numpy as np

from clinvla_jax.data import images as images_lib
from clinvla_jax.data import records
from clinvla_jax.data import text as text_lib
from clinvla_jax.data import tokenizer as tokenizer_lib

FORMAT_VERSION = 1
REJECT_FIELDS = ("row", "reason", "detail")


class ConversionError(RuntimeError):
  """The conversion cannot start or continue (bad input directory, output clash)."""


# --- what converters produce ------------------------------------------------------


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
  views: tuple[Optional[ViewRef], ...]  # one per records.VIEW_NAMES entry
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
class Options:
  """Conversion options shared by all converters (mirrors the CLI flags)."""

  part: int = 0
  num_parts: int = 1
  resume: bool = False
  workers: int = 0  # 0: in this process; N: a pool of N processes
  shard_size: int = 1024
  pad: bool = False
  image_transform: str = "paper"  # images.IMAGE_TRANSFORMS: "paper" stretch, or ALTA's resize + centre crop
  dicom_scaling: str = "display"  # images.DICOM_SCALINGS: DICOM LUTs, or ALTA's 255 / max
  image_codec: str = records.DEFAULT_IMAGE_CODEC
  jpeg_quality: int = 95
  vocab: str = ""  # "" -> the bundled BERT uncased vocabulary
  max_text_len: int = records.MAX_TEXT_LEN
  require_view: str = "frontal"  # "any", "frontal" (current frontal) or "both"
  require_text: bool = True  # False for image-only evaluation sets (CheXpert, RSNA)
  tfds: bool = True  # also write the folder as a TFDS builder directory
  progress: bool = True

  def check(self):
    if not 0 <= self.part < self.num_parts:
      raise ConversionError(f"--part={self.part} must be in [0, --num_parts={self.num_parts})")
    if self.shard_size < 1:
      raise ConversionError("--shard_size must be >= 1")
    if self.require_view not in ("any", "frontal", "both"):
      raise ConversionError(f"--require_view={self.require_view!r}: use any, frontal or both")
    if self.image_transform not in images_lib.IMAGE_TRANSFORMS:
      raise ConversionError(f"--image_transform={self.image_transform!r}: use one of {images_lib.IMAGE_TRANSFORMS}")
    if self.pad and self.image_transform != "paper":
      raise ConversionError("--pad applies to --image_transform=paper; the alta transform crops instead")
    if self.dicom_scaling not in images_lib.DICOM_SCALINGS:
      raise ConversionError(f"--dicom_scaling={self.dicom_scaling!r}: use one of {images_lib.DICOM_SCALINGS}")
    if self.image_codec not in records.IMAGE_CODECS:
      raise ConversionError(f"--image_codec must be one of {records.IMAGE_CODECS}")
    if not 8 <= self.max_text_len <= records.MAX_TEXT_LEN:
      raise ConversionError(
        f"--max_text_len={self.max_text_len}: records hold {records.MAX_TEXT_LEN} tokens; "
        f"use 8..{records.MAX_TEXT_LEN} (shorter reports are padded to {records.MAX_TEXT_LEN})"
      )

  def content_key(self) -> dict[str, Any]:
    """Options that change the bytes written; parts must agree on them."""
    d = dataclasses.asdict(self)
    for k in ("part", "resume", "workers", "progress"):
      d.pop(k)
    return d


# --- CLI ---------------------------------------------------------------------------


def define_flags():
  """Defines the flags every converter takes; call once at module import."""
  flags.DEFINE_string("input", None, "Dataset root directory.", required=True)
  flags.DEFINE_string("output", None, "Output directory for shards and manifest.", required=True)
  flags.DEFINE_integer("part", 0, "Which part to convert (0-based).")
  flags.DEFINE_integer("num_parts", 1, "Split the work into this many independent parts.")
  flags.DEFINE_bool("resume", False, "Continue a conversion already in --output.")
  flags.DEFINE_integer("workers", os.cpu_count() or 1, "Worker processes (0 = run in this process).")
  flags.DEFINE_integer("shard_size", 1024, "Maximum records per ArrayRecord shard.")
  flags.DEFINE_bool("pad", False, "Keep the aspect ratio and pad instead of stretching (--image_transform=paper).")
  flags.DEFINE_enum(
    "image_transform",
    "paper",
    list(images_lib.IMAGE_TRANSFORMS),
    "paper: bilinear stretch to 224x224 (the default); alta: ALTA's evaluation transform, torchvision's "
    "Resize(256, BICUBIC) + CenterCrop(224) + Grayscale, pixel for pixel.",
  )
  flags.DEFINE_enum(
    "dicom_scaling",
    "display",
    list(images_lib.DICOM_SCALINGS),
    "display: the DICOM's modality and VOI LUTs (the default); alta: ALTA's RSNA loader, raw pixels * 255 / max "
    "(as cv2.convertScaleAbs), MONOCHROME1 inverted.",
  )
  flags.DEFINE_enum(
    "image_codec",
    records.DEFAULT_IMAGE_CODEC,
    list(records.IMAGE_CODECS),
    "How views are stored (see clinvla_jax.data.records).",
  )
  flags.DEFINE_integer("jpeg_quality", 95, "Quality when --image_codec=jpeg.")
  flags.DEFINE_string("vocab", "", "WordPiece vocab.txt (default: bundled BERT uncased).")
  flags.DEFINE_integer(
    "max_text_len",
    records.MAX_TEXT_LEN,
    f"Real tokens per report, at most {records.MAX_TEXT_LEN} (the record length; the rest is padding).",
  )
  flags.DEFINE_enum(
    "require_view", "frontal", ["any", "frontal", "both"], "Which current views a study needs to be written."
  )
  flags.DEFINE_bool("tfds", True, "Also write the output as a TFDS builder directory (needs tensorflow-datasets).")


def options_from_flags(**overrides) -> Options:
  f = flags.FLAGS
  opts = Options(
    part=f.part,
    num_parts=f.num_parts,
    resume=f.resume,
    workers=f.workers,
    shard_size=f.shard_size,
    pad=f.pad,
    image_transform=f.image_transform,
    dicom_scaling=f.dicom_scaling,
    image_codec=f.image_codec,
    jpeg_quality=f.jpeg_quality,
    vocab=f.vocab,
    max_text_len=f.max_text_len,
    require_view=f.require_view,
    tfds=f.tfds,
  )
  return dataclasses.replace(opts, **overrides)


# --- small file helpers --------------------------------------------------------------


def fsync_dir(path: str):
  try:
    fd = os.open(path, os.O_RDONLY)
  except OSError:
    return
  try:
    os.fsync(fd)
  except OSError:
    pass
  finally:
    os.close(fd)


def atomic_write_bytes(path: str, data: bytes):
  """Writes via a temporary name + fsync + rename: readers never see half a file."""
  tmp = f"{path}.tmp-{os.getpid()}"
  with open(tmp, "wb") as f:
    f.write(data)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)
  fsync_dir(os.path.dirname(os.path.abspath(path)))


def atomic_write_json(path: str, obj: Any):
  atomic_write_bytes(path, (json.dumps(obj, indent=1, sort_keys=False, default=str) + "\n").encode())


def sha256_file(path: str) -> str:
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      h.update(block)
  return h.hexdigest()


def rejects_to_csv(rejects: Iterable[Reject]) -> bytes:
  buf = io.StringIO()
  w = csv.writer(buf, lineterminator="\n")
  w.writerow(REJECT_FIELDS)
  for r in rejects:
    w.writerow([r.row, r.reason, r.detail])
  return buf.getvalue().encode("utf-8")


def read_rejects(path: str) -> list[Reject]:
  with open(path, newline="", encoding="utf-8") as f:
    return [Reject(r["row"], r["reason"], r["detail"]) for r in csv.DictReader(f)]


def versions() -> dict[str, str]:
  out = {"python": platform.python_version()}
  for pkg in ("clinvla-jax", "numpy", "pillow", "pydicom", "transformers", "tokenizers", "array-record"):
    try:
      out[pkg] = importlib.metadata.version(pkg)
    except importlib.metadata.PackageNotFoundError:
      out[pkg] = "not installed"
  return out


# --- worker side ---------------------------------------------------------------------

_WORKER: dict[str, Any] = {}


def _worker_init(opts: Options):
  vocab = opts.vocab or tokenizer_lib.DEFAULT_VOCAB
  key = (vocab, opts.max_text_len)
  if _WORKER.get("key") != key:
    _WORKER["tokenizer"] = tokenizer_lib.Tokenizer(vocab, max_len=opts.max_text_len)
    _WORKER["key"] = key
  _WORKER["opts"] = opts


def _view_ok(valid: Sequence[bool], require: str) -> Optional[str]:
  frontal, lateral = valid[0], valid[1]
  if require == "any" and not (frontal or lateral):
    return "no usable current view"
  if require == "frontal" and not frontal:
    return "no usable current frontal view"
  if require == "both" and not (frontal and lateral):
    missing = [n for n, ok in zip(records.VIEW_NAMES[:2], (frontal, lateral)) if not ok]
    return f"missing {', '.join(missing)}"
  return None


def build_record(study: Study, opts: Optional[Options] = None) -> tuple[Optional[bytes], list[Reject], dict]:
  """Loads, resizes and tokenises one study.

  Returns:
    (record bytes or None, rejected rows, info).  Every row in ``study.rows`` is
    either in the written record or in the rejects, never both.
  """
  if opts is not None:
    _worker_init(opts)
  opts = _WORKER["opts"]
  tok = _WORKER["tokenizer"]
  n = records.NUM_VIEWS
  size = records.IMAGE_SIZE
  pixels = np.zeros((n, size, size), np.uint8)
  valid = [False] * n
  problems: dict[int, str] = {}
  for v, ref in enumerate(study.views):
    if ref is None:
      continue
    try:
      pixels[v] = images_lib.preprocess(
        ref.path, size=size, pad=opts.pad, transform=opts.image_transform, dicom_scaling=opts.dicom_scaling
      )
      valid[v] = True
    except images_lib.ImageError as e:
      problems[v] = str(e)
  # A row is lost to a bad image only when every view it supplies failed; a
  # broken prior image is reported by the study that owns that row, and here
  # the prior slot simply stays empty.
  rejects: list[Reject] = []
  row_views: dict[str, list[int]] = collections.defaultdict(list)
  for v, ref in enumerate(study.views):
    if ref is not None and ref.row is not None:
      row_views[ref.row].append(v)
  remaining = []
  for row in study.rows:
    views = row_views.get(row, [])
    if views and not any(valid[v] for v in views):
      rejects.append(Reject(row, "bad_image", "; ".join(problems[v] for v in views)))
    else:
      remaining.append(row)
  reason, problem = "missing_view", _view_ok(valid, opts.require_view)
  if problem is None and opts.require_text and not study.text.strip():
    reason, problem = "empty_report", "empty report text"
  if problem is not None:
    if problems:
      problem += " (" + "; ".join(problems.values()) + ")"
    rejects.extend(Reject(r, reason, f"study {study.study_id}: {problem}") for r in remaining)
    return None, rejects, {}
  text = text_lib.fit_text(study.text, tok)
  enc = tok(text)
  # The record always holds MAX_TEXT_LEN tokens; a shorter --max_text_len
  # only caps the real ones, the rest is [PAD] (id 0, mask 0).
  pad = records.MAX_TEXT_LEN - enc["input_ids"].shape[1]
  example = {
    "images": pixels,
    "view_valid": np.array(valid),
    "input_ids": np.pad(enc["input_ids"][0], (0, pad), constant_values=tok.pad_id),
    "attention_mask": np.pad(enc["attention_mask"][0], (0, pad)),
    "text": text,
    "labels": np.asarray(study.labels, np.float32),
    "patient_id": study.patient_id,
    "study_id": study.study_id,
    "split": study.split,
    "dataset": _WORKER.get("dataset", ""),
    "image_ids": tuple(r.image_id if (r is not None and ok) else "" for r, ok in zip(study.views, valid)),
    "prior_days": study.prior_days if (valid[2] or valid[3]) else math.nan,
  }
  data = records.encode_record(example, image_codec=opts.image_codec, jpeg_quality=opts.jpeg_quality)
  info = {
    "valid": valid,
    "rows": remaining,
    "truncated": text != study.text,
    "image_problems": list(problems.values()),
    "tokens": int(enc["attention_mask"].sum()),
  }
  return data, rejects, info


def _pool_task(args):
  study, dataset = args
  _WORKER["dataset"] = dataset
  return build_record(study)


def _pool_init(opts: Options, dataset: str):
  _worker_init(opts)
  _WORKER["dataset"] = dataset


# --- writing -------------------------------------------------------------------------


def shard_name(split: str, part: int, chunk: int) -> str:
  return f"{split}-p{part:03d}-{chunk:05d}.array_record"


def part_summary_name(part: int, num_parts: int) -> str:
  return f"part-{part:03d}-of-{num_parts:03d}.json"


def write_shard(path: str, payloads: Sequence[bytes]):
  """Writes one ArrayRecord file atomically (temp name, fsync, rename)."""
  from array_record.python import array_record_module  # pylint: disable=g-import-not-at-top
  from clinvla_jax.data import source  # pylint: disable=g-import-not-at-top

  tmp = f"{path}.tmp-{os.getpid()}"
  writer = array_record_module.ArrayRecordWriter(tmp, source.WRITER_OPTIONS)
  for p in payloads:
    writer.write(p)
  writer.close()
  with open(tmp, "rb+") as f:
    os.fsync(f.fileno())
  os.replace(tmp, path)
  fsync_dir(os.path.dirname(os.path.abspath(path)))


def read_shard(path: str) -> list[bytes]:
  """All records of one shard, in order (small shards; for tests and tools)."""
  from clinvla_jax.data import source  # pylint: disable=g-import-not-at-top

  return source.read_all(path)


def _chunks(studies: list[Study], size: int) -> list[tuple[str, int, list[Study]]]:
  """(split, chunk index, studies) per shard; deterministic given the plan."""
  by_split: dict[str, list[Study]] = collections.defaultdict(list)
  for s in studies:
    by_split[s.split].append(s)
  out = []
  for split in sorted(by_split):
    items = by_split[split]
    for k in range(0, len(items), size):
      out.append((split, k // size, items[k : k + size]))
  return out


def assign_part(index: int, opts: Options) -> bool:
  return index % opts.num_parts == opts.part


def _check_output(output: str, opts: Options, dataset: str):
  """Refuses to mix with an earlier conversion unless resuming a compatible one."""
  os.makedirs(output, exist_ok=True)
  mine = glob.glob(os.path.join(output, f"*-p{opts.part:03d}-*.array_record*"))
  summary = os.path.join(output, part_summary_name(opts.part, opts.num_parts))
  others = glob.glob(os.path.join(output, "part-*-of-*.json"))
  manifest = os.path.join(output, "manifest.json")
  if not opts.resume and (mine or os.path.exists(summary) or (os.path.exists(manifest) and opts.num_parts == 1)):
    raise ConversionError(
      f"{output} already holds output of part {opts.part}; pass --resume to continue it or choose an empty directory"
    )
  for path in others:
    with open(path) as f:
      other = json.load(f)
    if other.get("dataset") != dataset or other.get("options") != opts.content_key():
      raise ConversionError(
        f"{path} was written by a different conversion ({other.get('dataset')}, "
        f"options {other.get('options')}); refusing to mix outputs"
      )


def run(plan: Plan, output: str, opts: Options) -> dict[str, Any]:
  """Converts this part of ``plan`` into ``output``; returns the part summary.

  When every part's summary is present afterwards, also writes ``manifest.json``
  and ``rejects.csv`` (see ``combine``).
  """
  opts.check()
  planned = sum(len(s.rows) for s in plan.studies) + len(plan.rejects)
  if planned != plan.input_rows:
    raise ConversionError(
      f"{plan.dataset}: plan accounts for {planned} of {plan.input_rows} input rows (converter bug)"
    )
  _check_output(output, opts, plan.dataset)
  summary_path = os.path.join(output, part_summary_name(opts.part, opts.num_parts))
  if opts.resume and os.path.exists(summary_path):
    with open(summary_path) as f:
      summary = json.load(f)
    _maybe_combine(output, opts.num_parts)
    return summary

  my_studies = [s for i, s in enumerate(plan.studies) if assign_part(i, opts)]
  my_rejects = [r for i, r in enumerate(plan.rejects) if assign_part(i, opts)]
  chunks = _chunks(my_studies, opts.shard_size)
  # Stale temporaries of this part come from an interrupted run: never reuse them.
  for tmp in glob.glob(os.path.join(output, f"*-p{opts.part:03d}-*.tmp-*")):
    os.remove(tmp)

  todo, done_infos = [], []
  for split, k, items in chunks:
    path = os.path.join(output, shard_name(split, opts.part, k))
    side = path + ".json"
    if opts.resume and os.path.exists(path) and os.path.exists(side):
      with open(side) as f:
        info = json.load(f)
      if info.get("bytes") == os.path.getsize(path):
        done_infos.append(info)
        continue
    todo.append((split, k, items, path))

  total = sum(len(items) for _, _, items, _ in todo)
  pool = None
  if opts.workers > 0 and total > 0:
    ctx = multiprocessing.get_context("spawn")  # safe even if JAX threads exist
    pool = ctx.Pool(opts.workers, initializer=_pool_init, initargs=(opts, plan.dataset))
    mapper = lambda items: pool.imap(_pool_task, [(s, plan.dataset) for s in items], chunksize=4)
  else:
    _pool_init(opts, plan.dataset)
    mapper = lambda items: map(_pool_task, [(s, plan.dataset) for s in items])
  bar = _progress(total, f"{plan.dataset} part {opts.part}", opts.progress)
  try:
    for split, k, items, path in todo:
      payloads, rejects, view_counts, used_rows, truncated = [], [], [0] * records.NUM_VIEWS, 0, 0
      for data, rej, info in mapper(items):
        rejects.extend(rej)
        if data is not None:
          payloads.append(data)
          view_counts = [c + int(v) for c, v in zip(view_counts, info["valid"])]
          used_rows += len(info["rows"])
          truncated += int(info["truncated"])
        bar.update(1)
      if payloads:
        write_shard(path, payloads)
      info = {
        "file": os.path.basename(path) if payloads else None,
        "split": split,
        "chunk": k,
        "studies": len(items),
        "num_records": len(payloads),
        "rows_used": used_rows,
        "view_counts": view_counts,
        "text_truncated": truncated,
        "bytes": os.path.getsize(path) if payloads else 0,
        "sha256": sha256_file(path) if payloads else None,
        "rejects": [dataclasses.asdict(r) for r in rejects],
      }
      # The sidecar is the commit point for this chunk (also for empty chunks).
      atomic_write_json(path + ".json", info)
      done_infos.append(info)
  finally:
    bar.close()
    if pool is not None:
      pool.close()
      pool.join()

  summary = _part_summary(plan, opts, done_infos, my_rejects)
  atomic_write_json(summary_path, summary)
  _maybe_combine(output, opts.num_parts)
  return summary


def _progress(total: int, desc: str, enabled: bool):
  from tqdm import tqdm  # pylint: disable=g-import-not-at-top

  return tqdm(total=total, desc=desc, unit="study", disable=not enabled, file=sys.stderr)


def _part_summary(plan: Plan, opts: Options, infos: list[dict], plan_rejects: list[Reject]) -> dict:
  infos = sorted(infos, key=lambda i: (i["split"], i["chunk"]))
  rejects = [dataclasses.asdict(r) for r in plan_rejects]
  for i in infos:
    rejects.extend(i["rejects"])
  my_rows = sum(len(s.rows) for idx, s in enumerate(plan.studies) if assign_part(idx, opts))
  return {
    "dataset": plan.dataset,
    "part": opts.part,
    "num_parts": opts.num_parts,
    "options": opts.content_key(),
    "input_rows_total": plan.input_rows,
    "row_unit": plan.row_unit,
    "rows_in_part": my_rows + len(plan_rejects),
    "label_names": plan.label_names,
    "notes": plan.notes,
    "shards": [{k: i[k] for k in ("file", "split", "num_records", "bytes", "sha256")} for i in infos if i["file"]],
    "records": {
      s: sum(i["num_records"] for i in infos if i["split"] == s) for s in sorted({i["split"] for i in infos})
    },
    "rows_used": sum(i["rows_used"] for i in infos),
    "view_counts": [sum(i["view_counts"][v] for i in infos) for v in range(records.NUM_VIEWS)],
    "text_truncated": sum(i["text_truncated"] for i in infos),
    "rejects": rejects,
    "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
  }


def _maybe_combine(output: str, num_parts: int):
  paths = [os.path.join(output, part_summary_name(p, num_parts)) for p in range(num_parts)]
  if all(os.path.exists(p) for p in paths):
    combine(output, num_parts)


def combine(output: str, num_parts: Optional[int] = None) -> dict[str, Any]:
  """Merges the part summaries in ``output`` into manifest.json and rejects.csv."""
  paths = sorted(glob.glob(os.path.join(output, "part-*-of-*.json")))
  if num_parts is not None:
    paths = [p for p in paths if p.endswith(f"-of-{num_parts:03d}.json")]
  if not paths:
    raise ConversionError(f"{output}: no part summaries to combine")
  parts = []
  for p in paths:
    with open(p) as f:
      parts.append(json.load(f))
  n = parts[0]["num_parts"]
  have = sorted(p["part"] for p in parts)
  if have != list(range(n)):
    raise ConversionError(f"{output}: parts {sorted(set(range(n)) - set(have))} of {n} are missing")
  first = parts[0]
  rejects = [Reject(**r) for p in parts for r in p["rejects"]]
  shards = sorted((s for p in parts for s in p["shards"]), key=lambda s: s["file"])
  split_names = sorted({s for p in parts for s in p["records"]})
  records_by_split = {s: sum(p["records"].get(s, 0) for p in parts) for s in split_names}
  rows_used = sum(p["rows_used"] for p in parts)
  rows_seen = sum(p["rows_in_part"] for p in parts)
  input_rows = first["input_rows_total"]
  reasons = collections.Counter(r.reason for r in rejects)
  manifest = {
    "dataset": first["dataset"],
    "format_version": FORMAT_VERSION,
    "record_schema": "clinvla_jax.data.records (encode_record / decode_record)",
    "view_names": list(records.VIEW_NAMES),
    "label_names": first["label_names"],
    "options": first["options"],
    "num_parts": n,
    "counts": {
      "input_rows": input_rows,
      "row_unit": first["row_unit"],
      "rows_written": rows_used,
      "rows_rejected": len(rejects),
      "rows_add_up": rows_used + len(rejects) == input_rows == rows_seen,
      "records": sum(records_by_split.values()),
      "records_by_split": records_by_split,
      "reject_reasons": dict(sorted(reasons.items())),
      "views_present": dict(
        zip(records.VIEW_NAMES, [sum(p["view_counts"][v] for p in parts) for v in range(records.NUM_VIEWS)])
      ),
      "text_truncated_at_sentence": sum(p["text_truncated"] for p in parts),
    },
    "splits": {
      s: {"num_records": records_by_split[s], "shards": [x["file"] for x in shards if x["split"] == s]}
      for s in split_names
    },
    "shards": shards,
    "notes": first["notes"],
    "vocab_sha256": sha256_file(first["options"]["vocab"] or tokenizer_lib.DEFAULT_VOCAB),
    "versions": versions(),
    "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
  }
  if first["options"].get("tfds", False):
    manifest["tfds"] = write_tfds(output, manifest)
  atomic_write_bytes(os.path.join(output, "rejects.csv"), rejects_to_csv(rejects))
  # Written last: a manifest means every file it describes is complete.
  atomic_write_json(os.path.join(output, "manifest.json"), manifest)
  return manifest


# Source, citation and licence per dataset, for the TFDS dataset info.
SOURCES = {
  "covid_cxr": dict(
    homepage="https://github.com/ieee8023/covid-chestxray-dataset",
    citation=(
      "@article{cohen2020covidProspective, title={COVID-19 Image Data Collection: "
      "Prospective Predictions Are the Future}, author={Cohen, Joseph Paul and "
      "Morrison, Paul and Dao, Lan and Roth, Karsten and Duong, Tim Q and Ghassemi, "
      "Marzyeh}, journal={arXiv 2006.11988}, year={2020}}"
    ),
    licence="Per image, see the source metadata.csv (licence column); metadata CC BY-NC-SA 4.0.",
  ),
  "mimic_cxr": dict(
    homepage="https://physionet.org/content/mimic-cxr-jpg/",
    citation=(
      "@article{johnson2019mimicjpg, title={MIMIC-CXR-JPG, a large publicly available "
      "database of labeled chest radiographs}, author={Johnson, Alistair E W and "
      "others}, journal={arXiv 1901.07042}, year={2019}}"
    ),
    licence="PhysioNet Credentialed Health Data License 1.5.0 (credentialed access only).",
  ),
  "chexpert": dict(
    homepage="https://stanfordmlgroup.github.io/competitions/chexpert/",
    citation=(
      "@inproceedings{irvin2019chexpert, title={CheXpert: A Large Chest Radiograph "
      "Dataset with Uncertainty Labels and Expert Comparison}, author={Irvin, Jeremy "
      "and others}, booktitle={AAAI}, year={2019}}"
    ),
    licence="Stanford University School of Medicine CheXpert Dataset Research Use Agreement.",
  ),
  "iu_xray": dict(
    homepage="https://openi.nlm.nih.gov/",
    citation=(
      "@article{demner2016preparing, title={Preparing a collection of radiology "
      "examinations for distribution and retrieval}, author={Demner-Fushman, Dina "
      "and others}, journal={JAMIA}, volume={23}, number={2}, year={2016}}"
    ),
    licence="CC BY-NC-ND 4.0 (Indiana University / NLM Open-I).",
  ),
  "rsna_pneumonia": dict(
    homepage="https://www.kaggle.com/c/rsna-pneumonia-detection-challenge",
    citation=(
      "@article{shih2019augmenting, title={Augmenting the National Institutes of "
      "Health Chest Radiograph Dataset with Expert Annotations of Possible "
      "Pneumonia}, author={Shih, George and others}, journal={Radiology: "
      "Artificial Intelligence}, year={2019}}"
    ),
    licence="RSNA Pneumonia Detection Challenge data terms (non-commercial research).",
  ),
}


def write_tfds(output: str, manifest: dict[str, Any]) -> dict[str, Any]:
  """Writes the converted records again as a TFDS builder directory in ``output``."""
  try:
    from clinvla_jax.data import tfds_format  # pylint: disable=g-import-not-at-top
    import tensorflow_datasets  # noqa: F401  # pylint: disable=g-import-not-at-top,unused-import
  except ImportError as e:
    raise ConversionError(
      "writing the TFDS copy needs tensorflow-datasets (pip install -e '.[tfds]'), or pass --notfds"
    ) from e
  dataset = manifest["dataset"]
  splits = {s: [os.path.join(output, f) for f in info["shards"]] for s, info in manifest["splits"].items()}
  if not any(splits.values()):
    return {
      "name": dataset,
      "records_by_split": {},
      "files": [],
      "note": "no records were written, so there is no TFDS dataset",
    }
  source = SOURCES.get(dataset, {})
  counts = tfds_format.write_builder_dir(
    output,
    dataset=dataset,
    splits=splits,
    label_names=manifest["label_names"],
    description=(
      f"{dataset} converted by data_prep.{dataset} for ClinVLA: one example per "
      f"study, views {', '.join(records.VIEW_NAMES)}; labels "
      f"{', '.join(manifest['label_names'])}."
    ),
    homepage=source.get("homepage", ""),
    citation=source.get("citation", ""),
    licence=source.get("licence", ""),
  )
  return {
    "name": dataset,
    "records_by_split": counts,
    "files": sorted(os.path.basename(p) for s in counts for p in tfds_format.split_files(output, s)),
  }


def load_manifest(output: str) -> dict[str, Any]:
  with open(os.path.join(output, "manifest.json")) as f:
    return json.load(f)


def split_shards(output: str, split: str) -> list[str]:
  """Paths of the shards of one split, from manifest.json."""
  m = load_manifest(output)
  return [os.path.join(output, f) for f in m["splits"].get(split, {}).get("shards", [])]


def main_for(build_plan: Callable[[str], Plan], **extra_options) -> Callable[[list[str]], None]:
  """Returns an absl ``main`` that plans from --input and runs one part."""

  def main(argv):
    del argv
    opts = options_from_flags(**extra_options)
    try:
      plan = build_plan(flags.FLAGS.input)
      summary = run(plan, flags.FLAGS.output, opts)
    except ConversionError as e:
      sys.exit(f"error: {e}")
    print(
      json.dumps(
        {k: summary[k] for k in ("dataset", "part", "num_parts", "records", "rows_used")}
        | {"rejected": len(summary["rejects"])}
      )
    )

  return main


# --- the shared study assembly ------------------------------------------------------------


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
  groups: dict[tuple[str, Any], list[Row]] = collections.defaultdict(list)
  for row in rows:
    if row.view not in ("frontal", "lateral"):
      rejects.append(Reject(row.row_id, "unknown_view", row.why_unknown or f"view {row.view!r}"))
      continue
    groups[(row.patient_id, row.study_key)].append(row)
  order = sorted(groups, key=lambda k: (k[0], str(k[1])))
  chosen: dict[tuple[str, Any], StudyRows] = {}
  for key in order:
    views: dict[str, Row] = {}
    for row in sorted(groups[key], key=lambda r: r.rank):
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
        continue
      split = splits.pop()
    times = {r.time for r in used}
    chosen[key] = StudyRows(key[0], key[1], split, views, times.pop() if len(times) == 1 else None)

  timeline: dict[tuple[str, str], list[StudyRows]] = collections.defaultdict(list)
  for s in chosen.values():
    if s.time is not None:
      timeline[(s.patient_id, s.split)].append(s)
  for studies_of in timeline.values():
    studies_of.sort(key=lambda s: s.time)

  out: list[Study] = []
  for key in order:
    s = chosen.get(key)
    if s is None:
      continue
    d = describe(s)
    rejects.extend(d.rejects)
    if not d.rows:
      continue
    prior, prior_days = None, math.nan
    if s.time is not None:
      earlier = [p for p in timeline[(s.patient_id, s.split)] if p.time < s.time]
      if earlier:
        prior = earlier[-1]
        if time_in_days:
          prior_days = float(s.time - prior.time)
    current = {r.view: r for r in d.rows}
    ref = lambda r, own: None if r is None else ViewRef(r.path, r.image_id, r.row_id if own else None)
    pv = prior.views if prior is not None else {}
    out.append(
      Study(
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
    )
  return out, rejects


# --- helpers for converters ------------------------------------------------------------

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


def read_table(path: str) -> list[dict[str, str]]:
  """Rows of a CSV that may be plain, gzipped or the only CSV inside a zip."""
  import zipfile  # pylint: disable=g-import-not-at-top

  if not os.path.isfile(path):
    raise ConversionError(f"{path}: table not found")
  if path.endswith(".zip"):
    with zipfile.ZipFile(path) as z:
      names = [n for n in z.namelist() if n.endswith(".csv")]
      if len(names) != 1:
        raise ConversionError(f"{path}: expected one CSV inside, found {names}")
      data = z.read(names[0]).decode("utf-8-sig")
    return list(csv.DictReader(io.StringIO(data)))
  import gzip  # pylint: disable=g-import-not-at-top

  opener = gzip.open if path.endswith(".gz") else open
  with opener(path, "rt", newline="", encoding="utf-8-sig") as f:
    return list(csv.DictReader(f))


def find_first(*candidates: str) -> str:
  """The first existing path among ``candidates`` (else the first one)."""
  for c in candidates:
    if c and os.path.exists(c):
      return c
  return candidates[0]
