"""Evaluation of a tiny random model end to end on the bundled real demo set.

A random model scores at chance; these tests check the machinery (embedding,
padding, sharding, outputs), not the numbers.
"""

import copy
import json

import jax
import numpy as np
import pytest

from clinvla_jax import api
from clinvla_jax.data import DEMO_DIR
from clinvla_jax.data import schema
from clinvla_jax.data import records
from clinvla_jax.data import source as source_lib
from clinvla_jax import predict as predict_lib
from clinvla_jax.evaluate import embed as embed_lib
from clinvla_jax.evaluate import labels as labels_lib
from clinvla_jax.evaluate import retrieval
from clinvla_jax.evaluate import run_evaluators
from clinvla_jax.evaluate import run as run_lib
from clinvla_jax.evaluate.options import evaluator_options
from clinvla_jax.predict import PredictFn
from configs import tiny

COVID = DEMO_DIR / "covid_cxr"
NUM_VAL = 36  # studies in the demo's val split


def _config():
  cfg = tiny.get_config()
  cfg.model.text.vocab_size = 30522  # the bundled vocabulary
  cfg.eval.batch_size = 4
  cfg.evals.covid_cxr = evaluator_options("retrieval", path=str(COVID), split="val")
  return cfg


@pytest.fixture(scope="module")
def model():
  cfg = _config()
  return cfg, api.init_params(cfg, jax.random.key(0))


def _val_records():
  with source_lib.ArrayRecordSource(embed_lib.split_paths(COVID, "val")) as src:
    return [records.decode_record(src[i], with_images=False) for i in range(len(src))]


def test_run_evaluation_writes_results_table_and_figure(model, tmp_path):
  cfg, variables = model
  results = run_lib.run_evaluation(cfg, variables, tmp_path)

  # P@50 does not fit 36 studies and must be skipped, not crash.
  expected = {f"covid_cxr/{d}/P@{k}" for d in ("image_to_text", "text_to_image", "image_to_image") for k in (5, 10)}
  expected |= {"covid_cxr/zero_shot/ACC", "covid_cxr/zero_shot/BACC", "covid_cxr/zero_shot/AUC"}
  assert expected <= set(results)
  # Beside each score: its chance level, bootstrap interval or majority baseline, and own-pair recall.
  assert all(k.endswith(("_chance", "_ci_low", "_ci_high", "_majority")) or "/R@" in k for k in set(results) - expected)
  assert all(0.0 <= v <= 1.0 for v in results.values())
  on_disk = json.loads((tmp_path / "results.json").read_text())
  assert on_disk == pytest.approx(results)

  md = (tmp_path / "results.md").read_text()
  assert "ClinVLA (paper)" in md  # the paper's tables sit beside ours
  assert "**covid_cxr**" in md and "P@50 skipped" in md
  png = (tmp_path / "retrieval_examples.png").read_bytes()
  assert png.startswith(b"\x89PNG") and len(png) > 20_000


def test_embeddings_npz_round_trip(model, tmp_path):
  cfg, variables = model
  out = tmp_path / "emb.npz"
  run_lib.write_embeddings(cfg, variables, COVID, out, split="val")
  with np.load(out) as z:
    data = {k: z[k] for k in z.files}
  recs = _val_records()
  proj = cfg.model.proj_dim
  assert data["image_global"].shape == (NUM_VAL, proj)
  assert data["text_global"].shape == (NUM_VAL, proj)
  np.testing.assert_allclose(np.linalg.norm(data["image_global"], axis=1), 1, atol=1e-5)
  assert list(data["study_id"]) == [r["study_id"] for r in recs]
  np.testing.assert_array_equal(data["labels"], np.stack([r["labels"] for r in recs]))
  manifest = source_lib.read_manifest(str(COVID))
  assert list(data["label_names"]) == manifest["label_names"]
  assert list(data["report_text"]) == [r["text"] for r in recs]


def test_padded_last_batch_does_not_change_embeddings(model):
  cfg, variables = model
  # 36 studies: batch 5 pads 4 rows, batch 7 pads 6 (one device, so the
  # batch sizes are not rounded up to the device count).
  mesh = predict_lib.data_mesh(jax.devices()[:1])
  a = embed_lib.embed_dataset(cfg, variables, COVID, split="val", batch_size=5, mesh=mesh)
  b = embed_lib.embed_dataset(cfg, variables, COVID, split="val", batch_size=7, mesh=mesh)
  assert len(a) == len(b) == NUM_VAL
  assert a.ids == b.ids
  np.testing.assert_allclose(a.image, b.image, atol=1e-5)
  np.testing.assert_allclose(a.text, b.text, atol=1e-5)
  assert a.frontal_image(0).shape == (schema.IMAGE_SIZE, schema.IMAGE_SIZE)


def test_text_embed_fn_batches_any_count(model):
  cfg, variables = model
  fn = embed_lib.make_text_embed_fn(cfg, variables, batch_size=4)
  texts = [
    "There is pneumonia",
    "There is no pneumonia",
    "Small effusion.",
    "Clear lungs.",
    "Cardiomegaly.",
    "No acute process.",
  ]
  together = fn(texts)
  one_by_one = np.concatenate([fn([t]) for t in texts])
  assert together.shape == (6, cfg.model.proj_dim)
  np.testing.assert_allclose(together, one_by_one, atol=1e-5)


def test_fit_token_length_keeps_the_separator():
  ids = np.array([[101, 5, 6, 7, 8, 102, 0, 0], [101, 5, 102, 0, 0, 0, 0, 0]])
  mask = (ids > 0).astype(np.int32)
  short_ids, short_mask = records.fit_token_length(ids, mask, 4)
  np.testing.assert_array_equal(short_ids, [[101, 5, 6, 102], [101, 5, 102, 0]])
  np.testing.assert_array_equal(short_mask, [[1, 1, 1, 1], [1, 1, 1, 0]])


def test_usable_ks_skips_cutoffs_beyond_the_set():
  assert retrieval.usable_ks((5, 10, 50), 13) == ((5, 10), (50,))
  assert retrieval.usable_ks((5,), 5) == ((), (5,))


PROMPTS = ["There is pneumonia", "There is no pneumonia", "Clear lungs."]


def _evaluate(cfg, variables, mesh=None):
  emb = embed_lib.embed_dataset(cfg, variables, COVID, split="val", batch_size=5, mesh=mesh)
  text_fn = embed_lib.make_text_embed_fn(cfg, variables, batch_size=5, mesh=mesh)
  scores = run_evaluators(["covid_cxr"], {"covid_cxr": emb}, text_fn, {"retrieval_ks": (5, 10)})
  return dict(image=emb.image, text=emb.text, prompts=text_fn(PROMPTS), scores=scores)


@pytest.mark.slow
@pytest.mark.multidevice
def test_sharded_two_devices_match_one_device(model):
  """A 2-device data mesh gives the 1-device embeddings and scores."""
  cfg, variables = model
  two = _evaluate(cfg, variables, predict_lib.data_mesh(jax.devices()[:2]))
  assert predict_lib.padded_batch_size(5, predict_lib.data_mesh(jax.devices()[:2])) == 6
  one = _evaluate(cfg, variables, predict_lib.data_mesh(jax.devices()[:1]))
  for key in ("image", "text", "prompts"):
    np.testing.assert_allclose(two[key], one[key], atol=1e-5)
  assert two["scores"].keys() == one["scores"].keys()
  for key, value in one["scores"].items():
    assert two["scores"][key] == pytest.approx(value, abs=1e-6), key


def test_class_names_and_label_prompts():
  names = ("No Finding", "Cardiomegaly", "Edema", "COVID-19")
  labels = np.array([[np.nan, 1, 0, np.nan], [0, -1, 1, np.nan]])
  got = labels_lib.class_names_of(labels, names, ("Cardiomegaly", "Edema"))
  assert list(got) == ["Cardiomegaly", "Edema"]
  with pytest.raises(ValueError):
    labels_lib.class_names_of(labels, names, ("No Finding", "COVID-19"))
  prompts = labels_lib.label_prompts(names)
  assert "Findings suggesting COVID-19 pneumonia." in prompts["COVID-19"]
  assert "Findings suggesting Edema." in prompts["Edema"]
  assert "The lungs are clear." in prompts["No Finding"]


@pytest.mark.slow  # full tier: the default tier's sharded evaluation check is the two-device one above
@pytest.mark.multidevice
def test_training_mesh_keeps_fsdp_shardings_and_matches_one_device(model):
  """Evaluation on the config's training mesh (FSDP over 4 devices) shards the variables like training."""
  cfg, variables = model
  cfg = copy.deepcopy(cfg)
  cfg.mesh.update(data=2, fsdp=4, tensor=1)
  predict = PredictFn.from_config(cfg)
  assert dict(predict.mesh.shape) == {"data": 2, "fsdp": 4, "tensor": 1}
  assert predict.rules is not None
  placed = predict.place(variables)
  kernel = placed["params"]["text_tower"]["layer_0"]["intermediate"]["kernel"]
  # The embed dimension lies on the fsdp axis: each device holds a quarter of it.
  assert "fsdp" in str(kernel.sharding.spec)
  assert {s.data.shape[0] for s in kernel.addressable_shards} == {kernel.shape[0] // 4}
  sharded = _evaluate(cfg, variables)  # mesh=None: the training mesh of the config
  one = _evaluate(cfg, variables, predict_lib.data_mesh(jax.devices()[:1]))
  for key in ("image", "text", "prompts"):
    np.testing.assert_allclose(sharded[key], one[key], atol=1e-5)


@pytest.mark.multidevice
@pytest.mark.slow
def test_train_setup_predict_fn_embeds_like_a_fresh_one(model):
  """The training's predict_fn runs on the training mesh and rules, and gives the default embeddings."""
  from clinvla_jax import train  # pylint: disable=g-import-not-at-top

  cfg, variables = model
  cfg = copy.deepcopy(cfg)
  cfg.mesh.update(data=-1, fsdp=2, tensor=1)
  setup = train.TrainSetup(cfg)
  predict = setup.predict_fn
  assert predict.mesh is setup.mesh and predict.rules == setup.rules
  assert setup.predict_fn is predict  # built once per run
  ours = embed_lib.embed_dataset(cfg, variables, COVID, split="val", batch_size=8, predict_fn=predict)
  fresh = embed_lib.embed_dataset(cfg, variables, COVID, split="val", batch_size=8)
  np.testing.assert_allclose(ours.image, fresh.image, atol=1e-5)
  np.testing.assert_allclose(ours.text, fresh.text, atol=1e-5)
  with pytest.raises(ValueError, match="not both"):
    embed_lib.embed_dataset(cfg, variables, COVID, split="val", predict_fn=predict, mesh=predict_lib.data_mesh())
