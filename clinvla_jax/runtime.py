"""Process-level settings that must be in place before JAX starts its backend.

Entry points call ``configure_host_runtime()`` first thing::

    from clinvla_jax import runtime
    runtime.configure_host_runtime()

On a CPU host it

* preloads tcmalloc (Debian/Ubuntu ``libtcmalloc-minimal4``) by re-executing
  the process once with ``LD_PRELOAD``: XLA's CPU runtime allocates and frees
  large buffers every step, and glibc's malloc returns them to the kernel, so
  every step page-faults its buffers back in (11-15 % of a train step here);
  tcmalloc keeps them.  The library cannot be loaded after start-up, hence the
  re-exec.  Without the library nothing happens beyond a log line.
* adds XLA flags to ``XLA_FLAGS`` (before the backend is created).

Set ``CLINVLA_NO_TCMALLOC=1`` to skip the preload.  Nothing here changes
numerics.
"""

from __future__ import annotations

import os
import sys
from typing import Optional, Sequence

TCMALLOC_CANDIDATES = (
  "/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4",
  "/usr/lib/aarch64-linux-gnu/libtcmalloc_minimal.so.4",
  "/usr/lib64/libtcmalloc_minimal.so.4",
  "/usr/lib/libtcmalloc_minimal.so.4",
  "/usr/lib/x86_64-linux-gnu/libtcmalloc.so.4",
)
_REEXEC_MARK = "CLINVLA_RUNTIME_REEXEC"

# Flags measured on the CPU train step and embedding (benchmarks/RESULTS.md,
# benchmarks/xla_options.py).  None helped beyond noise: disabling YNNPACK dots,
# oneDNN matmuls, XNNPACK (with or without greedy graph fusion), 512-bit vectors,
# the concurrency-optimised scheduler and the legacy fusion emitters each moved
# the base step by less than the run-to-run spread, so the default adds nothing.
DEFAULT_CPU_XLA_FLAGS: Sequence[str] = ()


def find_tcmalloc() -> Optional[str]:
  for path in TCMALLOC_CANDIDATES:
    if os.path.exists(path):
      return path
  return None


def tcmalloc_loaded() -> bool:
  """True when a tcmalloc is mapped into this process."""
  try:
    with open("/proc/self/maps") as f:
      return "tcmalloc" in f.read()
  except OSError:
    return False


def _can_reexec() -> bool:
  argv = getattr(sys, "orig_argv", None)
  if not argv or sys.flags.interactive:
    return False
  # `python -c ...` and code read from stdin cannot be started again
  # faithfully; a test runner must not restart halfway through its session.
  if "-c" in argv[1:] or len(argv) == 1 or argv[-1] == "-" or "pytest" in sys.modules:
    return False
  return True


def _merged_xla_flags(current: str, flags: Sequence[str]) -> str:
  # Flags the user set win over ours.
  present = {f.split("=", 1)[0] for f in current.split()}
  extra = [f for f in flags if f.split("=", 1)[0] not in present]
  return " ".join([current] + extra).strip() if extra else current


def _backend_started() -> bool:
  xla_bridge = sys.modules.get("jax._src.xla_bridge")
  return bool(xla_bridge is not None and getattr(xla_bridge, "_backends", None))


def configure_host_runtime(
  *, preload_tcmalloc: bool = True, xla_flags: Optional[Sequence[str]] = None, verbose: bool = False
) -> dict:
  """Preloads tcmalloc and sets XLA flags, re-executing the process at most once.

  Returns what it found: {"tcmalloc": path or None, "tcmalloc_loaded": bool,
  "xla_flags": str}.  Call it before any work: importing ``clinvla_jax``
  already starts the JAX backend, after which flags only take effect through
  the re-exec.  It never re-executes an interactive session or ``python -c``
  (a re-exec would lose their state); there it applies what it still can.
  """
  path = find_tcmalloc()
  env_changes = {}
  if (
    preload_tcmalloc
    and path is not None
    and os.environ.get("CLINVLA_NO_TCMALLOC", "") in ("", "0")
    and not tcmalloc_loaded()
  ):
    env_changes["LD_PRELOAD"] = ":".join(p for p in (path, os.environ.get("LD_PRELOAD", "")) if p)
  flags = DEFAULT_CPU_XLA_FLAGS if xla_flags is None else xla_flags
  current = os.environ.get("XLA_FLAGS", "")
  wanted = _merged_xla_flags(current, flags)
  if wanted != current:
    if _backend_started():
      env_changes["XLA_FLAGS"] = wanted
    else:
      os.environ["XLA_FLAGS"] = wanted
  if env_changes and not os.environ.get(_REEXEC_MARK) and _can_reexec():
    env = dict(os.environ, **env_changes)
    env[_REEXEC_MARK] = "1"
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, list(sys.orig_argv), env)
  if "XLA_FLAGS" in env_changes:
    print("clinvla_jax.runtime: the JAX backend already started; XLA flags not applied", file=sys.stderr)
  info = {"tcmalloc": path, "tcmalloc_loaded": tcmalloc_loaded(), "xla_flags": os.environ.get("XLA_FLAGS", "")}
  if verbose:
    print(f"clinvla_jax.runtime: {info}", file=sys.stderr)
  return info
