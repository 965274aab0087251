r"""Regenerates the bundled demo set ``clinvla_jax/assets/demo/`` from real samples.

Runs the ``covid_cxr`` converter on the development samples
(``shared/data`` beside the repository, or ``--data``) and writes, per dataset,
ArrayRecord shards split by patient into train/val (35 % of patients held out;
studies without a known finding train when their patient does) plus ``manifest.json`` and
``rejects.csv``, then ``ATTRIBUTION.md`` with the licence of every image used.

The IU X-ray images are licensed CC BY-NC-ND 4.0 (no derivatives): a resized
copy would be a derivative, so they are not bundled; the ``iu_xray`` converter
is exercised on the samples in ``shared/data`` by the tests instead.

Usage:
  python -m data_prep.make_demo [--data=/path/to/shared/data] [--out=...]
"""

import csv
import glob
import os
import shutil
from pathlib import Path

from absl import app
from absl import flags

from clinvla_jax import files
from clinvla_jax.data import records
from clinvla_jax.data import writer
from data_prep import covid_cxr

_REPO = Path(__file__).resolve().parents[1]
# About a third of the patients are held out: the largest val split that still
# leaves most of the few studies for training; both splits then hold COVID-19
# and non-COVID findings (35 % gives 36 val studies from 21 patients, 6 findings).
DEMO_VAL_PERCENT = 35.0
DEFAULT_DATA = _REPO.parent / "shared" / "data"
DEFAULT_OUT = _REPO / "clinvla_jax" / "assets" / "demo"

_HEADER = """# Demo data: attribution and licences

Small real chest X-ray sets converted with `python -m data_prep.make_demo` for
demos, smoke tests and examples.  They are **not** a training corpus, and every
image keeps its original licence (all research / non-commercial use here).
Images were resized to 224x224 8-bit grayscale; report text was cleaned.

## covid_cxr/  (covid-chestxray-dataset)

Source: J. P. Cohen, P. Morrison, L. Dao, K. Roth, T. Q. Duong, M. Ghassemi,
"COVID-19 Image Data Collection: Prospective Predictions Are the Future",
arXiv:2006.11988, https://github.com/ieee8023/covid-chestxray-dataset.
Metadata: CC BY-NC-SA 4.0.  Only images whose licence allows a resized copy
(no blank licence, no NoDerivatives) are included.  Per-image licence and source:

| image | patient | licence | source |
|---|---|---|---|
"""


def _used_images(out_dir: str) -> set[str]:
  used = set()
  for path in glob.glob(os.path.join(out_dir, "*.array_record")):
    for data in writer.read_shard(path):
      used.update(i for i in records.decode_record(data, with_images=False)["image_ids"] if i)
  return used


def _attribution(data: Path, out: Path) -> str:
  used = _used_images(str(out / "covid_cxr"))
  lines = [_HEADER]
  with open(data / "covid_cxr_dev" / "metadata.csv", newline="", encoding="utf-8") as f:
    seen = set()
    for row in csv.DictReader(f):
      fn = row["filename"]
      if fn in used and fn not in seen:
        seen.add(fn)
        src = row.get("url") or (f"https://doi.org/{row['doi']}" if row.get("doi") else "")
        lines.append(f"| {fn} | {row['patientid']} | {row['license']} | {src} |\n")
  return "".join(lines)


def make_demo(
  data: Path = DEFAULT_DATA, out: Path = DEFAULT_OUT, workers: int = 0, progress: bool = True
) -> dict[str, dict]:
  """Rebuilds the demo set in ``out`` (replacing what is there)."""
  # PNG keeps the bundled set small (about 3x smaller than the default
  # patch-major codec); a few hundred studies read fast enough either way.
  # The TFDS copy would double the bundled size; convert with the converter
  # itself (python -m data_prep.covid_cxr) to get one.
  opts = writer.Options(workers=workers, shard_size=64, progress=progress, image_codec="png", tfds=False)
  jobs = {
    "covid_cxr": (
      lambda: covid_cxr.build_plan(str(data / "covid_cxr_dev"), val_percent=DEMO_VAL_PERCENT, unlabelled="train"),
      opts,
    ),
  }
  manifests = {}
  for name, (plan_fn, o) in jobs.items():
    target = out / name
    if target.exists():
      shutil.rmtree(target)
    writer.run(plan_fn(), str(target), o)
    # Resume bookkeeping is useless in a finished, bundled set.
    for p in glob.glob(str(target / "*.array_record.json")) + glob.glob(str(target / "part-*.json")):
      os.remove(p)
    manifests[name] = writer.load_manifest(str(target))
  files.atomic_write_bytes(str(out / "ATTRIBUTION.md"), _attribution(data, out).encode())
  return manifests


def main(argv):
  del argv
  manifests = make_demo(Path(flags.FLAGS.data), Path(flags.FLAGS.out), flags.FLAGS.workers)
  for name, m in manifests.items():
    print(name, m["counts"]["records_by_split"], "rejected", m["counts"]["rows_rejected"])


if __name__ == "__main__":
  flags.DEFINE_string("data", str(DEFAULT_DATA), "The shared/data folder with the samples.")
  flags.DEFINE_string("out", str(DEFAULT_OUT), "Where to write the demo set.")
  flags.DEFINE_integer("workers", os.cpu_count() or 1, "Worker processes.")
  app.run(main)
