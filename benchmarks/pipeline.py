r"""Throughput of the input pipeline: studies per second delivered as batches.

Measures ``make_train_loader`` (shuffled, 75 % masked; ``train_augment``: also
ALTA's random affine and jitter, ``augment.AugmentSpec()``, compiled on the host
CPU; ``train_augment_numpy``: the same through the numpy reference, 0 workers
only, and the ratio of the two) and optionally
``make_eval_loader`` (fixed order, unmasked) with 0, 1, 2 Grain workers, on

  * a synthetic ArrayRecord file of ``--num_records`` studies (default 100k),
    generated into a temporary folder and deleted afterwards, and
  * a converter output folder given with ``--data=DIR`` (optional).

The synthetic file is written the way the converters write shards (the
default codec ``records.DEFAULT_IMAGE_CODEC``, ``source.WRITER_OPTIONS``; other
codecs with ``--codec``) and cycles through a pool of ``--distinct`` encoded
studies.  Pool views are smooth synthetic images or, with
``--pool_images=GLOB``, real images resized to 224.  Every study has all four
views, the worst case.  Reading, decoding and masking cost the same whether or
not the bytes repeat; only the page cache benefits (the file has to fit in it:
20k studies of the default codec take 4 GB).

Evaluation reads the view slots of ``--eval_views`` ("frontal", what
``config.eval.views`` defaults to, or "all").  Each row carries the size on
disk per study.

It also compares raw random-access reads (records/s) of our ``ArrayRecordSource``
(``reader.read(i, i + 1)``) with ``grain.sources.ArrayRecordDataSource``
(``reader.read([i])``), whose cost grows with the file's record count.

``--train_step_s`` (seconds per training step at --batch_size, when known) adds
the rate at which training would consume studies, to see whether the pipeline
keeps up.

  python benchmarks/pipeline.py --out=/tmp/pipeline.json
  python benchmarks/pipeline.py --data=/path/to/converted --num_records=0
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import platform
import shutil
import tempfile
import time

from absl import app
from absl import flags
from array_record.python import array_record_module
import numpy as np

from clinvla_jax.data import augment
from clinvla_jax.data import masking
from clinvla_jax.data import pipeline
from clinvla_jax.data import schema
from clinvla_jax.data import records
from clinvla_jax.data import source as source_lib

_NUM_RECORDS = flags.DEFINE_integer("num_records", 100_000, "Studies in the synthetic file; 0 skips it.")
_DISTINCT = flags.DEFINE_integer("distinct", 64, "Distinct encoded studies the synthetic file cycles through.")
_POOL_IMAGES = flags.DEFINE_string(
  "pool_images",
  None,
  "Glob of image files for the synthetic pool's views (resized to 224); default: smooth synthetic images.",
)
_CODEC = flags.DEFINE_enum(
  "codec", records.DEFAULT_IMAGE_CODEC, list(records.IMAGE_CODECS), "Image codec of the synthetic records."
)
_EVAL_VIEWS = flags.DEFINE_enum("eval_views", "frontal", ["frontal", "all"], "View slots the eval loader delivers.")
_READ_THREADS = flags.DEFINE_integer("read_threads", 2, "Reader threads per process.")
_DATA = flags.DEFINE_string("data", None, "A converter output folder to measure.")
_BATCH = flags.DEFINE_integer("batch_size", 32, "Batch size (one process).")
_WORKERS = flags.DEFINE_list("workers", ["0", "1", "2"], "Worker counts.")
_MODES = flags.DEFINE_list(
  "modes",
  ["train", "train_augment", "train_augment_numpy"],
  "Loaders to measure: train, train_augment (ALTA's augmentation, compiled), train_augment_numpy (its numpy "
  "reference, 0 workers only), eval.",
)
_BATCHES = flags.DEFINE_integer("num_batches", 40, "Timed batches per setting.")
_WARMUP = flags.DEFINE_integer("warmup_batches", 3, "Untimed batches after the first one.")
_READ_PROBE = flags.DEFINE_integer("read_probe", 2000, "Random reads per source in the raw read comparison.")
_TRAIN_STEP_S = flags.DEFINE_float("train_step_s", None, "Seconds per training step at --batch_size (optional).")
_TMP = flags.DEFINE_string("tmp_dir", None, "Where to write the synthetic file.")
_TFDS = flags.DEFINE_bool(
  "tfds", True, "Also time TFDS's data source on the synthetic studies (needs tensorflow-datasets)."
)
_OUT = flags.DEFINE_string("out", None, "Write the results as JSON here.")


def _synthetic_view(rng: np.random.Generator) -> np.ndarray:
  """A smooth, X-ray-like 224x224 image (compresses well as PNG)."""
  yy, xx = np.mgrid[0 : schema.IMAGE_SIZE, 0 : schema.IMAGE_SIZE] / schema.IMAGE_SIZE
  a, b, c = rng.uniform(1, 4, 3)
  img = 128 + 60 * np.sin(a * xx + c) * np.cos(b * yy) - 40 * (xx - 0.5) ** 2
  return img.clip(0, 255).astype(np.uint8)


def _pool_views(count: int, pattern: str | None, seed: int) -> list[np.ndarray]:
  rng = np.random.default_rng(seed)
  if not pattern:
    return [_synthetic_view(rng) for _ in range(count)]
  from PIL import Image  # pylint: disable=g-import-not-at-top

  files = sorted(glob.glob(pattern))
  if not files:
    raise FileNotFoundError(f"--pool_images={pattern} matches nothing")
  size = (schema.IMAGE_SIZE, schema.IMAGE_SIZE)
  return [np.asarray(Image.open(f).convert("L").resize(size), np.uint8) for f in files]


def _pool_records(distinct: int, pattern: str | None, codec: str) -> list[bytes]:
  """Encoded studies with four valid views each and random text and labels."""
  views = _pool_views(distinct * schema.NUM_VIEWS, pattern, seed=0)
  rng = np.random.default_rng(1)
  out = []
  for i in range(distinct):
    images = np.stack([views[(i * schema.NUM_VIEWS + v) % len(views)] for v in range(schema.NUM_VIEWS)])
    length = int(rng.integers(20, schema.MAX_TEXT_LEN))
    ids = np.zeros(schema.MAX_TEXT_LEN, np.int32)
    ids[:length] = rng.integers(1000, 30000, length)
    example = {
      "images": images,
      "view_valid": np.ones(schema.NUM_VIEWS, bool),
      "input_ids": ids,
      "attention_mask": (ids > 0).astype(np.int32),
      "text": "synthetic report " * 10,
      "labels": rng.choice([0.0, 1.0, -1.0, np.nan], 14).astype(np.float32),
      "patient_id": f"p{i}",
      "study_id": f"s{i}",
      "split": "train",
    }
    out.append(records.encode_record(example, image_codec=codec))
  return out


def write_synthetic(folder: str, num_records: int, distinct: int, pattern: str | None, codec: str) -> str:
  """Writes one ArrayRecord file of ``num_records`` studies; returns its path."""
  pool = _pool_records(distinct, pattern, codec)
  path = os.path.join(folder, "synthetic-00000-of-00001.array_record")
  writer = array_record_module.ArrayRecordWriter(path, source_lib.WRITER_OPTIONS)
  for i in range(num_records):
    writer.write(pool[i % len(pool)])
  writer.close()
  return path


def _read_rate(src, num_records: int, probe: int) -> float:
  indices = np.random.default_rng(0).integers(0, num_records, probe)
  src[int(indices[0])]  # open the reader outside the timing
  start = time.perf_counter()
  for i in indices:
    src[int(i)]
  return probe / (time.perf_counter() - start)


def compare_reads(path: str, probe: int) -> dict[str, float]:
  """Random-access records/s: our range reads vs grain's list reads."""
  import grain  # pylint: disable=g-import-not-at-top

  ours = source_lib.ArrayRecordSource(path)
  theirs = grain.sources.ArrayRecordDataSource([path])
  return {
    "num_records": len(ours),
    "ArrayRecordSource read(i, i+1)": _read_rate(ours, len(ours), probe),
    "grain ArrayRecordDataSource read([i])": _read_rate(theirs, len(ours), max(probe // 4, 50)),
  }


def decode_cost_us(src: source_lib.ArrayRecordSource, count: int = 256, batch: int = 32) -> dict[str, float]:
  """Mean in-process cost per study of each stage, in µs.

  read: one random read; parse: ``records.decode_for_batch`` (no pixel copy
  for the "patches" codec, a full decode otherwise); decode_images: the full
  ``records.decode_record``; mask: the masks of a batch, one vectorised draw;
  gather: copying the kept patches of four views out of the record.
  """
  count = min(count, len(src))
  order = np.random.default_rng(0).permutation(len(src))[:count]
  start = time.perf_counter()
  raw = [src[int(i)] for i in order]
  read = (time.perf_counter() - start) / count
  start = time.perf_counter()
  parsed = [records.decode_for_batch(r) for r in raw]
  parse = (time.perf_counter() - start) / count
  start = time.perf_counter()
  for r in raw:
    records.decode_record(r)
  decode = (time.perf_counter() - start) / count
  num_kept = records.num_kept_patches(0.75)
  start = time.perf_counter()
  idx = [
    masking.keep_indices_batch(num_kept, seed=0, epoch=0, index=order[k : k + batch]) for k in range(0, count, batch)
  ]
  mask = (time.perf_counter() - start) / count
  idx = np.concatenate(idx)
  out = np.empty((schema.NUM_VIEWS, num_kept, schema.PATCH_SIZE**2), np.uint8)
  start = time.perf_counter()
  for parts, rows in zip(parsed, idx):
    flat = rows + np.asarray(parts.row_start, np.int32)[:, None]
    np.take(parts.rows, flat.reshape(-1), axis=0, out=out.reshape(-1, out.shape[-1]))
  gather = (time.perf_counter() - start) / count
  return {
    "read_us": read * 1e6,
    "parse_us": parse * 1e6,
    "decode_us": decode * 1e6,
    "mask_us": mask * 1e6,
    "gather_us": gather * 1e6,
    "bytes_per_study": float(np.mean([len(r) for r in raw])),
  }


def tfds_cost_us(src: source_lib.ArrayRecordSource, folder: str, count: int = 128) -> dict[str, float] | None:
  """Random access through TFDS's data source vs ours, per study, in µs.

  Writes the first ``count`` studies as a TFDS builder directory (what the
  converters write beside their shards) and reads them back with
  ``tfds.builder_from_directory(...).as_data_source``; None without
  tensorflow-datasets.
  """
  try:
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
    from clinvla_jax.data import tfds_format, tfds_writer  # pylint: disable=g-import-not-at-top
  except ImportError:
    return None
  count = min(count, len(src))
  os.makedirs(folder)
  shard = os.path.join(folder, "ours.array_record")
  writer = array_record_module.ArrayRecordWriter(shard, source_lib.WRITER_OPTIONS)
  for i in range(count):
    writer.write(src[i])
  writer.close()
  num_labels = records.decode_record(src[0], with_images=False)["labels"].shape[0]
  tfds_writer.write_builder_dir(
    folder, dataset="synthetic", splits={"train": [shard]}, label_names=[f"l{k}" for k in range(num_labels)]
  )
  ds = tfds.builder_from_directory(folder).as_data_source("train")
  ours = source_lib.ArrayRecordSource(shard)
  order = np.random.default_rng(0).permutation(count).tolist()
  ds[order[0]], ours[order[0]]  # pylint: disable=expression-not-assigned
  start = time.perf_counter()
  for i in order:
    ds[i]  # pylint: disable=pointless-statement
  theirs_us = (time.perf_counter() - start) / count * 1e6
  start = time.perf_counter()
  for i in order:
    records.decode_for_batch(ours[i])
  ours_us = (time.perf_counter() - start) / count * 1e6
  files = tfds_format.split_files(folder, "train")
  return {
    "tfds_read_decode_us": theirs_us,
    "ours_read_parse_us": ours_us,
    "tfds_disk_kib_per_study": sum(map(os.path.getsize, files)) / count / 1024,
    "ours_disk_kib_per_study": os.path.getsize(shard) / count / 1024,
  }


def disk_bytes_per_study(src: source_lib.ArrayRecordSource) -> float:
  return sum(os.path.getsize(p) for p in src.paths) / max(len(src), 1)


def measure(make_loader, *, batch_size: int, num_batches: int, warmup: int) -> dict[str, float]:
  """Times the first batch (start-up) and then ``num_batches`` batches."""
  start = time.perf_counter()
  loader = make_loader()
  it = iter(loader)
  next(it)
  startup = time.perf_counter() - start
  for _ in range(warmup):
    next(it)
  start, cpu = time.perf_counter(), time.process_time()
  for _ in range(num_batches):
    next(it)
  elapsed = time.perf_counter() - start
  # CPU seconds of this process (all its threads; not its workers'): with
  # 0 workers, studies per CPU second is the rate of one fully used core.
  cpu = time.process_time() - cpu
  del it  # stops the workers before the next setting starts its own
  return {
    "startup_s": startup,
    "studies_per_s": num_batches * batch_size / elapsed,
    "studies_per_cpu_s": num_batches * batch_size / max(cpu, 1e-9),
    "batches_per_s": num_batches / elapsed,
  }


def run_dataset(name: str, src: source_lib.ArrayRecordSource) -> list[dict]:
  rows = []
  batch = _BATCH.value
  threads = _READ_THREADS.value
  eval_slots = (0,) if _EVAL_VIEWS.value == "frontal" else None
  disk = disk_bytes_per_study(src)
  for mode in _MODES.value:
    for workers in map(int, _WORKERS.value):
      reference = contextlib.nullcontext()
      if mode == "train_augment_numpy":
        if workers:
          continue  # the switch holds in this process only
        reference = augment.numpy_reference()
      if mode in ("train", "train_augment", "train_augment_numpy"):
        spec = augment.AugmentSpec() if mode.startswith("train_augment") else None
        make = lambda w=workers, spec=spec: pipeline.make_train_loader(
          src,
          global_batch_size=batch,
          seed=0,
          mask_ratio=0.75,
          worker_count=w,
          shard_index=0,
          shard_count=1,
          read_threads=threads,
          augment=spec,
        )
      elif mode == "eval":
        make = lambda w=workers: pipeline.make_eval_loader(
          src,
          global_batch_size=batch,
          worker_count=w,
          shard_index=0,
          shard_count=1,
          read_threads=threads,
          view_slots=eval_slots,
        )
      else:
        raise ValueError(f"unknown mode {mode!r}")
      needed = (1 + _WARMUP.value + _BATCHES.value) * batch
      num_batches = _BATCHES.value
      if mode == "eval" and needed > len(src):
        num_batches = max(1, len(src) // batch - 1 - _WARMUP.value)
      with reference:
        result = measure(make, batch_size=batch, num_batches=num_batches, warmup=_WARMUP.value)
      row = {
        "dataset": name,
        "num_records": len(src),
        "mode": mode,
        "workers": workers,
        "batch_size": batch,
        "views": _EVAL_VIEWS.value if mode == "eval" else "all",
        "disk_kib_per_study": disk / 1024,
        **result,
      }
      if _TRAIN_STEP_S.value:
        row["train_consumes_studies_per_s"] = batch / _TRAIN_STEP_S.value
        row["keeps_up"] = row["studies_per_s"] >= row["train_consumes_studies_per_s"]
      print(_format_row(row), flush=True)
      rows.append(row)
  return rows


_COLUMNS = (
  "dataset",
  "num_records",
  "mode",
  "views",
  "workers",
  "batch_size",
  "disk_kib_per_study",
  "startup_s",
  "studies_per_s",
  "studies_per_cpu_s",
  "train_consumes_studies_per_s",
  "keeps_up",
)


def _format_row(row: dict) -> str:
  cells = []
  for col in _COLUMNS:
    value = row.get(col, "")
    cells.append(f"{value:.1f}" if isinstance(value, float) else str(value))
  return "| " + " | ".join(cells) + " |"


def augment_ratios(rows: list[dict]) -> dict:
  """{dataset: {studies_per_s, studies_per_cpu_s}}: train_augment over train_augment_numpy, 0 workers, this run."""
  out = {}
  for row in rows:
    if row["mode"] != "train_augment" or row["workers"]:
      continue
    numpy_row = next(
      (r for r in rows if r["dataset"] == row["dataset"] and r["mode"] == "train_augment_numpy" and not r["workers"]),
      None,
    )
    if numpy_row:
      out[row["dataset"]] = {k: row[k] / numpy_row[k] for k in ("studies_per_s", "studies_per_cpu_s")}
  return out


def main(argv):
  del argv
  results = {
    "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
    "flags": {
      f: flags.FLAGS[f].value
      for f in (
        "num_records",
        "distinct",
        "pool_images",
        "codec",
        "data",
        "batch_size",
        "workers",
        "modes",
        "num_batches",
        "train_step_s",
        "eval_views",
        "read_threads",
      )
    },
    "reads": [],
    "decode": {},
    "pipeline": [],
  }
  print("| " + " | ".join(_COLUMNS) + " |")
  print("|" + "---|" * len(_COLUMNS))
  tmp = None
  try:
    if _NUM_RECORDS.value > 0:
      tmp = tempfile.mkdtemp(prefix="clinvla_pipeline_bench_", dir=_TMP.value)
      start = time.perf_counter()
      path = write_synthetic(tmp, _NUM_RECORDS.value, _DISTINCT.value, _POOL_IMAGES.value, _CODEC.value)
      results["synthetic"] = {"write_s": time.perf_counter() - start, "file_bytes": os.path.getsize(path)}
      src = source_lib.ArrayRecordSource(path)
      name = "synthetic" + ("-real-views" if _POOL_IMAGES.value else "")
      results["decode"][name] = decode_cost_us(src)
      results["pipeline"] += run_dataset(name, src)
      results["reads"].append(compare_reads(path, _READ_PROBE.value))
      if _TFDS.value:
        results["tfds"] = tfds_cost_us(src, os.path.join(tmp, "tfds"))
    if _DATA.value:
      src = source_lib.ArrayRecordSource(_DATA.value)
      name = os.path.basename(os.path.normpath(_DATA.value))
      results["decode"][name] = decode_cost_us(src)
      results["pipeline"] += run_dataset(name, src)
  finally:
    if tmp:
      shutil.rmtree(tmp, ignore_errors=True)
  print()
  for name, cost in results["decode"].items():
    print(
      f"{name}, µs/study: read {cost['read_us']:.0f}, parse "
      f"{cost['parse_us']:.0f}, full decode {cost['decode_us']:.0f}, mask "
      f"{cost['mask_us']:.0f}, gather {cost['gather_us']:.0f}; "
      f"{cost['bytes_per_study'] / 1024:.1f} KiB/study"
    )
  if results.get("tfds"):
    t = results["tfds"]
    print(
      f"random access + decode, µs/study: TFDS data source {t['tfds_read_decode_us']:.0f} "
      f"({t['tfds_disk_kib_per_study']:.1f} KiB/study), ours (read + parse) "
      f"{t['ours_read_parse_us']:.0f} ({t['ours_disk_kib_per_study']:.1f} KiB/study)"
    )
  results["augment_compiled_vs_numpy"] = augment_ratios(results["pipeline"])
  for name, ratio in results["augment_compiled_vs_numpy"].items():
    print(
      f"{name}, 0 workers: compiled augmentation / numpy reference = {ratio['studies_per_s']:.2f}x studies/s, "
      f"{ratio['studies_per_cpu_s']:.2f}x studies per CPU s"
    )
  for reads in results["reads"]:
    print(
      f"random reads on {reads['num_records']} records: "
      + ", ".join(f"{k} {v:,.0f}/s" for k, v in reads.items() if k != "num_records")
    )
  if _OUT.value:
    with open(_OUT.value, "w", encoding="utf-8") as f:
      json.dump(results, f, indent=2, default=str)
    print(f"wrote {_OUT.value}")


if __name__ == "__main__":
  app.run(main)
