"""Grain input pipeline: ArrayRecord studies -> masked, batched numpy arrays.

Stages, in order::

  ArrayRecordSource (bytes by range)          source.py
    -> global shuffle, new permutation per epoch (sampler, seeded)
    -> shard by process: process p takes positions p, p + P, ... of the
       shuffled stream (grain.DataLoader shard_options)
    -> decode, never fatal (map)    -> drop undecodable records (filter)
    -> patchify + per-view random masking (map)      masking.py
    -> batch (per-process batch size)
    -> grain.DataLoader workers (multiprocessing prefetch; 0 = in-process)

With workers, every stage up to the batch runs inside the worker processes
(each batching its own strided share of this process's stream).  The loaders
yield exactly the batch dict of ``records.py`` (``records.BATCH_KEYS``).

Training (``make_train_loader``): shuffled, masked (K = records.num_kept_patches
of the mask ratio), repeating over epochs with new permutations and new masks
each epoch.  An epoch is ``(N // P) * P`` studies (the up to P - 1 studies that
do not divide evenly among P processes are dropped, a different few each epoch),
so every process sees the same number of studies per epoch.  The stream runs on
across epoch boundaries: a batch may mix the end of one epoch with the start of
the next.  ``drop_remainder``: when ``num_epochs`` is finite, each worker drops
its last incomplete batch, so every batch is full.

Evaluation (``make_eval_loader``): fixed order, no masking (K = 196), one pass.
The record list is padded to a multiple of P * max(worker_count, 1) * B, so every
process yields the same number of full batches; padding rows have
``example_valid=False`` and ``record_index=-1``.  With worker_count 0 only the
last batch holds padding; with W workers the last W batches may.

Undecodable records: the decode map catches every error, logs a warning naming
the record index and marks the record.  Training drops it in a filter; evaluation
turns it into a padding row (so all processes still run the same number of
batches).  The count of skipped records travels with the batches to the main
process: ``BatchIterator.num_skipped``.

Masks are drawn from (seed, epoch, record index, view) only (``masking.py``), so
a batch can be rebuilt from its ``record_index`` column and the epoch.  Iterator
state (``get_state``/``set_state``) restores the stream exactly; it requires the
same worker_count, shards and seed.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import threading
from typing import Any, Sequence

from absl import flags
from absl import logging
import grain
import numpy as np

from clinvla_jax.data import masking
from clinvla_jax.data import records
from clinvla_jax.data import source as source_lib

PathsLike = str | os.PathLike[str] | Sequence[str | os.PathLike[str]]

# Rides along in every row until the main process folds it into a counter.
_SKIPPED_KEY = "_num_skipped"
_STATE_SKIPPED_KEY = "clinvla_num_skipped"
# Separates the shuffle stream from the masking stream of the same seed.
_SHUFFLE_STREAM = 0x73687566  # "shuf"


@dataclasses.dataclass(frozen=True)
class LoaderInfo:
  """What a loader delivers, for the training loop's bookkeeping.

  Attributes:
    num_records: studies in the source.
    global_batch_size: batch size summed over processes.
    batch_size: rows per batch yielded by this process.
    num_kept: patches per view in each batch (K).
    shard_index: this process's data shard.
    shard_count: number of data shards (processes).
    examples_per_epoch: studies this process reads per epoch (padding included
      in evaluation).
    batches_per_epoch: training: full batches' worth of one epoch (floor);
      evaluation: the exact number of batches of the single pass.
    num_epochs: None repeats forever.
    training: True for the training loader.
  """
  num_records: int
  global_batch_size: int
  batch_size: int
  num_kept: int
  shard_index: int
  shard_count: int
  examples_per_epoch: int
  batches_per_epoch: int
  num_epochs: int | None
  training: bool


def _ensure_flags_parsed():
  # Grain's workers read absl flags; outside absl.app.run (notebooks, pytest)
  # nothing has parsed them yet and the workers would fail on first access.
  if not flags.FLAGS.is_parsed():
    flags.FLAGS(sys.argv[:1])


def _shard_args(shard_index: int | None, shard_count: int | None
                ) -> tuple[int, int]:
  if shard_index is None and shard_count is None:
    import jax  # pylint: disable=g-import-not-at-top
    return jax.process_index(), jax.process_count()
  if shard_index is None or shard_count is None:
    raise ValueError("give both shard_index and shard_count, or neither")
  if not 0 <= shard_index < shard_count:
    raise ValueError(f"shard_index {shard_index} not in [0, {shard_count})")
  return int(shard_index), int(shard_count)


def _per_process_batch(global_batch_size: int, shard_count: int) -> int:
  if global_batch_size <= 0 or global_batch_size % shard_count:
    raise ValueError(
        f"global_batch_size {global_batch_size} must be a positive multiple of "
        f"the process count {shard_count}")
  return global_batch_size // shard_count


def _as_source(paths: PathsLike | source_lib.ArrayRecordSource
               ) -> source_lib.ArrayRecordSource:
  if isinstance(paths, source_lib.ArrayRecordSource):
    return paths
  return source_lib.ArrayRecordSource(paths)


def infer_num_labels(source: source_lib.ArrayRecordSource, *, probe: int = 16
                     ) -> int:
  """Label count from a shard folder's manifest, else from the first records."""
  for path in source.paths:
    manifest = source_lib.read_manifest(os.path.dirname(path))
    if manifest and "label_names" in manifest:
      return len(manifest["label_names"])
  for index in range(min(probe, len(source))):
    try:
      return int(records.decode_record(source[index], with_images=False)
                 ["labels"].shape[0])
    except Exception:  # pylint: disable=broad-exception-caught
      continue
  raise ValueError(f"cannot infer the label count from {source!r}")


class _KeyedSource:
  """Turns sampler keys into (record index, epoch, bytes) items.

  The sampler packs the epoch into the record key (key = epoch * stride +
  position) because Grain hands maps only the data, and masking needs the
  epoch.  Positions at or past ``len(source)`` are evaluation padding.  Read
  errors are caught here and reported downstream, never raised.
  """

  def __init__(self, source: source_lib.ArrayRecordSource, stride: int):
    self._source = source
    self._stride = stride

  def __len__(self) -> int:
    # Grain takes keys modulo this length; make it larger than any key.
    return self._stride * (2**62 // self._stride)

  def __repr__(self) -> str:
    return f"_KeyedSource({self._source!r}, stride={self._stride})"

  def __getitem__(self, key: int) -> dict[str, Any]:
    epoch, index = divmod(int(key), self._stride)
    if index >= len(self._source):
      return {"index": -1, "epoch": epoch, "data": None, "error": None}
    try:
      data, error = self._source[index], None
    except Exception as e:  # pylint: disable=broad-exception-caught
      data, error = None, f"read failed: {e!r}"
    return {"index": index, "epoch": epoch, "data": data, "error": error}


class _StudySampler:
  """Global, per-epoch shuffled order of the studies (Grain sampler protocol).

  Position g of the stream is position ``g % epoch_len`` of epoch
  ``g // epoch_len``.  Grain's DataLoader gives process p the positions
  p, p + P, ..., i.e. shards after the global shuffle.
  """

  def __init__(self, *, num_records: int, epoch_len: int, shuffle: bool,
               seed: int, num_epochs: int | None):
    if epoch_len <= 0:
      raise ValueError(f"empty epoch ({num_records} records)")
    self._num_records = num_records
    self._epoch_len = epoch_len
    self._stride = max(num_records, epoch_len)
    self._shuffle = shuffle
    self._seed = int(seed)
    self._num_epochs = num_epochs
    self._init_cache()

  def _init_cache(self):
    self._lock = threading.Lock()
    self._perms: dict[int, np.ndarray] = {}

  def __getstate__(self) -> dict[str, Any]:
    state = self.__dict__.copy()
    del state["_lock"], state["_perms"]
    return state

  def __setstate__(self, state: dict[str, Any]):
    self.__dict__.update(state)
    self._init_cache()

  @property
  def stride(self) -> int:
    return self._stride

  def __len__(self) -> int:
    if self._num_epochs is None:
      return sys.maxsize
    return self._num_epochs * self._epoch_len

  def __repr__(self) -> str:
    return (f"_StudySampler(num_records={self._num_records}, "
            f"epoch_len={self._epoch_len}, shuffle={self._shuffle}, "
            f"seed={self._seed}, num_epochs={self._num_epochs})")

  def permutation(self, epoch: int) -> np.ndarray:
    """The order of the studies in one epoch (cached for the last two)."""
    with self._lock:
      perm = self._perms.get(epoch)
      if perm is None:
        rng = np.random.Generator(np.random.Philox(np.random.SeedSequence(
            [_SHUFFLE_STREAM, self._seed, epoch])))
        perm = rng.permutation(self._num_records)
        for old in sorted(self._perms)[:-1]:
          del self._perms[old]
        self._perms[epoch] = perm
      return perm

  def __getitem__(self, index: int) -> grain.RecordMetadata:
    if index < 0 or index >= len(self):
      raise IndexError(f"sampler index {index} out of range")
    epoch, position = divmod(index, self._epoch_len)
    if self._shuffle and position < self._num_records:
      position = int(self.permutation(epoch)[position])
    return grain.RecordMetadata(
        index=index, record_key=epoch * self._stride + position)


def _check_record(rec: dict[str, Any], num_labels: int):
  expected = {
      "images": (records.NUM_VIEWS, records.IMAGE_SIZE, records.IMAGE_SIZE),
      "view_valid": (records.NUM_VIEWS,),
      "input_ids": (records.MAX_TEXT_LEN,),
      "attention_mask": (records.MAX_TEXT_LEN,),
      "labels": (num_labels,),
  }
  for name, shape in expected.items():
    if rec[name].shape != shape:
      raise records.RecordError(
          f"{name} has shape {rec[name].shape}, expected {shape}")


class _SafeDecode(grain.transforms.Map):
  """Decodes record bytes; marks (and logs) records that fail instead of raising."""

  def __init__(self, num_labels: int):
    self._num_labels = num_labels

  def map(self, element: dict[str, Any]) -> dict[str, Any]:
    index = element["index"]
    out = {"index": index, "epoch": element["epoch"], "record": None,
           "skipped": 0}
    if index < 0:
      return out
    try:
      if element["error"]:
        raise IOError(element["error"])
      rec = records.decode_record(element["data"])
      _check_record(rec, self._num_labels)
    except Exception as e:  # pylint: disable=broad-exception-caught
      logging.warning("Skipping record %d: cannot decode it (%s)", index, e)
      out["skipped"] = 1
      return out
    out["record"] = rec
    return out


class _DropUndecodable(grain.transforms.Filter):
  """Drops the records that failed to decode.

  Each process counts what it drops and adds the count to the next record it
  keeps, so the count reaches the main process inside the batches (the only
  channel out of a Grain worker).  Drops after a worker's last kept record are
  not reported.
  """

  def __init__(self):
    self._pending = 0
    self._lock = threading.Lock()

  def __getstate__(self) -> dict[str, Any]:
    return {"_pending": 0}

  def __setstate__(self, state: dict[str, Any]):
    self.__dict__.update(state)
    self._lock = threading.Lock()

  def filter(self, element: dict[str, Any]) -> bool:
    with self._lock:
      if element["record"] is None:
        self._pending += element["skipped"]
        return False
      # Elements are fresh dicts made by _SafeDecode, safe to annotate.
      element["skipped"] += self._pending
      self._pending = 0
      return True


def padding_row(num_kept: int, num_labels: int) -> dict[str, np.ndarray]:
  """One batch row that stands for no study (``example_valid=False``).

  Pixels, ids and masks are zero, views invalid, labels NaN ("not mentioned"),
  patch indices the first ``num_kept`` patches (valid positions).
  """
  k, p = num_kept, records.PATCH_SIZE * records.PATCH_SIZE
  return {
      "patches": np.zeros((records.NUM_VIEWS, k, p), np.uint8),
      "patch_idx": np.broadcast_to(np.arange(k, dtype=np.int32),
                                   (records.NUM_VIEWS, k)).copy(),
      "view_valid": np.zeros((records.NUM_VIEWS,), np.bool_),
      "input_ids": np.zeros((records.MAX_TEXT_LEN,), np.int32),
      "attention_mask": np.zeros((records.MAX_TEXT_LEN,), np.int32),
      "labels": np.full((num_labels,), np.nan, np.float32),
      "example_valid": np.array(False),
      "record_index": np.array(-1, np.int64),
  }


class _MakeRow(grain.transforms.Map):
  """Decoded study -> one batch row: kept patches per view plus text and labels."""

  def __init__(self, *, num_kept: int, seed: int, num_labels: int):
    self._num_kept = num_kept
    self._seed = seed
    self._num_labels = num_labels

  def map(self, element: dict[str, Any]) -> dict[str, np.ndarray]:
    rec = element["record"]
    if rec is None:
      row = padding_row(self._num_kept, self._num_labels)
    else:
      patches, patch_idx = masking.mask_views(
          rec["images"], self._num_kept, seed=self._seed,
          epoch=element["epoch"], index=element["index"])
      row = {
          "patches": patches,
          "patch_idx": patch_idx,
          "view_valid": rec["view_valid"].astype(np.bool_),
          "input_ids": rec["input_ids"].astype(np.int32),
          "attention_mask": rec["attention_mask"].astype(np.int32),
          "labels": rec["labels"].astype(np.float32),
          "example_valid": np.array(True),
          "record_index": np.array(element["index"], np.int64),
      }
    row[_SKIPPED_KEY] = np.array(element["skipped"], np.int32)
    return row


class BatchIterator(grain.DataLoaderIterator):
  """Grain's DataLoader iterator, yielding exactly ``records.BATCH_KEYS``.

  Adds ``num_skipped`` (undecodable records seen so far, kept across
  ``get_state``/``set_state``).
  """

  def __init__(self, loader: Loader, state: bytes | None = None):
    self._num_skipped = 0
    super().__init__(loader, state=None)
    if state is not None:
      self.set_state(state)

  @property
  def num_skipped(self) -> int:
    return self._num_skipped

  def __next__(self) -> dict[str, np.ndarray]:
    batch = super().__next__()
    self._num_skipped += int(np.sum(batch[_SKIPPED_KEY]))
    # np.asarray drops Grain's shared-memory ndarray subclass, keeping the data.
    return {k: np.asarray(batch[k]) for k in records.BATCH_KEYS}

  def get_state(self) -> bytes:
    state = json.loads(super().get_state().decode())
    state[_STATE_SKIPPED_KEY] = self._num_skipped
    return json.dumps(state, indent=4).encode()

  def set_state(self, state: bytes):
    state = json.loads(state.decode())
    self._num_skipped = int(state.pop(_STATE_SKIPPED_KEY, 0))
    super().set_state(json.dumps(state).encode())


class Loader(grain.DataLoader):
  """A grain.DataLoader whose iterators are ``BatchIterator``s; see ``info``."""

  def __init__(self, *, info: LoaderInfo, **kwargs):
    super().__init__(**kwargs)
    self.info = info

  def __iter__(self) -> BatchIterator:
    return BatchIterator(self)

  def iterator(self, state: bytes | None = None) -> BatchIterator:
    """A fresh iterator, optionally restored from ``BatchIterator.get_state()``."""
    return BatchIterator(self, state)


def _build(src: source_lib.ArrayRecordSource, *, sampler: _StudySampler,
           operations: list[Any], info: LoaderInfo, worker_count: int,
           worker_buffer_size: int, read_threads: int, read_buffer_size: int
           ) -> Loader:
  if worker_count:
    _ensure_flags_parsed()
  return Loader(
      info=info,
      data_source=_KeyedSource(src, sampler.stride),
      sampler=sampler,
      operations=operations,
      worker_count=worker_count,
      worker_buffer_size=worker_buffer_size,
      shard_options=grain.sharding.ShardOptions(
          shard_index=info.shard_index, shard_count=info.shard_count,
          drop_remainder=True),
      read_options=grain.ReadOptions(num_threads=read_threads,
                                     prefetch_buffer_size=read_buffer_size),
  )


def make_train_loader(
    paths: PathsLike | source_lib.ArrayRecordSource,
    *,
    global_batch_size: int,
    seed: int,
    mask_ratio: float = 0.75,
    num_epochs: int | None = None,
    shuffle: bool = True,
    worker_count: int = 0,
    worker_buffer_size: int = 2,
    shard_index: int | None = None,
    shard_count: int | None = None,
    num_labels: int | None = None,
    read_threads: int = 2,
    read_buffer_size: int = 64,
) -> Loader:
  """Shuffled, masked, repeating training batches for this process.

  Args:
    paths: shard files, converter output folders or globs (see
      ``source.list_shards``), or an ``ArrayRecordSource``.
    global_batch_size: batch summed over processes; this process yields
      ``global_batch_size // shard_count`` rows per batch.
    seed: seeds the per-epoch shuffle and the masks (any non-negative int).
    mask_ratio: fraction of patches masked per view (0.75 keeps 49 of 196).
    num_epochs: passes over the data; None repeats forever.
    shuffle: False keeps source order (debugging); masks stay random.
    worker_count: Grain worker processes; 0 runs everything in this process.
      Restoring a state needs the same count.
    worker_buffer_size: batches each worker prepares ahead.
    shard_index: this process's shard; default ``jax.process_index()``.
    shard_count: number of shards; default ``jax.process_count()``.
    num_labels: label vector length; default from manifest.json or the data.
    read_threads: threads per process reading records.
    read_buffer_size: records per process read ahead.

  Returns:
    A ``Loader``; ``iter(loader)`` or ``loader.iterator(state)`` gives a
    ``BatchIterator``.  Drop remainder: every batch is full (see module doc).
  """
  src = _as_source(paths)
  shard_index, shard_count = _shard_args(shard_index, shard_count)
  batch_size = _per_process_batch(global_batch_size, shard_count)
  if num_labels is None:
    num_labels = infer_num_labels(src)
  num_kept = records.num_kept_patches(mask_ratio)
  if not 0 < num_kept <= records.NUM_PATCHES:
    raise ValueError(f"mask_ratio {mask_ratio} keeps {num_kept} patches")
  if seed < 0:
    raise ValueError(f"seed must be non-negative, got {seed}")
  epoch_len = (len(src) // shard_count) * shard_count
  if epoch_len == 0:
    raise ValueError(f"{len(src)} records cannot feed {shard_count} processes")
  sampler = _StudySampler(num_records=len(src), epoch_len=epoch_len,
                          shuffle=shuffle, seed=seed, num_epochs=num_epochs)
  per_process = epoch_len // shard_count
  info = LoaderInfo(
      num_records=len(src), global_batch_size=global_batch_size,
      batch_size=batch_size, num_kept=num_kept, shard_index=shard_index,
      shard_count=shard_count, examples_per_epoch=per_process,
      batches_per_epoch=per_process // batch_size, num_epochs=num_epochs,
      training=True)
  operations = [
      _SafeDecode(num_labels),
      _DropUndecodable(),
      _MakeRow(num_kept=num_kept, seed=seed, num_labels=num_labels),
      grain.transforms.Batch(batch_size=batch_size, drop_remainder=True),
  ]
  return _build(src, sampler=sampler, operations=operations, info=info,
                worker_count=worker_count,
                worker_buffer_size=worker_buffer_size,
                read_threads=read_threads, read_buffer_size=read_buffer_size)


def make_eval_loader(
    paths: PathsLike | source_lib.ArrayRecordSource,
    *,
    global_batch_size: int,
    worker_count: int = 0,
    worker_buffer_size: int = 2,
    shard_index: int | None = None,
    shard_count: int | None = None,
    num_labels: int | None = None,
    read_threads: int = 2,
    read_buffer_size: int = 64,
) -> Loader:
  """One unmasked pass over every study, in a fixed order, in full batches.

  Every study appears exactly once over all processes; padding rows
  (``example_valid=False``, ``record_index=-1``) fill the last batch(es).
  Undecodable studies become padding rows too and are counted.

  Args:
    paths: as for ``make_train_loader``.
    global_batch_size: batch summed over processes (per process:
      ``global_batch_size // shard_count``).
    worker_count: Grain worker processes; 0 runs in this process.
    worker_buffer_size: batches each worker prepares ahead.
    shard_index: default ``jax.process_index()``.
    shard_count: default ``jax.process_count()``.
    num_labels: label vector length; default from manifest.json or the data.
    read_threads: threads per process reading records.
    read_buffer_size: records per process read ahead.

  Returns:
    A ``Loader`` whose ``info.batches_per_epoch`` is the exact batch count.
  """
  src = _as_source(paths)
  shard_index, shard_count = _shard_args(shard_index, shard_count)
  batch_size = _per_process_batch(global_batch_size, shard_count)
  if num_labels is None:
    num_labels = infer_num_labels(src)
  # Grain's workers each batch their own strided share of the process's
  # records, so the padding unit includes the worker count.
  unit = shard_count * max(worker_count, 1) * batch_size
  epoch_len = -(-len(src) // unit) * unit
  sampler = _StudySampler(num_records=len(src), epoch_len=epoch_len,
                          shuffle=False, seed=0, num_epochs=1)
  per_process = epoch_len // shard_count
  info = LoaderInfo(
      num_records=len(src), global_batch_size=global_batch_size,
      batch_size=batch_size, num_kept=records.NUM_PATCHES,
      shard_index=shard_index, shard_count=shard_count,
      examples_per_epoch=per_process,
      batches_per_epoch=per_process // batch_size, num_epochs=1,
      training=False)
  operations = [
      _SafeDecode(num_labels),
      _MakeRow(num_kept=records.NUM_PATCHES, seed=0, num_labels=num_labels),
      grain.transforms.Batch(batch_size=batch_size, drop_remainder=False),
  ]
  return _build(src, sampler=sampler, operations=operations, info=info,
                worker_count=worker_count,
                worker_buffer_size=worker_buffer_size,
                read_threads=read_threads, read_buffer_size=read_buffer_size)
