"""The record and batch contract shared by the converters, the pipeline and the model.

One ArrayRecord record per study.  The converters (``data_prep/``) write records,
the Grain pipeline (``clinvla_jax.data.pipeline``) reads them and yields batches,
and the model consumes batches.  Names, shapes and dtypes are fixed here and
nowhere else.

Record (one study, written by ``encode_record``, read by ``decode_record``):

  images          uint8  [NUM_VIEWS, IMAGE_SIZE, IMAGE_SIZE]  grayscale; zeros where a view is missing
  view_valid      bool   [NUM_VIEWS]
  input_ids       int32  [MAX_TEXT_LEN]
  attention_mask  int32  [MAX_TEXT_LEN]
  text            str    the cleaned report text that was tokenised
  labels          float32 [num_labels]  1 positive, 0 negative, -1 uncertain, NaN not mentioned;
                                         names in manifest.json["label_names"]
  patient_id, study_id, split   str

Optional record fields (added later; ``decode_record`` fills defaults when absent):

  dataset         str    source dataset name, e.g. "mimic_cxr", "covid_cxr"
  image_ids       tuple[str, ...] of length NUM_VIEWS: source image id per view ("" where missing)
  prior_days      float32 scalar: days between the prior and the current study (NaN if unknown / no prior)

Serialisation: ``MAGIC`` + little-endian uint32 header length + JSON header + payload.
The header holds the string fields and, per array, dtype/shape/offset/length into the
payload.  Image views are stored one by one, PNG-compressed (lossless) by default;
missing views take no space.  Decoding never uses pickle, so records are safe to
read from untrusted files.

Batch (numpy, yielded by the pipeline; exactly the model's inputs plus bookkeeping):

  patches         uint8  [B, NUM_VIEWS, K, PATCH_SIZE * PATCH_SIZE * 1]
                         pixels of the kept patches, each flattened in (row, col, channel) order
  patch_idx       int32  [B, NUM_VIEWS, K]  row-major index of each kept patch in the 14x14 grid
  view_valid      bool   [B, NUM_VIEWS]
  input_ids       int32  [B, MAX_TEXT_LEN]
  attention_mask  int32  [B, MAX_TEXT_LEN]
  labels          float32 [B, num_labels]
  example_valid   bool   [B]   False for padding rows of the last evaluation batch
  record_index    int64  [B]   global index of the record in its source (-1 for padding)

K = NUM_PATCHES - round(NUM_PATCHES * mask_ratio) in training (49 at 75 %), NUM_PATCHES (196) in evaluation.
"""

import io
import json
import math
import struct
from typing import Any, Mapping

import numpy as np


VIEW_NAMES = ("current_frontal", "current_lateral", "prior_frontal", "prior_lateral")
NUM_VIEWS = len(VIEW_NAMES)
IMAGE_SIZE = 224
PATCH_SIZE = 16
NUM_PATCHES = (IMAGE_SIZE // PATCH_SIZE) ** 2
MAX_TEXT_LEN = 128

BATCH_KEYS = (
    "patches", "patch_idx", "view_valid", "input_ids", "attention_mask",
    "labels", "example_valid", "record_index",
)


def num_kept_patches(mask_ratio: float, num_patches: int = NUM_PATCHES) -> int:
  """Patches kept per view after MAE-style random masking."""
  return num_patches - int(round(num_patches * mask_ratio))


# --- record (de)serialisation ---------------------------------------------------

MAGIC = b"CVR1"
_HEADER_LEN = struct.Struct("<I")
IMAGE_CODECS = ("png", "raw", "jpeg")

REQUIRED_FIELDS = (
    "images", "view_valid", "input_ids", "attention_mask", "text", "labels",
    "patient_id", "study_id", "split",
)
_STR_FIELDS = ("text", "patient_id", "study_id", "split", "dataset")


class RecordError(ValueError):
  """A record does not follow the schema above."""


def _as_array(example, name, dtype, shape):
  """Returns ``example[name]`` as an array of ``dtype``/``shape`` or raises."""
  value = np.asarray(example[name])
  if shape is not None and value.shape != tuple(shape):
    raise RecordError(
        f"{name}: expected shape {tuple(shape)}, got {value.shape}")
  if value.dtype != dtype:
    # Only lossless casts are accepted silently: a float image or a negative id
    # would otherwise be wrapped around without anyone noticing.
    bool_like = dtype == np.bool_ and np.isin(value, (0, 1)).all()
    if not bool_like and not np.can_cast(value.dtype, dtype, casting="same_kind"):
      raise RecordError(f"{name}: expected dtype {np.dtype(dtype)}, got {value.dtype}")
    cast = value.astype(dtype)
    if value.size and np.issubdtype(dtype, np.integer) and not np.array_equal(cast, value):
      raise RecordError(f"{name}: values do not fit {np.dtype(dtype)}")
    value = cast
  return value


def _encode_image(view: np.ndarray, codec: str, jpeg_quality: int) -> bytes:
  if codec == "raw":
    return view.tobytes()
  from PIL import Image  # pylint: disable=g-import-not-at-top
  buf = io.BytesIO()
  img = Image.fromarray(view, mode="L")
  if codec == "png":
    # compress_level 6 is ~2x faster to write than 9 and only ~1 % larger.
    img.save(buf, format="PNG", compress_level=6)
  else:
    img.save(buf, format="JPEG", quality=jpeg_quality)
  return buf.getvalue()


def _decode_image(data: bytes, codec: str) -> np.ndarray:
  if codec == "raw":
    return np.frombuffer(data, np.uint8).reshape(IMAGE_SIZE, IMAGE_SIZE)
  from PIL import Image  # pylint: disable=g-import-not-at-top
  with Image.open(io.BytesIO(data)) as img:
    arr = np.asarray(img.convert("L") if img.mode != "L" else img, np.uint8)
  if arr.shape != (IMAGE_SIZE, IMAGE_SIZE):
    raise RecordError(f"stored view has shape {arr.shape}")
  return arr


def encode_record(example: Mapping[str, Any], *, image_codec: str = "png",
                  jpeg_quality: int = 95) -> bytes:
  """Serialises one study (a dict following the record schema) to bytes.

  Args:
    example: dict with at least ``REQUIRED_FIELDS``; optional fields ``dataset``,
      ``image_ids`` and ``prior_days``.  Arrays may be any array-like with the
      documented shape; dtypes are cast only when the cast is lossless.
    image_codec: "png" (lossless, default), "raw" (fastest to decode, ~3x larger)
      or "jpeg" (lossy, smallest).
    jpeg_quality: quality for the "jpeg" codec.

  Returns:
    The record bytes.

  Raises:
    RecordError: a field is missing or has the wrong shape/dtype.
  """
  missing = [k for k in REQUIRED_FIELDS if k not in example]
  if missing:
    raise RecordError(f"record lacks fields {missing}")
  if image_codec not in IMAGE_CODECS:
    raise RecordError(f"unknown image codec {image_codec!r}; use one of {IMAGE_CODECS}")
  images = _as_array(example, "images", np.uint8, (NUM_VIEWS, IMAGE_SIZE, IMAGE_SIZE))
  view_valid = _as_array(example, "view_valid", np.bool_, (NUM_VIEWS,))
  arrays = {
      "input_ids": _as_array(example, "input_ids", np.int32, (MAX_TEXT_LEN,)),
      "attention_mask": _as_array(example, "attention_mask", np.int32, (MAX_TEXT_LEN,)),
      "labels": _as_array(example, "labels", np.float32, None).reshape(-1),
      "view_valid": view_valid,
  }
  header = {k: str(example.get(k, "")) for k in _STR_FIELDS}
  image_ids = tuple(str(x) for x in example.get("image_ids", ("",) * NUM_VIEWS))
  if len(image_ids) != NUM_VIEWS:
    raise RecordError(f"image_ids: expected {NUM_VIEWS} entries, got {len(image_ids)}")
  header["image_ids"] = list(image_ids)
  prior_days = float(example.get("prior_days", math.nan))
  header["prior_days"] = None if math.isnan(prior_days) else prior_days
  header["image_codec"] = image_codec

  chunks, offset, entries = [], 0, {}
  for name, arr in arrays.items():
    data = np.ascontiguousarray(arr).astype(arr.dtype.newbyteorder("<")).tobytes()
    entries[name] = [arr.dtype.str, list(arr.shape), offset, len(data)]
    chunks.append(data)
    offset += len(data)
  views = []
  for v in range(NUM_VIEWS):
    if not view_valid[v]:
      # Missing views must read back as zeros; store nothing for them.
      views.append(None)
      continue
    data = _encode_image(np.ascontiguousarray(images[v]), image_codec, jpeg_quality)
    views.append([offset, len(data)])
    chunks.append(data)
    offset += len(data)
  header["arrays"] = entries
  header["views"] = views
  head = json.dumps(header, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
  return b"".join([MAGIC, _HEADER_LEN.pack(len(head)), head, *chunks])


def decode_header(data: bytes) -> tuple[dict[str, Any], memoryview]:
  """Parses the JSON header; returns it with a view of the payload."""
  if data[:4] != MAGIC:
    raise RecordError(f"not a ClinVLA record (magic {bytes(data[:4])!r})")
  (n,) = _HEADER_LEN.unpack_from(data, 4)
  start = 4 + _HEADER_LEN.size
  header = json.loads(bytes(data[start:start + n]).decode("utf-8"))
  return header, memoryview(data)[start + n:]


def decode_record(data: bytes, *, with_images: bool = True) -> dict[str, Any]:
  """Inverse of ``encode_record``.

  Args:
    data: record bytes.
    with_images: if False, ``images`` is left out (text-only consumers, label
      statistics) and no image is decompressed.

  Returns:
    dict with every record field (see module docstring); arrays are writable
    numpy arrays with the documented dtypes.
  """
  header, payload = decode_header(data)
  out: dict[str, Any] = {}
  for name, (dtype, shape, off, n) in header["arrays"].items():
    arr = np.frombuffer(payload[off:off + n], dtype=np.dtype(dtype)).reshape(shape)
    out[name] = arr.astype(arr.dtype.newbyteorder("="))  # copies: writable, native
  for k in _STR_FIELDS:
    out[k] = header.get(k, "")
  out["image_ids"] = tuple(header.get("image_ids", ("",) * NUM_VIEWS))
  prior = header.get("prior_days")
  out["prior_days"] = np.float32(math.nan if prior is None else prior)
  if with_images:
    codec = header.get("image_codec", "png")
    images = np.zeros((NUM_VIEWS, IMAGE_SIZE, IMAGE_SIZE), np.uint8)
    for v, loc in enumerate(header["views"]):
      if loc is not None:
        off, n = loc
        images[v] = _decode_image(bytes(payload[off:off + n]), codec)
    out["images"] = images
  return out
