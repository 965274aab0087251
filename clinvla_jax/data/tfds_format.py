"""The study records as a TensorFlow Datasets (TFDS) dataset, readable without TensorFlow.

Every converter output folder is also a TFDS builder directory::

  import tensorflow_datasets as tfds
  ds = tfds.builder_from_directory(DIR).as_data_source("train")
  ds[0]["images"]        # uint8 [4, 224, 224]

Beside our own shards (``{split}-p000-00000.array_record``, read by the
pipeline) the folder holds TFDS's ArrayRecord shards
(``{dataset}-{split}.array_record-00000-of-00001``: serialised
``tf.train.Example`` protos of ``features``), ``dataset_info.json`` (source
citation, homepage, split sizes), ``features.json``, ``metadata.json`` (label
and view names) and ``LICENSE``.  The same studies twice: the pipeline's
records carry views patch-major and uncompressed, so a batch gathers its kept
patches straight out of the record bytes (about 4 µs a study to parse), while
TFDS decodes a whole example (about 1 ms a study with its zlib-compressed
images, benchmarks/RESULTS.md); the TFDS copy is for other tools.

The pipeline reads a TFDS-only folder too (``source.list_shards`` finds the
shards of a split; ``records.decode_record`` recognises the protos), at TFDS's
decode speed.

``clinvla_jax.data.tfds_writer`` writes the copy. Reading or writing one needs ``tensorflow-datasets`` (the
``tfds`` extra), imported only then.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any, Mapping

import numpy as np

from clinvla_jax.data import schema

FILE_FORMAT = "array_record"
TEMPLATE = "{DATASET}-{SPLIT}.{FILEFORMAT}-{SHARD_X_OF_Y}"
DATASET_INFO = "dataset_info.json"


def features():
  """The TFDS feature spec of one study (``tfds.features.FeaturesDict``)."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  f = tfds.features
  v, s, n = schema.NUM_VIEWS, schema.IMAGE_SIZE, schema.MAX_TEXT_LEN
  return f.FeaturesDict(
    {
      "images": f.Tensor(
        shape=(v, s, s),
        dtype=np.uint8,
        encoding=f.Encoding.ZLIB,
        doc="grayscale views " + ", ".join(schema.VIEW_NAMES) + "; zeros where a view is missing",
      ),
      "view_valid": f.Tensor(shape=(v,), dtype=np.bool_),
      "input_ids": f.Tensor(shape=(n,), dtype=np.int32, doc="BERT WordPiece ids of text"),
      "attention_mask": f.Tensor(shape=(n,), dtype=np.int32),
      # Any label count: one reader serves every dataset; names in metadata.json.
      "labels": f.Tensor(
        shape=(None,), dtype=np.float32, doc="1 positive, 0 negative, -1 uncertain, NaN not mentioned"
      ),
      "text": f.Text(doc="cleaned report text that was tokenised"),
      "patient_id": f.Text(),
      "study_id": f.Text(),
      "split": f.Text(),
      "dataset": f.Text(),
      "image_ids": f.Sequence(f.Text(), length=v),
      "prior_days": f.Scalar(dtype=np.float32, doc="days from the prior study (NaN: none)"),
    }
  )


def to_example(rec: Mapping[str, Any]) -> dict[str, Any]:
  """A decoded record (``records.decode_record``) as a TFDS example dict."""
  return {
    "images": rec["images"],
    "view_valid": np.asarray(rec["view_valid"], np.bool_),
    "input_ids": np.asarray(rec["input_ids"], np.int32),
    "attention_mask": np.asarray(rec["attention_mask"], np.int32),
    "labels": np.asarray(rec["labels"], np.float32).reshape(-1),
    "text": rec["text"],
    "patient_id": rec["patient_id"],
    "study_id": rec["study_id"],
    "split": rec["split"],
    "dataset": rec.get("dataset", ""),
    "image_ids": list(rec.get("image_ids", ("",) * schema.NUM_VIEWS)),
    "prior_days": np.float32(rec.get("prior_days", math.nan)),
  }


_FEATURES = None


def decode_example(data: bytes) -> dict[str, Any]:
  """A serialised TFDS example -> a dict like ``records.decode_record``'s."""
  global _FEATURES
  if _FEATURES is None:
    _FEATURES = features()
  ex = _FEATURES.deserialize_example_np(data)
  text = lambda x: x.decode("utf-8") if isinstance(x, bytes) else str(x)
  return {
    "images": np.array(ex["images"], np.uint8),
    "view_valid": np.array(ex["view_valid"], np.bool_),
    "input_ids": np.array(ex["input_ids"], np.int32),
    "attention_mask": np.array(ex["attention_mask"], np.int32),
    "labels": np.array(ex["labels"], np.float32),
    "text": text(ex["text"]),
    "patient_id": text(ex["patient_id"]),
    "study_id": text(ex["study_id"]),
    "split": text(ex["split"]),
    "dataset": text(ex["dataset"]),
    "image_ids": tuple(text(x) for x in ex["image_ids"]),
    "prior_days": np.float32(ex["prior_days"]),
  }


def is_builder_dir(folder: str) -> bool:
  return os.path.isfile(os.path.join(folder, DATASET_INFO))


def split_files(folder: str, split: str | None = None) -> list[str]:
  """TFDS shard files of a builder directory (one split, or all), in order."""
  with open(os.path.join(folder, DATASET_INFO), encoding="utf-8") as f:
    info = json.load(f)
  name = info.get("name", "")
  out = []
  for entry in info.get("splits", []):
    if split is not None and entry["name"] != split:
      continue
    lengths = entry.get("shardLengths", [])
    template = entry.get("filepathTemplate") or TEMPLATE
    for k in range(len(lengths)):
      rel = (
        template.replace("{DATASET}", name)
        .replace("{SPLIT}", entry["name"])
        .replace("{FILEFORMAT}", info.get("fileFormat", FILE_FORMAT))
        .replace("{SHARD_X_OF_Y}", f"{k:05d}-of-{len(lengths):05d}")
        .replace("{SHARD_INDEX}", f"{k:05d}")
        .replace("{NUM_SHARDS}", f"{len(lengths):05d}")
      )
      out.append(os.path.join(folder, rel))
  return out
