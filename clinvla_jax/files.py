"""Writing files so that a reader never sees half of one: a temporary name, fsync, then rename.

Converter shards and manifests (``clinvla_jax.data.writer``) and search index files (``clinvla_jax.search``) are
written this way, so an interrupted run leaves either the old file or the new one.
"""

import hashlib
import json
import os
from typing import Any


def fsync_dir(path: str):
  try:
    fd = os.open(path, os.O_RDONLY)
  except OSError:
    return
  try:
    os.fsync(fd)
  except OSError:
    pass
  finally:
    os.close(fd)


def atomic_write_bytes(path: str, data: bytes):
  """Writes via a temporary name + fsync + rename: readers never see half a file."""
  tmp = f"{path}.tmp-{os.getpid()}"
  with open(tmp, "wb") as f:
    f.write(data)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)
  fsync_dir(os.path.dirname(os.path.abspath(path)))


def atomic_write_json(path: str, obj: Any):
  atomic_write_bytes(path, (json.dumps(obj, indent=1, sort_keys=False, default=str) + "\n").encode())


def sha256_file(path: str) -> str:
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      h.update(block)
  return h.hexdigest()
