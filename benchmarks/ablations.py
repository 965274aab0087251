r"""The paper's Table 6 ablations, measured on the demo: one training per switch, held-out P@5 beside chance.

Each variant is the demo config (`configs/demo.py`) with one component
switched off, trained from the same seed on the same data in its own
subprocess and workdir, then evaluated on the demo's patient-level held-out
split exactly as `./run.sh` evaluates the demo:

  full                  the demo as shipped
  -adapters             model.text.use_adapters=False (Table 6 "- Transformer-Adapt": no language/task adapters)
  -multiview            model.multiview=False (frontal views only)
  -invertible_adapter   model.text.invertible_adapter=False
  -temporal_multiview   model.multiview=False, model.temporal=False (current frontal only)
  -local_loss           loss.use_local=False
  -global_loss          loss.use_global=False

The switches concern the text tower's adapters among others, so they train in
every variant (`adapters_trained`): `configs/demo.py` freezes the whole text
tower, and that rule is dropped here, as `configs/base.py` has it.

It prints and writes, for each variant, the held-out metric (default
image->text P@5 of covid_cxr), its chance level and its 95 % bootstrap
interval.  This is a measurement, not a test: on 36 held-out studies most
differences are inside the intervals.  About 6 minutes per variant on 2 CPU
cores at the demo's 200 steps.

  python benchmarks/ablations.py --out=/tmp/ablations.json
  python benchmarks/ablations.py --variants=full,-local_loss --steps=50 --workdir=/tmp/abl
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
  sys.path.insert(0, REPO)

from clinvla_jax.evaluate import report  # pylint: disable=wrong-import-position

VARIANTS = {
  "full": {},
  "-adapters": {"model.text.use_adapters": False},
  "-multiview": {"model.multiview": False},
  "-invertible_adapter": {"model.text.invertible_adapter": False},
  "-temporal_multiview": {"model.multiview": False, "model.temporal": False},
  "-local_loss": {"loss.use_local": False},
  "-global_loss": {"loss.use_global": False},
}
# Metrics reported for every variant (each with _chance and a CI where results.json has them).
DEFAULT_METRICS = (
  "covid_cxr/image_to_text/P@5",
  "covid_cxr/text_to_image/P@5",
  "covid_cxr/image_to_text/R@5",
  "covid_cxr/zero_shot/AUC",
)


def config_flags(overrides: dict) -> list:
  return [f"--config.{k}={v}" for k, v in overrides.items()]


def adapters_trained(config: str) -> dict:
  """Overrides that let the text tower's adapters train: the config's rules without `demo.TEXT_FROZEN_RULE`."""
  from clinvla_jax.config import load_config  # pylint: disable=import-outside-toplevel
  from configs import demo  # pylint: disable=import-outside-toplevel

  rules = tuple(tuple(rule) for rule in load_config(os.path.join(REPO, config)).optim.param_groups)
  kept = tuple(rule for rule in rules if rule != demo.TEXT_FROZEN_RULE)
  return {} if kept == rules else {"optim.param_groups": kept}


def run_variant(name: str, overrides: dict, config: str, workdir: str, steps: int | None, log_path: str) -> dict:
  """Trains and evaluates one variant; returns its results.json with the wall time."""
  # The held-out set once, after training (the demo's evaluator is covid_cxr).
  extra = config_flags(overrides) + ["--config.evals.covid_cxr.every_steps=0", "--config.evals.covid_cxr.figure=False"]
  if steps:
    extra.append(f"--config.train.num_steps={steps}")
  base = [sys.executable, "-m", "clinvla_jax.main", f"--config={config}", f"--workdir={workdir}"]
  start = time.perf_counter()
  with open(log_path, "w") as log:
    for mode in ("train", "eval"):
      proc = subprocess.run(base + [f"--mode={mode}"] + extra, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
      if proc.returncode:
        raise RuntimeError(f"variant {name}: --mode={mode} failed (exit {proc.returncode}); see {log_path}")
  with open(os.path.join(workdir, "results.json")) as f:
    results = json.load(f)
  results["wall_s"] = time.perf_counter() - start
  return results


def row(name: str, results: dict, metrics) -> dict:
  out = {"variant": name, "wall_s": round(results["wall_s"], 1)}
  for m in metrics:
    if m not in results:
      continue
    out[m] = results[m]
    for suffix in ("_chance", "_majority", "_ci_low", "_ci_high"):
      if m + suffix in results:
        out[m + suffix] = results[m + suffix]
  return out


def format_cell(r: dict, m: str) -> str:
  """ "57.2 [42.2–71.1]": the score and its interval (the chance level is in the column header)."""
  return report.score_cell({k: v for k, v in r.items() if k in (m, m + "_ci_low", m + "_ci_high")}, m)


def markdown(rows, metrics) -> str:
  chance = {m: next((r[m + "_chance"] for r in rows if m + "_chance" in r), None) for m in metrics}
  head = (
    "| variant | "
    + " | ".join(
      f"{m.split('/', 1)[1]}" + (f" (chance {100 * chance[m]:.1f})" if chance[m] is not None else "") for m in metrics
    )
    + " | wall s |"
  )
  lines = [head, "|" + "---|" * (len(metrics) + 2)]
  for r in rows:
    lines.append(f"| {r['variant']} | " + " | ".join(format_cell(r, m) for m in metrics) + f" | {r['wall_s']:.0f} |")
  return "\n".join(lines)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--config", default="configs/demo.py")
  parser.add_argument(
    "--variants", default=",".join(VARIANTS), help="comma-separated names from: " + ", ".join(VARIANTS)
  )
  parser.add_argument("--steps", type=int, default=None, help="override config.train.num_steps")
  parser.add_argument("--metrics", default=",".join(DEFAULT_METRICS))
  parser.add_argument("--workdir", default="", help="one sub-folder per variant (default: a temporary folder)")
  parser.add_argument("--out", default="", help="write the rows as JSON here")
  args = parser.parse_args(argv)

  names = [v for v in args.variants.split(",") if v]
  unknown = [v for v in names if v not in VARIANTS]
  if unknown:
    parser.error(f"unknown variants {unknown}; choose from {list(VARIANTS)}")
  metrics = [m for m in args.metrics.split(",") if m]
  root = args.workdir or tempfile.mkdtemp(prefix="clinvla_ablations_")
  rows = []
  base = adapters_trained(args.config)
  for name in names:
    workdir = os.path.join(root, name.lstrip("-") or "full")
    if os.path.isdir(workdir):
      shutil.rmtree(workdir)  # a stale checkpoint would be resumed instead of trained
    os.makedirs(workdir)
    overrides = {**base, **VARIANTS[name]}
    results = run_variant(name, overrides, args.config, workdir, args.steps, os.path.join(workdir, "log.txt"))
    rows.append(row(name, results, metrics))
    print(json.dumps(rows[-1]), flush=True)
  print(markdown(rows, metrics))
  if args.out:
    with open(args.out, "w") as f:
      json.dump({"config": args.config, "steps": args.steps, "rows": rows}, f, indent=1)
  return rows


if __name__ == "__main__":
  main()
