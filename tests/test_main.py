"""The command line: train -> eval from the checkpoint, and embed to an npz."""

import json
import pathlib

import numpy as np
import pytest

import tiny_runs

REPO = pathlib.Path(__file__).resolve().parents[1]
DEMO = REPO / "clinvla_jax" / "assets" / "demo" / "covid_cxr"


def _main(*args):
  # Started outside the repository: the config's sibling imports must not depend on the working directory.
  out = tiny_runs.cli(f"--config.data.train={DEMO}", "--config.train.data_workers=0", *args, cwd="/")
  assert out.returncode == 0, out.stderr[-3000:]
  return out.stdout


def test_train_then_eval_and_embed_from_the_checkpoint(tiny_run, tmp_path):
  # The training is the session's shared tiny run (tests/tiny_runs.py); eval writes into a copy.
  work = tiny_runs.copy_workdir(tiny_run.workdir, tmp_path / "run")
  assert tiny_runs.saved_steps(work) == tiny_runs.KEPT_STEPS  # every 2 steps, the last 3 kept
  oldest, _, latest = tiny_runs.KEPT_STEPS
  records = [json.loads(line) for line in (work / "metrics.jsonl").read_text().splitlines()]
  for key in ("step", "loss", "loss_global", "loss_local", "lr_language_adapters", "lr_task_adapters", "samples_per_s"):
    assert key in records[-1], key
  assert list((work / "tensorboard").glob("events.out.tfevents.*"))

  stdout = _main(f"--workdir={work}", "--mode=eval")
  assert f"evaluating checkpoint step {latest}" in stdout
  results = json.loads((work / "results.json").read_text())
  assert "covid_cxr/image_to_text/P@5" in results
  assert (work / "results.md").stat().st_size > 200 and (work / "retrieval_examples.png").stat().st_size > 10_000

  npz = tmp_path / "emb.npz"
  stdout = _main(
    f"--checkpoint={work / 'checkpoints' / str(oldest)}",
    "--mode=embed",
    f"--config.data.eval={DEMO}",
    "--config.data.eval_split=val",
    f"--output={npz}",
  )
  assert f"evaluating checkpoint step {oldest}" in stdout
  with np.load(npz) as data:
    assert data["image_global"].shape == (36, 32) and data["text_global"].shape == (36, 32)
    assert len(data["study_id"]) == 36
    np.testing.assert_allclose(np.linalg.norm(data["image_global"], axis=1), 1.0, rtol=1e-5)


@pytest.mark.slow
def test_index_and_search_modes_name_what_is_missing(tmp_path):
  out = tiny_runs.cli("--mode=index", f"--output={tmp_path / 'idx'}")
  assert out.returncode != 0 and "--mode=index needs --input" in out.stderr
  out = tiny_runs.cli("--mode=search", f"--index={tmp_path}", "--query=effusion")
  assert out.returncode == 1 and f"error: {tmp_path}: no manifest.json" in out.stderr
  (tmp_path / "manifest.json").write_text("{}")
  out = tiny_runs.cli("--mode=search", f"--index={tmp_path}", "--query=effusion")
  assert out.returncode == 1 and "not a search index" in out.stderr
