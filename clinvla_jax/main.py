"""Command-line entry point.

  python -m clinvla_jax.main --config=configs/base.py --mode=summary
  python -m clinvla_jax.main --config=configs/demo.py --config.model.text.num_layers=2 --mode=summary

``--config`` is an ml_collections config file; any field can be overridden
with ``--config.<field>=value``.
"""

from __future__ import annotations

import sys

from absl import app, flags, logging
from ml_collections import config_flags

MODES = ("summary",)

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (configs/<name>.py).", lock_config=True)
_MODE = flags.DEFINE_enum("mode", "summary", MODES, "What to run.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Output folder (checkpoints, metrics, results).")


def run_summary(config) -> None:
  from clinvla_jax import summary
  print("\n".join(summary.summary_lines(config)))


def main(argv) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  config = _CONFIG.value
  if config is None:
    raise app.UsageError("--config is required, e.g. --config=configs/base.py")
  logging.info("mode=%s", _MODE.value)
  if _MODE.value == "summary":
    run_summary(config)


def entry() -> None:
  flags.mark_flag_as_required("config")
  app.run(main)


if __name__ == "__main__":
  entry()
