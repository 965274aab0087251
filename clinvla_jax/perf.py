"""Peak FLOP rates for MFU estimates, and seconds per stage of a pipeline (`StageTimes`)."""

from __future__ import annotations

import collections
import contextlib
import functools
import time

import jax
import jax.numpy as jnp

# Dense bf16 peaks, FLOP/s per device, keyed by a substring of the lower-cased
# `device_kind` that jax reports.  Order matters: the first match wins, so the
# more specific names come first ("tpu v5 lite" before "tpu v5").  jax calls
# v5e "TPU v5 lite", v6e "TPU v6 lite" and v5p "TPU v5".
PEAK_BF16 = (
  ("tpu v6 lite", 918e12),
  ("tpu v6e", 918e12),
  ("tpu v5 lite", 197e12),
  ("tpu v5e", 197e12),
  ("tpu v5p", 459e12),
  ("tpu v5", 459e12),
  ("tpu v4", 275e12),
  ("h200", 989e12),
  ("h100", 989e12),
  ("b200", 2250e12),
  ("a100", 312e12),
  ("l40s", 362e12),
  ("nvidia l4", 121e12),
)


def peak_flops_for_kind(device_kind: str) -> float:
  """The bf16 peak for a jax ``device_kind`` string; 0.0 when unknown."""
  kind = device_kind.lower()
  for name, peak in PEAK_BF16:
    if name in kind:
      return peak
  return 0.0


@functools.lru_cache(maxsize=None)
def measured_matmul_flops(size: int = 2048, repeats: int = 5) -> float:
  """Median FLOP/s of a large fp32 matmul on the default device (the CPU peak)."""
  a = jnp.ones((size, size), jnp.float32)
  f = jax.jit(lambda x: x @ x)
  f(a).block_until_ready()
  times = []
  for _ in range(repeats):
    t = time.perf_counter()
    f(a).block_until_ready()
    times.append(time.perf_counter() - t)
  times.sort()
  return 2 * size**3 / times[len(times) // 2]


def peak_flops_per_device(override: float = 0.0) -> float:
  if override:
    return float(override)
  device = jax.devices()[0]
  peak = peak_flops_for_kind(device.device_kind)
  if peak:
    return peak
  if device.platform == "cpu":
    return measured_matmul_flops()
  return 0.0


class StageTimes:
  """Seconds and calls per named stage, summed: ``with times.stage("decode"): ...``.

  Code that can be timed takes an optional one and falls back to `NO_TIMES`,
  whose stages are a shared no-op context, so an untimed run pays nothing.
  """

  def __init__(self):
    self.seconds: dict[str, float] = collections.defaultdict(float)
    self.calls: dict[str, int] = collections.defaultdict(int)

  @contextlib.contextmanager
  def stage(self, name: str):
    start = time.perf_counter()
    try:
      yield
    finally:
      self.seconds[name] += time.perf_counter() - start
      self.calls[name] += 1

  def as_dict(self, digits: int = 3) -> dict[str, float]:
    return {k: round(v, digits) for k, v in self.seconds.items()}


class _NoTimes:
  _NULL = contextlib.nullcontext()

  def stage(self, name: str):  # pylint: disable=unused-argument
    return self._NULL


NO_TIMES = _NoTimes()
