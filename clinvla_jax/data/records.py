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
payload.  Image views are stored one by one; missing views take no space.  Codecs
(``image_codec`` in the header):

  patches  default: uncompressed, patch-major (a view is [NUM_PATCHES, PATCH_SIZE**2],
           patches in the order of ``masking.patchify``), 50,176 bytes a view.  The
           pipeline gathers kept patches straight out of the record bytes, with no
           decode step; 11x faster to read than PNG for 2.6x the disk (measured in
           benchmarks/RESULTS.md).
  raw      uncompressed, row-major [IMAGE_SIZE, IMAGE_SIZE].
  png      lossless, about 19 KB a real X-ray view, 1-3 ms a study to decode.
  jpeg     lossy, smallest.

Every codec reads back with ``decode_record``; records written with earlier
codecs stay readable.  The pipeline reads records through ``decode_for_batch``,
which parses only the header's layout tail (shared by records with the same
views) and hands out views into the record bytes.  Both also accept the TFDS
examples of ``tfds_format`` (a TFDS-only folder), at TFDS's decode speed.  Decoding never uses pickle, so records are safe to read
from untrusted files.

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
from typing import Any, Mapping, NamedTuple, Sequence

import numpy as np


from clinvla_jax.data import tfds_format
from clinvla_jax.data.schema import IMAGE_SIZE, MAX_TEXT_LEN, NUM_PATCHES, NUM_VIEWS, PATCH_SIZE

BATCH_KEYS = (
  "patches",
  "patch_idx",
  "view_valid",
  "input_ids",
  "attention_mask",
  "labels",
  "example_valid",
  "record_index",
)


def num_kept_patches(mask_ratio: float, num_patches: int = NUM_PATCHES) -> int:
  """Patches kept per view after MAE-style random masking."""
  return num_patches - int(round(num_patches * mask_ratio))


# --- record (de)serialisation ---------------------------------------------------

MAGIC = b"CVR1"
_HEADER_LEN = struct.Struct("<I")
IMAGE_CODECS = ("patches", "png", "raw", "jpeg")
DEFAULT_IMAGE_CODEC = "patches"
_GRID = IMAGE_SIZE // PATCH_SIZE
_VIEW_BYTES = IMAGE_SIZE * IMAGE_SIZE

REQUIRED_FIELDS = (
  "images",
  "view_valid",
  "input_ids",
  "attention_mask",
  "text",
  "labels",
  "patient_id",
  "study_id",
  "split",
)
_STR_FIELDS = ("text", "patient_id", "study_id", "split", "dataset")


class RecordError(ValueError):
  """A record does not follow the schema above."""


def _as_array(example, name, dtype, shape):
  """Returns ``example[name]`` as an array of ``dtype``/``shape`` or raises."""
  value = np.asarray(example[name])
  if shape is not None and value.shape != tuple(shape):
    raise RecordError(f"{name}: expected shape {tuple(shape)}, got {value.shape}")
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


def to_patch_major(view: np.ndarray) -> np.ndarray:
  """[IMAGE_SIZE, IMAGE_SIZE] -> [NUM_PATCHES, PATCH_SIZE**2], ``masking.patchify``'s order."""
  g, p = _GRID, PATCH_SIZE
  return view.reshape(g, p, g, p).swapaxes(1, 2).reshape(g * g, p * p)


def from_patch_major(patches: np.ndarray) -> np.ndarray:
  """Inverse of ``to_patch_major``."""
  g, p = _GRID, PATCH_SIZE
  return patches.reshape(g, g, p, p).swapaxes(1, 2).reshape(g * p, g * p)


def _encode_image(view: np.ndarray, codec: str, jpeg_quality: int) -> bytes:
  if codec == "raw":
    return view.tobytes()
  if codec == "patches":
    return to_patch_major(view).tobytes()
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
  if codec == "patches":
    return from_patch_major(np.frombuffer(data, np.uint8).reshape(NUM_PATCHES, -1))
  from PIL import Image  # pylint: disable=g-import-not-at-top

  with Image.open(io.BytesIO(data)) as img:
    arr = np.asarray(img.convert("L") if img.mode != "L" else img, np.uint8)
  if arr.shape != (IMAGE_SIZE, IMAGE_SIZE):
    raise RecordError(f"stored view has shape {arr.shape}")
  return arr


def encode_record(
  example: Mapping[str, Any], *, image_codec: str = DEFAULT_IMAGE_CODEC, jpeg_quality: int = 95
) -> bytes:
  """Serialises one study (a dict following the record schema) to bytes.

  Args:
    example: dict with at least ``REQUIRED_FIELDS``; optional fields ``dataset``,
      ``image_ids`` and ``prior_days``.  Arrays may be any array-like with the
      documented shape; dtypes are cast only when the cast is lossless.
    image_codec: one of ``IMAGE_CODECS`` (see the module docstring).
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


def _looks_like_tfds(data: bytes) -> bool:
  # A serialised tf.train.Example starts with field 1 (features), wire type 2.
  return len(data) > 1 and data[0] == 0x0A


def _tfds_record(data: bytes) -> dict[str, Any]:
  """A TFDS example of ``tfds_format.features`` (a TFDS-only folder's record)."""
  try:
    return tfds_format.decode_example(data)
  except ImportError as e:
    raise RecordError("a TFDS record: reading it needs tensorflow-datasets (pip install -e '.[tfds]')") from e
  except Exception as e:  # pylint: disable=broad-exception-caught
    raise RecordError(f"neither a ClinVLA record nor a readable TFDS example ({e})") from e


def decode_header(data: bytes) -> tuple[dict[str, Any], memoryview]:
  """Parses the JSON header; returns it with a view of the payload."""
  if data[:4] != MAGIC:
    raise RecordError(f"not a ClinVLA record (magic {bytes(data[:4])!r})")
  (n,) = _HEADER_LEN.unpack_from(data, 4)
  start = 4 + _HEADER_LEN.size
  header = json.loads(bytes(data[start : start + n]).decode("utf-8"))
  return header, memoryview(data)[start + n :]


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
  if data[:4] != MAGIC and _looks_like_tfds(data):
    rec = _tfds_record(data)
    if not with_images:
      rec.pop("images")
    return rec
  header, payload = decode_header(data)
  out: dict[str, Any] = {}
  for name, (dtype, shape, off, n) in header["arrays"].items():
    arr = np.frombuffer(payload[off : off + n], dtype=np.dtype(dtype)).reshape(shape)
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
        images[v] = _decode_image(bytes(payload[off : off + n]), codec)
    out["images"] = images
  return out


class BatchParts(NamedTuple):
  """What a batch needs of one record (``decode_for_batch``).

  fields: "view_valid", "input_ids", "attention_mask", "labels" as 1-D
    read-only arrays (views into the record bytes).
  rows: the patches of the requested views that are stored, patch-major,
    uint8 [n * NUM_PATCHES, PATCH_SIZE**2].  With the "patches" codec a view
    into the record bytes (all stored views, back to back), else a copy.
  row_start: per requested slot, the first row of its view in ``rows``, or -1
    where the view is missing.
  """

  fields: dict[str, np.ndarray]
  rows: np.ndarray
  row_start: tuple[int, ...]


_PATCH_BYTES = PATCH_SIZE * PATCH_SIZE


# Layouts parsed from header tails, keyed by the tail bytes and the view slots.
_LAYOUTS: dict[tuple[bytes, tuple[int, ...]], Any] = {}
_LAYOUT_MARK = b'"image_codec":'


def _layout(tail: bytes, view_slots: tuple[int, ...]):
  """(arrays, codec, view locations, stored rows span, row_start) of a header tail."""
  key = (tail, view_slots)
  layout = _LAYOUTS.get(key)
  if layout is not None:
    return layout
  header = json.loads(b"{" + tail)
  arrays = tuple((name, np.dtype(dtype), off, size) for name, (dtype, _, off, size) in header["arrays"].items())
  codec, locs = header["image_codec"], header["views"]
  span, row_start = None, None
  if codec == "patches":
    first = end = None
    for loc in locs:
      if loc is None:
        continue
      if loc[1] != _VIEW_BYTES:
        raise RecordError(f"a stored view has {loc[1]} bytes, expected {_VIEW_BYTES}")
      if first is None:
        first = end = loc[0]
      if loc[0] != end:
        raise RecordError("stored views are not back to back")
      end += _VIEW_BYTES
    if first is None:
      first = end = 0
    span = (first, end)
    row_start = tuple(-1 if locs[slot] is None else (locs[slot][0] - first) // _PATCH_BYTES for slot in view_slots)
  layout = (arrays, codec, locs, span, row_start)
  if len(_LAYOUTS) < 4096:  # a few view patterns x label counts; bounded anyway
    _LAYOUTS[key] = layout
  return layout


def decode_for_batch(data: bytes, view_slots: Sequence[int] = tuple(range(NUM_VIEWS))) -> BatchParts:
  """The parts of a record a batch needs, copying as little as possible.

  With the "patches" codec nothing is copied; other codecs decode the
  requested views (only those) and convert them to patch-major order.  Only
  the end of the header (codec and layout, which ``encode_record`` writes
  last) is parsed, and its parse is shared by records with the same layout.
  """
  if data[:4] != MAGIC:
    if not _looks_like_tfds(data):
      raise RecordError(f"not a ClinVLA record (magic {bytes(data[:4])!r})")
    rec = _tfds_record(data)
    fields = {k: rec[k] for k in ("view_valid", "input_ids", "attention_mask", "labels")}
    present = [slot for slot in view_slots if rec["view_valid"][slot]]
    rows = (
      np.concatenate([to_patch_major(rec["images"][slot]) for slot in present])
      if present
      else np.zeros((0, _PATCH_BYTES), np.uint8)
    )
    starts = {slot: q * NUM_PATCHES for q, slot in enumerate(present)}
    return BatchParts(fields, rows, tuple(starts.get(slot, -1) for slot in view_slots))
  (n,) = _HEADER_LEN.unpack_from(data, 4)
  start = 4 + _HEADER_LEN.size
  mark = data.rfind(_LAYOUT_MARK, start, start + n)
  if mark >= 0:
    tail = bytes(data[mark : start + n])
  else:  # not written by encode_record's key order: rebuild the tail
    header = json.loads(bytes(data[start : start + n]))
    tail = json.dumps(
      {"image_codec": header.get("image_codec", "png"), "arrays": header["arrays"], "views": header["views"]},
      separators=(",", ":"),
    ).encode()[1:]
  arrays, codec, locs, span, row_start = _layout(tail, tuple(view_slots))
  start += n
  buf = np.frombuffer(data, np.uint8)
  fields = {name: buf[start + off : start + off + size].view(dtype) for name, dtype, off, size in arrays}
  if codec == "patches":
    rows = buf[start + span[0] : start + span[1]].reshape(-1, _PATCH_BYTES)
    return BatchParts(fields, rows, row_start)
  decoded, starts = [], []
  for slot in view_slots:
    loc = locs[slot]
    if loc is None:
      starts.append(-1)
      continue
    starts.append(len(decoded) * NUM_PATCHES)
    decoded.append(to_patch_major(_decode_image(bytes(data[start + loc[0] : start + loc[0] + loc[1]]), codec)))
  rows = np.concatenate(decoded) if decoded else np.zeros((0, _PATCH_BYTES), np.uint8)
  return BatchParts(fields, rows, tuple(starts))


def fit_token_length(input_ids: np.ndarray, attention_mask: np.ndarray, max_len: int) -> tuple[np.ndarray, np.ndarray]:
  """Shortens record tokens ([CLS] ... [SEP] [PAD]...) to the model's length.

  Records hold MAX_TEXT_LEN tokens, smaller models read fewer.  A row longer
  than ``max_len`` keeps its first ``max_len - 1`` tokens and ends on its own
  last real token (the [SEP]), so it still looks like a tokenizer output.

  Args:
    input_ids: int [B, L].
    attention_mask: int [B, L], ones then zeros.
    max_len: target length.

  Returns:
    (input_ids, attention_mask), int32 [B, min(L, max_len)].
  """
  ids = np.asarray(input_ids, np.int32)
  mask = np.asarray(attention_mask, np.int32)
  if ids.shape[1] <= max_len:
    return ids, mask
  length = mask.sum(axis=1)
  last = ids[np.arange(len(ids)), np.maximum(length - 1, 0)]
  ids, mask = ids[:, :max_len].copy(), mask[:, :max_len].copy()
  cut = length > max_len
  ids[cut, max_len - 1] = last[cut]
  return ids, mask
