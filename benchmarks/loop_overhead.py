r"""What the training loop costs on top of the bare compiled step.

On the tiny config, the same host batches go through

  * ``bare``: the compiled train step called back to back on batches already
    on the device, one block at the end (the floor);
  * ``bare_put``: the same, with each batch's host->device placement
    (``sharding.global_batch``) inside the timed loop;
  * ``loop``: ``train.train_and_evaluate`` fed the batches through
    ``host_batches``: prefetch, step, metric window, non-finite check,
    metrics.jsonl/TensorBoard writes, progress bar, preemption check.  Its
    time per step is read from the steady log windows of metrics.jsonl (the
    first two windows, which include warm-up, are left out; the final save is
    outside every window).

The three alternate ``--repeats`` times in one process; medians are compared.
Target: loop / bare <= 1.03.

  python benchmarks/loop_overhead.py --out=/tmp/loop_overhead.json
"""

from __future__ import annotations

import json
import os
import pathlib
import platform
import statistics
import sys
import tempfile
import time

# One host device: the loop's cost, not a simulated mesh's, is what is measured
# (a device count inherited from the environment, e.g. from the tests, is replaced).
os.environ["XLA_FLAGS"] = " ".join(
  [f for f in os.environ.get("XLA_FLAGS", "").split() if not f.startswith("--xla_force_host_platform_device_count")]
  + ["--xla_force_host_platform_device_count=1"]
)

REPO = pathlib.Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
  sys.path.insert(0, str(REPO))

# As the entry point does: tcmalloc and XLA flags before the backend starts.
from clinvla_jax import runtime  # pylint: disable=g-import-not-at-top

runtime.configure_host_runtime()

from absl import app  # pylint: disable=g-import-not-at-top
from absl import flags
import jax

from clinvla_jax import console, train  # pylint: disable=g-import-not-at-top
from clinvla_jax.config import load_config
from clinvla_jax.data import pipeline
from clinvla_jax.data.source import list_shards

_CONFIG = flags.DEFINE_string("config", str(REPO / "configs" / "tiny.py"), "Config file.")
_STEPS = flags.DEFINE_integer("steps", 60, "Steps per timed run.")
_LOG_EVERY = flags.DEFINE_integer("log_every", 10, "Log window of the loop run.")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Alternating repeats of the three runs.")
_BATCH = flags.DEFINE_integer("batch_size", 8, "Global batch size.")
_OUT = flags.DEFINE_string("out", None, "Write the results as JSON here.")


def _config(steps: int, log_every: int, batch: int):
  config = _load(steps, log_every, batch)
  for spec in config.evals.values():
    spec.every_steps = 0  # the loop alone is timed
  return config


def _load(steps: int, log_every: int, batch: int):
  return load_config(
    _CONFIG.value,
    {
      "train.num_steps": steps,
      "train.log_every_steps": log_every,
      "train.checkpoint_every_steps": 10**9,
      "train.data_workers": 0,
      "optim.batch_size": batch,
      "optim.warmup_steps": 1,
    },
  )


def host_batches(config, n: int):
  loader = pipeline.make_train_loader(
    list_shards(config.data.train, split=config.data.train_split or None),
    global_batch_size=int(config.optim.batch_size),
    seed=0,
    mask_ratio=float(config.data.mask_ratio),
  )
  return [b for b, _ in zip(loader.iterator(), range(n))]


def time_bare(config, batches, with_put: bool) -> float:
  """Seconds per step of the compiled step alone (after 3 untimed steps)."""
  setup = train.TrainSetup(config)
  place = train._placer(setup)  # pylint: disable=protected-access
  state = setup.init_state()
  device_batches = [place(b) for b in batches]
  compiled, _ = setup.compile(state, device_batches[0])
  for b in device_batches[:3]:
    state, metrics = compiled(state, setup.frozen, b)
  jax.block_until_ready(metrics)
  start = time.perf_counter()
  for host, placed in zip(batches, device_batches):
    state, metrics = compiled(state, setup.frozen, place(host) if with_put else placed)
  jax.block_until_ready((state, metrics))
  return (time.perf_counter() - start) / len(batches)


def time_loop(config, batches) -> float:
  """Median seconds per step over the loop's steady log windows."""
  with tempfile.TemporaryDirectory() as workdir:
    train.train_and_evaluate(config, workdir, host_batches=iter(batches))
    records = [json.loads(l) for l in open(os.path.join(workdir, "metrics.jsonl"))]
  windows = [r["step_time_s"] for r in records if "step_time_s" in r][2:]
  return statistics.median(windows)


def main(argv):
  del argv
  console.quiet_console(verbosity_given=flags.FLAGS["verbosity"].present)
  config = _config(_STEPS.value, _LOG_EVERY.value, _BATCH.value)
  batches = host_batches(config, _STEPS.value)
  runs = {"bare": [], "bare_put": [], "loop": []}
  for _ in range(_REPEATS.value):
    runs["bare"].append(time_bare(config, batches, with_put=False))
    runs["bare_put"].append(time_bare(config, batches, with_put=True))
    runs["loop"].append(time_loop(config, batches))
  medians = {k: statistics.median(v) for k, v in runs.items()}
  result = {
    "config": os.path.basename(_CONFIG.value),
    "steps": _STEPS.value,
    "log_every": _LOG_EVERY.value,
    "batch_size": _BATCH.value,
    "repeats": _REPEATS.value,
    "device": jax.devices()[0].device_kind,
    "machine": platform.processor() or platform.machine(),
    "date": time.strftime("%Y-%m-%d"),
    "step_s": medians,
    "runs_s": runs,
    "loop_vs_bare": medians["loop"] / medians["bare"],
    "loop_vs_bare_put": medians["loop"] / medians["bare_put"],
  }
  for name in runs:
    print(f"{name:9s} {1e3 * medians[name]:8.2f} ms/step   runs: " + ", ".join(f"{1e3 * t:.2f}" for t in runs[name]))
  print(
    f"loop / bare = {result['loop_vs_bare']:.3f}   loop / bare_put = {result['loop_vs_bare_put']:.3f}"
    f"   (target loop / bare <= 1.03)"
  )
  if _OUT.value:
    with open(_OUT.value, "w") as f:
      json.dump(result, f, indent=2)


if __name__ == "__main__":
  app.run(main)
