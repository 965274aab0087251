"""Writes a ``Plan`` (``clinvla_jax.data.studies``) as sharded study records, with every rejected row and a manifest.

The dataset converters (``data_prep``) and the search index both end here:

* splits the plan into ``--num_parts`` independent parts (study ``i`` goes to
  part ``i % num_parts``, so parts can run on different machines); with
  ``Options.whole_shards`` a part takes whole shards instead (shard ``k`` of the
  one-part layout goes to part ``k % num_parts``), so the shards, manifest and
  rejects do not depend on how many parts wrote them;
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
import importlib.metadata
import io
import json
import math
import multiprocessing
import os
import platform
import sys
import time
from typing import Any, Iterable, Optional, Sequence

from array_record.python import array_record_module
import numpy as np

from clinvla_jax import files
from clinvla_jax.data import images as images_lib
from clinvla_jax.data import schema
from clinvla_jax.data import records
from clinvla_jax.data import source
from clinvla_jax.data import text as text_lib
from clinvla_jax.data import tfds_writer
from clinvla_jax.data import tokenizer as tokenizer_lib
from clinvla_jax.data.studies import ConversionError, Plan, Reject, Study

FORMAT_VERSION = 1
REJECT_FIELDS = ("row", "reason", "detail")


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
  max_text_len: int = schema.MAX_TEXT_LEN
  require_view: str = "frontal"  # "any", "frontal" (current frontal) or "both"
  require_text: bool = True  # False for image-only evaluation sets (CheXpert, RSNA)
  tfds: bool = True  # also write the folder as a TFDS builder directory
  progress: bool = True
  whole_shards: bool = False  # parts take whole shards of the one-part layout (see the module docstring)
  combine: bool = True  # the part that finishes last writes manifest.json (else call `combine`)

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
    if not 8 <= self.max_text_len <= schema.MAX_TEXT_LEN:
      raise ConversionError(
        f"--max_text_len={self.max_text_len}: records hold {schema.MAX_TEXT_LEN} tokens; "
        f"use 8..{schema.MAX_TEXT_LEN} (shorter reports are padded to {schema.MAX_TEXT_LEN})"
      )

  def content_key(self) -> dict[str, Any]:
    """Options that change the bytes written; parts must agree on them."""
    d = dataclasses.asdict(self)
    for k in ("part", "resume", "workers", "progress", "whole_shards", "combine"):
      d.pop(k)
    if self.whole_shards:
      # Whole-shard parts write what one part would, so parts of any count may resume each other's shards.
      d["num_parts"] = 1
    return d


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
    missing = [n for n, ok in zip(schema.VIEW_NAMES[:2], (frontal, lateral)) if not ok]
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
  n = schema.NUM_VIEWS
  size = schema.IMAGE_SIZE
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
  pad = schema.MAX_TEXT_LEN - enc["input_ids"].shape[1]
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
  tmp = f"{path}.tmp-{os.getpid()}"
  writer = array_record_module.ArrayRecordWriter(tmp, source.WRITER_OPTIONS)
  for p in payloads:
    writer.write(p)
  writer.close()
  with open(tmp, "rb+") as f:
    os.fsync(f.fileno())
  os.replace(tmp, path)
  files.fsync_dir(os.path.dirname(os.path.abspath(path)))


def read_shard(path: str) -> list[bytes]:
  """All records of one shard, in order (small shards; for tests and tools)."""
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


def _my_chunks(plan: Plan, opts: Options) -> list[tuple[str, int, list[Study]]]:
  """The chunks (split, chunk index, studies) this part writes."""
  if opts.whole_shards:
    return [c for j, c in enumerate(_chunks(plan.studies, opts.shard_size)) if assign_part(j, opts)]
  return _chunks([s for i, s in enumerate(plan.studies) if assign_part(i, opts)], opts.shard_size)


def _chunk_path(output: str, opts: Options, split: str, k: int) -> str:
  # Whole-shard parts name their shards as the one part of a one-part conversion would.
  return os.path.join(output, shard_name(split, 0 if opts.whole_shards else opts.part, k))


def _own_files(output: str, opts: Options, chunks) -> list[str]:
  """What an earlier run of this part left: its shards, sidecars and temporaries."""
  if not opts.whole_shards:
    return glob.glob(os.path.join(output, f"*-p{opts.part:03d}-*.array_record*"))
  # Every part's shards share one name pattern here: only this part's chunks are its own.
  return [f for split, k, _ in chunks for f in glob.glob(glob.escape(_chunk_path(output, opts, split, k)) + "*")]


def _check_output(output: str, opts: Options, dataset: str, mine: Sequence[str]):
  """Refuses to mix with an earlier conversion unless resuming a compatible one."""
  os.makedirs(output, exist_ok=True)
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
  chunks = _my_chunks(plan, opts)
  _check_output(output, opts, plan.dataset, _own_files(output, opts, chunks))
  summary_path = os.path.join(output, part_summary_name(opts.part, opts.num_parts))
  if opts.resume and os.path.exists(summary_path):
    with open(summary_path) as f:
      summary = json.load(f)
    if opts.combine:
      _maybe_combine(output, opts.num_parts)
    return summary

  if opts.whole_shards:
    my_rejects = list(plan.rejects) if opts.part == 0 else []  # listed once, first, as one part lists them
  else:
    my_rejects = [r for i, r in enumerate(plan.rejects) if assign_part(i, opts)]
  # Stale temporaries of this part come from an interrupted run: never reuse them.
  for tmp in _own_files(output, opts, chunks):
    if ".tmp-" in os.path.basename(tmp):
      os.remove(tmp)
  todo, done_infos = _pending_chunks(chunks, output, opts)
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
      done_infos.append(_write_chunk(split, k, path, len(items), mapper(items), on_study=lambda: bar.update(1)))
  finally:
    bar.close()
    if pool is not None:
      pool.close()
      pool.join()

  summary = _part_summary(plan, opts, done_infos, my_rejects, sum(len(s.rows) for _, _, items in chunks for s in items))
  files.atomic_write_json(summary_path, summary)
  if opts.combine:
    _maybe_combine(output, opts.num_parts)
  return summary


def _pending_chunks(chunks, output: str, opts: Options) -> tuple[list[tuple[str, int, list[Study], str]], list[dict]]:
  """(chunks still to write with their shard paths, sidecars of the chunks an earlier run completed)."""
  todo, done_infos = [], []
  for split, k, items in chunks:
    path = _chunk_path(output, opts, split, k)
    side = path + ".json"
    if opts.resume and os.path.exists(path) and os.path.exists(side):
      with open(side) as f:
        info = json.load(f)
      if info.get("bytes") == os.path.getsize(path):
        done_infos.append(info)
        continue
    todo.append((split, k, items, path))
  return todo, done_infos


def _write_chunk(split: str, k: int, path: str, num_studies: int, built: Iterable[tuple], on_study) -> dict:
  """Writes one shard from its built records and commits it with its sidecar; returns the sidecar."""
  payloads, rejects, view_counts, used_rows, truncated = [], [], [0] * schema.NUM_VIEWS, 0, 0
  for data, rej, info in built:
    rejects.extend(rej)
    if data is not None:
      payloads.append(data)
      view_counts = [c + int(v) for c, v in zip(view_counts, info["valid"])]
      used_rows += len(info["rows"])
      truncated += int(info["truncated"])
    on_study()
  if payloads:
    write_shard(path, payloads)
  info = {
    "file": os.path.basename(path) if payloads else None,
    "split": split,
    "chunk": k,
    "studies": num_studies,
    "num_records": len(payloads),
    "rows_used": used_rows,
    "view_counts": view_counts,
    "text_truncated": truncated,
    "bytes": os.path.getsize(path) if payloads else 0,
    "sha256": files.sha256_file(path) if payloads else None,
    "rejects": [dataclasses.asdict(r) for r in rejects],
  }
  # The sidecar is the commit point for this chunk (also for empty chunks).
  files.atomic_write_json(path + ".json", info)
  return info


def _progress(total: int, desc: str, enabled: bool):
  from tqdm import tqdm  # pylint: disable=g-import-not-at-top

  return tqdm(total=total, desc=desc, unit="study", disable=not enabled, file=sys.stderr)


def _part_summary(plan: Plan, opts: Options, infos: list[dict], plan_rejects: list[Reject], my_rows: int) -> dict:
  infos = sorted(infos, key=lambda i: (i["split"], i["chunk"]))
  rejects = [dataclasses.asdict(r) for r in plan_rejects]
  for i in infos:
    rejects.extend(i["rejects"])
  whole = {}
  if opts.whole_shards:
    # What `combine` needs to list the rejects in the one-part order: the plan's, then chunk by chunk.
    whole = {
      "plan_rejects": [dataclasses.asdict(r) for r in plan_rejects],
      "chunks": [{"split": i["split"], "chunk": i["chunk"], "rejects": i["rejects"]} for i in infos],
    }
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
    "view_counts": [sum(i["view_counts"][v] for i in infos) for v in range(schema.NUM_VIEWS)],
    "text_truncated": sum(i["text_truncated"] for i in infos),
    "rejects": rejects,
    **whole,
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
  if all("chunks" in p for p in parts):
    chunks = sorted((c for p in parts for c in p["chunks"]), key=lambda c: (c["split"], c["chunk"]))
    listed = [r for p in parts for r in p["plan_rejects"]] + [r for c in chunks for r in c["rejects"]]
  else:
    listed = [r for p in parts for r in p["rejects"]]
  rejects = [Reject(**r) for r in listed]
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
    "view_names": list(schema.VIEW_NAMES),
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
        zip(schema.VIEW_NAMES, [sum(p["view_counts"][v] for p in parts) for v in range(schema.NUM_VIEWS)])
      ),
      "text_truncated_at_sentence": sum(p["text_truncated"] for p in parts),
    },
    "splits": {
      s: {"num_records": records_by_split[s], "shards": [x["file"] for x in shards if x["split"] == s]}
      for s in split_names
    },
    "shards": shards,
    "notes": first["notes"],
    "vocab_sha256": files.sha256_file(first["options"]["vocab"] or tokenizer_lib.DEFAULT_VOCAB),
    "versions": versions(),
    "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
  }
  if first["options"].get("tfds", False):
    manifest["tfds"] = tfds_writer.write_tfds(output, manifest)
  files.atomic_write_bytes(os.path.join(output, "rejects.csv"), rejects_to_csv(rejects))
  # Written last: a manifest means every file it describes is complete.
  files.atomic_write_json(os.path.join(output, "manifest.json"), manifest)
  return manifest


def load_manifest(output: str) -> dict[str, Any]:
  with open(os.path.join(output, "manifest.json")) as f:
    return json.load(f)


def split_shards(output: str, split: str) -> list[str]:
  """Paths of the shards of one split, from manifest.json."""
  m = load_manifest(output)
  return [os.path.join(output, f) for f in m["splits"].get(split, {}).get("shards", [])]
