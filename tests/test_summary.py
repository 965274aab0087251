"""The `--mode=summary` table for the paper's configuration."""

import pathlib

import tiny_runs

from clinvla_jax import summary
from clinvla_jax.config import load_config

REPO = pathlib.Path(__file__).resolve().parents[1]

# ViT-B/16 + BERT-base (BioBERT vocabulary) with d = 64 adapters and 128-d heads.
BASE_TOTAL = 199_703_169
BASE_TRAINABLE = 6_708_609


def test_base_parameter_counts_and_trainable_fraction():
  table = summary.parameter_table(load_config(str(REPO / "configs" / "base.py")))
  assert table["total"] == {"total": BASE_TOTAL, "trainable": BASE_TRAINABLE}
  # protocols.md §3: 99,136 per language / task adapter layer, 296,064 for the invertible adapter.
  assert table["language adapters"]["total"] == 12 * 99_136
  assert table["task adapters"]["total"] == 12 * 99_136
  assert table["invertible adapter"]["total"] == 296_064
  assert round(summary.trainable_percent(table), 2) == 3.36


def test_summary_command_prints_table_and_readme_agrees():
  # With --verbosity=0 absl's info lines reach the console (without it, none: test_train.py's quiet check).
  out = tiny_runs.cli("--mode=summary", "--verbosity=0", config=REPO / "configs" / "base.py", timeout=300)
  assert out.returncode == 0, out.stderr[-2000:]
  assert "mode=summary" in out.stderr
  text = out.stdout
  assert f"trainable: {BASE_TRAINABLE:,d} of {BASE_TOTAL:,d} = 3.36 %" in text
  assert "paper: 12 %" in text and "2.8e+12" in text
  assert "evaluation (1 frontal view x 196 patches" in text
  readme = (REPO / "README.md").read_text()
  assert "3.36 %" in readme and "12 %" in readme
