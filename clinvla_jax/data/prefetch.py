"""Batches placed on the devices ahead of the step that consumes them.

The training step is dispatched asynchronously, so the host is free while the
devices compute.  ``DevicePrefetcher`` spends that time reading the next
batches and starting their host->device copies, keeping ``depth`` of them in
flight.  Reading ahead moves the Grain iterator past the batches still in the
queue; the prefetcher therefore remembers the iterator state after each batch
and reports, through ``get_state``, the state after the last batch it *handed
out*.  A checkpoint taken at step s thus resumes at batch s + 1, whatever the
depth.
"""

from __future__ import annotations

import collections
from typing import Any, Callable, Deque, Dict, Iterator, Optional, Tuple

Batch = Dict[str, Any]


class DevicePrefetcher:
  """Wraps a host iterator (``BatchIterator``-like); yields device batches.

  ``place(host_batch) -> device_batch`` does the (asynchronous) transfer, e.g.
  ``sharding.global_batch``.  The wrapped iterator needs ``get_state()``;
  ``num_skipped`` is carried along when it has one.  Orbax's Grain checkpoint
  handler saves this object like the iterator itself.
  """

  def __init__(self, host_iter: Iterator[Batch], place: Callable[[Batch], Batch], depth: int = 2):
    if depth < 0:
      raise ValueError(f"prefetch depth must be >= 0, got {depth}")
    self._host_iter = host_iter
    self._place = place
    self._depth = depth
    self._queue: Deque[Tuple[Batch, Optional[bytes], int]] = collections.deque()
    self._consumed_state = self._snapshot()
    self._consumed_skipped = int(getattr(host_iter, "num_skipped", 0))

  def _snapshot(self) -> Optional[bytes]:
    get_state = getattr(self._host_iter, "get_state", None)
    return get_state() if get_state is not None else None

  def _read_one(self) -> None:
    host = next(self._host_iter)
    self._queue.append((self._place(host), self._snapshot(), int(getattr(self._host_iter, "num_skipped", 0))))

  def __iter__(self):
    return self

  def __next__(self) -> Batch:
    if not self._queue:
      self._read_one()
    batch, state, skipped = self._queue.popleft()
    self._consumed_state, self._consumed_skipped = state, skipped
    # Refill after handing out, so the copies overlap the step about to run.
    try:
      while len(self._queue) < self._depth:
        self._read_one()
    except StopIteration:
      pass
    return batch

  @property
  def num_skipped(self) -> int:
    return self._consumed_skipped

  def get_state(self) -> bytes:
    if self._consumed_state is None:
      raise TypeError(f"{type(self._host_iter).__name__} has no get_state(): it cannot be checkpointed")
    return self._consumed_state

  def set_state(self, state: bytes) -> None:
    self._queue.clear()
    self._host_iter.set_state(state)
    self._consumed_state = state
    self._consumed_skipped = int(getattr(self._host_iter, "num_skipped", 0))

  def start_prefetch(self) -> None:
    start = getattr(self._host_iter, "start_prefetch", None)
    if start is not None:
      start()
