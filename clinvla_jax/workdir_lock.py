"""One trainer per workdir: an exclusive ``flock`` on ``<workdir>/train.lock``.

Two trainers on one workdir (a double submit, a requeued job racing the old
one) would interleave ``metrics.jsonl`` and trip over each other's temporary
checkpoint folders.  The first trainer holds an exclusive, non-blocking
``fcntl.flock`` on the lock file for its whole life and writes who it is into
the file (host, pid, start time); a second one fails at once and names it.

The kernel drops a ``flock`` when its file descriptor closes, which includes
``kill -9`` and machine crashes seen by a local file system, so there is no
stale lock to clean up: the file's text may outlive its holder, the lock does
not.  On network file systems the lock is only as good as the server's
locking.  Linux NFSv4 clients turn ``flock`` into an NFS byte-range lock that
other clients respect; NFSv3 needs a running ``lockd``; some FUSE and object
store mounts (gcsfuse, s3fs) do not lock at all.  Where the file system says
it cannot lock (``ENOLCK``, ``EOPNOTSUPP``) the trainer warns and carries on
unlocked rather than refusing to train.

Only process 0 of a multi-process job takes the lock: the job's processes
share the workdir by design.  Evaluation, embedding and summaries only read,
and take no lock.
"""

from __future__ import annotations

import datetime
import errno
import fcntl
import json
import os
import socket
from typing import Optional

from absl import logging

LOCK_NAME = "train.lock"


class WorkdirLockedError(RuntimeError):
  """Another trainer holds the workdir."""


class WorkdirLock:
  """``with WorkdirLock(workdir):`` holds the workdir for this trainer."""

  def __init__(self, workdir: str):
    self.path = os.path.join(os.path.abspath(workdir), LOCK_NAME)
    self._fd: Optional[int] = None

  def acquire(self) -> "WorkdirLock":
    os.makedirs(os.path.dirname(self.path), exist_ok=True)
    fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
      if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
        holder = _read_holder(fd)
        os.close(fd)
        raise WorkdirLockedError(
          f"{os.path.dirname(self.path)} is in use by another trainer ({holder}). "
          f"Wait for it to end, stop it, or train in another --workdir."
        ) from None
      if e.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
        os.close(fd)
        logging.warning(
          "the file system of %s cannot lock (%s): training without a workdir lock", self.path, os.strerror(e.errno)
        )
        return self
      os.close(fd)
      raise
    holder = {
      "host": socket.gethostname(),
      "pid": os.getpid(),
      "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    os.ftruncate(fd, 0)
    os.pwrite(fd, (json.dumps(holder) + "\n").encode(), 0)
    os.fsync(fd)
    self._fd = fd
    return self

  def release(self) -> None:
    if self._fd is not None:
      # Closing drops the lock; the holder text stays as a record of the last trainer.
      os.close(self._fd)
      self._fd = None

  def __enter__(self) -> "WorkdirLock":
    return self.acquire()

  def __exit__(self, *exc) -> None:
    self.release()


def _read_holder(fd: int) -> str:
  try:
    text = os.pread(fd, 4096, 0).decode(errors="replace").strip()
    holder = json.loads(text)
    return f"host {holder.get('host')}, pid {holder.get('pid')}, started {holder.get('started')}"
  except (OSError, ValueError):
    return "holder unknown: the lock file names nobody yet"
