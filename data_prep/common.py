"""The command line every converter shares, and the readers of the tables the official layouts ship.

A converter module (``data_prep/<dataset>.py``) reads its dataset's official layout into a ``Plan``
(``clinvla_jax.data.studies``) and hands it to ``main_for``, which runs ``clinvla_jax.data.writer.run`` on one part
with the options of these flags. Everything the search index also needs (rows, study assembly, writing) lives in
``clinvla_jax.data``.
"""

import csv
import dataclasses
import gzip
import io
import json
import os
import sys
import zipfile
from typing import Callable

from absl import flags

from clinvla_jax.data import images as images_lib
from clinvla_jax.data import schema
from clinvla_jax.data import records
from clinvla_jax.data import writer
from clinvla_jax.data.studies import ConversionError, Plan


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
    schema.MAX_TEXT_LEN,
    f"Real tokens per report, at most {schema.MAX_TEXT_LEN} (the record length; the rest is padding).",
  )
  flags.DEFINE_enum(
    "require_view", "frontal", ["any", "frontal", "both"], "Which current views a study needs to be written."
  )
  flags.DEFINE_bool("tfds", True, "Also write the output as a TFDS builder directory (needs tensorflow-datasets).")


def options_from_flags(**overrides) -> writer.Options:
  f = flags.FLAGS
  opts = writer.Options(
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


def main_for(build_plan: Callable[[str], Plan], **extra_options) -> Callable[[list[str]], None]:
  """Returns an absl ``main`` that plans from --input and runs one part."""

  def main(argv):
    del argv
    opts = options_from_flags(**extra_options)
    try:
      plan = build_plan(flags.FLAGS.input)
      summary = writer.run(plan, flags.FLAGS.output, opts)
    except ConversionError as e:
      sys.exit(f"error: {e}")
    print(
      json.dumps(
        {k: summary[k] for k in ("dataset", "part", "num_parts", "records", "rows_used")}
        | {"rejected": len(summary["rejects"])}
      )
    )

  return main


def read_table(path: str) -> list[dict[str, str]]:
  """Rows of a CSV that may be plain, gzipped or the only CSV inside a zip."""
  if not os.path.isfile(path):
    raise ConversionError(f"{path}: table not found")
  if path.endswith(".zip"):
    with zipfile.ZipFile(path) as z:
      names = [n for n in z.namelist() if n.endswith(".csv")]
      if len(names) != 1:
        raise ConversionError(f"{path}: expected one CSV inside, found {names}")
      data = z.read(names[0]).decode("utf-8-sig")
    return list(csv.DictReader(io.StringIO(data)))
  opener = gzip.open if path.endswith(".gz") else open
  with opener(path, "rt", newline="", encoding="utf-8-sig") as f:
    return list(csv.DictReader(f))


def find_first(*candidates: str) -> str:
  """The first existing path among ``candidates`` (else the first one)."""
  for c in candidates:
    if c and os.path.exists(c):
      return c
  return candidates[0]
