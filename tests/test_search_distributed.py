"""`--mode=index` on two processes (jax.distributed on this machine, one CPU device each).

Two processes build the index one process builds (same segments, rows, reports and embeddings) from a plain folder of
studies and from a converted folder; a run whose process 1 is killed keeps its finished segments, its process 0 exits
at once, and the rerun embeds only the rest.  Every run is a `python -m clinvla_jax.main` of the tiny config on its
initial (seeded) weights, so nothing is trained here.  Those runs take minutes on 2 cores (slow tier); the staging
writer's whole-shard parts are checked in-process in seconds.
"""

import dataclasses
import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

import tiny_runs
from test_search import archive  # noqa: F401  (the fixture: a plain folder of real studies)

from clinvla_jax.data import DEMO_DIR, writer
from clinvla_jax.search import ingest
from clinvla_jax.search.index import Index

COVID = DEMO_DIR / "covid_cxr"
TIMEOUT = 600
# Staged shards of 2 studies: the 5 studies of the archive become 3 shards, so both processes convert some.
SMALL_STAGING = (
  "from clinvla_jax.search import index; index.STAGING_SHARD_SIZE = 2; from clinvla_jax import main; main.entry()"
)


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _command(args, staging_shard_size=False):
  cmd = tiny_runs.cli_command("--mode=index", *args)
  return [sys.executable, "-c", SMALL_STAGING, *cmd[3:]] if staging_shard_size else cmd


def _start(args, logs: pathlib.Path, name: str, staging_shard_size=False) -> subprocess.Popen:
  """One process of a run, its output in ``logs/name.{out,err}`` (files: a full pipe would stall it)."""
  logs.mkdir(parents=True, exist_ok=True)
  with open(logs / f"{name}.out", "w") as out, open(logs / f"{name}.err", "w") as err:
    return subprocess.Popen(
      _command(args, staging_shard_size),
      cwd=tiny_runs.REPO,
      env=tiny_runs.env(JAX_PLATFORMS="cpu"),
      stdout=out,
      stderr=err,
    )


def _start_two(args, logs, name, staging_shard_size=False) -> list:
  address = f"127.0.0.1:{_free_port()}"
  return [
    _start(
      [*args, f"--coordinator_address={address}", "--num_processes=2", f"--process_id={rank}"],
      logs,
      f"{name}-{rank}",
      staging_shard_size,
    )
    for rank in range(2)
  ]


def _finish(procs, logs, name, timeout=TIMEOUT) -> list:
  """Waits for every process (killing the rest on a timeout); their stdout, after asserting status 0."""
  deadline = time.monotonic() + timeout
  try:
    for p in procs:
      p.wait(timeout=max(1, deadline - time.monotonic()))
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  names = [name] if len(procs) == 1 else [f"{name}-{rank}" for rank in range(len(procs))]
  for p, n in zip(procs, names):
    assert p.returncode == 0, f"{n}: status {p.returncode}\n{(logs / f'{n}.err').read_text()[-3000:]}"
  return [(logs / f"{n}.out").read_text() for n in names]


def _index_one(args, logs, name, staging_shard_size=False) -> str:
  return _finish([_start(args, logs, name, staging_shard_size)], logs, name)[0]


def _index_two(args, logs, name, staging_shard_size=False) -> list:
  return _finish(_start_two(args, logs, name, staging_shard_size), logs, name)


def _segments(directory: pathlib.Path) -> list:
  path = directory / "manifest.json"
  return json.loads(path.read_text())["segments"] if path.exists() else []


def assert_same_index(a: pathlib.Path, b: pathlib.Path, atol=1e-5):
  """Two index folders hold the same studies in the same segments and order, with equal rows and rejects."""
  ma, mb = (json.loads((d / "manifest.json").read_text()) for d in (a, b))
  assert ma["counts"] == mb["counts"] and ma["config_hash"] == mb["config_hash"]
  assert [{k: v for k, v in i.items() if k != "added"} for i in ma["inputs"]] == [
    {k: v for k, v in i.items() if k != "added"} for i in mb["inputs"]
  ]

  def relative(seg, directory):  # staged shards lie inside each index folder
    return seg | {
      "shard": os.path.relpath(seg["shard"], directory) if seg["shard"].startswith(str(directory)) else seg["shard"]
    }

  assert [relative(s, a) for s in ma["segments"]] == [relative(s, b) for s in mb["segments"]]
  for seg in ma["segments"]:
    for suffix in (".jsonl", ".ids.json"):
      assert (a / (seg["file"] + suffix)).read_bytes() == (b / (seg["file"] + suffix)).read_bytes(), seg["file"]
    with np.load(a / (seg["file"] + ".npz")) as za, np.load(b / (seg["file"] + ".npz")) as zb:
      assert sorted(za.files) == sorted(zb.files)
      for key in za.files:
        if za[key].dtype.kind == "f":
          assert za[key].dtype == zb[key].dtype == np.float32
          np.testing.assert_allclose(za[key], zb[key], atol=atol, rtol=0, err_msg=f"{seg['file']} {key}")
        else:
          np.testing.assert_array_equal(za[key], zb[key], err_msg=f"{seg['file']} {key}")
  assert (a / "rejects.csv").read_bytes() == (b / "rejects.csv").read_bytes()
  ia, ib = Index.load(str(a)), Index.load(str(b))
  assert list(ia.study_ids) == list(ib.study_ids) and len(ia) == ma["counts"]["studies"]


def _resharded(src: pathlib.Path, dst: pathlib.Path, size: int) -> pathlib.Path:
  """The demo's records in one converted folder of ``size``-record shards (the last one shorter)."""
  manifest = json.loads((src / "manifest.json").read_text())
  records = [r for shard in manifest["shards"] for r in writer.read_shard(str(src / shard["file"]))]
  dst.mkdir()
  shards = []
  for k in range(0, len(records), size):
    name = writer.shard_name("all", 0, k // size)
    writer.write_shard(str(dst / name), records[k : k + size])
    shards.append({"file": name, "split": "all", "num_records": len(records[k : k + size])})
  (dst / "manifest.json").write_text(
    json.dumps(
      {
        "label_names": manifest["label_names"],
        "splits": {"all": {"num_records": len(records), "shards": [s["file"] for s in shards]}},
        "shards": shards,
      }
    )
  )
  return dst


def test_whole_shard_parts_write_what_one_part_writes_and_resume_each_other(archive, tmp_path):  # noqa: F811
  plan = ingest.plan_folder(str(archive)).plan
  opts = writer.Options(
    shard_size=2, image_codec="png", require_text=False, tfds=False, progress=False, whole_shards=True, combine=False
  )
  one, two = tmp_path / "one", tmp_path / "two"
  writer.run(plan, str(one), opts)
  writer.combine(str(one), 1)
  for part in (1, 0):
    writer.run(plan, str(two), dataclasses.replace(opts, part=part, num_parts=2))
  assert not (two / "manifest.json").exists()  # combine=False: left to the caller
  writer.combine(str(two), 2)
  shards = sorted(p.name for p in one.glob("*.array_record"))
  assert len(shards) == 3 and shards == sorted(p.name for p in two.glob("*.array_record"))
  assert all((one / s).read_bytes() == (two / s).read_bytes() for s in shards)
  assert (one / "rejects.csv").read_bytes() == (two / "rejects.csv").read_bytes()
  ma, mb = (json.loads((d / "manifest.json").read_text()) for d in (one, two))
  assert {k: v for k, v in ma.items() if k not in ("created", "num_parts")} == {
    k: v for k, v in mb.items() if k not in ("created", "num_parts")
  }
  # One part resumes what two parts of an interrupted run finished: their shards are not written again.
  three = tmp_path / "three"
  writer.run(plan, str(three), dataclasses.replace(opts, part=0, num_parts=2))
  stamps = {p.name: p.stat().st_mtime_ns for p in three.glob("*.array_record")}
  assert sorted(stamps) == [shards[0], shards[2]]
  writer.run(plan, str(three), dataclasses.replace(opts, resume=True))
  writer.combine(str(three), 1)
  assert {p: (three / p).stat().st_mtime_ns for p in stamps} == stamps
  assert (three / "rejects.csv").read_bytes() == (one / "rejects.csv").read_bytes()


@pytest.mark.slow
def test_two_processes_index_a_folder_of_studies_as_one_does(archive, tmp_path):  # noqa: F811
  one, two, logs = tmp_path / "one", tmp_path / "two", tmp_path / "logs"
  _index_one([f"--input={archive}", f"--output={one}"], logs, "one", staging_shard_size=True)
  outs = _index_two([f"--input={archive}", f"--output={two}"], logs, "two", staging_shard_size=True)
  assert all("5 studies" in out and "3 segments (3 embedded by this run)" in out for out in outs), outs
  assert_same_index(one, two)
  staged = next((two / "staging").iterdir())
  # Both processes converted whole shards (0 and 2, then 1); the staged folder is the one process's.
  parts = [json.loads((staged / f"part-00{p}-of-002.json").read_text()) for p in range(2)]
  assert [[c["chunk"] for c in p["chunks"]] for p in parts] == [[0, 2], [1]]
  one_staged = one / "staging" / staged.name
  shards = sorted(p.name for p in staged.glob("*.array_record"))
  assert shards == sorted(p.name for p in one_staged.glob("*.array_record")) and len(shards) == 3
  assert all((staged / s).read_bytes() == (one_staged / s).read_bytes() for s in shards)


@pytest.mark.slow
def test_a_killed_two_process_index_resumes_without_reembedding_finished_shards(tmp_path):
  # 11 shards: 10 of 12 studies (8 for process 0, 4 and padding for process 1 in a batch of 16) and one of 1.
  data = _resharded(COVID, tmp_path / "data", 12)
  one, two, logs = tmp_path / "one", tmp_path / "two", tmp_path / "logs"
  _index_one([f"--input={data}", f"--output={one}"], logs, "one")
  total = len(_segments(one))
  assert total == 11

  procs = _start_two([f"--input={data}", f"--output={two}"], logs, "killed")
  deadline = time.monotonic() + TIMEOUT
  try:
    while not _segments(two) and time.monotonic() < deadline and procs[0].poll() is None:
      time.sleep(0.02)
    procs[1].send_signal(signal.SIGKILL)
    killed = time.monotonic()
    # Process 0's next collective fails on the lost connection and it exits at once with status 1.
    survivor = procs[0].wait(timeout=60)
    waited = time.monotonic() - killed
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  err = (logs / "killed-0.err").read_text()
  assert survivor == 1 and "rerun the same commands" in err, (survivor, err[-3000:])
  assert waited < 30, waited  # not jax.distributed's 100 s heartbeat timeout
  kept = _segments(two)
  assert 1 <= len(kept) < total, f"{len(kept)} of {total} segments before the kill: nothing left to resume"
  stamps = {
    p: (p.stat().st_ino, p.stat().st_mtime_ns)
    for s in kept
    for p in (two / "segments").glob(f"{os.path.basename(s['file'])}.*")
  }

  outs = _index_two([f"--input={data}", f"--output={two}"], logs, "rerun")
  assert all(f"{total} segments ({total - len(kept)} embedded by this run)" in out for out in outs), outs
  assert {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in stamps} == stamps
  assert _segments(two)[: len(kept)] == kept
  print(f"killed after {len(kept)} of {total} segments; process 0 exited {waited:.1f} s after the kill")
  assert_same_index(one, two)
