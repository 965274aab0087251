"""Command-line entry point.

  python -m clinvla_jax.main --config=configs/demo.py --workdir=runs/demo          # train (resumes)
  python -m clinvla_jax.main --config=configs/base.py --mode=summary
  python -m clinvla_jax.main --config=configs/demo.py --config.train.num_steps=10 --workdir=...

``--config`` is an ml_collections config file; any field can be overridden
with ``--config.<field>=value``.  Multi-process runs pass
``--coordinator_address/--num_processes/--process_id`` (or rely on JAX's
cluster auto-detection).
"""

from __future__ import annotations

from absl import app, flags, logging
from ml_collections import config_flags

MODES = ("train", "summary")

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (configs/<name>.py).", lock_config=True)
_MODE = flags.DEFINE_enum("mode", "train", MODES, "What to run.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Output folder: checkpoints, metrics.jsonl, TensorBoard, results.")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (multi-process runs).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes (multi-process runs).")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index (multi-process runs).")


def run_summary(config) -> None:
  from clinvla_jax import summary
  print("\n".join(summary.summary_lines(config)))


def run_train(config, workdir: str) -> None:
  from clinvla_jax import sharding, train
  sharding.initialize_distributed(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
  train.train_and_evaluate(config, workdir)
  print(f"training output in {workdir} (metrics.jsonl, tensorboard/, checkpoints/)", flush=True)


def main(argv) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  config = _CONFIG.value
  if config is None:
    raise app.UsageError("--config is required, e.g. --config=configs/base.py")
  logging.info("mode=%s", _MODE.value)
  if _MODE.value == "summary":
    run_summary(config)
  elif _MODE.value == "train":
    if not _WORKDIR.value:
      raise app.UsageError("--workdir is required to train")
    run_train(config, _WORKDIR.value)


def _make_config_siblings_importable(argv) -> None:
  # Config files import their siblings (`from configs import base`), so the
  # folder holding `configs/` must be importable wherever we are started from.
  import os
  import sys
  for i, arg in enumerate(argv):
    path = arg.split("=", 1)[1] if arg.startswith("--config=") else (
        argv[i + 1] if arg == "--config" and i + 1 < len(argv) else None)
    if path:
      root = os.path.dirname(os.path.dirname(os.path.abspath(path.split(":")[0])))
      if root not in sys.path:
        sys.path.insert(0, root)


def entry() -> None:
  import sys
  _make_config_siblings_importable(sys.argv)
  flags.mark_flag_as_required("config")
  app.run(main)


if __name__ == "__main__":
  entry()
