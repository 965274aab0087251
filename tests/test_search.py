"""The study search: indexing (converted folders, plain folders of real DICOM/PNG studies), search, pages.

The fast tests use the tiny config with random weights: they check the
machinery (rankings, resuming, appending, rejects), not retrieval quality.
The slow test trains the demo config and checks that a study's own report
finds it far more often than chance.
"""

import csv
import json
import os
import pathlib
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

import tiny_runs

from clinvla_jax import api
from clinvla_jax.data import DEMO_DIR
from clinvla_jax.evaluate import run as eval_run
from clinvla_jax.search import exact, ingest
from clinvla_jax.search import index as index_lib
from clinvla_jax.search.index import Index, IndexMismatchError, SearchIndexError
from configs import tiny

REPO = pathlib.Path(__file__).resolve().parents[1]
COVID = DEMO_DIR / "covid_cxr"
NUM_VAL = 36


@pytest.fixture(scope="module")
def model():
  cfg = tiny.get_config()
  return cfg, api.init_params(cfg, jax.random.key(0))


@pytest.fixture(scope="module")
def val_index(model, tmp_path_factory):
  cfg, variables = model
  out = tmp_path_factory.mktemp("val_index")
  return Index.build(cfg, str(COVID), str(out), variables=variables, split="val", progress=False)


def _rejects(directory) -> list[dict]:
  with open(os.path.join(directory, "rejects.csv"), newline="", encoding="utf-8") as f:
    return list(csv.DictReader(f))


def _write_dicom(src, dst, **tags):
  import pydicom

  ds = pydicom.dcmread(src)
  for k, v in tags.items():
    setattr(ds, k, v)
  ds.save_as(dst)


@pytest.fixture(scope="module")
def archive(shared_data, tmp_path_factory):
  """A plain folder of real studies, one sub-folder each, with the kinds of trouble archives hold."""
  root = tmp_path_factory.mktemp("archive")
  dicom = shared_data / "dicom"
  rg1 = dicom / "RG1_UNCR.dcm"
  # One patient, two dated studies: the later one takes the earlier as its prior.
  (root / "p9rg1_early").mkdir()
  _write_dicom(rg1, root / "p9rg1_early" / "view.dcm", StudyDate="20040101")
  (root / "p9rg1_early" / "report.txt").write_text("FINDINGS: Small left pleural effusion.\nIMPRESSION: Effusion.")
  (root / "p9rg1_late").mkdir()
  shutil.copy(rg1, root / "p9rg1_late" / "view.dcm")  # StudyDate 20040826
  (root / "p9rg1_late" / "report.txt").write_text("IMPRESSION: No acute cardiopulmonary process.")
  (root / "p9rg1_late" / "notes.xml").write_text("<x/>")
  (root / "rsna").mkdir()
  shutil.copy(next(dicom.glob("1.2.276*.dcm")), root / "rsna" / "image.dcm")
  # A nested patient/study layout with PNG views decided by their pixels, no report.
  iu = shared_data / "iu_xray" / "images" / "r2gen_layout" / "CXR368_IM-1832"
  (root / "iu" / "CXR368").mkdir(parents=True)
  for png in iu.glob("*.png"):
    shutil.copy(png, root / "iu" / "CXR368" / png.name)
  (root / "nih").mkdir()
  shutil.copy(dicom / "00000001_000.png", root / "nih" / "frontal.png")
  (root / "nih" / "report.txt").write_text("Cardiomegaly. No effusion.")
  (root / "broken").mkdir()
  (root / "broken" / "view.dcm").write_bytes(b"\0" * 128 + b"DICM" + b"not a dicom at all")
  (root / "empty").mkdir()
  return root


# --- exact search ------------------------------------------------------------------------


def test_top_k_equals_a_stable_full_sort_with_ties_and_masks():
  rng = np.random.default_rng(0)
  rows = rng.standard_normal((500, 16)).astype(np.float32)
  rows /= np.linalg.norm(rows, axis=1, keepdims=True)
  rows[10] = rows[20]  # a tie: the lower row number ranks first
  queries = rng.standard_normal((7, 16)).astype(np.float32)
  queries[0] = rows[10]
  idx, scores = exact.top_k(rows, queries, k=25)
  full = np.argsort(-(queries @ rows.T), axis=1, kind="stable")[:, :25]
  np.testing.assert_array_equal(idx, full)
  assert list(idx[0, :2]) == [10, 20]
  np.testing.assert_allclose(scores, np.take_along_axis(queries @ rows.T, full, 1), rtol=1e-6)
  valid = np.arange(500) % 3 == 0
  idx, _ = exact.top_k(rows, queries, k=1000, valid=valid)
  assert idx.shape == (7, valid.sum()) and valid[idx].all()


# --- indexing a converted folder ----------------------------------------------------------


def test_ranking_equals_brute_force_over_the_embed_mode_output(model, val_index, tmp_path):
  cfg, variables = model
  npz = tmp_path / "emb.npz"
  eval_run.write_embeddings(cfg, variables, str(COVID), npz, split="val")
  emb = np.load(npz)
  ids = list(emb["study_id"])
  assert len(val_index) == NUM_VAL and sorted(val_index.study_ids) == sorted(ids)
  rows = [ids.index(s) for s in val_index.study_ids]
  np.testing.assert_allclose(val_index.image, emb["image_global"][rows], atol=1e-6)
  np.testing.assert_allclose(val_index.text, emb["text_global"][rows], atol=1e-6)
  image, text = emb["image_global"], emb["text_global"]
  reports = list(emb["report_text"])
  for i in range(0, NUM_VAL, 5):
    _assert_brute_force_ranking(val_index.search_text(reports[i], k=10), image @ text[i], ids)
    _assert_brute_force_ranking(val_index.search_embedding(text[i][None], k=10)[0], image @ text[i], ids)
    # image -> report and image -> image
    _assert_brute_force_ranking(val_index.search_embedding(image[i][None], 10, "report")[0], text @ image[i], ids)
    _assert_brute_force_ranking(val_index.search_embedding(image[i][None], 10, "image")[0], image @ image[i], ids)


def _assert_brute_force_ranking(hits, scores, ids, k=10):
  """Hits equal a full stable sort of ``scores``; only studies with equal scores (same report) may swap."""
  order = np.argsort(-scores, kind="stable")[:k]
  np.testing.assert_allclose([h.score for h in hits], scores[order], atol=1e-5)
  for hit, j in zip(hits, order):
    if hit.study_id != ids[j]:
      assert abs(scores[ids.index(hit.study_id)] - scores[j]) < 1e-6, (hit.study_id, ids[j])


def test_query_image_embeds_like_the_study_it_came_from(val_index):
  row = 3
  view = val_index.thumbnail(row)
  assert view.shape == (224, 224) and view.dtype == np.uint8
  hits = val_index.search_image(view, k=1)
  assert hits[0].study_id == val_index.study_ids[row] and hits[0].score == pytest.approx(1.0, abs=1e-4)


def test_reopened_index_answers_the_same_and_lists_files(model, val_index):
  cfg, variables = model
  manifest = json.loads((pathlib.Path(val_index.directory) / "manifest.json").read_text())
  assert manifest["config_hash"] == index_lib.config_hash(cfg)
  assert manifest["checkpoint"]["step"] is None
  assert manifest["counts"]["studies"] == NUM_VAL and manifest["counts"]["rejects"] == 0
  again = Index.load(val_index.directory, cfg, variables=variables)
  a = [h.study_id for h in again.search_text(["pleural effusion", "pneumonia"], k=5)[1]]
  assert a == [h.study_id for h in val_index.search_text("pneumonia", k=5)]


def test_rebuilding_skips_what_is_indexed_and_appends_new_splits(model, val_index, tmp_path):
  cfg, variables = model
  out = tmp_path / "idx"
  shutil.copytree(val_index.directory, out)
  seg = out / "segments" / "seg-000000.npz"
  before = seg.stat().st_mtime_ns
  again = Index.build(cfg, str(COVID), str(out), variables=variables, split="val", progress=False)
  assert len(again) == NUM_VAL and seg.stat().st_mtime_ns == before
  more = Index.build(cfg, str(COVID), str(out), variables=variables, split="train", progress=False)
  assert len(more) == NUM_VAL + 85 and seg.stat().st_mtime_ns == before
  assert len(set(more.study_ids)) == len(more)


def _index_files(directory):
  """Every segment file's content and the manifest's segments, for comparing two indexes."""
  segments = json.loads((directory / "manifest.json").read_text())["segments"]
  files = {}
  for path in sorted((directory / "segments").iterdir()):
    if path.suffix == ".npz":
      with np.load(path) as z:
        files[path.name] = {k: z[k].tolist() for k in z.files}
    else:
      files[path.name] = path.read_bytes()
  return segments, files


def test_append_reads_no_report_and_old_layout_segments_still_append(model, val_index, tmp_path, monkeypatch):
  cfg, variables = model
  new_layout, old_layout = tmp_path / "new", tmp_path / "old"
  shutil.copytree(val_index.directory, new_layout)
  shutil.copytree(val_index.directory, old_layout)
  (old_layout / "segments" / "seg-000000.ids.json").unlink()  # as segments were written before the side file

  Index.build(cfg, str(COVID), str(old_layout), variables=variables, split="train", progress=False)

  def no_reports(path):
    raise AssertionError(f"an append read the reports of {path}")

  monkeypatch.setattr(index_lib, "_read_jsonl", no_reports)
  appended = Index.build(cfg, str(COVID), str(new_layout), variables=variables, split="train", progress=False)
  assert len(appended) == NUM_VAL + 85
  new_segments, new_files = _index_files(new_layout)
  old_segments, old_files = _index_files(old_layout)
  assert new_segments == old_segments
  assert set(new_files) - set(old_files) == {"seg-000000.ids.json"}
  assert {k: v for k, v in new_files.items() if k in old_files} == old_files
  for seg in new_segments:
    ids = json.loads(new_files[os.path.basename(seg["file"]) + ".ids.json"])
    assert sorted(ids) == ["date", "path", "patient_id", "study_id"] and len(ids["study_id"]) == seg["rows"]


def test_an_interrupted_build_keeps_finished_shards_and_resumes(model, tmp_path, monkeypatch):
  cfg, variables = model
  out = tmp_path / "idx"
  calls = []
  real = index_lib._Builder._embed_shard

  def flaky(self, inp, shard, bar):
    calls.append(os.path.basename(shard))
    if len(calls) == 2:
      raise KeyboardInterrupt("stopped mid-index")
    return real(self, inp, shard, bar)

  monkeypatch.setattr(index_lib._Builder, "_embed_shard", flaky)
  with pytest.raises(KeyboardInterrupt):
    Index.build(cfg, str(COVID), str(out), variables=variables, split="train", progress=False)
  kept = Index.load(str(out))
  assert 0 < len(kept) < 85
  calls.clear()
  done = Index.build(cfg, str(COVID), str(out), variables=variables, split="train", progress=False)
  assert len(done) == 85 and len(calls) == 1  # only the unfinished shard


def test_another_model_config_is_refused_with_a_clear_error(model, val_index, tmp_path, placeholder_params):
  cfg, variables = model
  other = tiny.get_config()
  other.model.proj_dim = 16
  with pytest.raises(IndexMismatchError, match="another model config"):
    Index.load(val_index.directory, other)
  out = tmp_path / "idx"
  shutil.copytree(val_index.directory, out)
  other_vars = placeholder_params(other)  # refused before anything is embedded
  with pytest.raises(IndexMismatchError, match="another model config"):
    Index.build(other, str(COVID), str(out), variables=other_vars, split="train", progress=False)
  with pytest.raises(IndexMismatchError, match="checkpoint step"):
    Index.build(cfg, str(COVID), str(out), variables=variables, checkpoint_step=7, split="train", progress=False)
  assert len(Index.load(str(out))) == NUM_VAL  # nothing was touched


def test_missing_input_and_empty_folder_are_clear_errors(model, tmp_path):
  cfg, variables = model
  with pytest.raises(SearchIndexError, match="not found"):
    Index.build(cfg, str(tmp_path / "nope"), str(tmp_path / "idx"), variables=variables, progress=False)
  (tmp_path / "bare").mkdir()
  with pytest.raises(SearchIndexError, match="no study folders"):
    Index.build(cfg, str(tmp_path / "bare"), str(tmp_path / "idx"), variables=variables, progress=False)
  with pytest.raises(SearchIndexError, match="no manifest.json"):
    Index.load(str(tmp_path / "bare"))


# --- indexing a plain folder of studies ---------------------------------------------------


def test_plan_decides_views_priors_dates_and_rejects(archive):
  plan = ingest.plan_folder(str(archive))
  studies = {s.study_id: s for s in plan.plan.studies}
  assert set(studies) == {"p9rg1_early", "p9rg1_late", "rsna", "iu/CXR368", "nih"}
  assert plan.info["p9rg1_late"].patient_id == "9RG1" and plan.info["p9rg1_late"].date == "2004-08-26"
  assert plan.info["iu/CXR368"].patient_id == "iu" and plan.info["iu/CXR368"].date == ""
  late = studies["p9rg1_late"]
  assert late.views[2] is not None and late.views[2].path.endswith("p9rg1_early/view.dcm")
  assert late.prior_days == (np.datetime64("2004-08-26") - np.datetime64("2004-01-01")).astype(int)
  iu = studies["iu/CXR368"]
  assert iu.views[0] is not None and iu.views[1] is not None  # frontal and lateral from the pixels
  assert studies["nih"].text == "Cardiomegaly. No effusion."
  reasons = {r.row: r.reason for r in plan.plan.rejects}
  assert reasons == {
    "p9rg1_late/notes.xml": "unsupported_file",
    "broken/view.dcm": "bad_image",
    "empty/": "empty_folder",
  }


def test_index_a_folder_of_studies_then_append_without_reembedding(model, archive, tmp_path):
  cfg, variables = model
  root = tmp_path / "archive"
  shutil.copytree(archive, root)
  held_back = tmp_path / "nih"
  shutil.move(root / "nih", held_back)
  out = tmp_path / "idx"
  index = Index.build(cfg, str(root), str(out), variables=variables, progress=False)
  assert sorted(index.study_ids) == ["iu/CXR368", "p9rg1_early", "p9rg1_late", "rsna"]
  rejects = {(os.path.relpath(r["row"], root), r["reason"]) for r in _rejects(out)}
  assert ("broken/view.dcm", "bad_image") in rejects and ("empty", "empty_folder") in rejects
  assert ("p9rg1_late/notes.xml", "unsupported_file") in rejects
  hit = index.search_text("pleural effusion", k=4)
  late = next(h for h in hit if h.study_id == "p9rg1_late")
  assert late.date == "2004-08-26" and late.path == str(root / "p9rg1_late") and late.report
  assert index.thumbnail(late.row).shape == (224, 224)
  segments = sorted((out / "segments").glob("*.npz"))
  stamps = [p.stat().st_mtime_ns for p in segments]

  shutil.move(held_back, root / "nih")
  index = Index.build(cfg, str(root), str(out), variables=variables, progress=False)
  assert sorted(index.study_ids) == ["iu/CXR368", "nih", "p9rg1_early", "p9rg1_late", "rsna"]
  assert [p.stat().st_mtime_ns for p in segments] == stamps
  new = json.loads((out / "manifest.json").read_text())["segments"][-1]
  assert new["rows"] == 1
  # No report: searchable by image, never returned as a report.
  no_report = list(index.study_ids).index("iu/CXR368")
  assert not index.has_report[no_report]
  assert "iu/CXR368" not in [h.study_id for h in index.search_text("effusion", k=10, target="report")]
  rows = [(r["row"], r["reason"]) for r in _rejects(out)]
  assert len(rows) == len(set(rows))  # appending does not repeat old rejects


# --- the command line and the page ---------------------------------------------------------


def _main(*args, timeout=600):
  return tiny_runs.cli(*args, timeout=timeout, JAX_PLATFORMS="cpu")


def _chromium():
  return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


@pytest.mark.slow
def test_cli_index_search_json_and_html_in_a_real_browser(archive, tmp_path):
  out = tmp_path / "idx"
  run = _main("--mode=index", f"--input={archive}", f"--output={out}")
  assert run.returncode == 0, run.stderr[-3000:]
  assert "5 studies" in run.stdout
  queries = tmp_path / "queries.txt"
  queries.write_text("small left pleural effusion\n\ncardiomegaly\n")
  result, page = tmp_path / "r.json", tmp_path / "page.html"
  run = _main(
    "--mode=search", f"--index={out}", f"--queries={queries}", "--k=3", f"--output={result}", f"--html={page}"
  )
  assert run.returncode == 0, run.stderr[-3000:]
  assert "query: small left pleural effusion" in run.stdout and "rank" in run.stdout
  got = json.loads(result.read_text())
  assert [q["query"] for q in got["queries"]] == ["small left pleural effusion", "cardiomegaly"]
  for q in got["queries"]:
    assert len(q["results"]) == 3
    assert all(set(r) == {"study_id", "score", "path", "report"} for r in q["results"])
    assert [r["score"] for r in q["results"]] == sorted((r["score"] for r in q["results"]), reverse=True)
  run = _main("--mode=search", f"--index={out}", f"--query_image={archive / 'nih' / 'frontal.png'}", "--k=1")
  assert run.returncode == 0, run.stderr[-3000:]
  first = next(line for line in run.stdout.splitlines() if line.startswith("   1  "))
  assert " nih " in first
  run = _main("--mode=search", f"--index={out}", "--query=x", "--config.model.proj_dim=16")
  assert run.returncode == 1 and "another model config" in run.stderr

  browser = _chromium()
  if browser is None:
    pytest.skip("no chromium binary (apt-get install chromium) for the headless page check")
  shot = tmp_path / "page.png"
  flags = ["--headless", "--no-sandbox", "--disable-gpu", "--allow-file-access-from-files"]
  dom = subprocess.run([browser, *flags, "--dump-dom", page.as_uri()], capture_output=True, text=True, timeout=120)
  assert dom.returncode == 0, dom.stderr[-2000:]
  html = dom.stdout
  assert html.count('class="hit"') == 6 and html.count('data-query="') == 2
  for q in got["queries"]:
    for r in q["results"]:
      assert f'data-study-id="{r["study_id"]}"' in html
  assert html.count("data:image/jpeg;base64,") == 6
  subprocess.run(
    [browser, *flags, f"--screenshot={shot}", "--window-size=1200,1400", page.as_uri()],
    capture_output=True,
    timeout=120,
  )
  from PIL import Image

  with Image.open(shot) as img:
    pixels = np.asarray(img.convert("L"))
  assert pixels.std() > 10  # thumbnails were drawn, not a blank page
  if os.environ.get("CLINVLA_KEEP_SCREENSHOT"):
    shutil.copy(shot, os.environ["CLINVLA_KEEP_SCREENSHOT"])


def test_benchmark_runs_on_tiny_sizes(tmp_path):
  out = tmp_path / "bench.json"
  cmd = [sys.executable, "benchmarks/search.py", "--rows=2000,5000", "--queries=4", f"--out={out}", "--noindexing"]
  run = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
  assert run.returncode == 0, run.stderr[-3000:]
  result = json.loads(out.read_text())
  assert [r["rows"] for r in result["query_latency"]] == [2000, 5000]
  assert all(r["exact_ms_per_query"] > 0 for r in result["query_latency"])


# --- retrieval quality on the demo -----------------------------------------------------------


@pytest.mark.slow
def test_demo_model_finds_a_study_by_its_own_report(tmp_path, demo_run):
  from configs import demo

  steps, work = demo_run.steps, demo_run.workdir  # the session's demo training (tests/conftest.py)
  cfg = demo.get_config()
  index = Index.build(cfg, str(COVID), str(tmp_path / "idx"), checkpoint=str(work))
  assert index.manifest["checkpoint"]["step"] == steps and len(index) == 121
  reports = [index.row_info(r)["report"] for r in range(len(index))]
  results = index.search_text(reports, k=5)
  found = np.array([index.study_ids[r] in [h.study_id for h in res] for r, res in enumerate(results)])
  chance = 5 / len(index)
  val = np.array([index.row_info(r)["path"].startswith(str(COVID / "val")) for r in range(len(index))])
  print(f"own-report top-5: all {found.mean():.3f}, held-out {found[val].mean():.3f}, chance {chance:.3f}")
  # Measured with the demo's frozen text tower (2-core AMD EPYC, bf16 policy), against 3 x chance = 0.124
  # asserted: after the session's 100 steps all 0.388, held-out 0.111, chance 0.041; after 50, all 0.165,
  # held-out 0.028.  The training studies carry the rate; a held-out study competes with 85 well-fitted
  # training ones here (in the demo's held-out-only evaluation, text->image R@5 is about 0.2 against 0.139).
  assert found.mean() >= 3 * chance, (found.mean(), chance)
