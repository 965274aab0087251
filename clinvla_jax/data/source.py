"""Random access to the study records in a set of ArrayRecord shards.

The converters in ``data_prep/`` write a folder of ``*.array_record`` shards and a
``manifest.json``.  ``ArrayRecordSource`` presents those shards as one sequence
of record bytes: ``len(source)`` studies, ``source[i]`` the bytes of study ``i``
(shards concatenated in order).

Why not ``grain.sources.ArrayRecordDataSource``: it reads one record with
``reader.read([i])``, which gets slower as files grow (about 3.4k records/s on a
100k-record file on our machines), while ``reader.read(i, i + 1)`` stays fast at
every size.  This source always reads by range.

The source is picklable and opens its readers lazily in whichever process first
reads from it, so Grain can ship it to worker processes.
"""

from __future__ import annotations

import bisect
import glob
import json
import os
import threading
from typing import Any, Iterable, Sequence

from array_record.python import array_record_module

from clinvla_jax.data import tfds_format

SHARD_SUFFIX = ".array_record"
MANIFEST_NAME = "manifest.json"

# Readahead only helps sequential scans; random access wants none.
DEFAULT_READER_OPTIONS = "readahead_buffer_size:0"
# How the converters (and the benchmarks) write shards.  group_size:1 makes every
# record its own chunk, so a random read touches one record; records hold PNG
# or uncompressed pixels, which ArrayRecord's default compression could only
# slow down (brotli inflates nothing here but costs time on every read).
WRITER_OPTIONS = "group_size:1,uncompressed"


def read_manifest(folder: str) -> dict[str, Any] | None:
  """Returns the folder's parsed ``manifest.json``, or None if it has none."""
  path = os.path.join(folder, MANIFEST_NAME)
  if not os.path.exists(path):
    return None
  with open(path, encoding="utf-8") as f:
    return json.load(f)


def _shards_from_manifest(folder: str, manifest: dict[str, Any]) -> list[str]:
  """Shard paths named by a manifest, in its order; [] if it names none."""
  entries = manifest.get("shards") or manifest.get("files") or []
  paths = []
  for entry in entries:
    if isinstance(entry, dict):
      entry = entry.get("path") or entry.get("file") or entry.get("name")
    if not isinstance(entry, str) or not entry.endswith(SHARD_SUFFIX):
      continue
    paths.append(entry if os.path.isabs(entry) else os.path.join(folder, entry))
  return paths


def list_shards(
  paths: str | os.PathLike[str] | Iterable[str | os.PathLike[str]], split: str | None = None
) -> list[str]:
  """Expands a folder, a glob pattern, a shard file or a list of these to shards.

  A folder lists the shards named in its ``manifest.json`` (key ``shards`` or
  ``files``: file names or dicts with a ``path``/``file``/``name``) if it names
  any, else every ``*.array_record`` file in it, sorted by name.  A TFDS builder
  directory without a manifest lists its TFDS shards (``dataset_info.json``).

  Args:
    paths: one path-like or a sequence of them.
    split: keep only a folder's shards of this split (the manifest's
      ``splits``/``shards[].split``, else file names starting ``<split>-``).

  Returns:
    Shard file paths in reading order.

  Raises:
    FileNotFoundError: a path matches no shard.
  """
  if isinstance(paths, (str, os.PathLike)):
    paths = [paths]
  shards: list[str] = []
  for path in map(os.fspath, paths):
    if os.path.isdir(path) and read_manifest(path) is None and _is_tfds_dir(path):
      # A TFDS builder directory alone (no converter manifest): its own shards.
      found = tfds_format.split_files(path, split)
      if not found:
        raise FileNotFoundError(f"{path}: TFDS dataset has no shards" + (f" of split {split!r}" if split else ""))
    elif os.path.isdir(path):
      manifest = read_manifest(path)
      found = _shards_from_manifest(path, manifest) if manifest else []
      if not found:
        found = sorted(glob.glob(os.path.join(path, "*" + SHARD_SUFFIX)))
      if split is not None:
        found = _filter_split(path, manifest, found, split)
    elif os.path.exists(path):
      found = [path]
    else:
      found = sorted(glob.glob(path))
    if not found:
      raise FileNotFoundError(f"no ArrayRecord shards at {path!r}")
    shards.extend(found)
  return shards


def _is_tfds_dir(folder: str) -> bool:
  return os.path.isfile(os.path.join(folder, "dataset_info.json"))


def _filter_split(folder: str, manifest: dict[str, Any] | None, found: list[str], split: str) -> list[str]:
  names = None
  if manifest and isinstance(manifest.get("splits"), dict):
    names = set(manifest["splits"].get(split, {}).get("shards", []))
  elif manifest and isinstance(manifest.get("shards"), list):
    names = {e.get("file") for e in manifest["shards"] if isinstance(e, dict) and e.get("split") == split}
  if names is None:
    return [p for p in found if os.path.basename(p).startswith(split + "-")]
  kept = [p for p in found if os.path.basename(p) in names]
  if not kept:
    known = sorted(manifest.get("splits", {})) if manifest else []
    raise FileNotFoundError(f"{folder}: no shards of split {split!r} (splits: {known})")
  return kept


def _open_reader(path: str, options: str):
  return array_record_module.ArrayRecordReader(path, options)


def read_all(path: str | os.PathLike[str]) -> list[bytes]:
  """Every record of one shard, in order (a whole-file scan: converters, tools)."""
  reader = array_record_module.ArrayRecordReader(os.fspath(path))
  try:
    return list(reader.read_all())
  finally:
    reader.close()


class ArrayRecordSource:
  """Record bytes from a list of ArrayRecord shards, read by range.

  Implements Grain's ``RandomAccessDataSource`` protocol (``__len__``,
  ``__getitem__``).  Readers are shared by the threads of one process (the
  ArrayRecord reader is thread-safe) and reopened after pickling or forking.
  """

  def __init__(self, paths: str | os.PathLike[str] | Sequence[str], *, reader_options: str = DEFAULT_READER_OPTIONS):
    """Lists the shards and counts their records (opens each once).

    Args:
      paths: shard files, folders (converter output) or glob patterns; see
        ``list_shards``.
      reader_options: ArrayRecord reader option string.
    """
    self._paths = tuple(list_shards(paths))
    self._reader_options = reader_options
    counts = []
    for path in self._paths:
      reader = _open_reader(path, reader_options)
      try:
        counts.append(reader.num_records())
      finally:
        reader.close()
    self._counts = tuple(counts)
    # _ends[k] is one past the last global index held by shard k.
    self._ends = []
    total = 0
    for n in counts:
      total += n
      self._ends.append(total)
    self._len = total
    self._init_process_state()

  def _init_process_state(self):
    self._readers: list[Any] = [None] * len(self._paths)
    self._lock = threading.Lock()
    self._pid = os.getpid()

  @property
  def paths(self) -> tuple[str, ...]:
    return self._paths

  @property
  def shard_sizes(self) -> tuple[int, ...]:
    return self._counts

  def __len__(self) -> int:
    return self._len

  def __repr__(self) -> str:
    # Grain compares this string when restoring an iterator, so it names the
    # shards by file name only: moving the data folder must not break resume.
    names = ",".join(os.path.basename(p) for p in self._paths)
    return f"ArrayRecordSource(num_records={self._len}, shards=[{names}], shard_sizes={list(self._counts)})"

  def locate(self, index: int) -> tuple[int, int]:
    """Returns (shard number, position in that shard) of a global index."""
    if index < 0:
      index += self._len
    if not 0 <= index < self._len:
      raise IndexError(f"record index {index} out of range [0, {self._len})")
    shard = bisect.bisect_right(self._ends, index)
    start = self._ends[shard - 1] if shard else 0
    return shard, index - start

  def _reader(self, shard: int):
    if self._pid != os.getpid():
      # A forked child must not share the parent's file handles.
      self._init_process_state()
    reader = self._readers[shard]
    if reader is None:
      with self._lock:
        reader = self._readers[shard]
        if reader is None:
          reader = _open_reader(self._paths[shard], self._reader_options)
          self._readers[shard] = reader
    return reader

  def __getitem__(self, index: int) -> bytes:
    shard, position = self.locate(int(index))
    return self._reader(shard).read(position, position + 1)[0]

  def read_range(self, start: int, stop: int) -> list[bytes]:
    """Records ``start`` to ``stop - 1`` (may span shards), read sequentially."""
    out: list[bytes] = []
    index = start
    while index < stop:
      shard, position = self.locate(index)
      count = min(stop - index, self._counts[shard] - position)
      out.extend(self._reader(shard).read(position, position + count))
      index += count
    return out

  def close(self):
    """Closes the readers of this process; later reads reopen them."""
    for reader in self._readers:
      if reader is not None:
        reader.close()
    self._readers = [None] * len(self._paths)

  def __enter__(self) -> ArrayRecordSource:
    return self

  def __exit__(self, *exc_info):
    self.close()

  def __getstate__(self) -> dict[str, Any]:
    state = self.__dict__.copy()
    for key in ("_readers", "_lock", "_pid"):
      state.pop(key)
    return state

  def __setstate__(self, state: dict[str, Any]):
    self.__dict__.update(state)
    self._init_process_state()
