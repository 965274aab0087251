"""Grain input pipeline: ArrayRecord studies -> masked, batched numpy arrays.

Stages, in order::

  ArrayRecordSource (bytes by range)          source.py
    -> stream: global shuffle, new permutation per epoch (seeded)
    -> chunks of one batch of stream positions; process p takes chunks
       p, p + P, ... (grain.DataLoader shard_options)
    -> per chunk, one map: read the records, parse them (never fatal), draw
       the masks of all its studies at once and gather the kept patches
       straight from the record bytes            masking.py, records.py
    -> grain.DataLoader workers (multiprocessing prefetch; 0 = in-process),
       each handling whole chunks, in order
    -> training only: chunks that lost undecodable studies are topped up
       from the next chunk, so every batch is full (BatchIterator)

Grain carries one element per batch, not per study: its own cost per element
(about 50 µs in process, over 100 µs with read threads) exceeded the cost of
reading and masking a study.  The loaders yield exactly the batch dict of
``records.py`` (``records.BATCH_KEYS``).

Training (``make_train_loader``): shuffled, masked (K = records.num_kept_patches
of the mask ratio), repeating over epochs with new permutations and new masks
each epoch.  An epoch is ``(N // P) * P`` studies (the up to P - 1 studies that
do not divide evenly among P processes are dropped, a different few each epoch).
The stream runs on across epoch boundaries: a batch may mix the end of one
epoch with the start of the next.  ``drop_remainder``: when ``num_epochs`` is
finite, the stream ends on a partial chunk and an incomplete last batch is
dropped, so every batch is full.

Evaluation (``make_eval_loader``): fixed order, no masking (K = 196), one pass,
optionally only some view slots (``view_slots``: the others are never read).
The record list is padded to a multiple of P * B, so every process yields the
same number of full batches, whatever the worker count; padding rows have
``example_valid=False`` and ``record_index=-1`` and only the last batch of a
process holds them.

Undecodable records: the chunk map catches every error, logs a warning naming
the record index and counts it.  Training leaves the record out; evaluation
turns it into a padding row (so all processes still run the same number of
batches).  The count travels with the chunks to the main process:
``BatchIterator.num_skipped``.

Masks are drawn from (seed, epoch, record index, view) only (``masking.py``), so
a batch can be rebuilt from its ``record_index`` column and the epoch.  Iterator
state (``get_state``/``set_state``) restores the stream exactly; it requires the
same worker_count, shards and seed.
"""

from __future__ import annotations

import dataclasses
import json
import multiprocessing
import os
import sys
import threading
import time
from typing import Any, Sequence

from absl import flags
from absl import logging
import grain
import numpy as np

from clinvla_jax.data import augment as augment_lib
from clinvla_jax.data import masking
from clinvla_jax.data import schema
from clinvla_jax.data import records
from clinvla_jax.data import source as source_lib

PathsLike = str | os.PathLike[str] | Sequence[str | os.PathLike[str]]

# Rides along in every row until the main process folds it into a counter.
_SKIPPED_KEY = "_num_skipped"
_STATE_SKIPPED_KEY = "clinvla_num_skipped"
_STATE_OFFSET_KEY = "clinvla_chunk_rows_used"
_STATE_FORMAT_KEY = "clinvla_stream"
_STATE_FORMAT = "chunks-v1"
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


_watching_parent = False


def _exit_with_parent(poll_s: float = 0.5) -> None:
  """In a worker process: exit within ``poll_s`` once the process that started it is gone.

  A parent killed by SIGKILL runs no cleanup, so its Grain workers would live on, re-parented to init, and
  with them multiprocessing's resource tracker (it exits when the last holder of its pipe does).  A parent-death
  signal (prctl PR_SET_PDEATHSIG) is not used: it fires when the *thread* that started the worker ends, and Grain
  starts workers from its own pool threads, whose lifetime is not ours to know.  Polling the parent pid has no such trap and works off Linux too.
  """
  global _watching_parent
  parent = multiprocessing.parent_process()
  if parent is None or _watching_parent:
    return
  _watching_parent = True

  def watch():
    while os.getppid() == parent.pid:
      time.sleep(poll_s)
    os._exit(1)

  threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()


def _keep_jax_on_the_host() -> None:
  """In a worker process: jax (the compiled augmentation) may use the host CPU only.

  Left alone, a worker's first jax call would start every backend jax finds, and on a GPU machine each worker
  would claim accelerator memory for a computation that runs on the CPU anyway.
  """
  if multiprocessing.parent_process() is None:
    return
  import jax  # pylint: disable=g-import-not-at-top

  try:
    jax.config.update("jax_platforms", "cpu")
  except Exception as e:  # pylint: disable=broad-exception-caught
    logging.warning("could not keep this worker's jax on the CPU: %s", e)


def _shard_args(shard_index: int | None, shard_count: int | None) -> tuple[int, int]:
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
      f"global_batch_size {global_batch_size} must be a positive multiple of the process count {shard_count}"
    )
  return global_batch_size // shard_count


def _as_source(paths: PathsLike | source_lib.ArrayRecordSource) -> source_lib.ArrayRecordSource:
  if isinstance(paths, source_lib.ArrayRecordSource):
    return paths
  return source_lib.ArrayRecordSource(paths)


def infer_num_labels(source: source_lib.ArrayRecordSource, *, probe: int = 16) -> int:
  """Label count from a shard folder's manifest, else from the first records."""
  for path in source.paths:
    manifest = source_lib.read_manifest(os.path.dirname(path))
    if manifest and "label_names" in manifest:
      return len(manifest["label_names"])
  for index in range(min(probe, len(source))):
    try:
      return int(records.decode_record(source[index], with_images=False)["labels"].shape[0])
    except Exception:  # pylint: disable=broad-exception-caught
      continue
  raise ValueError(f"cannot infer the label count from {source!r}")


class _Stream:
  """Position g of the study stream -> (epoch, record index); -1 is padding.

  Position g is position ``g % epoch_len`` of epoch ``g // epoch_len``; with
  ``shuffle`` that position goes through the epoch's permutation.  Positions
  at or past ``num_records`` within an epoch are evaluation padding.
  """

  def __init__(self, *, num_records: int, epoch_len: int, shuffle: bool, seed: int):
    if epoch_len <= 0:
      raise ValueError(f"empty epoch ({num_records} records)")
    self._num_records = num_records
    self._epoch_len = epoch_len
    self._shuffle = shuffle
    self._seed = int(seed)
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

  def __repr__(self) -> str:
    return (
      f"_Stream(num_records={self._num_records}, "
      f"epoch_len={self._epoch_len}, shuffle={self._shuffle}, "
      f"seed={self._seed})"
    )

  def permutation(self, epoch: int) -> np.ndarray:
    """The order of the studies in one epoch (cached for the last two)."""
    with self._lock:
      perm = self._perms.get(epoch)
      if perm is None:
        rng = np.random.Generator(np.random.Philox(np.random.SeedSequence([_SHUFFLE_STREAM, self._seed, epoch])))
        perm = rng.permutation(self._num_records)
        for old in sorted(self._perms)[:-1]:
          del self._perms[old]
        self._perms[epoch] = perm
      return perm

  def locate(self, start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
    """(epoch, record index) int64 arrays of positions start..stop-1."""
    g = np.arange(start, stop, dtype=np.int64)
    epoch, position = np.divmod(g, self._epoch_len)
    index = np.where(position < self._num_records, position, -1)
    if self._shuffle:
      for e in np.unique(epoch):
        sel = (epoch == e) & (index >= 0)
        index[sel] = self.permutation(int(e))[index[sel]]
    return epoch, index


class _ChunkSource:
  """Chunk j = the studies at stream positions [j * size, (j + 1) * size).

  Grain moves one element per chunk (a batch's worth of studies) rather than one
  per study: its per-element cost (about 50 µs in process, 120-160 µs with
  read threads) was larger than reading a study.  Read errors are caught here
  and reported downstream, never raised.
  """

  def __init__(self, source: source_lib.ArrayRecordSource, stream: _Stream, size: int, limit: int | None = None):
    self._source = source
    self._stream = stream
    self._size = size
    self._limit = limit  # one past the last stream position; None: endless

  def __setstate__(self, state: dict[str, Any]):
    # Unpickling is the first of our code a Grain worker runs (DataLoader takes no worker_init_fn).
    self.__dict__.update(state)
    _exit_with_parent()
    _keep_jax_on_the_host()

  def __len__(self) -> int:
    # Grain takes keys modulo this length; make it larger than any key.
    return 2**62

  def __repr__(self) -> str:
    return f"_ChunkSource({self._source!r}, {self._stream!r}, size={self._size}, limit={self._limit})"

  def __getitem__(self, key: int) -> dict[str, Any]:
    key = int(key)
    stop = (key + 1) * self._size
    if self._limit is not None:
      stop = min(stop, self._limit)
    epoch, index = self._stream.locate(key * self._size, stop)
    data: list[bytes | None] = [None] * len(index)
    errors: list[str | None] = [None] * len(index)
    for row, i in enumerate(index.tolist()):
      if i < 0:
        continue
      try:
        data[row] = self._source[i]
      except Exception as e:  # pylint: disable=broad-exception-caught
        errors[row] = f"read failed: {e!r}"
    return {"index": index, "epoch": epoch, "data": data, "error": errors}


class _ChunkSampler:
  """Chunks 0, 1, ... in order (Grain sampler protocol).

  Grain's DataLoader gives process p the chunks p, p + P, ... and, with W
  workers, spreads each process's chunks round-robin over them while keeping
  their order.
  """

  def __init__(self, num_chunks: int | None):
    self._num_chunks = num_chunks

  def __len__(self) -> int:
    return sys.maxsize if self._num_chunks is None else self._num_chunks

  def __repr__(self) -> str:
    return f"_ChunkSampler(num_chunks={self._num_chunks})"

  def __getitem__(self, index: int) -> grain.RecordMetadata:
    if index < 0 or index >= len(self):
      raise IndexError(f"sampler index {index} out of range")
    return grain.RecordMetadata(index=index, record_key=index)


def _parse(data: bytes, slots: tuple[int, ...], num_labels: int) -> records.BatchParts:
  parts = records.decode_for_batch(data, slots)
  fields = parts.fields
  expected = {
    "view_valid": (schema.NUM_VIEWS,),
    "input_ids": (schema.MAX_TEXT_LEN,),
    "attention_mask": (schema.MAX_TEXT_LEN,),
    "labels": (num_labels,),
  }
  for name, shape in expected.items():
    if name not in fields or fields[name].shape != shape:
      got = fields[name].shape if name in fields else "nothing"
      raise records.RecordError(f"{name} has shape {got}, expected {shape}")
  return parts


def _augment_chunk(patches, studies, patch_idx, drawn, matrices) -> None:
  """Fills ``patches`` [n, V, K, 256] with the augmented kept patches of every present view of a chunk, at once.

  ``studies``: (chunk row, BatchParts.rows, its view starts, present [V]) per decoded study.  One compiled call
  serves the whole chunk (``augment.augment_kept_compiled``): per call its fixed cost is paid once, not per study.
  Views not present are zeros.
  """
  patches[...] = 0
  if not studies:
    return
  rows_of, starts, which = [], [], []
  offset = 0
  for row, all_rows, row_start, present in studies:
    rows_of.append(all_rows)
    for view, (start, shown) in enumerate(zip(row_start, present)):
      if shown:
        starts.append(offset + start)
        which.append((row, view))
    offset += all_rows.shape[0]
  if not which:
    return
  # Concatenated straight into the kernel's padded row buffer, so the rows are copied once.
  buffer = np.zeros((augment_lib.padded_rows(offset), schema.PATCH_SIZE**2), np.uint8)
  np.concatenate(rows_of, out=buffer[:offset])
  rows, views = np.asarray(which).T
  params = {name: values[rows, views] for name, values in drawn.items()}
  patches[rows, views] = augment_lib.augment_kept_compiled(
    buffer, np.asarray(starts, np.int32), patch_idx[rows, views], params, matrices[rows, views]
  )


class _MakeChunk(grain.transforms.Map):
  """A chunk of record bytes -> batch rows, all studies of the chunk at once.

  Masks for the whole chunk come from one vectorised draw
  (``masking.keep_indices_batch``); kept patches are copied straight out of the
  record bytes into the output arrays, or, with ``augment``, computed from them
  through each view's drawn affine and jitter (``augment.augment_kept_compiled``,
  the whole chunk in one call).  Undecodable records are logged and counted;
  with ``drop_failed`` (training) they leave no row, otherwise they become
  padding rows: zero pixels, ids and masks, views invalid, labels NaN
  ("not mentioned"), patch indices the first K patches.
  """

  def __init__(
    self,
    *,
    num_kept: int,
    seed: int,
    num_labels: int,
    view_slots: tuple[int, ...],
    drop_failed: bool,
    augment: augment_lib.AugmentSpec | None = None,
  ):
    self._num_kept = num_kept
    self._seed = seed
    self._augment = augment
    self._num_labels = num_labels
    self._slots = tuple(view_slots)
    self._drop_failed = drop_failed

  def map(self, chunk: dict[str, Any]) -> dict[str, np.ndarray]:
    index, epoch = chunk["index"], chunk["epoch"]
    parsed: list[Any] = [None] * len(index)
    skipped = 0
    for row, i in enumerate(index.tolist()):
      if i < 0:
        continue
      try:
        if chunk["error"][row]:
          raise IOError(chunk["error"][row])
        parsed[row] = _parse(chunk["data"][row], self._slots, self._num_labels)
      except Exception as e:  # pylint: disable=broad-exception-caught
        logging.warning("Skipping record %d: cannot decode it (%s)", i, e)
        skipped += 1
    rows = [r for r, p in enumerate(parsed) if p is not None or not self._drop_failed]
    n, v, k = len(rows), len(self._slots), self._num_kept
    real = np.array([parsed[r] is not None for r in rows], np.bool_)
    record_index = np.where(real, index[rows], -1).astype(np.int64)
    if k == schema.NUM_PATCHES:
      patch_idx = np.broadcast_to(np.arange(k, dtype=np.int32), (n, v, k)).copy()
    else:
      patch_idx = masking.keep_indices_batch(k, seed=self._seed, epoch=epoch[rows], index=np.maximum(record_index, 0))
      patch_idx = patch_idx[:, list(self._slots)]
      patch_idx[~real] = np.arange(k, dtype=np.int32)
    out = {
      "patches": np.empty((n, v, k, schema.PATCH_SIZE**2), np.uint8),
      "patch_idx": patch_idx,
      "view_valid": np.zeros((n, v), np.bool_),
      "input_ids": np.zeros((n, schema.MAX_TEXT_LEN), np.int32),
      "attention_mask": np.zeros((n, schema.MAX_TEXT_LEN), np.int32),
      "labels": np.full((n, self._num_labels), np.nan, np.float32),
      "example_valid": real,
      "record_index": record_index,
    }
    patches, valid = out["patches"], out["view_valid"]
    drawn = matrices = None
    to_augment = []
    if self._augment is not None:  # the whole chunk's draws at once, like its masks
      drawn = augment_lib.draw(self._augment, seed=self._seed, epoch=epoch[rows], index=np.maximum(record_index, 0))
      drawn = {name: values[:, list(self._slots)] for name, values in drawn.items()}
      matrices = augment_lib.inverse_matrices(drawn)
    for j, r in enumerate(rows):
      if parsed[r] is None:
        patches[j] = 0
        continue
      fields, all_rows, row_start = parsed[r]
      out["input_ids"][j] = fields["input_ids"]
      out["attention_mask"][j] = fields["attention_mask"]
      out["labels"][j] = fields["labels"]
      present = [start >= 0 and bool(fields["view_valid"][slot]) for slot, start in zip(self._slots, row_start)]
      valid[j] = present
      if drawn is not None:
        to_augment.append((j, all_rows, row_start, present))
        continue
      if k < schema.NUM_PATCHES and all(present):
        # One gather serves every view: their rows lie in one array.
        flat = patch_idx[j] + np.asarray(row_start, np.int32)[:, None]
        np.take(all_rows, flat.reshape(-1), axis=0, out=patches[j].reshape(v * k, -1))
        continue
      for s, (start, ok) in enumerate(zip(row_start, present)):
        if not ok:
          patches[j, s] = 0
        elif k == schema.NUM_PATCHES:
          patches[j, s] = all_rows[start : start + k]
        else:
          np.take(all_rows, patch_idx[j, s] + start, axis=0, out=patches[j, s])
    if drawn is not None:
      _augment_chunk(patches, to_augment, patch_idx, drawn, matrices)
    out[_SKIPPED_KEY] = np.array(skipped, np.int32)
    return out


class BatchIterator(grain.DataLoaderIterator):
  """Grain's DataLoader iterator, yielding exactly ``records.BATCH_KEYS``.

  Grain yields chunks; in training a chunk that lost undecodable records is
  topped up from the next one, so every batch is full.  ``num_skipped`` counts
  undecodable records seen so far.  ``get_state`` / ``set_state`` restore the
  stream exactly: the state is Grain's before the chunk in use, the rows of it
  already handed out, and the skip count.
  """

  def __init__(self, loader: Loader, state: bytes | None = None):
    self._num_skipped = 0
    self._batch_size = loader.info.batch_size
    self._top_up = loader.info.training
    # [Grain state before the chunk, the chunk, rows handed out, skips before it]
    self._pending: list[Any] | None = None
    super().__init__(loader, state=None)
    if state is not None:
      self.set_state(state)

  @property
  def num_skipped(self) -> int:
    return self._num_skipped

  def _fetch(self) -> list[Any]:
    before, skipped = super().get_state(), self._num_skipped
    chunk = super().__next__()
    self._num_skipped += int(chunk[_SKIPPED_KEY])
    return [before, chunk, 0, skipped]

  def __next__(self) -> dict[str, np.ndarray]:
    if not self._top_up:
      chunk = self._fetch()[1]
      # np.asarray drops Grain's shared-memory ndarray subclass, keeping the data.
      return {k: np.asarray(chunk[k]) for k in records.BATCH_KEYS}
    parts, need = [], self._batch_size
    while need:
      if self._pending is None:
        self._pending = self._fetch()
      _, chunk, start, _ = self._pending
      size = len(chunk["record_index"])
      take = min(need, size - start)
      if take:
        parts.append((chunk, start, start + take))
      need -= take
      self._pending[2] = start + take
      if start + take == size:
        self._pending = None
    if len(parts) == 1 and parts[0][1] == 0 and parts[0][2] == len(parts[0][0]["record_index"]):
      return {k: np.asarray(parts[0][0][k]) for k in records.BATCH_KEYS}
    return {k: np.concatenate([np.asarray(c[k])[a:b] for c, a, b in parts]) for k in records.BATCH_KEYS}

  def get_state(self) -> bytes:
    if self._pending is not None:
      before, _, offset, skipped = self._pending
      state = json.loads(before.decode())
    else:
      offset, skipped = 0, self._num_skipped
      state = json.loads(super().get_state().decode())
    state[_STATE_SKIPPED_KEY] = skipped
    state[_STATE_OFFSET_KEY] = offset
    state[_STATE_FORMAT_KEY] = _STATE_FORMAT
    return json.dumps(state, indent=4).encode()

  def set_state(self, state: bytes):
    state = json.loads(state.decode())
    if state.pop(_STATE_FORMAT_KEY, None) != _STATE_FORMAT:
      raise ValueError(
        "this data iterator state was saved by an earlier input pipeline, which "
        "moved one study per Grain element; it cannot position the chunked stream "
        "of this one.  Resume from a checkpoint written by this version, or start "
        "the data stream afresh."
      )
    skipped = int(state.pop(_STATE_SKIPPED_KEY, 0))
    offset = int(state.pop(_STATE_OFFSET_KEY, 0))
    self._pending = None
    super().set_state(json.dumps(state).encode())
    self._num_skipped = skipped
    if offset:
      self._pending = self._fetch()
      self._pending[2] = offset
      self._pending[3] = skipped


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


def _build(
  src: source_lib.ArrayRecordSource,
  *,
  stream: _Stream,
  num_positions: int | None,
  operation: _MakeChunk,
  info: LoaderInfo,
  worker_count: int,
  worker_buffer_size: int,
  read_threads: int,
  read_buffer_size: int,
) -> Loader:
  if worker_count:
    _ensure_flags_parsed()
  return Loader(
    info=info,
    data_source=_ChunkSource(src, stream, info.batch_size, num_positions),
    sampler=_ChunkSampler(None if num_positions is None else -(-num_positions // info.batch_size)),
    operations=[operation],
    worker_count=worker_count,
    worker_buffer_size=worker_buffer_size,
    shard_options=grain.sharding.ShardOptions(
      shard_index=info.shard_index, shard_count=info.shard_count, drop_remainder=True
    ),
    read_options=grain.ReadOptions(
      num_threads=read_threads, prefetch_buffer_size=max(1, -(-read_buffer_size // info.batch_size))
    ),
  )


def _train_info(
  num_records: int,
  global_batch_size: int,
  mask_ratio: float,
  num_epochs: int | None,
  shard_index: int,
  shard_count: int,
) -> LoaderInfo:
  """The training loader's shape: every process gets the same whole number of records per epoch."""
  batch_size = _per_process_batch(global_batch_size, shard_count)
  num_kept = records.num_kept_patches(mask_ratio)
  if not 0 < num_kept <= schema.NUM_PATCHES:
    raise ValueError(f"mask_ratio {mask_ratio} keeps {num_kept} patches")
  per_process = num_records // shard_count
  if per_process == 0:
    raise ValueError(f"{num_records} records cannot feed {shard_count} processes")
  return LoaderInfo(
    num_records=num_records,
    global_batch_size=global_batch_size,
    batch_size=batch_size,
    num_kept=num_kept,
    shard_index=shard_index,
    shard_count=shard_count,
    examples_per_epoch=per_process,
    batches_per_epoch=per_process // batch_size,
    num_epochs=num_epochs,
    training=True,
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
  augment: augment_lib.AugmentSpec | None = None,
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
    worker_buffer_size: chunks (batches) each worker prepares ahead.
    shard_index: this process's shard; default ``jax.process_index()``.
    shard_count: number of shards; default ``jax.process_count()``.
    num_labels: label vector length; default from manifest.json or the data.
    read_threads: threads per process reading records.
    read_buffer_size: records per process read ahead (rounded up to whole
      batches).
    augment: random affine and jitter of every view before masking
      (``augment.AugmentSpec``, drawn from seed, epoch and record index like
      the masks); None: the stored pixels.

  Returns:
    A ``Loader``; ``iter(loader)`` or ``loader.iterator(state)`` gives a
    ``BatchIterator``.  Drop remainder: every batch is full (see module doc).
  """
  src = _as_source(paths)
  if seed < 0:
    raise ValueError(f"seed must be non-negative, got {seed}")
  info = _train_info(len(src), global_batch_size, mask_ratio, num_epochs, *_shard_args(shard_index, shard_count))
  epoch_len = info.examples_per_epoch * info.shard_count
  stream = _Stream(num_records=len(src), epoch_len=epoch_len, shuffle=shuffle, seed=seed)
  operation = _MakeChunk(
    num_kept=info.num_kept,
    seed=seed,
    num_labels=infer_num_labels(src) if num_labels is None else num_labels,
    view_slots=tuple(range(schema.NUM_VIEWS)),
    drop_failed=True,
    augment=augment,
  )
  # A finite stream ends on a partial chunk: its studies can still top up a
  # batch that lost undecodable ones.
  num_positions = None if num_epochs is None else num_epochs * epoch_len
  return _build(
    src,
    stream=stream,
    num_positions=num_positions,
    operation=operation,
    info=info,
    worker_count=worker_count,
    worker_buffer_size=worker_buffer_size,
    read_threads=read_threads,
    read_buffer_size=read_buffer_size,
  )


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
  view_slots: Sequence[int] | None = None,
) -> Loader:
  """One unmasked pass over every study, in a fixed order, in full batches.

  Every study appears exactly once over all processes; padding rows
  (``example_valid=False``, ``record_index=-1``) fill the last batch of each
  process.  Undecodable studies become padding rows too and are counted.

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
    read_buffer_size: records per process read ahead (rounded up to whole
      batches).
    view_slots: record view slots to deliver, in this order (e.g. ``(0,)`` for
      frontal-only evaluation); the batch's view axis then has
      ``len(view_slots)`` entries and the other views are never decoded.
      None delivers all ``schema.NUM_VIEWS``.

  Returns:
    A ``Loader`` whose ``info.batches_per_epoch`` is the exact batch count.
  """
  src = _as_source(paths)
  shard_index, shard_count = _shard_args(shard_index, shard_count)
  batch_size = _per_process_batch(global_batch_size, shard_count)
  if num_labels is None:
    num_labels = infer_num_labels(src)
  slots = tuple(range(schema.NUM_VIEWS)) if view_slots is None else tuple(int(s) for s in view_slots)
  if not slots or any(not 0 <= s < schema.NUM_VIEWS for s in slots):
    raise ValueError(f"view_slots {view_slots} must be slots in [0, {schema.NUM_VIEWS})")
  # Chunks are whole batches, so padding only has to even out the processes.
  unit = shard_count * batch_size
  epoch_len = -(-len(src) // unit) * unit
  stream = _Stream(num_records=len(src), epoch_len=epoch_len, shuffle=False, seed=0)
  per_process = epoch_len // shard_count
  info = LoaderInfo(
    num_records=len(src),
    global_batch_size=global_batch_size,
    batch_size=batch_size,
    num_kept=schema.NUM_PATCHES,
    shard_index=shard_index,
    shard_count=shard_count,
    examples_per_epoch=per_process,
    batches_per_epoch=per_process // batch_size,
    num_epochs=1,
    training=False,
  )
  operation = _MakeChunk(
    num_kept=schema.NUM_PATCHES, seed=0, num_labels=num_labels, view_slots=slots, drop_failed=False
  )
  return _build(
    src,
    stream=stream,
    num_positions=epoch_len,
    operation=operation,
    info=info,
    worker_count=worker_count,
    worker_buffer_size=worker_buffer_size,
    read_threads=read_threads,
    read_buffer_size=read_buffer_size,
  )
