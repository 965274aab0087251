"""Tests for the record schema and the dataset converters in ``data_prep``."""

import collections
import csv
import dataclasses
import glob
import gzip
import io
import math
import os
import shutil
import zipfile

import numpy as np
import pytest

from clinvla_jax.data import schema
from clinvla_jax.data import records
from data_prep import chexpert
from clinvla_jax import files
from clinvla_jax.data import studies as studies_lib
from clinvla_jax.data import writer
from data_prep import common
from data_prep import covid_cxr
from data_prep import iu_xray
from data_prep import mimic_cxr
from data_prep import rsna_pneumonia


def _example(rng, num_labels=3):
  images = rng.integers(0, 256, (schema.NUM_VIEWS, schema.IMAGE_SIZE, schema.IMAGE_SIZE), dtype=np.uint8)
  view_valid = np.array([True, False, True, False])
  images[~view_valid] = 0
  ids = np.zeros(schema.MAX_TEXT_LEN, np.int32)
  ids[:5] = [101, 2023, 2003, 1037, 102]
  return {
    "images": images,
    "view_valid": view_valid,
    "input_ids": ids,
    "attention_mask": (ids > 0).astype(np.int32),
    "text": "no acute findings. \u00b0",
    "labels": np.array([1.0, np.nan, -1.0][:num_labels], np.float32),
    "patient_id": "p1",
    "study_id": "s1",
    "split": "train",
  }


@pytest.mark.parametrize("codec", ["patches", "png", "raw"])
def test_record_round_trip(codec):
  ex = _example(np.random.default_rng(0))
  out = records.decode_record(records.encode_record(ex, image_codec=codec))
  np.testing.assert_array_equal(out["images"], ex["images"])
  for k in ("view_valid", "input_ids", "attention_mask"):
    np.testing.assert_array_equal(out[k], ex[k])
    assert out[k].dtype == np.asarray(ex[k]).dtype
  np.testing.assert_array_equal(out["labels"], ex["labels"])  # NaN-aware
  assert out["labels"].dtype == np.float32
  assert out["images"].dtype == np.uint8
  for k in ("text", "patient_id", "study_id", "split"):
    assert out[k] == ex[k]
  assert out["image_ids"] == ("",) * schema.NUM_VIEWS
  assert math.isnan(out["prior_days"])
  out["input_ids"][0] = 0  # decoded arrays are writable


@pytest.mark.parametrize("codec", ["patches", "png", "raw"])
def test_batch_parts_hold_patch_major_views(codec):
  from clinvla_jax.data import masking  # pylint: disable=g-import-not-at-top

  ex = _example(np.random.default_rng(3))
  data = records.encode_record(ex, image_codec=codec)
  fields, rows, row_start = records.decode_for_batch(data, (2, 1, 0))
  assert row_start[1] == -1
  expected = masking.patchify(ex["images"])
  for slot, start in zip((2, 0), (row_start[0], row_start[2])):
    np.testing.assert_array_equal(rows[start : start + schema.NUM_PATCHES], expected[slot])
  for k in ("view_valid", "input_ids", "attention_mask", "labels"):
    np.testing.assert_array_equal(fields[k], ex[k])
  if codec == "patches":
    assert len(data) < schema.NUM_VIEWS * 224 * 224  # missing views take no space


def test_record_optional_fields_and_text_only_decode():
  ex = _example(np.random.default_rng(1))
  ex.update(dataset="covid_cxr", image_ids=("a.jpg", "", "b.jpg", ""), prior_days=7.0)
  out = records.decode_record(records.encode_record(ex), with_images=False)
  assert "images" not in out
  assert out["dataset"] == "covid_cxr"
  assert out["image_ids"] == ("a.jpg", "", "b.jpg", "")
  assert out["prior_days"] == 7.0


def test_record_rejects_bad_fields():
  ex = _example(np.random.default_rng(2))
  with pytest.raises(records.RecordError, match="images"):
    records.encode_record({**ex, "images": ex["images"].astype(np.float32)})
  with pytest.raises(records.RecordError, match="input_ids"):
    records.encode_record({**ex, "input_ids": ex["input_ids"][:10]})
  with pytest.raises(records.RecordError, match="lacks"):
    records.encode_record({k: v for k, v in ex.items() if k != "text"})
  with pytest.raises(records.RecordError, match="magic"):
    records.decode_record(b"garbage-bytes")


# --- converters on the real samples ------------------------------------------------


try:
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
except ImportError:
  tfds = None

_FAST = writer.Options(workers=0, progress=False, shard_size=64, tfds=tfds is not None)
needs_tfds = pytest.mark.skipif(tfds is None, reason="tensorflow-datasets not installed")


def _decode_all(out_dir, with_images=False):
  out = []
  for path in sorted(glob.glob(os.path.join(out_dir, "*.array_record"))):
    out.extend(records.decode_record(b, with_images=with_images) for b in writer.read_shard(path))
  return out


def _rejects(out_dir):
  with open(os.path.join(out_dir, "rejects.csv"), newline="") as f:
    return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def covid_out(shared_data, tmp_path_factory):
  out = tmp_path_factory.mktemp("covid")
  plan = covid_cxr.build_plan(str(shared_data / "covid_cxr_dev"))
  writer.run(plan, str(out), _FAST)
  return out


def test_covid_counts_add_up(covid_out):
  m = writer.load_manifest(str(covid_out))
  c = m["counts"]
  assert c["input_rows"] == 240
  assert c["rows_add_up"] and c["rows_written"] + c["rows_rejected"] == 240
  assert c["records"] == sum(c["records_by_split"].values()) >= 100
  assert set(m["splits"]) == {"train", "val"}
  assert len(_rejects(str(covid_out))) == c["rows_rejected"]
  assert c["reject_reasons"]["duplicate_row"] == 3  # one image under two patients
  assert c["reject_reasons"]["unknown_label"] > 0  # "todo"
  assert c["reject_reasons"]["empty_report"] > 0
  assert "todo" not in m["label_names"] and "COVID-19" in m["label_names"]
  # Checksums in the manifest match the files.
  for s in m["shards"]:
    assert files.sha256_file(os.path.join(covid_out, s["file"])) == s["sha256"]
    assert s["num_records"] <= 64


def test_covid_records_have_priors_and_text(covid_out):
  recs = _decode_all(str(covid_out))
  by_id = {r["study_id"]: r for r in recs}
  # Patient 17 was imaged on days 3, 9 and 15: day 9's prior is day 3.
  r = by_id["17_9"]
  assert r["view_valid"].tolist() == [True, False, True, False]
  assert r["image_ids"][0] == "jkms-35-e79-g001-l-b.jpg"
  assert r["image_ids"][2] == "jkms-35-e79-g001-l-a.jpg"
  assert r["prior_days"] == 6.0
  assert r["text"].startswith("Small consolidation in right upper lobe")
  assert sum(r["view_valid"][2] for r in recs) >= 30
  m = writer.load_manifest(str(covid_out))
  assert r["labels"][m["label_names"].index("COVID-19")] == 1.0
  for r in recs:
    assert r["attention_mask"].sum() > 2 and r["input_ids"][0] == 101


@needs_tfds
def test_covid_output_is_a_tfds_dataset(covid_out):
  m = writer.load_manifest(str(covid_out))
  builder = tfds.builder_from_directory(str(covid_out))
  info = builder.info
  assert "Cohen" in info.citation and "ieee8023" in info.homepage
  assert "CC BY-NC-SA" in (covid_out / "LICENSE").read_text()
  assert list(info.metadata["label_names"]) == m["label_names"]
  ours = {r["study_id"]: r for r in _decode_all(str(covid_out), with_images=True)}
  for split, count in m["counts"]["records_by_split"].items():
    assert info.splits[split].num_examples == count
    ds = builder.as_data_source(split)
    assert len(ds) == count
    for k in range(count):
      ex = ds[k]
      rec = ours[ex["study_id"].decode()]
      assert ex["images"].shape == (4, 224, 224) and ex["images"].dtype == np.uint8
      np.testing.assert_array_equal(ex["images"], rec["images"])
      for key in ("view_valid", "input_ids", "attention_mask", "labels"):
        np.testing.assert_array_equal(ex[key], rec[key], err_msg=key)
      for key in ("text", "patient_id", "split", "dataset"):
        assert ex[key].decode() == rec[key], key
      assert tuple(x.decode() for x in ex["image_ids"]) == rec["image_ids"]
      np.testing.assert_array_equal(ex["prior_days"], rec["prior_days"])


@needs_tfds
def test_pipeline_reads_a_tfds_only_folder(covid_out, tmp_path):
  from clinvla_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  from clinvla_jax.data import source  # pylint: disable=g-import-not-at-top

  only = tmp_path / "tfds_only"
  only.mkdir()
  tfds_files = {"dataset_info.json", "features.json", "metadata.json"}
  for p in covid_out.iterdir():
    if ".array_record-" in p.name or p.name in tfds_files:
      shutil.copy(p, only / p.name)
  tfds_val = source.list_shards(str(only), split="val")
  assert tfds_val and all("-val.array_record-" in p for p in tfds_val)
  from clinvla_jax.evaluate import embed  # pylint: disable=g-import-not-at-top

  assert embed.split_paths(str(only), "val") == tfds_val
  assert list(embed.label_names_of(tfds_val)) == writer.load_manifest(str(covid_out))["label_names"]
  ours = list(
    pipeline.make_eval_loader(
      writer.split_shards(str(covid_out), "val"), global_batch_size=8, shard_index=0, shard_count=1
    )
  )
  theirs = list(pipeline.make_eval_loader(tfds_val, global_batch_size=8, shard_index=0, shard_count=1))
  assert len(ours) == len(theirs)
  for a, b in zip(ours, theirs):
    for key in records.BATCH_KEYS:
      np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def test_covid_images_decode(covid_out):
  path = sorted(glob.glob(os.path.join(covid_out, "val-*.array_record")))[0]
  rec = records.decode_record(writer.read_shard(path)[0])
  assert rec["images"].shape == (4, 224, 224) and rec["images"].dtype == np.uint8
  assert rec["images"][0].std() > 10
  assert not rec["images"][~rec["view_valid"]].any()


def test_iu_views_and_text(shared_data, tmp_path):
  plan = iu_xray.build_plan(str(shared_data / "iu_xray"))
  writer.run(plan, str(tmp_path), dataclasses.replace(_FAST, require_view="any"))
  m = writer.load_manifest(str(tmp_path))
  assert m["counts"]["input_rows"] == 3955 and m["counts"]["rows_add_up"]
  assert m["counts"]["records"] == 9
  assert "frontal_score" in m["notes"]["views_decided_by"]
  recs = {r["study_id"]: r for r in _decode_all(str(tmp_path))}
  # Views judged by eye (images/manifest.csv), including tag errors and R2Gen order.
  eye = {}
  with open(shared_data / "iu_xray" / "images" / "manifest.csv", newline="") as f:
    for row in csv.DictReader(f):
      eye[row["image_id"]] = row["view_by_eye"]
  for r in recs.values():
    for v, iid in enumerate(r["image_ids"][:2]):
      if iid:
        assert eye[iid] == ("frontal" if v == 0 else "lateral"), (r["study_id"], iid)
  assert recs["CXR54"]["text"].startswith("The lungs are clear bilaterally.")
  assert "XXXX" not in recs["CXR1000"]["text"]
  assert recs["CXR1000"]["text"].startswith("There is increased opacity within the right upper lobe")
  assert m["label_names"].count("normal") == 1
  assert recs["CXR3"]["labels"][m["label_names"].index("normal")] == 1.0


def test_parts_combine_refuse_and_resume(shared_data, tmp_path):
  plan = iu_xray.build_plan(str(shared_data / "iu_xray"))
  opts = dataclasses.replace(_FAST, require_view="any", num_parts=2, shard_size=2)
  writer.run(plan, str(tmp_path), dataclasses.replace(opts, part=1))
  assert not (tmp_path / "manifest.json").exists()  # part 0 still missing
  writer.run(plan, str(tmp_path), dataclasses.replace(opts, part=0))
  m = writer.load_manifest(str(tmp_path))
  assert m["counts"]["records"] == 9 and m["counts"]["rows_add_up"]
  assert len(m["shards"]) == len(glob.glob(str(tmp_path / "*.array_record")))
  with pytest.raises(studies_lib.ConversionError, match="--resume"):
    writer.run(plan, str(tmp_path), dataclasses.replace(opts, part=0))
  # Simulate a crash: one shard lost its commit sidecar, a temp file lies around.
  victim = sorted(glob.glob(str(tmp_path / "*-p000-*.array_record")))[0]
  os.remove(victim + ".json")
  os.remove(tmp_path / "part-000-of-002.json")
  (tmp_path / "train-p000-00009.array_record.tmp-1").write_bytes(b"half")
  writer.run(plan, str(tmp_path), dataclasses.replace(opts, part=0, resume=True))
  assert not glob.glob(str(tmp_path / "*.tmp-*"))
  assert writer.load_manifest(str(tmp_path))["counts"]["records"] == 9
  with pytest.raises(studies_lib.ConversionError, match="different conversion"):
    writer.run(plan, str(tmp_path), dataclasses.replace(opts, part=1, resume=True, pad=True))


def _corrupt_covid_tree(src, dst):
  """A 12-row covid tree with one of each kind of bad input."""
  (dst / "images").mkdir(parents=True)
  with open(src / "metadata.csv", newline="") as f:
    reader = csv.DictReader(f)
    fields, rows = reader.fieldnames, list(reader)
  pick = [r for r in rows if r["patientid"] == "17"] + [r for r in rows if r["patientid"] in ("20", "21", "24", "25")]
  for r in pick:
    shutil.copy(src / "images" / r["filename"], dst / "images" / r["filename"])
  extra = []
  trunc = dict(pick[0], patientid="900", offset="", filename="truncated.jpg")
  data = (src / "images" / pick[0]["filename"]).read_bytes()
  (dst / "images" / "truncated.jpg").write_bytes(data[: len(data) // 3])
  garbage = dict(pick[0], patientid="901", offset="", filename="garbage.jpg")
  (dst / "images" / "garbage.jpg").write_bytes(b"this is not an image" * 50)
  empty = dict(pick[0], patientid="902", offset="", filename="empty.jpg")
  (dst / "images" / "empty.jpg").write_bytes(b"")
  missing = dict(pick[0], patientid="903", offset="", filename="missing.jpg")
  nonotes = dict(pick[0], patientid="904", offset="", filename="nonotes.jpg", clinical_notes="  ")
  shutil.copy(src / "images" / pick[0]["filename"], dst / "images" / "nonotes.jpg")
  todo = dict(pick[0], patientid="905", offset="", filename="todo.jpg", finding="todo")
  shutil.copy(src / "images" / pick[0]["filename"], dst / "images" / "todo.jpg")
  dup = dict(pick[1], patientid="906")
  extra = [trunc, garbage, empty, missing, nonotes, todo, dup]
  with open(dst / "metadata.csv", "w", newline="") as f:
    w = csv.DictWriter(f, fieldnames=fields)
    w.writeheader()
    w.writerows(pick + extra)
  return len(pick) + len(extra)


def test_corrupt_inputs_are_reported(shared_data, tmp_path):
  n = _corrupt_covid_tree(shared_data / "covid_cxr_dev", tmp_path / "in")
  plan = covid_cxr.build_plan(str(tmp_path / "in"))
  writer.run(plan, str(tmp_path / "out"), _FAST)
  m = writer.load_manifest(str(tmp_path / "out"))
  assert m["counts"]["input_rows"] == n and m["counts"]["rows_add_up"]
  why = {r["row"].split("(")[-1].rstrip(")"): (r["reason"], r["detail"]) for r in _rejects(str(tmp_path / "out"))}
  assert why["truncated.jpg"][0] == "bad_image" and "truncated.jpg" in why["truncated.jpg"][1]
  assert why["garbage.jpg"][0] == "bad_image" and "not a recognised image" in why["garbage.jpg"][1]
  assert why["empty.jpg"][0] == "bad_image" and why["empty.jpg"][1].endswith("empty.jpg: file is empty")
  assert why["missing.jpg"][0] == "bad_image" and why["missing.jpg"][1].endswith("missing.jpg: file not found")
  assert why["nonotes.jpg"][0] == "empty_report"
  assert why["todo.jpg"][0] == "unknown_label"
  assert any(r == "duplicate_row" for r, _ in why.values())
  assert m["counts"]["records"] >= 4


def test_short_max_text_len_converts_and_trains(shared_data, tmp_path):
  from clinvla_jax.data import pipeline  # pylint: disable=g-import-not-at-top

  _corrupt_covid_tree(shared_data / "covid_cxr_dev", tmp_path / "in")
  plan = covid_cxr.build_plan(str(tmp_path / "in"))
  writer.run(plan, str(tmp_path / "out"), dataclasses.replace(_FAST, max_text_len=16, tfds=False))
  recs = _decode_all(str(tmp_path / "out"))
  assert recs and max(int(r["attention_mask"].sum()) for r in recs) <= 16
  assert max(int(r["attention_mask"].sum()) for r in recs) > 8
  for r in recs:
    assert r["input_ids"].shape == (schema.MAX_TEXT_LEN,)
    n = int(r["attention_mask"].sum())
    assert r["input_ids"][n - 1] == 102 and not r["input_ids"][n:].any()  # [SEP], then [PAD]
  batch = next(
    iter(pipeline.make_train_loader(str(tmp_path / "out"), global_batch_size=2, seed=0, shard_index=0, shard_count=1))
  )
  assert batch["attention_mask"].sum(axis=1).max() <= 16
  with pytest.raises(studies_lib.ConversionError, match="max_text_len"):
    writer.run(plan, str(tmp_path / "out2"), dataclasses.replace(_FAST, max_text_len=200))


def test_shared_assembly_rules():
  R = studies_lib.Row
  rows = [
    R("a1", "p1", 1, "frontal", "a1.png", "a1", rank=1, time=1.0, split="train"),
    R("a2", "p1", 1, "frontal", "a2.png", "a2", rank=0, time=1.0, split="train"),  # wins
    R("a3", "p1", 1, None, "a3.png", "a3", time=1.0, split="train", why_unknown="tag ?"),
    R("b1", "p1", 2, "lateral", "b1.png", "b1", time=5.0, split="train"),  # not written
    R("c1", "p1", 3, "frontal", "c1.png", "c1", time=9.0, split="train"),
    R("d1", "p1", 4, "frontal", "d1.png", "d1", time=None, split="train"),  # undated
    R("e1", "p2", 1, "frontal", "e1.png", "e1", time=2.0, split="train"),
    R("e2", "p2", 1, "lateral", "e2.png", "e2", time=2.0, split="val"),  # disagrees
  ]

  def describe(study):
    rows = tuple(study.views.values())
    if study.study_key == 2:
      return studies_lib.Described("s2", rejects=tuple(studies_lib.Reject(r.row_id, "empty_report") for r in rows))
    return studies_lib.Described(f"{study.patient_id}-{study.study_key}", rows=rows, text="t", labels=(1.0,))

  studies, rejects = studies_lib.assemble_studies(rows, describe)
  why = {r.row: r.reason for r in rejects}
  assert why == {
    "a1": "extra_view",
    "a3": "unknown_view",
    "b1": "empty_report",
    "e1": "missing_metadata",
    "e2": "missing_metadata",
  }
  by_id = {s.study_id: s for s in studies}
  assert sorted(by_id) == ["p1-1", "p1-3", "p1-4"]
  assert sum(len(s.rows) for s in studies) + len(rejects) == len(rows)
  assert by_id["p1-1"].views[0].image_id == "a2" and by_id["p1-1"].views[2] is None
  # Study 2 was not written, but its lateral view is still study 3's prior.
  s3 = by_id["p1-3"]
  assert s3.views[2] is None and s3.views[3].image_id == "b1" and s3.views[3].row is None
  assert s3.prior_days == 4.0
  assert by_id["p1-4"].views[2:] == (None, None) and math.isnan(by_id["p1-4"].prior_days)
  # A given split_of wins over the rows' own splits.
  studies, rejects = studies_lib.assemble_studies(rows, describe, split_of=lambda pid: "train", time_in_days=False)
  assert {s.study_id for s in studies} == {"p1-1", "p1-3", "p1-4", "p2-1"}
  assert all(math.isnan(s.prior_days) for s in studies)


# --- CheXpert, RSNA, MIMIC on small fake trees built from real images ------------------


_NOREQ = dataclasses.replace(_FAST, require_text=False)


@pytest.fixture(scope="module")
def chexpert_rows(shared_data):
  return common.read_table(str(shared_data / "labels" / "chexpert_train.csv.gz"))


def test_5x200_rule_on_real_table(chexpert_rows):
  sel = chexpert.select_5x200(chexpert_rows, seed=0)
  assert len(sel) == 1000
  counts = collections.Counter(c for c, _ in sel)
  assert counts == {c: 200 for c in chexpert.CLASSES_5X200}
  assert len({r["Path"] for _, r in sel}) == 1000
  for cls, row in sel:
    assert row["Frontal/Lateral"] == "Frontal" and row["Path"].split("/")[1] == "train"
    for name in chexpert.LABELS:
      v = row[name].strip()
      assert v != "-1.0" and (float(v) if v else 0.0) == (1.0 if name == cls else 0.0)
  again = chexpert.select_5x200(chexpert_rows, seed=0)
  assert [r["Path"] for _, r in again] == [r["Path"] for _, r in sel]
  other = chexpert.select_5x200(chexpert_rows, seed=1)
  assert [r["Path"] for _, r in other] != [r["Path"] for _, r in sel]


def test_8x200_list_without_images_is_all_rejected(shared_data, tmp_path):
  lst = shared_data / "labels" / "chexpert_8x200" / "image-retrieval" / "candidate.csv"
  plan = chexpert.plan_list(str(tmp_path / "no_images"), str(lst), "8x200_candidate")
  assert plan.input_rows == 1600
  assert (
    collections.Counter(tuple(l == 1.0 for l in s.labels).index(True) for s in plan.studies).most_common(1)[0][1] == 200
  )
  writer.run(plan, str(tmp_path / "out"), _NOREQ)
  m = writer.load_manifest(str(tmp_path / "out"))
  assert m["counts"]["rows_add_up"] and m["counts"]["records"] == 0
  assert m["counts"]["reject_reasons"] == {"bad_image": 1600}


def _img(shared_data, k):
  srcs = [
    shared_data / "dicom" / "00000001_000.png",
    shared_data / "dicom" / "00027426_000.png",
    shared_data / "iu_xray" / "images" / "openi_512" / "CXR54_IM-2145-1002.png",
  ]
  return srcs[k % len(srcs)]


def test_chexpert_fake_tree(shared_data, chexpert_rows, tmp_path):
  root = tmp_path / "chexpert"
  header = list(chexpert_rows[0].keys())
  rows = []
  for pid, study, view, fl in [
    (1, 1, 1, "Frontal"),
    (1, 1, 2, "Lateral"),
    (1, 2, 1, "Frontal"),
    (2, 1, 1, "Frontal"),
    (2, 1, 2, "Frontal"),
  ]:
    rel = f"CheXpert-v1.0-small/train/patient{pid:05d}/study{study}/view{view}_{fl.lower()}.jpg"
    (root / os.path.dirname(rel)).mkdir(parents=True, exist_ok=True)
    shutil.copy(_img(shared_data, view - 1 if fl == "Frontal" else 2), root / rel)
    row = {k: "" for k in header}
    row.update(
      {
        "Path": rel,
        "Frontal/Lateral": fl,
        "AP/PA": "PA" if fl == "Frontal" else "",
        "Edema": "1.0",
        "Cardiomegaly": "-1.0",
      }
    )
    rows.append(row)
  in_dir = root / "CheXpert-v1.0-small"
  with open(in_dir / "train.csv", "w", newline="") as f:
    w = csv.DictWriter(f, fieldnames=header)
    w.writeheader()
    w.writerows(rows)
  writer.run(chexpert.plan_studies(str(in_dir)), str(tmp_path / "out"), _NOREQ)
  m = writer.load_manifest(str(tmp_path / "out"))
  assert m["counts"]["rows_add_up"] and m["counts"]["records"] == 3
  assert m["counts"]["reject_reasons"] == {"extra_view": 1}
  recs = {r["study_id"]: r for r in _decode_all(str(tmp_path / "out"))}
  assert recs["patient00001/study2"]["view_valid"].tolist() == [True, False, True, True]
  lab = recs["patient00001/study1"]["labels"]
  assert lab[chexpert.LABELS.index("Edema")] == 1 and lab[chexpert.LABELS.index("Cardiomegaly")] == -1
  assert np.isnan(lab[chexpert.LABELS.index("Fracture")])
  # 5x200 mode on the same tree (1 per class, Edema only has frontal rows with -1 elsewhere).
  for r in rows:
    r["Cardiomegaly"] = ""
  with open(in_dir / "train.csv", "w", newline="") as f:
    w = csv.DictWriter(f, fieldnames=header)
    w.writeheader()
    w.writerows(rows)
  sel = chexpert.select_5x200(rows, per_class=2, classes=("Edema",))
  assert len(sel) == 2 and all(r["Frontal/Lateral"] == "Frontal" for _, r in sel)


def test_rsna_fake_tree(shared_data, tmp_path):
  dcm = shared_data / "dicom" / "1.2.276.0.7230010.3.1.4.8323329.6904.1517875201.850819.dcm"
  with zipfile.ZipFile(shared_data / "labels" / "kaggle_stage_2_train_labels.csv.zip") as z:
    lines = z.read("stage_2_train_labels.csv").decode().splitlines()
  rows = list(csv.DictReader(lines))
  pos = [r for r in rows if r["Target"] == "1"][:3]  # one patient may have 2 boxes
  neg = [r for r in rows if r["Target"] == "0"][:3]
  keep = {r["patientId"] for r in pos + neg}
  table = [r for r in rows if r["patientId"] in keep]
  img_dir = tmp_path / "in" / "stage_2_train_images"
  img_dir.mkdir(parents=True)
  for pid in sorted(keep)[:-1]:  # the last one has no image
    shutil.copy(dcm, img_dir / f"{pid}.dcm")
  with zipfile.ZipFile(tmp_path / "in" / "stage_2_train_labels.csv.zip", "w") as z:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(rows[0]))
    w.writeheader()
    w.writerows(table)
    z.writestr("stage_2_train_labels.csv", buf.getvalue())
  test_ids = sorted(keep)[:2]
  (tmp_path / "test.txt").write_text("\n".join(test_ids) + "\n")
  plan = rsna_pneumonia.build_plan(str(tmp_path / "in"), test_list=str(tmp_path / "test.txt"))
  assert plan.input_rows == len(keep) < len(table)  # box rows collapse per patient
  writer.run(plan, str(tmp_path / "out"), _NOREQ)
  m = writer.load_manifest(str(tmp_path / "out"))
  assert m["counts"]["records_by_split"] == {"test": 2, "train": len(keep) - 3}
  assert m["counts"]["reject_reasons"] == {"bad_image": 1} and m["counts"]["rows_add_up"]
  recs = {r["study_id"]: r for r in _decode_all(str(tmp_path / "out"))}
  for r in pos:
    if r["patientId"] in recs:
      assert recs[r["patientId"]]["labels"].tolist() == [1.0]


def test_mimic_fake_tree(shared_data, tmp_path):
  root = tmp_path / "mimic"
  meta, split, chex = [], [], []
  studies = [
    ("10000032", "50000001", "20150101", "101010.000", [("d1", "PA"), ("d2", "LATERAL")]),
    ("10000032", "50000002", "20150301", "090000.000", [("d3", "AP"), ("d4", "PA"), ("d5", "LL"), ("d6", "")]),
    ("10000045", "50000003", "20160101", "120000", [("d7", "LL")]),
    ("10000045", "50000004", "20160202", "120000", [("d8", "PA")]),
  ]
  for k, (subj, stud, date, tm, dicoms) in enumerate(studies):
    sdir = root / "files" / f"p{subj[:2]}" / f"p{subj}" / f"s{stud}"
    sdir.mkdir(parents=True)
    for did, vp in dicoms:
      shutil.copy(_img(shared_data, 2 if vp in ("LATERAL", "LL") else k), sdir / f"{did}.jpg")
      meta.append(
        {"dicom_id": did, "subject_id": subj, "study_id": stud, "ViewPosition": vp, "StudyDate": date, "StudyTime": tm}
      )
      split.append(
        {"dicom_id": did, "study_id": stud, "subject_id": subj, "split": "validate" if subj == "10000045" else "train"}
      )
    chex.append({"subject_id": subj, "study_id": stud, "Edema": "1.0", "Cardiomegaly": ""})
    if stud != "50000004":  # the last study has no report
      (sdir.parent / f"s{stud}.txt").write_text(
        f"FINAL REPORT\n INDICATION: ___ cough\n\n FINDINGS: Study {k} lungs clear. No PTX.\n\n"
        " IMPRESSION: No acute process.\n"
      )
  for name, rows in (("metadata", meta), ("split", split), ("chexpert", chex)):
    with gzip.open(root / f"mimic-cxr-2.0.0-{name}.csv.gz", "wt", newline="") as f:
      w = csv.DictWriter(f, fieldnames=list(rows[0]))
      w.writeheader()
      w.writerows(rows)
  plan = mimic_cxr.build_plan(str(root))
  writer.run(plan, str(tmp_path / "out"), dataclasses.replace(_FAST, require_view="any"))
  m = writer.load_manifest(str(tmp_path / "out"))
  c = m["counts"]
  assert c["input_rows"] == 8 and c["rows_add_up"]
  assert c["records_by_split"] == {"train": 2, "val": 1}
  assert c["reject_reasons"] == {"empty_report": 1, "extra_view": 1, "unknown_view": 1}
  recs = {r["study_id"]: r for r in _decode_all(str(tmp_path / "out"))}
  r = recs["s50000002"]
  assert r["image_ids"] == ("d4", "d5", "d1", "d2")  # PA preferred; prior = previous study
  assert r["prior_days"] == pytest.approx(58.96, abs=0.01)
  assert r["text"] == "Study 1 lungs clear. No pneumothorax. No acute process."
  assert r["labels"][mimic_cxr.LABELS.index("Edema")] == 1.0
  assert recs["s50000001"]["view_valid"].tolist() == [True, True, False, False]
  assert recs["s50000003"]["view_valid"].tolist() == [False, True, False, False]


def test_bundled_demo_set():
  from clinvla_jax.data import DEMO_DIR

  total = sum(p.stat().st_size for p in DEMO_DIR.rglob("*") if p.is_file())
  assert total < 8 * 2**20
  assert (DEMO_DIR / "ATTRIBUTION.md").is_file()
  # IU X-ray is CC BY-NC-ND: no resized copy may ship, so only covid_cxr is bundled.
  assert not (DEMO_DIR / "iu_xray").exists()
  for name in ("covid_cxr",):
    m = writer.load_manifest(str(DEMO_DIR / name))
    assert m["counts"]["rows_add_up"]
    for split in ("train", "val"):
      paths = writer.split_shards(str(DEMO_DIR / name), split)
      assert paths, (name, split)
      for s in m["shards"]:
        if s["split"] == split:
          assert files.sha256_file(str(DEMO_DIR / name / s["file"])) == s["sha256"]
      rec = records.decode_record(writer.read_shard(paths[0])[0])
      assert rec["split"] == split and rec["dataset"] == name
      assert len(rec["labels"]) == len(m["label_names"])
  attribution = (DEMO_DIR / "ATTRIBUTION.md").read_text()
  assert "CC BY" in attribution and "jkms-35-e79-g001-l-b.jpg" in attribution


def test_covid_unlabelled_studies_train_only_and_patients_never_straddle(shared_data):
  kept = covid_cxr.build_plan(str(shared_data / "covid_cxr_dev"), val_percent=35, unlabelled="train")
  rejected = covid_cxr.build_plan(str(shared_data / "covid_cxr_dev"), val_percent=35)
  unlabelled = [s for s in kept.studies if not any(s.labels)]
  assert unlabelled and all(s.split == "train" for s in unlabelled)
  assert not any(not any(s.labels) for s in rejected.studies)
  assert len(kept.studies) == len(rejected.studies) + len(unlabelled)
  splits_of = {}
  for s in kept.studies:
    splits_of.setdefault(s.patient_id, set()).add(s.split)
  assert all(len(v) == 1 for v in splits_of.values())
  with pytest.raises(ValueError, match="unlabelled"):
    covid_cxr.build_plan(str(shared_data / "covid_cxr_dev"), unlabelled="keep")
