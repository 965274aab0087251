"""A searchable index of chest X-ray studies: image and report embeddings of an archive.

  index = Index.build(config, "archive/", "index/", checkpoint="runs/demo")   # or append to "index/"
  index = Index.load("index/", config)               # config: to embed queries
  index.search_text("small left pleural effusion")   # [Hit, ...] best first: text -> image
  index.search_image("query.dcm", target="report")   # image -> report ("image": look-alike studies)

Input: a converted dataset folder (its shards are embedded as they are), or a
plain folder of studies (`clinvla_jax.search.ingest`), converted first with
the converters' writer into ``INDEX_DIR/staging/<key>/`` (lossless PNG
records; they also supply the thumbnails).

Layout of INDEX_DIR::

  manifest.json          config hash, checkpoint, counts, inputs, segments (the commit point)
  rejects.csv            every study or file skipped, with its reason (row, reason, detail)
  segments/seg-K.npz     image, text [n, P] float32 unit rows, has_report, study_id, offsets
  segments/seg-K.jsonl   per row: study_id, patient_id, date, path, report, record
  segments/seg-K.ids.json  study_id, patient_id, date, path columns: what an append reads (no reports)
  staging/<key>/         records of a plain input folder (converter output)

One segment holds the studies of one input shard; it counts once
manifest.json lists it.  An interrupted build therefore keeps every finished
shard, and running it again embeds only the rest; a later build with new
studies (same folder or another one) adds segments without touching the old
ones.  Studies already indexed are skipped by study id.  An index refuses a
config whose model differs (`config_hash`) or other weights (checkpoint step).

Embedding runs through `clinvla_jax.predict.PredictFn` (the config's mesh and
logical rules, the precision policy's fastest path).  With several processes
(``jax.distributed``; INDEX_DIR on storage they all see) every process plans
the same work and checks that the others agree; the staging conversion gives
each process whole shards in turn (the records are those one process would
write), every pending shard is embedded by all processes, each its part of
every batch, and process 0 gathers the rows and alone writes the index files.
The index is the one a single process builds, and an interrupted run resumes
with any number of processes.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import shutil
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Optional

import jax
from jax.experimental import multihost_utils
import numpy as np
from tqdm import tqdm

from clinvla_jax import files
from clinvla_jax import perf
from clinvla_jax import weights
from clinvla_jax.data import images as images_lib
from clinvla_jax.data import schema
from clinvla_jax.data import records
from clinvla_jax.data import source as source_lib
from clinvla_jax.data import studies as studies_lib
from clinvla_jax.data import writer
from clinvla_jax.evaluate import embed
from clinvla_jax.model import layers
from clinvla_jax.predict import PredictFn
from clinvla_jax.search import exact
from clinvla_jax.search import ingest

FORMAT = "clinvla_jax search index"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
REJECTS = "rejects.csv"
SEGMENTS = "segments"
STAGING = "staging"
TARGETS = ("image", "report")
STAGING_SHARD_SIZE = 256  # studies per commit when indexing a plain folder
# Settings that change rounding, not the embedding space: an index built in
# float32 is searched with bf16 products and the other way round.
_HASH_IGNORED = ("precision", "residual_grad_barrier")


class SearchIndexError(ValueError):
  """An index cannot be built, appended to or searched as asked (names the folder)."""


class IndexMismatchError(SearchIndexError):
  """The index was built by another model config or other weights."""


@dataclasses.dataclass(frozen=True)
class Hit:
  """One search result."""

  study_id: str
  score: float
  path: str
  report: str
  date: str = ""
  patient_id: str = ""
  row: int = -1

  def to_json(self) -> dict[str, Any]:
    return {"study_id": self.study_id, "score": round(float(self.score), 6), "path": self.path, "report": self.report}


# ---------------------------------------------------------------------------
# Model identity.
# ---------------------------------------------------------------------------


def _strip(tree: Any) -> Any:
  if isinstance(tree, Mapping):
    return {k: _strip(v) for k, v in sorted(tree.items()) if k not in _HASH_IGNORED}
  if isinstance(tree, (list, tuple)):
    return [_strip(v) for v in tree]
  return tree


def model_identity(config) -> dict[str, Any]:
  """What decides the embedding space besides the checkpoint: model, initial weights, vocabulary, views."""
  init = config.get("init") or {}
  vocab = embed.tokenizer_from_config(config).vocab_path
  with open(vocab, "rb") as f:
    vocab_sha = hashlib.sha256(f.read()).hexdigest()
  slots = embed.eval_view_slots(config)
  return {
    "model": _strip(config.model.to_dict()),
    # alta_weights only when set, so indexes built before it existed keep their hash.
    "init": {
      k: str(init.get(k, "") or "")
      for k in ("text_weights", "image_weights", "alta_weights")
      if k != "alta_weights" or init.get(k)
    },
    "seed": int(config.get("seed", 0)),
    "vocab_sha256": vocab_sha,
    "view_slots": list(slots) if slots is not None else None,
  }


def config_hash(config) -> str:
  """sha256 of `model_identity`: equal hashes embed into the same space (given the same checkpoint)."""
  blob = json.dumps(model_identity(config), sort_keys=True, default=str).encode()
  return hashlib.sha256(blob).hexdigest()


def variables_for(config, checkpoint: Optional[str] = None) -> tuple[Any, Optional[int]]:
  """(variables, checkpoint step): a checkpoint's, else the initial (pretrained or seeded) weights (step None)."""
  return weights.evaluation_variables(config, checkpoint)


# ---------------------------------------------------------------------------
# Files.
# ---------------------------------------------------------------------------


def read_manifest(directory: str) -> Optional[dict[str, Any]]:
  path = os.path.join(directory, MANIFEST)
  if not os.path.isfile(path):
    return None
  try:
    with open(path, encoding="utf-8") as f:
      manifest = json.load(f)
  except (OSError, json.JSONDecodeError) as e:
    raise SearchIndexError(f"{path}: unreadable index manifest ({e})") from e
  if manifest.get("format") != FORMAT:
    raise SearchIndexError(f"{path}: not a search index (format {manifest.get('format')!r})")
  if manifest.get("format_version") != FORMAT_VERSION:
    raise SearchIndexError(
      f"{path}: index format {manifest.get('format_version')}, this version reads {FORMAT_VERSION}"
    )
  return manifest


def check_compatible(
  manifest: Mapping[str, Any], directory: str, chash: str, step: Optional[int] = None, *, check_step: bool = True
) -> None:
  """Raises `IndexMismatchError` unless the index was built by this config (and this checkpoint step)."""
  if manifest["config_hash"] != chash:
    raise IndexMismatchError(
      f"{directory} was built by another model config (hash {manifest['config_hash'][:12]}, this config "
      f"{chash[:12]}); its embeddings are not comparable: use the config it was built with, or a new index folder"
    )
  built = manifest.get("checkpoint", {}).get("step")
  if check_step and built != step:
    raise IndexMismatchError(
      f"{directory} was built with checkpoint step {built} ({manifest['checkpoint'].get('path')}), "
      f"not step {step}; mixing weights makes scores incomparable: use the same checkpoint or a new index folder"
    )


def _segment_bytes(emb: Mapping[str, np.ndarray], meta: Sequence[Mapping[str, Any]]) -> tuple[bytes, bytes]:
  lines = [(json.dumps(m, ensure_ascii=False) + "\n").encode("utf-8") for m in meta]
  offsets = np.concatenate([[0], np.cumsum([len(x) for x in lines])]).astype(np.int64)
  buf = io.BytesIO()
  np.savez(
    buf,
    image=np.asarray(emb["image"], np.float32),
    text=np.asarray(emb["text"], np.float32),
    has_report=np.asarray([bool(m["report"]) for m in meta], bool),
    study_id=np.asarray([m["study_id"] for m in meta], dtype=str),
    offsets=offsets,
  )
  return buf.getvalue(), b"".join(lines)


def _read_jsonl(path: str) -> list[dict[str, Any]]:
  with open(path, encoding="utf-8") as f:
    return [json.loads(line) for line in f]


# What an append needs of the indexed studies: ids to skip, and patient, date and path to find priors and to
# tell a duplicate id from the same study.  Kept beside each segment so an append never reads the reports.
KNOWN_FIELDS = ("study_id", "patient_id", "date", "path")
IDS_SUFFIX = ".ids.json"


def _ids_bytes(meta: Sequence[Mapping[str, Any]]) -> bytes:
  return json.dumps({k: [m[k] for m in meta] for k in KNOWN_FIELDS}, ensure_ascii=False).encode("utf-8")


def _read_ids(path: str) -> list[dict[str, Any]]:
  with open(path, encoding="utf-8") as f:
    columns = json.load(f)
  return [dict(zip(KNOWN_FIELDS, row)) for row in zip(*(columns[k] for k in KNOWN_FIELDS))]


def _known_studies(directory: str, segments: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
  """study_id -> its KNOWN_FIELDS, over the committed segments."""
  known = {}
  for seg in segments:
    base = os.path.join(directory, seg["file"])
    # Segments written before the side file existed: their full rows, reports included.
    rows = _read_ids(base + IDS_SUFFIX) if os.path.exists(base + IDS_SUFFIX) else _read_jsonl(base + ".jsonl")
    known.update((m["study_id"], m) for m in rows)
  return known


def write_rejects(directory: str, manifest: Mapping[str, Any]) -> int:
  """rejects.csv from the staging conversions' rejects and the index's own, each once; returns the count."""
  seen, out = set(), []
  rejects = []
  for inp in manifest["inputs"]:
    staged = inp.get("staging")
    path = os.path.join(directory, staged, REJECTS) if staged else ""
    if path and os.path.isfile(path):
      rejects += [dataclasses.replace(r, row=os.path.join(inp["path"], r.row)) for r in writer.read_rejects(path)]
  rejects += [studies_lib.Reject(**r) for seg in manifest["segments"] for r in seg.get("rejects", [])]
  for r in rejects:
    key = (r.row, r.reason)
    if key not in seen:
      seen.add(key)
      out.append(r)
  files.atomic_write_bytes(os.path.join(directory, REJECTS), writer.rejects_to_csv(out))
  return len(out)


# ---------------------------------------------------------------------------
# Building.
# ---------------------------------------------------------------------------


def _is_converted(path: str) -> bool:
  manifest = source_lib.read_manifest(path) if os.path.isdir(path) else None
  return bool(manifest and "splits" in manifest) or os.path.isfile(os.path.join(path, "dataset_info.json"))


def _input_shards(directory: str, inp: Mapping[str, Any]) -> list[str]:
  if inp["kind"] == "folder":
    staged = os.path.join(directory, inp["staging"])
    return list(embed.resolve_paths(staged)) if _has_shards(staged) else []
  return list(embed.resolve_paths(inp["path"], inp.get("split") or None))


def _has_shards(folder: str) -> bool:
  with open(os.path.join(folder, MANIFEST), encoding="utf-8") as f:
    return bool(json.load(f).get("shards"))


def _record_headers(shard: str) -> list[dict[str, Any]]:
  out = []
  with source_lib.ArrayRecordSource([shard]) as src:
    for i in range(len(src)):
      try:
        rec = records.decode_record(src[i], with_images=False)
        out.append({"study_id": rec["study_id"], "patient_id": rec["patient_id"], "text": rec["text"]})
      except Exception as e:  # pylint: disable=broad-exception-caught
        out.append({"error": str(e)})
  return out


class _Builder:
  """One build or append run into ``directory`` (see the module docstring)."""

  def __init__(self, config, directory: str, variables, step: Optional[int], checkpoint: Optional[str], **options):
    self.config = config
    self.directory = os.path.abspath(directory)
    self.is_writer = jax.process_index() == 0
    self.options = options
    self.chash = config_hash(config)
    manifest = read_manifest(self.directory)
    if manifest is None:
      manifest = self._new_manifest(step, checkpoint)
    else:
      check_compatible(manifest, self.directory, self.chash, step)
    self.manifest = manifest
    self.predict = PredictFn.from_config(config)
    self.placed = self.predict.place(variables)
    self.known = _known_studies(self.directory, manifest["segments"])
    self.embedded: list[str] = []  # the shards this run embedded
    # Process 0 writes nothing before every process has read what an earlier run left.
    _barrier("clinvla_index_opened")

  def _new_manifest(self, step, checkpoint) -> dict[str, Any]:
    precision = self.config.model.get("precision", "auto")
    return {
      "format": FORMAT,
      "format_version": FORMAT_VERSION,
      "config_hash": self.chash,
      "model": {
        "proj_dim": int(self.config.model.proj_dim),
        "precision": layers.auto_precision_name() if precision == "auto" else precision,
        "identity": model_identity(self.config),
      },
      "checkpoint": {"path": os.path.abspath(checkpoint) if checkpoint else None, "step": step},
      "counts": {},
      "inputs": [],
      "segments": [],
      "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }

  # --- commit points -------------------------------------------------------------

  def _commit(self) -> None:
    m = self.manifest
    rows = sum(s["rows"] for s in m["segments"])
    m["counts"] = {
      "studies": rows,
      "with_report": sum(s.get("with_report", 0) for s in m["segments"]),
      "segments": len(m["segments"]),
      "inputs": len(m["inputs"]),
      "skipped_already_indexed": sum(s.get("already_indexed", 0) for s in m["segments"]),
    }
    m["updated"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    if self.is_writer:
      os.makedirs(self.directory, exist_ok=True)
      m["counts"]["rejects"] = write_rejects(self.directory, m)
      # Written last: the manifest names only complete segments.
      files.atomic_write_bytes(os.path.join(self.directory, MANIFEST), (json.dumps(m, indent=1) + "\n").encode())

  def _add_input(self, entry: dict[str, Any]) -> None:
    same = lambda i: all(i.get(k) == entry.get(k) for k in ("kind", "path", "split", "staging"))  # noqa: E731
    if not any(same(i) for i in self.manifest["inputs"]):
      self.manifest["inputs"].append(entry | {"added": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
      self._commit()

  # --- inputs ----------------------------------------------------------------------

  def add(self, path: str, split: Optional[str] = None) -> None:
    path = os.path.abspath(path)
    if not os.path.exists(path):
      raise SearchIndexError(f"{path}: input not found")
    if _is_converted(path):
      self._add_input({"kind": "converted", "path": path, "split": split or ""})
    else:
      self._stage_folder(path)

  def _stage_folder(self, root: str) -> None:
    known = {sid: ingest.StudyInfo(sid, m["patient_id"], m["path"], m["date"]) for sid, m in self.known.items()}
    try:
      folder_plan = ingest.plan_folder(root, known)
    except ingest.IngestError as e:
      raise SearchIndexError(str(e)) from e
    ids = sorted(s.study_id for s in folder_plan.plan.studies)
    rejected = sorted(r.row for r in folder_plan.plan.rejects)
    key = hashlib.sha256("\n".join([root, *ids, "--", *rejected]).encode()).hexdigest()[:16]
    _agree(f"the studies of {root}", key)
    staged = os.path.join(STAGING, key)
    if not ids and (not rejected or any(i.get("staging") == staged for i in self.manifest["inputs"])):
      return  # nothing new
    self._convert(folder_plan, os.path.join(self.directory, staged))
    self._add_input({"kind": "folder", "path": root, "staging": staged})

  def _convert(self, folder_plan, out: str) -> None:
    if os.path.isfile(os.path.join(out, MANIFEST)):
      return  # converted by an earlier, interrupted run
    if self.is_writer:
      # A staging folder that never finished and is not this plan's was left by
      # an input that has changed since; nothing in the index refers to it.
      listed = {i.get("staging") for i in self.manifest["inputs"]}
      staging = os.path.join(self.directory, STAGING)
      for name in sorted(os.listdir(staging)) if os.path.isdir(staging) else []:
        stale = os.path.join(staging, name)
        if stale != out and os.path.join(STAGING, name) not in listed:
          shutil.rmtree(stale, ignore_errors=True)
      os.makedirs(out, exist_ok=True)
      info = {sid: dataclasses.asdict(i) for sid, i in folder_plan.info.items()}
      files.atomic_write_bytes(os.path.join(out, "studies.json"), json.dumps(info).encode())
    _barrier("clinvla_index_staging_ready")
    tok = embed.tokenizer_from_config(self.config)
    workers = self.options.get("workers")
    if workers is None:
      workers = min(8, os.cpu_count() or 1) if len(folder_plan.plan.studies) >= 64 else 0
    opts = writer.Options(
      part=jax.process_index(),
      num_parts=jax.process_count(),
      resume=True,  # continues the parts an interrupted run finished
      workers=workers,
      shard_size=STAGING_SHARD_SIZE,
      image_codec="png",  # lossless, so the embeddings equal those of the default codec
      vocab=tok.vocab_path,
      max_text_len=min(tok.max_len, 128),
      require_text=False,
      tfds=False,
      progress=self.options.get("progress", True) and self.is_writer,
      whole_shards=True,  # the staged shards, hence the segments, do not depend on the process count
      combine=False,  # process 0 does, below
    )
    try:
      writer.run(folder_plan.plan, out, opts)
    except studies_lib.ConversionError as e:
      raise SearchIndexError(f"{out}: {e}") from e
    _barrier("clinvla_index_staging_done")
    if self.is_writer and not os.path.isfile(os.path.join(out, MANIFEST)):
      writer.combine(out, jax.process_count())
    _barrier("clinvla_index_staging_combined")

  # --- embedding -------------------------------------------------------------------

  def pending(self) -> list[tuple[dict[str, Any], str]]:
    done = {s["shard"] for s in self.manifest["segments"]}
    out = []
    for inp in self.manifest["inputs"]:
      out += [(inp, shard) for shard in _input_shards(self.directory, inp) if shard not in done]
    return out

  def embed_pending(self) -> None:
    todo = self.pending()
    _agree("the shards still to embed", [shard for _, shard in todo])
    if not todo:
      return
    total = 0
    for _, shard in todo:
      with source_lib.ArrayRecordSource([shard]) as src:
        total += len(src)
    bar = _progress(total, self.options.get("progress", True) and self.is_writer)
    try:
      for inp, shard in todo:
        self._embed_shard(inp, shard, bar)
    finally:
      bar.close()

  def _embed_shard(self, inp: Mapping[str, Any], shard: str, bar) -> None:
    times = self.options.get("times") or perf.NO_TIMES
    with times.stage("read_headers"):
      headers = _record_headers(shard)
    infos = {}
    if inp["kind"] == "folder":
      with open(os.path.join(self.directory, inp["staging"], "studies.json"), encoding="utf-8") as f:
        infos = json.load(f)
    fresh = [i for i, h in enumerate(headers) if "error" not in h and h["study_id"] not in self.known]
    parts = []
    if fresh:
      batches = embed.iterate_embeddings(
        self.config,
        None,
        [shard],
        batch_size=self.options.get("batch_size"),
        predict_fn=self.predict,
        placed=self.placed,
        times=times,
      )
      for rows in batches:
        parts.append(rows)
        bar.update(len(rows["record_index"]))
    got = {}
    for rows in parts:
      for j, r in enumerate(rows["record_index"].tolist()):
        got[int(r)] = (rows["image"][j], rows["text"][j])
    bar.update(max(0, len(headers) - len(got)))
    rejects, meta, image, text, already = [], [], [], [], 0
    location = lambda i: f"{shard}#{i}"  # noqa: E731
    for i, h in enumerate(headers):
      if "error" in h or i not in got:
        detail = h.get("error", "the loader could not decode it")
        rejects.append({"row": location(i), "reason": "bad_record", "detail": detail})
        continue
      sid = h["study_id"]
      prev = self.known.get(sid)
      if prev is not None:
        if prev["path"] != self._path_of(inp, infos, sid, i, shard):
          rejects.append(
            {"row": location(i), "reason": "duplicate_study_id", "detail": f"{sid} already indexed from {prev['path']}"}
          )
        else:
          already += 1
        continue
      info = infos.get(sid, {})
      m = {
        "study_id": sid,
        "patient_id": info.get("patient_id", h["patient_id"]),
        "date": info.get("date", ""),
        "path": self._path_of(inp, infos, sid, i, shard),
        "report": h["text"],
        "record": i,
        "source": inp["path"],
      }
      meta.append(m)
      image.append(got[i][0])
      text.append(got[i][1])
      self.known[sid] = m
    with times.stage("write"):
      self._write_segment(shard, meta, image, text, rejects, already)
    self.embedded.append(shard)

  def _write_segment(self, shard: str, meta, image, text, rejects, already: int) -> None:
    k = len(self.manifest["segments"])
    name = os.path.join(SEGMENTS, f"seg-{k:06d}")
    if self.is_writer:
      os.makedirs(os.path.join(self.directory, SEGMENTS), exist_ok=True)
      p = self.predict.proj_dim
      npz, jsonl = _segment_bytes(
        {"image": np.reshape(image, (-1, p)), "text": np.reshape(text, (-1, p))},
        meta,
      )
      files.atomic_write_bytes(os.path.join(self.directory, name + ".jsonl"), jsonl)
      files.atomic_write_bytes(os.path.join(self.directory, name + IDS_SUFFIX), _ids_bytes(meta))
      files.atomic_write_bytes(os.path.join(self.directory, name + ".npz"), npz)
    self.manifest["segments"].append(
      {
        "file": name,
        "shard": shard,
        "rows": len(meta),
        "with_report": sum(bool(m["report"]) for m in meta),
        "already_indexed": already,
        "rejects": rejects,
      }
    )
    self._commit()

  @staticmethod
  def _path_of(inp, infos, sid: str, record: int, shard: str) -> str:
    if inp["kind"] == "folder" and sid in infos:
      return infos[sid]["path"]
    return f"{shard}#{record}"


def _barrier(name: str) -> None:
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)


def _agree(what: str, value: Any) -> None:
  """Every process computed the same ``value``: else each raises `SearchIndexError` (rather than deadlock later)."""
  if jax.process_count() == 1:
    return
  digest = np.frombuffer(hashlib.sha256(json.dumps(value, sort_keys=True).encode()).digest(), np.uint32)
  gathered = multihost_utils.process_allgather(digest)
  if not (gathered == digest).all():
    raise SearchIndexError(
      f"the {jax.process_count()} processes disagree on {what}: each must see the same input and index folders"
    )


def _progress(total: int, enabled: bool):
  return tqdm(total=total, desc="index", unit="study", disable=not enabled, file=sys.stderr, smoothing=0.1)


# ---------------------------------------------------------------------------
# The index.
# ---------------------------------------------------------------------------


class Index:
  """The embeddings of an index folder, searchable by text, image or embedding."""

  def __init__(self, directory: str, manifest: Mapping[str, Any], arrays: Mapping[str, np.ndarray], config=None):
    self.directory = directory
    self.manifest = dict(manifest)
    self.image = arrays["image"]
    self.text = arrays["text"]
    self.has_report = arrays["has_report"]
    self.study_ids = arrays["study_id"]
    self._segment_of = arrays["segment"]
    self._offsets = arrays["offset"]
    self.config = config
    self.embedded_shards: tuple[str, ...] = ()  # set by `build`: the shards it embedded (the rest were indexed)
    self._variables = None
    self._query_fns: dict[str, Callable] = {}

  # --- construction -----------------------------------------------------------------

  @classmethod
  def build(
    cls,
    config,
    input: str | Sequence[str],  # noqa: A002  (the CLI's --input)
    output: str,
    *,
    checkpoint: Optional[str] = None,
    variables=None,
    checkpoint_step: Optional[int] = None,
    split: Optional[str] = None,
    batch_size: Optional[int] = None,
    workers: Optional[int] = None,
    progress: bool = True,
    times: Optional[perf.StageTimes] = None,
  ) -> "Index":
    """Indexes ``input`` (converted folder or folder of studies; several allowed) into ``output``.

    Appends when ``output`` already is an index of this config and checkpoint;
    resumes an interrupted build of the same input.  Weights: ``variables``
    (their ``checkpoint_step`` if known), else ``checkpoint``, else the
    initial weights.  ``split`` limits a converted folder to one split.
    ``times``: adds the seconds of each stage of embedding the pending shards
    (`embed.iterate_embeddings`' stages, "read_headers" and "write").
    """
    existing = read_manifest(os.path.abspath(output))
    if existing is not None:
      # Before loading any weights: a wrong config is refused at once.
      check_compatible(existing, os.path.abspath(output), config_hash(config), check_step=False)
    step = checkpoint_step
    if variables is None:
      variables, step = variables_for(config, checkpoint)
    builder = _Builder(
      config,
      output,
      variables,
      step,
      checkpoint,
      batch_size=batch_size,
      workers=workers,
      progress=progress,
      times=times,
    )
    # Finish what an interrupted run left first, so its studies count as known.
    builder.embed_pending()
    for path in [input] if isinstance(input, (str, os.PathLike)) else list(input):
      builder.add(os.fspath(path), split)
      builder.embed_pending()
    if not builder.manifest["segments"]:
      builder._commit()  # pylint: disable=protected-access
    _barrier("clinvla_index_built")  # every process opens the manifest process 0 wrote last
    index = cls.load(output, config)
    index._variables = variables  # pylint: disable=protected-access
    index.embedded_shards = tuple(builder.embedded)
    return index

  @classmethod
  def load(cls, directory: str, config=None, *, checkpoint: Optional[str] = None, variables=None) -> "Index":
    """Opens an index; ``config`` (and weights) are needed only to embed text or image queries.

    Without ``variables`` or ``checkpoint`` the queries use the checkpoint the
    index was built with.  Raises `IndexMismatchError` for another model config.
    """
    directory = os.path.abspath(directory)
    manifest = read_manifest(directory)
    if manifest is None:
      raise SearchIndexError(f"{directory}: no {MANIFEST}, so not an index (build one with --mode=index)")
    if config is not None:
      check_compatible(manifest, directory, config_hash(config), check_step=False)
    p = int(manifest["model"]["proj_dim"])
    parts = {k: [] for k in ("image", "text", "has_report", "study_id", "segment", "offset")}
    for k, seg in enumerate(manifest["segments"]):
      path = os.path.join(directory, seg["file"] + ".npz")
      try:
        with np.load(path) as z:
          n = len(z["study_id"])
          parts["image"].append(z["image"].reshape(n, p))
          parts["text"].append(z["text"].reshape(n, p))
          parts["has_report"].append(z["has_report"])
          parts["study_id"].append(z["study_id"])
          parts["offset"].append(z["offsets"][:-1])
      except (OSError, KeyError, ValueError) as e:
        raise SearchIndexError(f"{path}: unreadable index segment ({e})") from e
      parts["segment"].append(np.full(n, k, np.int32))
    arrays = {
      k: np.concatenate(v) if v else np.zeros((0, p) if k in ("image", "text") else (0,)) for k, v in parts.items()
    }
    arrays["study_id"] = arrays["study_id"].astype(str)
    arrays["has_report"] = arrays["has_report"].astype(bool)
    index = cls(directory, manifest, arrays, config)
    if variables is not None:
      index._variables = variables
    elif checkpoint is not None and config is not None:
      variables, step = variables_for(config, checkpoint)
      check_compatible(manifest, directory, config_hash(config), step)
      index._variables = variables
    return index

  def __len__(self) -> int:
    return len(self.study_ids)

  # --- rows ---------------------------------------------------------------------------

  def row_info(self, row: int) -> dict[str, Any]:
    """study_id, patient_id, date, path, report, record of one row (read from its segment)."""
    seg = self.manifest["segments"][int(self._segment_of[row])]
    with open(os.path.join(self.directory, seg["file"] + ".jsonl"), "rb") as f:
      f.seek(int(self._offsets[row]))
      return json.loads(f.readline())

  def thumbnail(self, row: int) -> Optional[np.ndarray]:
    """uint8 [224, 224] current frontal view of one row, from its record; None when the record is gone."""
    seg = self.manifest["segments"][int(self._segment_of[row])]
    try:
      return embed.load_frontal_image((seg["shard"],), int(self.row_info(row)["record"]))
    except Exception:  # pylint: disable=broad-exception-caught
      return None

  def hits(self, rows: Iterable[int], scores: Iterable[float]) -> list[Hit]:
    out = []
    for r, s in zip(rows, scores):
      m = self.row_info(int(r))
      out.append(Hit(m["study_id"], float(s), m["path"], m["report"], m.get("date", ""), m["patient_id"], int(r)))
    return out

  # --- search --------------------------------------------------------------------------

  def search_embedding(self, vectors: np.ndarray, k: int = 10, target: str = "image") -> list[list[Hit]]:
    """Exact top-k rows per query vector [Q, P] against the image or the report embeddings."""
    if target not in TARGETS:
      raise ValueError(f"target must be one of {TARGETS}, got {target!r}")
    rows = self.image if target == "image" else self.text
    valid = None if target == "image" else self.has_report
    idx, scores = exact.top_k(rows, vectors, k, valid)
    return [self.hits(i, s) for i, s in zip(idx, scores)]

  def search_text(self, queries: str | Sequence[str], k: int = 10, target: str = "image"):
    """Studies for text queries: a str gives [Hit, ...], a list one such list per query, in order."""
    single = isinstance(queries, str)
    texts = [queries] if single else list(queries)
    # One query runs alone: a full evaluation batch would cost that many times more.
    vectors = self._query_fn("text" if len(texts) > 1 else "one_text")(texts)
    results = self.search_embedding(vectors, k, target)
    return results[0] if single else results

  def search_image(self, images, k: int = 10, target: str = "image"):
    """Studies for query images (file paths or uint8 [H, W] arrays): like `search_text`.

    ``target="image"``: studies that look like the query; ``"report"``: the
    reports that describe it.
    """
    single = isinstance(images, (str, os.PathLike, np.ndarray))
    items = [images] if single else list(images)
    vectors = self._query_fn("image")(items)
    results = self.search_embedding(vectors, k, target)
    return results[0] if single else results

  def _query_fn(self, kind: str) -> Callable:
    if kind in self._query_fns:
      return self._query_fns[kind]
    if self.config is None:
      raise SearchIndexError(f"{self.directory}: text and image queries need the model: Index.load(dir, config)")
    if self._variables is None:
      ckpt = self.manifest["checkpoint"]
      if ckpt.get("step") is not None and not (ckpt.get("path") and os.path.exists(ckpt["path"])):
        raise SearchIndexError(
          f"{self.directory} was built with checkpoint step {ckpt['step']} from {ckpt.get('path')}, "
          "which is not there: pass the checkpoint"
        )
      variables, step = variables_for(self.config, ckpt.get("path"))
      check_compatible(self.manifest, self.directory, config_hash(self.config), step)
      self._variables = variables
    predict = PredictFn.from_config(self.config)
    placed = predict.place(self._variables)
    self._query_fns["text"] = embed.make_text_embed_fn(self.config, None, predict_fn=predict, placed=placed)
    self._query_fns["one_text"] = embed.make_text_embed_fn(
      self.config, None, batch_size=1, predict_fn=predict, placed=placed
    )
    self._query_fns["image"] = make_image_embed_fn(self.config, predict, placed)
    return self._query_fns[kind]


def make_image_embed_fn(config, predict, placed) -> Callable[[Sequence[Any]], np.ndarray]:
  """list of image files / uint8 arrays -> float [N, P]: each as the current frontal view of a study."""
  slots = embed.eval_view_slots(config)
  slots = tuple(range(schema.NUM_VIEWS)) if slots is None else slots
  size = predict.padded_batch_size(1)

  def pixels(item) -> np.ndarray:
    if isinstance(item, np.ndarray):
      return images_lib.resize(item) if item.shape != (schema.IMAGE_SIZE,) * 2 else item.astype(np.uint8)
    return images_lib.preprocess(os.fspath(item))

  def embed_images(items: Sequence[Any]) -> np.ndarray:
    views = [pixels(x) for x in items]
    out = []
    for start in range(0, len(views), size):
      chunk = views[start : start + size]
      n = len(chunk)
      patches = np.zeros((size, len(slots), schema.NUM_PATCHES, schema.PATCH_SIZE**2), np.uint8)
      valid = np.zeros((size, len(slots)), bool)
      front = slots.index(embed.FRONTAL_SLOT)
      for j in range(size):
        patches[j, front] = records.to_patch_major(chunk[min(j, n - 1)])
        valid[j, front] = True
      idx = np.broadcast_to(np.arange(schema.NUM_PATCHES, dtype=np.int32), (size, len(slots), schema.NUM_PATCHES))
      share = size // jax.process_count()
      lo = jax.process_index() * share
      part = slice(lo, lo + share)
      out.append(predict.images(placed, patches[part], idx[part], valid[part], view_slots=slots)[:n])
    return np.concatenate(out) if out else np.zeros((0, predict.proj_dim), np.float32)

  return embed_images
