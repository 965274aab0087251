"""What a run prints: a quiet console by default, the full log in a file.

absl, Orbax and Grain log at INFO through absl; a checkpoint save alone is
about twenty lines, which bury the progress bar.  Unless ``--verbosity`` is
given on the command line, the console handler shows warnings and errors
only, while the loggers keep producing INFO for the log file that training
writes in its workdir (``train.log``; ``train.process_<i>.log`` for the other
processes of a multi-process run).
"""

from __future__ import annotations

import logging as std_logging
import os
from typing import Optional

from absl import logging

_FILE_HANDLERS = {}


def quiet_console(verbosity_given: bool) -> None:
  """Console: warnings and errors only, unless the user chose a verbosity."""
  if verbosity_given:
    return
  # INFO records are still made (for the log file); only the console filters them.
  logging.set_verbosity(logging.INFO)
  logging.get_absl_handler().setLevel(std_logging.WARNING)


def log_file_name(process_index: int) -> str:
  return "train.log" if process_index == 0 else f"train.process_{process_index}.log"


def add_log_file(path: str) -> Optional[std_logging.Handler]:
  """Appends every INFO-or-worse record of this process to ``path`` (idempotent per path)."""
  path = os.path.abspath(path)
  if path in _FILE_HANDLERS:
    return _FILE_HANDLERS[path]
  os.makedirs(os.path.dirname(path), exist_ok=True)
  handler = std_logging.FileHandler(path)
  handler.setLevel(std_logging.INFO)
  handler.setFormatter(logging.PythonFormatter())
  std_logging.getLogger().addHandler(handler)
  _FILE_HANDLERS[path] = handler
  return handler


def remove_log_file(path: str) -> None:
  handler = _FILE_HANDLERS.pop(os.path.abspath(path), None)
  if handler is not None:
    std_logging.getLogger().removeHandler(handler)
    handler.close()
