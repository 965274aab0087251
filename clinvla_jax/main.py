"""Command-line entry point.

  python -m clinvla_jax.main --config=configs/demo.py --workdir=runs/demo            # train (resumes)
  python -m clinvla_jax.main --config=configs/demo.py --workdir=runs/demo --mode=eval
  python -m clinvla_jax.main --config=configs/demo.py --mode=embed --config.data.eval=DIR --output=emb.npz
  python -m clinvla_jax.main --config=configs/base.py --mode=summary
  python -m clinvla_jax.main --config=configs/demo.py --mode=index --checkpoint=runs/demo --input=DIR --output=INDEX
  python -m clinvla_jax.main --config=configs/demo.py --mode=search --index=INDEX --query="small left pleural effusion"
  python -m clinvla_jax.main --config=configs/demo.py --mode=export --workdir=runs/demo --platforms=cpu,tpu --output=DIR
    (then clinvla_jax.load_exported(DIR): embed_images / embed_text without the model code)

``--config`` is an ml_collections config file, loaded by
`clinvla_jax.config.load_config` (the Python API's loader); any field can be
overridden with ``--config.<field>=value`` (a field that does not exist or a
value not of its type: exit status 2, naming the field).  The console shows warnings, progress and
results; ``--verbosity=0`` (or ``-v 0``) adds absl/Orbax/Grain INFO lines,
which training always writes to ``<workdir>/train.log``.

Training holds ``<workdir>/train.lock`` (a second trainer exits with status 1
and names the holder).  SIGTERM or SIGINT saves a checkpoint at the end of
the current step and exits with status 128 + the signal number (143 for
SIGTERM); rerunning the same command resumes.  Multi-process runs pass
``--coordinator_address/--num_processes/--process_id`` (or rely on JAX's
cluster auto-detection).
"""

from __future__ import annotations

import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

MODES = ("train", "eval", "embed", "summary", "index", "search", "export")

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (configs/<name>.py).", lock_config=True)


class _ConfigFileParser(flags.ArgumentParser):
  """config_flags' parser of --config, loading the file with `clinvla_jax.config.load_config`.

  One loader for the command line and the Python API: the same import of the file (its sibling imports work from
  any working directory) and the same checks.  config_flags applies the --config.<field> overrides after.
  """

  def parse(self, path):
    from clinvla_jax import config as config_lib

    config = config_lib.load_config(path, check=False)  # checked with the overrides applied, in main()
    config.lock()  # lock_config=True: an override naming no field fails
    return config

  def flag_type(self):
    return "config object"


flags.FLAGS[_CONFIG.name].parser = _ConfigFileParser()
_MODE = flags.DEFINE_enum("mode", "train", MODES, "What to run.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Output folder: checkpoints, metrics.jsonl, TensorBoard, results.")
_CHECKPOINT = flags.DEFINE_string(
  "checkpoint",
  None,
  "eval/embed/index: a workdir, its checkpoints/ folder or one checkpoints/<step> folder "
  "(default: --workdir's latest checkpoint; search: the index's own).",
)
_OUTPUT = flags.DEFINE_string(
  "output",
  None,
  "embed: the .npz file to write; index: the index folder; search: a results .json file; export: the artifact folder.",
)
_PLATFORMS = flags.DEFINE_list(
  "platforms", ["cpu"], "export: the jax.export platforms to lower for (comma-separated: cpu, cuda, rocm, tpu)."
)
_INPUT = flags.DEFINE_string("input", None, "index: a converted dataset folder or a folder of study sub-folders.")
_INDEX = flags.DEFINE_string("index", None, "search: the index folder (from --mode=index).")
_QUERY = flags.DEFINE_string("query", None, "search: one text query.")
_QUERIES = flags.DEFINE_string("queries", None, "search: a file of text queries, one per line.")
_QUERY_IMAGE = flags.DEFINE_string("query_image", None, "search: a DICOM/PNG/JPEG image to find look-alikes of.")
_K = flags.DEFINE_integer("k", 10, "search: results per query.")
_TARGET = flags.DEFINE_enum(
  "target", "image", ["image", "report"], "search: rank the studies' images or their reports (image -> report)."
)
_HTML = flags.DEFINE_string("html", None, "search: also write a results page (.html) with thumbnails.")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (multi-process runs).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes (multi-process runs).")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index (multi-process runs).")


def run_summary(config) -> None:
  from clinvla_jax import summary

  print("\n".join(summary.summary_lines(config)))


def run_train(config, workdir: str) -> None:
  from clinvla_jax import preemption, train, workdir_lock

  try:
    train.train_and_evaluate(config, workdir)
  except workdir_lock.WorkdirLockedError as e:
    print(f"error: {e}", file=sys.stderr, flush=True)
    sys.exit(1)
  except train.TrainingPreempted as e:
    # Already said on the console; the status tells a scheduler the job was stopped, not finished.
    sys.exit(preemption.exit_code(e.signum))
  print(f"training output in {workdir} (metrics.jsonl, train.log, tensorboard/, checkpoints/)", flush=True)


def _variables_for_evaluation(config):
  """From --checkpoint or --workdir's checkpoints; else the (pretrained or seeded) initial weights."""
  from clinvla_jax import weights

  source = _checkpoint_source()
  variables, step = weights.evaluation_variables(config, source)
  if source:
    print(f"evaluating checkpoint step {step} from {source}", flush=True)
  else:
    print("no checkpoint given: evaluating the initial (pretrained or seeded) weights", flush=True)
  return variables


def _checkpoint_source():
  """--checkpoint, else --workdir when it holds checkpoints, else None."""
  return _CHECKPOINT.value or (
    _WORKDIR.value if _WORKDIR.value and os.path.isdir(os.path.join(_WORKDIR.value, "checkpoints")) else None
  )


def run_eval(config) -> None:
  from clinvla_jax.evaluate import report
  from clinvla_jax.evaluate import run as eval_run

  workdir = _WORKDIR.value or (_CHECKPOINT.value and _checkpoint_workdir(_CHECKPOINT.value))
  if not workdir:
    raise app.UsageError("--mode=eval needs --workdir (or --checkpoint)")
  variables = _variables_for_evaluation(config)
  results = eval_run.run_evaluation(config, variables, workdir)
  outputs = (eval_run.RESULTS_MD, eval_run.RESULTS_JSON, eval_run.FIGURE_PNG)
  paths = [os.path.join(workdir, name) for name in outputs if os.path.exists(os.path.join(workdir, name))]
  print("\n".join(report.console_table(results, paths)), flush=True)


def _checkpoint_workdir(path: str) -> str:
  from clinvla_jax import weights

  return weights.checkpoint_location(path)[0]


def run_embed(config) -> None:
  from clinvla_jax.evaluate import run as eval_run

  if not _OUTPUT.value:
    raise app.UsageError("--mode=embed needs --output=FILE.npz")
  if not config.data.eval:
    raise app.UsageError("--mode=embed needs --config.data.eval=<converted dataset folder>")
  variables = _variables_for_evaluation(config)
  eval_run.write_embeddings(config, variables, config.data.eval, _OUTPUT.value, split=config.data.eval_split or None)
  print(f"embeddings written to {_OUTPUT.value}", flush=True)


def run_index(config) -> None:
  from clinvla_jax.search import cli, index

  if not _INPUT.value or not _OUTPUT.value:
    raise app.UsageError("--mode=index needs --input=<converted folder or folder of studies> and --output=INDEX_DIR")
  try:
    cli.run_index(config, _INPUT.value, _OUTPUT.value, _checkpoint_source())
  except index.SearchIndexError as e:
    print(f"error: {e}", file=sys.stderr, flush=True)
    sys.exit(1)


def run_search(config) -> None:
  from clinvla_jax.search import cli, index

  if not _INDEX.value:
    raise app.UsageError("--mode=search needs --index=INDEX_DIR")
  try:
    cli.run_search(
      config,
      _INDEX.value,
      query=_QUERY.value,
      queries_file=_QUERIES.value,
      query_image=_QUERY_IMAGE.value,
      k=_K.value,
      target=_TARGET.value,
      checkpoint=_CHECKPOINT.value,
      output=_OUTPUT.value,
      html_path=_HTML.value,
    )
  except index.SearchIndexError as e:
    print(f"error: {e}", file=sys.stderr, flush=True)
    sys.exit(1)


def run_export(config) -> None:
  from clinvla_jax import export

  if not _OUTPUT.value:
    raise app.UsageError("--mode=export needs --output=ARTIFACT_DIR")
  try:
    platforms = export.check_platforms(_PLATFORMS.value)
    export.check_destination(os.path.abspath(_OUTPUT.value))  # before the weights are loaded
    manifest = export.export_embedders(
      config, _variables_for_evaluation(config), _OUTPUT.value, platforms, source=_checkpoint_source()
    )
  except export.ExportedArtifactError as e:
    print(f"error: {e}", file=sys.stderr, flush=True)
    sys.exit(1)
  size = sum(f["bytes"] for f in manifest["files"].values())
  print(f"exported embedders for {','.join(platforms)} to {_OUTPUT.value} ({size / 1e6:.1f} MB)", flush=True)


def main(argv) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  config = _CONFIG.value
  if config is None:
    raise app.UsageError("--config is required, e.g. --config=configs/base.py")
  from clinvla_jax import config as config_lib

  try:
    config_lib.validate(config)
  except config_lib.ConfigError as e:
    _exit_on_config_problems(e.problems)
  from clinvla_jax import console

  console.quiet_console(verbosity_given=flags.FLAGS["verbosity"].present)
  logging.info("mode=%s", _MODE.value)
  try:
    _run_mode(config)
  except config_lib.ConfigError as e:  # rules that need the devices (sharding.make_mesh, check_batch_divides)
    _exit_on_config_problems(e.problems)


def _run_mode(config) -> None:
  if _MODE.value == "summary":
    run_summary(config)
    return
  from clinvla_jax import sharding

  sharding.initialize_distributed(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
  if _MODE.value == "train":
    if not _WORKDIR.value:
      raise app.UsageError("--workdir is required to train")
    run_train(config, _WORKDIR.value)
  elif _MODE.value == "eval":
    run_eval(config)
  elif _MODE.value == "embed":
    run_embed(config)
  elif _MODE.value == "index":
    run_index(config)
  elif _MODE.value == "search":
    run_search(config)
  elif _MODE.value == "export":
    run_export(config)


def _config_path(argv):
  """The value of --config (``--config=PATH`` or ``--config PATH``), or None."""
  for i, arg in enumerate(argv):
    if arg.startswith("--config="):
      return arg.split("=", 1)[1]
    if arg == "--config" and i + 1 < len(argv):
      return argv[i + 1]
  return None


def _config_problems(argv) -> list:
  """--config.<field>=value arguments naming no field or of the wrong type, or the rules the config then breaks.

  Checked before absl parses anything: inside flag parsing, ml_collections would fail on them with status 1 and
  without the field's type (or, for an unknown field, with a traceback).
  """
  from clinvla_jax import config as config_lib

  path = _config_path(argv)
  overrides = dict(arg[len("--config.") :].split("=", 1) for arg in argv if arg.startswith("--config.") and "=" in arg)
  if not path:
    return []
  try:
    config_lib.load_config(path, overrides)
  except config_lib.ConfigError as e:
    return e.problems
  except Exception:  # pylint: disable=broad-exception-caught
    return []  # a file that does not load: config_flags says why
  return []


def _exit_on_config_problems(problems) -> None:
  if problems:
    print("error: invalid config:\n  " + "\n  ".join(problems), file=sys.stderr, flush=True)
    sys.exit(2)


def entry() -> None:
  # Before anything starts JAX's backend: tcmalloc preload (a one-time
  # re-exec) and XLA flags; see clinvla_jax/runtime.py.
  from clinvla_jax import runtime

  runtime.configure_host_runtime()
  from clinvla_jax.evaluate import options

  # ml_collections would only say that the key is not found.
  legacy = options.legacy_flag_error(sys.argv[1:])
  if legacy:
    print(f"error: {legacy}", file=sys.stderr, flush=True)
    sys.exit(2)
  _exit_on_config_problems(_config_problems(sys.argv[1:]))
  flags.mark_flag_as_required("config")
  app.run(main)


if __name__ == "__main__":
  entry()
