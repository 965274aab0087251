"""The tiny training run that tests share, and the command line that starts it.

`conftest.py`'s session fixture `tiny_run` trains it once (`python -m clinvla_jax.main`, one
device); tests that need a trained checkpoint, its losses or its workdir read it or copy it
(`copy_workdir`) instead of training their own.  `RUN` is the run's config as overrides of
`configs/tiny.py`, so a test can resume or rerun it in-process with the same numbers.
"""

import json
import os
import pathlib
import shutil
import subprocess
import sys

from clinvla_jax.config import load_config

REPO = pathlib.Path(__file__).resolve().parents[1]
DEMO = REPO / "clinvla_jax" / "assets" / "demo" / "covid_cxr"
TINY = REPO / "configs" / "tiny.py"
NUM_STEPS = 12
CHECKPOINT_EVERY = 2
# The shared run: warm-up 2 (learning rates 0, peak / 2, then the cosine over NUM_STEPS), a
# checkpoint every 2 steps (the last 3 kept: 8, 10, 12), every step logged.
KEPT_STEPS = [NUM_STEPS - 2 * CHECKPOINT_EVERY, NUM_STEPS - CHECKPOINT_EVERY, NUM_STEPS]
RUN = {
  "data.train": str(DEMO),
  "train.log_every_steps": 1,
  "optim.warmup_steps": 2,
  "train.data_workers": 0,
  "train.num_steps": NUM_STEPS,
  "train.checkpoint_every_steps": CHECKPOINT_EVERY,
}
# One simulated device: the run's numbers do not depend on the test process's devices.
ONE_DEVICE = "--xla_force_host_platform_device_count=1"


def config(**overrides):
  """The shared run's config (plus overrides), for in-process training."""
  return load_config(str(TINY), {**RUN, **overrides})


def cli_command(*args, config=TINY) -> list:
  """`python -m clinvla_jax.main --config=CONFIG ARGS...`."""
  return [sys.executable, "-m", "clinvla_jax.main", f"--config={config}", *map(str, args)]


def cli(*args, config=TINY, cwd=REPO, timeout=600, **env_extra) -> subprocess.CompletedProcess:
  """Runs the command line to its end on one simulated device (``env_extra`` added to the environment)."""
  return subprocess.run(
    cli_command(*args, config=config), cwd=cwd, env=env(**env_extra), capture_output=True, text=True, timeout=timeout
  )


def command(workdir, *extra, run=None) -> list:
  """`python -m clinvla_jax.main` on the tiny config with ``run``'s settings (default: the shared run's)."""
  settings = RUN if run is None else run
  return cli_command(f"--workdir={workdir}", *(f"--config.{k}={v}" for k, v in settings.items()), *extra)


def env(**extra) -> dict:
  return dict(os.environ, XLA_FLAGS=ONE_DEVICE, **extra)


def main(workdir, *extra, run=None, timeout=600):
  """Runs the command line to its end; the CompletedProcess (text output)."""
  settings = RUN if run is None else run
  return cli(f"--workdir={workdir}", *(f"--config.{k}={v}" for k, v in settings.items()), *extra, timeout=timeout)


def losses_by_step(workdir) -> dict:
  by_step = {}
  for line in (pathlib.Path(workdir) / "metrics.jsonl").read_text().splitlines():
    record = json.loads(line)
    if "loss" in record:
      by_step[record["step"]] = record["loss"]
  return by_step


def saved_steps(workdir) -> list:
  return sorted(int(p.name) for p in (pathlib.Path(workdir) / "checkpoints").iterdir() if p.name.isdigit())


def copy_workdir(src, dst) -> pathlib.Path:
  """A private copy of a workdir (tests that resume, damage or evaluate must not change the shared one)."""
  shutil.copytree(src, dst, ignore=shutil.ignore_patterns("train.lock"))
  return pathlib.Path(dst)


def truncate_arrays(step_dir) -> int:
  """Damages one checkpoint: every array file of its state cut to a third."""
  files = [p for p in (pathlib.Path(step_dir) / "state").rglob("*") if p.is_file() and "/d/" in str(p)]
  for p in files:
    with open(p, "r+b") as f:
      f.truncate(max(1, p.stat().st_size // 3))
  return len(files)
