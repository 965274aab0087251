"""Stop at a step boundary on SIGTERM/SIGINT, so the trainer can save and exit.

SLURM, Kubernetes and TPU maintenance announce preemption with SIGTERM and a
grace period; Ctrl-C sends SIGINT.  Either one asks the loop to finish the step
it is on, save a checkpoint and exit; a second signal of the same kind while
saving ends the process the usual way.

With several processes every one of them must stop at the same step, or the
collectives of the next step would hang.  JAX's distributed runtime already
agrees on such a step: its preemption service catches SIGTERM on any process,
tells the others, and ``multihost_utils.reached_preemption_sync_point(step)``
turns true on all of them at the same step.  In a multi-process run this
module therefore leaves SIGTERM to JAX and forwards SIGINT to it as a SIGTERM.
A single process keeps its own flag, which costs nothing per step.
"""

from __future__ import annotations

import os
import signal
import threading
from typing import Optional

import jax
from jax.experimental import multihost_utils

SIGNALS = (signal.SIGTERM, signal.SIGINT)


def exit_code(signum: int) -> int:
  """The shell's status for a process ended by ``signum``: schedulers read it as 'killed', not 'done'."""
  return 128 + int(signum)


class PreemptionWatcher:
  """``with PreemptionWatcher() as w: ... if w.should_stop(step): save; break``."""

  def __init__(self):
    self.signum: Optional[int] = None
    self._previous = {}
    self._multiprocess = jax.process_count() > 1

  def __enter__(self) -> "PreemptionWatcher":
    # signal.signal only works in the main thread; elsewhere (a trainer
    # started from a worker thread) the default handlers stay.
    if threading.current_thread() is threading.main_thread():
      for signum in SIGNALS:
        if self._multiprocess and signum == signal.SIGTERM:
          continue  # JAX's preemption service owns SIGTERM here.
        self._previous[signum] = signal.signal(signum, self._handle)
    return self

  def __exit__(self, *exc) -> None:
    for signum, handler in self._previous.items():
      signal.signal(signum, handler)
    self._previous.clear()

  def _handle(self, signum, frame) -> None:
    del frame
    if self.signum == signum:
      # Asked twice: stop waiting for the save.
      signal.signal(signum, self._previous.get(signum, signal.SIG_DFL))
      os.kill(os.getpid(), signum)
      return
    self.signum = signum
    if self._multiprocess:
      # The other processes only hear of a preemption through JAX's service,
      # which listens for SIGTERM.
      os.kill(os.getpid(), signal.SIGTERM)

  def should_stop(self, step: int) -> bool:
    """True at the step where this process (and, with several, every process) stops.

    Call it after every step with that step's number; in a multi-process run
    all processes must call it at every step.
    """
    if self._multiprocess:
      if multihost_utils.reached_preemption_sync_point(step):
        if self.signum is None:
          self.signum = signal.SIGTERM
        return True
      return False
    return self.signum is not None
