"""The published CheXpert 5x200 and RSNA lists: parsing, conversion and the evaluators' list option."""

import collections
import csv
import hashlib
import json
import re
import shutil

import jax
import numpy as np
import pytest
from PIL import Image

from clinvla_jax import api
from clinvla_jax.data import records
from clinvla_jax.data import source as source_lib
from clinvla_jax.evaluate import embed as embed_lib
from clinvla_jax.evaluate import evaluators
from clinvla_jax.evaluate import lists
from clinvla_jax.evaluate import options
from clinvla_jax.evaluate import report
from clinvla_jax.evaluate import run as run_lib
from clinvla_jax.evaluate.options import evaluator_options
from configs import tiny
from data_prep import chexpert
from clinvla_jax.data import writer
from data_prep import common
from data_prep import rsna_pneumonia

CONVERT = writer.Options(workers=0, progress=False, tfds=False, require_text=False)
RSNA_DICOM = "1.2.276.0.7230010.3.1.4.8323329.6904.1517875201.850819.dcm"
PER_CLASS = 2  # list rows per 5x200 class in the small trees


def _source_sha256(folder, name):
  text = (folder / "SOURCE.md").read_text()
  return re.search(rf"sha256 (?:{re.escape(name)}\s+)?([0-9a-f]{{64}})", text).group(1)


# --------------------------------------------------------------------------
# The real lists.
# --------------------------------------------------------------------------


def test_real_rsna_lists_parse(shared_data):
  folder = shared_data / "labels" / "rsna_splits"
  test = lists.read_list(folder / "test_list.txt", "rsna")
  assert len(test) == 3000
  assert sum(e.labels["Pneumonia"] for e in test.entries) == 1094
  assert test.sha256 == _source_sha256(folder, "test_list.txt")
  first = test.entries[0]
  assert first.name.startswith("stage_2_test_images/") and first.key == first.name.split("/")[1][: -len(".dcm")]
  val = lists.read_list(folder / "val_list.txt", "rsna")
  assert len(val) == 1500 and val.sha256 == _source_sha256(folder, "val_list.txt")
  # The val list names challenge train images: its labels agree with the Kaggle table.
  table = common.read_table(str(shared_data / "labels" / "kaggle_stage_2_train_labels.csv.zip"))
  target = {r["patientId"]: float(r["Target"]) for r in table}
  keys = sorted(target)
  chosen = lists.select_listed(val, keys, np.array([[target[k]] for k in keys]), ["Pneumonia"])
  assert len(chosen.rows) == 1500 and chosen.set_info["list_missing"] == 0


def test_real_chexpert_5x200_list_parses_and_agrees_with_the_label_table(shared_data):
  folder = shared_data / "labels" / "chexpert_5x200"
  published = lists.read_list(folder / "chexpert_5x200.csv", "chexpert")
  assert len(published) == 1000
  assert published.sha256 == _source_sha256(folder, "chexpert_5x200.csv")
  assert set(published.entries[0].labels) == set(chexpert.LABELS)
  classes = collections.Counter()
  for e in published.entries:
    (cls,) = [c for c in chexpert.CLASSES_5X200 if e.labels[c] == 1.0]
    classes[cls] += 1
  assert classes == {c: 200 for c in chexpert.CLASSES_5X200}
  # Every listed image is in CheXpert's train table, labels equal (blank there = 0.0 in the list).
  table = common.read_table(str(shared_data / "labels" / "chexpert_train.csv.gz"))
  keys = [lists.chexpert_key(r["Path"]) for r in table]
  labels = np.array([[chexpert.label_value(r[n]) for n in chexpert.LABELS] for r in table])
  chosen = lists.select_listed(published, keys, labels, chexpert.LABELS)
  assert len(chosen.rows) == 1000 and chosen.unlisted == len(table) - 1000
  assert [table[i]["Path"] for i in chosen.rows[:2]] == [e.name for e in published.entries[:2]]
  # The converter plans the whole list as the 5x200 split (the images are not shipped).
  plan = chexpert.plan_5x200("/nowhere", list_csv=str(folder / "chexpert_5x200.csv"))
  assert len(plan.studies) == 1000 and {s.split for s in plan.studies} == {"5x200"}
  assert plan.notes["selection"] == "published_list" and plan.notes["list_sha256"] == published.sha256


# --------------------------------------------------------------------------
# Matching rules.
# --------------------------------------------------------------------------


def _rsna_list(tmp_path, lines, name="list.txt"):
  path = tmp_path / name
  path.write_text("".join(f"stage_2_test_images/{pid}.dcm {lab} \n" for pid, lab in lines))
  return path


def test_selection_follows_the_list_and_fails_on_missing_or_disagreeing_images(tmp_path):
  path = _rsna_list(tmp_path, [("c", 1), ("a", 0), ("zz", 1)])
  published = lists.read_list(path, "rsna")
  keys, labels = ["a", "b", "c"], np.array([[0.0], [1.0], [1.0]])
  with pytest.raises(lists.ListError, match=r"1 of its 3 images are not in .*first: stage_2_test_images/zz.dcm"):
    lists.select_listed(published, keys, labels, ["Pneumonia"])
  chosen = lists.select_listed(published, keys, labels, ["Pneumonia"], allow_missing=True)
  assert chosen.rows.tolist() == [2, 0] and chosen.unlisted == 1  # list order; "b" is not listed
  assert chosen.set_info == {
    "selection": "published_list",
    "list_sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
    "list_size": 3,
    "list_missing": 1,
  }
  with pytest.raises(lists.ListError, match=r"stage_2_test_images/a.dcm: Pneumonia is 0 in the list, 1 in the record"):
    lists.select_listed(published, keys, np.array([[1.0], [1.0], [1.0]]), ["Pneumonia"], allow_missing=True)
  with pytest.raises(lists.ListError, match="listed twice"):
    lists.read_list(_rsna_list(tmp_path, [("a", 0), ("a", 0)], "twice.txt"), "rsna")


def test_chexpert_paths_match_across_releases():
  assert lists.chexpert_key("CheXpert-v1.0-small/train/patient1/study1/view1_frontal.jpg") == (
    lists.chexpert_key("CheXpert-v1.0/train/patient1/study1/view1_frontal.jpg")
  )
  assert lists.chexpert_key("train/patient1/study1/view1_frontal.jpg") == "train/patient1/study1/view1_frontal.jpg"
  assert lists.rsna_key("stage_2_train_images/ab-12.dcm") == lists.rsna_key("ab-12") == "ab-12"


def test_results_json_writes_set_info_beside_the_scores(tmp_path):
  info = {"rsna/list_sha256": "ab" * 32, "rsna/list_size": 3000, "rsna/list_missing": np.int64(2)}
  written = report.write_results_json({"rsna/zero_shot/AUC": 0.75}, tmp_path / "r.json", set_info=info)
  on_disk = json.loads((tmp_path / "r.json").read_text())
  assert on_disk == written == {**info, "rsna/list_missing": 2, "rsna/zero_shot/AUC": 0.75}
  assert isinstance(on_disk["rsna/list_size"], int)
  with pytest.raises(ValueError, match="reuses score keys"):
    report.write_results_json({"a/b/c": 0.5}, tmp_path / "x.json", set_info={"a/b/c": "x"})
  with pytest.raises(TypeError):
    report.write_results_json({}, tmp_path / "y.json", set_info={"a/list": [1, 2]})
  assert "- rsna: list_sha256 " + "ab" * 32 + ", list_size 3000" in report.set_info_markdown(info)


# --------------------------------------------------------------------------
# Small real-layout trees, converted, then evaluated.
# --------------------------------------------------------------------------


def _tiny_jpeg(path, seed):
  rng = np.random.default_rng(seed)
  arr = (np.linspace(0, 200, 40)[None, :] + rng.integers(0, 50, (48, 40))).astype(np.uint8)
  path.parent.mkdir(parents=True, exist_ok=True)
  Image.fromarray(arr, "L").save(path, quality=95)


@pytest.fixture(scope="module")
def chexpert_tree(shared_data, tmp_path_factory):
  """PER_CLASS rows per class of the real 5x200 list, with tiny images at their real paths, converted."""
  tmp = tmp_path_factory.mktemp("chexpert")
  with open(shared_data / "labels" / "chexpert_5x200" / "chexpert_5x200.csv", newline="") as f:
    reader = csv.DictReader(f)
    header, rows = reader.fieldnames, list(reader)
  taken = collections.Counter()
  subset = []
  for row in rows:
    (cls,) = [c for c in chexpert.CLASSES_5X200 if row[c] == "1.0"]
    if taken[cls] < PER_CLASS:
      taken[cls] += 1
      subset.append(row)
  for i, row in enumerate(subset):
    _tiny_jpeg(tmp / row["Path"], i)
  list_csv = tmp / "list.csv"
  with open(list_csv, "w", newline="") as f:
    w = csv.DictWriter(f, fieldnames=header)
    w.writeheader()
    w.writerows(subset)
  plan = chexpert.build_plan(str(tmp / "CheXpert-v1.0-small"), "5x200", list_csv=str(list_csv))
  writer.run(plan, str(tmp / "out"), CONVERT)
  return {"dir": tmp, "header": header, "rows": subset, "list": list_csv, "out": tmp / "out"}


def _write_list(path, header, rows):
  with open(path, "w", newline="") as f:
    w = csv.DictWriter(f, fieldnames=header)
    w.writeheader()
    w.writerows(rows)
  return path


def test_converter_writes_the_published_5x200_subset(chexpert_tree):
  manifest = writer.load_manifest(str(chexpert_tree["out"]))
  assert manifest["counts"]["records_by_split"] == {"5x200": 5 * PER_CLASS} and manifest["counts"]["rows_add_up"]
  notes = manifest["notes"]
  assert notes["selection"] == "published_list"
  assert notes["list_sha256"] == hashlib.sha256(chexpert_tree["list"].read_bytes()).hexdigest()
  paths = embed_lib.split_paths(chexpert_tree["out"], "5x200")
  ids = embed_lib.read_image_ids(paths, np.arange(5 * PER_CLASS))
  assert ids == [r["Path"] for r in chexpert_tree["rows"]]


def _fake_embeddings(out, split, num_labels):
  """A converted split's records as `DatasetEmbeddings` without a model (the list code reads no pixels)."""
  paths = tuple(embed_lib.split_paths(out, split))
  with source_lib.ArrayRecordSource(list(paths)) as src:
    recs = [records.decode_record(src[i], with_images=False) for i in range(len(src))]
  n = len(recs)
  return embed_lib.DatasetEmbeddings(
    image=np.eye(n, 8),
    labels=np.stack([r["labels"] for r in recs]).reshape(n, num_labels),
    ids=tuple(r["study_id"] for r in recs),
    texts=("",) * n,
    record_index=np.arange(n),
    paths=paths,
    label_names=embed_lib.label_names_of(paths),
  )


def _evaluator(name, **opts):
  return evaluators.EVALUATOR_TYPES[name](name, options.options_class(name)(**opts))


def test_chexpert_list_errors_name_the_image(chexpert_tree, tmp_path):
  tree, header = chexpert_tree, chexpert_tree["header"]
  emb = _fake_embeddings(tree["out"], "5x200", len(chexpert.LABELS))
  # The other release's folder name matches too; rows come in list order.
  other = [dict(r, Path=r["Path"].replace("CheXpert-v1.0-small/", "CheXpert-v1.0/")) for r in tree["rows"]][::-1]
  ev = _evaluator("chexpert_5x200", path=str(tree["out"]), list=str(_write_list(tmp_path / "o.csv", header, other)))
  chosen, info, _ = ev.listed(emb)
  assert list(chosen.ids) == [r["Path"] for r in tree["rows"]][::-1]
  assert info["chexpert_5x200/list_size"] == 5 * PER_CLASS and info["chexpert_5x200/list_missing"] == 0

  extra = dict(tree["rows"][0], Path="CheXpert-v1.0-small/train/patient99999/study1/view1_frontal.jpg")
  missing = _write_list(tmp_path / "m.csv", header, tree["rows"] + [extra])
  ev = _evaluator("chexpert_5x200", path=str(tree["out"]), list=str(missing))
  with pytest.raises(lists.ListError, match=r"1 of its 11 images are not in .*patient99999/study1/view1_frontal.jpg"):
    ev.listed(emb)
  ev = _evaluator("chexpert_5x200", path=str(tree["out"]), list=str(missing), allow_missing=True)
  chosen, info, notes = ev.listed(emb)
  assert len(chosen) == 5 * PER_CLASS and info["chexpert_5x200/list_missing"] == 1 and "patient99999" in notes[-1]

  wrong = [dict(r) for r in tree["rows"]]
  wrong[3]["Edema"], wrong[3]["Atelectasis"] = "1.0", "0.0"
  ev = _evaluator("chexpert_5x200", path=str(tree["out"]), list=str(_write_list(tmp_path / "w.csv", header, wrong)))
  with pytest.raises(lists.ListError, match=re.escape(wrong[3]["Path"]) + ": (Edema|Atelectasis) is"):
    ev.listed(emb)


def test_without_a_list_the_seeded_rule_is_named(chexpert_tree, tmp_path):
  # The subset's rows pass the 5x200 rule (frontal, one class 1, the rest 0), so it can stand for train.csv.
  plan = chexpert.plan_5x200("/nowhere", labels_csv=str(chexpert_tree["list"]), per_class=1)
  assert plan.notes["selection"] == "seeded_rule" and len(plan.studies) == 5
  emb = _fake_embeddings(chexpert_tree["out"], "5x200", len(chexpert.LABELS))
  same, info, notes = _evaluator("chexpert_5x200", path=str(chexpert_tree["out"])).listed(emb)
  assert same is emb and info == {"chexpert_5x200/selection": "published_list"}  # as the converter says
  assert not any("do not compare" in n for n in notes)
  shutil.copytree(chexpert_tree["out"], tmp_path / "ruled")
  manifest = json.loads((tmp_path / "ruled" / "manifest.json").read_text())
  manifest["notes"] = plan.notes
  (tmp_path / "ruled" / "manifest.json").write_text(json.dumps(manifest))
  _, info, notes = _evaluator("chexpert_5x200", path=str(tmp_path / "ruled")).listed(emb)
  assert info == {"chexpert_5x200/selection": "seeded_rule"}
  assert any("do not compare with the papers'" in n for n in notes)
  # RSNA's list selects the test split only.
  assert lists.converter_selection({"notes": {"selection": "published_list", "selection_split": "test"}}, "train") == (
    "unknown"
  )


@pytest.fixture(scope="module")
def rsna_tree(shared_data, tmp_path_factory):
  """Four positive and four negative lines of the real test list, plus two of the val list, as DICOMs."""
  tmp = tmp_path_factory.mktemp("rsna")
  folder = shared_data / "labels" / "rsna_splits"
  test = [line for line in (folder / "test_list.txt").read_text().splitlines() if line.strip()]
  pos = [line for line in test if line.split()[1] == "1"][:4]
  neg = [line for line in test if line.split()[1] == "0"][:4]
  val = (folder / "val_list.txt").read_text().splitlines()[:2]
  dcm = shared_data / "dicom" / RSNA_DICOM
  for line in pos + neg + val:
    (tmp / "in" / line.split()[0]).parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(dcm, tmp / "in" / line.split()[0])
  list_path = tmp / "test_list.txt"
  list_path.write_text("\n".join(pos + neg + val) + "\n")
  # A label table of the val images only: the test images' labels come from the list.
  table = common.read_table(str(shared_data / "labels" / "kaggle_stage_2_train_labels.csv.zip"))
  val_ids = {lists.rsna_key(v.split()[0]) for v in val}
  with open(tmp / "in" / "stage_2_train_labels.csv", "w", newline="") as f:
    w = csv.DictWriter(f, fieldnames=list(table[0]))
    w.writeheader()
    w.writerows(r for r in table if r["patientId"] in val_ids)
  plan = rsna_pneumonia.build_plan(str(tmp / "in"), test_list=str(list_path))
  writer.run(plan, str(tmp / "out"), CONVERT)
  return {"dir": tmp, "list": list_path, "out": tmp / "out", "lines": pos + neg + val}


def test_rsna_converter_takes_test_labels_from_the_list(rsna_tree):
  manifest = writer.load_manifest(str(rsna_tree["out"]))
  assert manifest["counts"]["records_by_split"] == {"test": 10} and manifest["counts"]["rows_add_up"]
  assert manifest["notes"]["test_labels_from_list"] == 8 and manifest["notes"]["selection_split"] == "test"
  emb = _fake_embeddings(rsna_tree["out"], "test", 1)
  by_id = dict(zip(emb.ids, emb.labels[:, 0]))
  for line in rsna_tree["lines"]:
    name, label = line.split()
    assert by_id[lists.rsna_key(name)] == float(label)


@pytest.fixture(scope="module")
def model():
  """Tiny-config weights of the model's shapes, drawn in numpy.

  Compiling the model's own init takes half a minute on two cores; what is
  tested here only needs a model whose embeddings are finite.
  """
  cfg = tiny.get_config()
  shapes = jax.eval_shape(lambda: api.init_params(cfg, jax.random.key(0)))
  rng = np.random.default_rng(0)

  def draw(path, leaf):
    name = jax.tree_util.keystr(path[-1:])
    if "scale" in name:
      return np.ones(leaf.shape, leaf.dtype)
    if "bias" in name:
      return np.zeros(leaf.shape, leaf.dtype)
    return (0.02 * rng.standard_normal(leaf.shape)).astype(leaf.dtype)

  return cfg, jax.tree_util.tree_map_with_path(draw, shapes)


def test_evaluators_with_lists_write_sha256_and_size(model, rsna_tree, chexpert_tree, tmp_path):
  _, variables = model
  cfg = tiny.get_config()
  cfg.eval.batch_size = 8
  cfg.evals.covid_cxr.path = ""  # only the two protocols
  rsna_list = rsna_tree["list"].read_text().splitlines()
  listed = tmp_path / "rsna_list.txt"
  listed.write_text("\n".join(rsna_list + ["stage_2_test_images/not-converted.dcm 0"]) + "\n")
  cfg.evals.rsna = evaluator_options(
    "rsna", path=str(rsna_tree["out"]), list=str(listed), allow_missing=True, rsna_folds=2
  )
  cfg.evals.chexpert_5x200 = evaluator_options(
    "chexpert_5x200", path=str(chexpert_tree["out"]), list=str(chexpert_tree["list"]), zero_shot_max_prompts=1
  )
  scores = run_lib.run_evaluation(cfg, variables, tmp_path / "work")
  assert "rsna/zero_shot/AUC" in scores and "chexpert_5x200/zero_shot/ACC" in scores
  assert all(isinstance(v, float) for v in scores.values())  # training logs these
  on_disk = json.loads((tmp_path / "work" / "results.json").read_text())
  assert on_disk["rsna/list_sha256"] == hashlib.sha256(listed.read_bytes()).hexdigest()
  assert on_disk["rsna/list_size"] == 11 and on_disk["rsna/list_missing"] == 1
  assert on_disk["chexpert_5x200/list_sha256"] == lists.sha256_file(chexpert_tree["list"])
  assert on_disk["chexpert_5x200/list_size"] == 5 * PER_CLASS and on_disk["chexpert_5x200/list_missing"] == 0
  assert on_disk["rsna/selection"] == on_disk["chexpert_5x200/selection"] == "published_list"
  assert {k: on_disk[k] for k in scores} == pytest.approx(scores)
  md = (tmp_path / "work" / "results.md").read_text()
  assert "**Evaluation sets**" in md and f"list_sha256 {on_disk['rsna/list_sha256']}" in md
  assert "not-converted.dcm" in md  # the note naming the missing image
