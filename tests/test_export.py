"""Exported embedders (clinvla_jax/export.py, --mode=export): the artifact embeds as the live model does, lowers for
accelerators without one, and a damaged or foreign artifact is refused with its reason."""

import json
import re
import shutil

import jax
import numpy as np
import pytest

import clinvla_jax as cv
import tiny_runs
from clinvla_jax import api, export, weights
from clinvla_jax.config import load_config
from clinvla_jax.data import records
from clinvla_jax.data import source as source_lib
from clinvla_jax.evaluate import embed as embed_lib
from clinvla_jax.predict import PredictFn

NUM_STUDIES = 5
ATOL = 1e-5


@pytest.fixture(scope="module")
def config():
  return tiny_runs.config()


@pytest.fixture(scope="module")
def variables(config):
  return api.init_params(config, jax.random.key(3))


@pytest.fixture(scope="module")
def studies():
  """The first validation studies of the bundled demo set: pixels, view validity and report tokens."""
  with source_lib.ArrayRecordSource(embed_lib.split_paths(tiny_runs.DEMO, "val")) as src:
    recs = [records.decode_record(src[i]) for i in range(NUM_STUDIES)]
  return {k: np.stack([r[k] for r in recs]) for k in ("images", "view_valid", "input_ids", "attention_mask")}


@pytest.fixture(scope="module")
def artifact(config, variables, tmp_path_factory):
  folder = tmp_path_factory.mktemp("export") / "artifact"
  export.export_embedders(config, variables, folder, ("cpu", "cuda", "tpu"))
  return folder


def live_embeddings(config, variables, studies, view_slots=(0,)):
  """What evaluation, embedding and the index compute (`PredictFn`): {"image", "text"} [N, P]."""
  predict = PredictFn.from_config(config)
  placed = predict.place(variables)
  images = studies["images"] if view_slots is None else studies["images"][:, list(view_slots)]
  valid = studies["view_valid"] if view_slots is None else studies["view_valid"][:, list(view_slots)]
  patches, idx = cv.patchify(images, api.model_config(config).image.patch_size)
  patch_idx = np.broadcast_to(np.asarray(idx), patches.shape[:-1])
  return {
    "image": predict.images(placed, np.asarray(patches), patch_idx, valid, view_slots=view_slots),
    "text": predict.texts(placed, studies["input_ids"], studies["attention_mask"]),
  }


def test_cpu_artifact_equals_the_live_model_at_any_batch_size(config, variables, studies, artifact):
  manifest = json.loads((artifact / "manifest.json").read_text())
  assert manifest["platforms"] == ["cpu", "cuda", "tpu"] and manifest["proj_dim"] == 32
  assert manifest["image"]["inputs"][0] == {"name": "images", "shape": ["b", 1, 224, 224], "dtype": "uint8"}
  assert manifest["text"]["inputs"][1] == {"name": "attention_mask", "shape": ["b", 128], "dtype": "int32"}
  assert sorted(manifest["files"]) == sorted(
    ["embed_images.jaxexport", "embed_text.jaxexport", "weights.safetensors", "vocab.txt"]
  )

  art = cv.load_exported(artifact)
  assert art.platform == "cpu"
  live = live_embeddings(config, variables, studies)
  frontal, valid = studies["images"][:, :1], studies["view_valid"][:, :1]
  image = art.embed_images(frontal, valid)
  text = art.embed_text(studies["input_ids"], studies["attention_mask"])
  np.testing.assert_allclose(image, live["image"], atol=ATOL, rtol=0)
  np.testing.assert_allclose(text, live["text"], atol=ATOL, rtol=0)
  np.testing.assert_allclose(np.linalg.norm(image, axis=1), 1.0, rtol=1e-5)
  # The batch dimension is symbolic: one study, or two, embed as they do among five.
  np.testing.assert_allclose(art.embed_images(frontal[2:3], valid[2:3]), image[2:3], atol=ATOL, rtol=0)
  np.testing.assert_allclose(
    art.embed_text(studies["input_ids"][:2], studies["attention_mask"][:2]), text[:2], atol=ATOL
  )
  assert art.embed_images(frontal[:0]).shape == (0, 32)


def test_all_views_artifact_takes_the_record_views(config, variables, studies, tmp_path):
  all_views = load_config(str(tiny_runs.TINY), {**tiny_runs.RUN, "eval.views": "all"})
  export.export_embedders(all_views, variables, tmp_path / "all", ["cpu"])
  art = cv.load_exported(tmp_path / "all")
  assert art.manifest["image"]["views"] == ["current_frontal", "current_lateral", "prior_frontal", "prior_lateral"]
  assert not studies["view_valid"].all()  # missing views among them, masked as the live model masks them
  live = live_embeddings(config, variables, studies, view_slots=None)
  np.testing.assert_allclose(art.embed_images(studies["images"], studies["view_valid"]), live["image"], atol=ATOL)
  with pytest.raises(ValueError, match=r"images: expected uint8 \[B, 4, 224, 224\]"):
    art.embed_images(studies["images"][:, :1])


def test_tokenize_uses_the_copied_vocabulary(artifact, config):
  art = cv.load_exported(artifact)
  tokens = art.tokenize(["Small left pleural effusion."])
  reference = embed_lib.tokenizer_from_config(config)(["Small left pleural effusion."])
  np.testing.assert_array_equal(tokens["input_ids"], reference["input_ids"])
  # Shorter token rows are padded to the text tower's length: the same embedding.
  short = int(tokens["attention_mask"].sum()) + 2
  np.testing.assert_allclose(
    art.embed_text(tokens["input_ids"][:, :short], tokens["attention_mask"][:, :short]),
    art.embed_text(**tokens),
    atol=ATOL,
  )


def test_tiny_train_step_and_embedders_lower_for_cuda_and_tpu(config):
  lowered = export.lower_for_platforms(config, ["cuda", "tpu"])
  assert sorted(lowered) == ["embed_images/cuda,tpu", "embed_text/cuda,tpu", "train_step/cuda,tpu"]
  assert all(e.platforms == ("cuda", "tpu") for e in lowered.values())


@pytest.mark.slow
def test_base_config_train_step_and_embedders_lower_for_cuda_and_tpu():
  # configs/base.py from abstract shapes only (no weights): what an accelerator job would compile, with the
  # precision and options "auto" resolves to there (bf16) and the XLA attention path.
  lowered = export.lower_for_platforms(load_config("configs/base.py"), ["cuda", "tpu"])
  assert sorted(lowered) == ["embed_images/cuda,tpu", "embed_text/cuda,tpu", "train_step/cuda,tpu"]
  for name, exported in lowered.items():
    assert exported.platforms == ("cuda", "tpu"), name
    text = exported.mlir_module()
    assert "bf16" in text and "cudnn" not in text, name
  assert str(lowered["embed_images/cuda,tpu"].out_avals[0]) == "float32[b,128]"
  assert str(lowered["embed_text/cuda,tpu"].out_avals[0]) == "float32[b,128]"


def _damaged(artifact, tmp_path, change):
  folder = tmp_path / "damaged"
  shutil.copytree(artifact, folder)
  change(folder)
  with pytest.raises(export.ExportedArtifactError) as e:
    cv.load_exported(folder)
  return str(e.value)


def _flip_byte(path, offset=200):
  data = bytearray(path.read_bytes())
  data[offset] ^= 0xFF
  path.write_bytes(bytes(data))


def _rewrite_manifest(folder, **fields):
  manifest = json.loads((folder / "manifest.json").read_text())
  manifest.update(fields)
  (folder / "manifest.json").write_text(json.dumps(manifest))


def _truncate(path):
  data = path.read_bytes()
  path.write_bytes(data[: len(data) // 2])


def _drop_a_weight(folder):
  from safetensors.numpy import load_file, save_file

  tensors = load_file(str(folder / "weights.safetensors"))
  tensors.pop(sorted(tensors)[0])
  save_file(tensors, str(folder / "weights.safetensors"))
  _rehash(folder, "weights.safetensors")


def _rehash(folder, name):
  manifest = json.loads((folder / "manifest.json").read_text())
  manifest["files"][name]["sha256"] = export.files.sha256_file(str(folder / name))
  (folder / "manifest.json").write_text(json.dumps(manifest))


@pytest.mark.parametrize(
  "change, message",
  [
    (lambda f: _flip_byte(f / "embed_images.jaxexport"), r"embed_images.jaxexport: sha256 differs from the manifest's"),
    (
      lambda f: (_truncate(f / "embed_text.jaxexport"), _rehash(f, "embed_text.jaxexport")),
      r"embed_text.jaxexport: not a serialized jax.export program",
    ),
    (lambda f: (f / "weights.safetensors").unlink(), r"weights.safetensors: missing"),
    (lambda f: _flip_byte(f / "weights.safetensors", 1000), r"weights.safetensors: sha256 differs"),
    (_drop_a_weight, r"weights.safetensors: the weights' tree is not the one"),
    (lambda f: _rewrite_manifest(f, version=99), r"manifest.json: format version 99; .* reads version 1"),
    (lambda f: (f / "manifest.json").write_text("{not json"), r"manifest.json: unreadable"),
    (lambda f: (f / "manifest.json").unlink(), r"manifest.json: missing; .* is not an exported artifact"),
  ],
  ids=[
    "program-bytes",
    "program-undecodable",
    "weights-missing",
    "weights-bytes",
    "weights-tree",
    "version",
    "manifest-json",
    "no-manifest",
  ],
)
def test_damaged_artifact_is_refused_with_its_reason(artifact, tmp_path, change, message):
  assert re.search(message, _damaged(artifact, tmp_path, change))
  cv.load_exported(artifact)  # the original is untouched


def test_artifact_of_another_platform_is_refused(config, variables, artifact, tmp_path):
  export.export_embedders(config, variables, tmp_path / "cuda", ["cuda"])
  with pytest.raises(export.ExportedArtifactError, match=r"manifest.json: exported for cuda; this machine runs cpu"):
    cv.load_exported(tmp_path / "cuda")
  # A manifest edited to claim more platforms than its programs were lowered for.
  _rewrite_manifest(tmp_path / "cuda", platforms=["cuda", "cpu"])
  with pytest.raises(
    export.ExportedArtifactError, match=r"embed_images.jaxexport: exported for cuda, the manifest says"
  ):
    cv.load_exported(tmp_path / "cuda")
  with pytest.raises(export.ExportedArtifactError, match=r"exported for cpu, cuda, tpu; asked for rocm"):
    cv.load_exported(artifact, platform="rocm")
  with pytest.raises(export.ExportedArtifactError, match=r"asked to run on tpu, but this machine has no tpu device"):
    cv.load_exported(artifact, platform="tpu")


def test_export_replaces_only_an_earlier_artifact(config, variables, artifact, tmp_path):
  other = tmp_path / "notes"
  other.mkdir()
  (other / "keep.txt").write_text("mine")
  with pytest.raises(export.ExportedArtifactError, match=r"notes: a folder that is not an exported artifact"):
    export.export_embedders(config, variables, other, ["cpu"])
  assert [p.name for p in other.iterdir()] == ["keep.txt"]
  with pytest.raises(export.ExportedArtifactError, match=r"platforms \['gpu'\]: expected one or more of cpu, cuda"):
    export.export_embedders(config, variables, artifact, ["gpu"])
  cv.load_exported(artifact)  # a failed export left the artifact there as it was


def test_cli_export_from_the_shared_checkpoint(tiny_run, studies, tmp_path):
  out = tmp_path / "artifact"
  proc = tiny_runs.cli(
    f"--checkpoint={tiny_run.workdir}", "--mode=export", "--platforms=cpu,cuda,tpu", f"--output={out}"
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert f"evaluating checkpoint step {tiny_runs.NUM_STEPS}" in proc.stdout
  assert f"exported embedders for cpu,cuda,tpu to {out}" in proc.stdout
  art = cv.load_exported(out)
  assert art.manifest["source"]["checkpoint"] == str(tiny_run.workdir)
  config = tiny_runs.config()
  trained, _ = weights.restore_variables(config, str(tiny_run.workdir))
  live = live_embeddings(config, trained, studies)
  np.testing.assert_allclose(
    art.embed_images(studies["images"][:, :1], studies["view_valid"][:, :1]), live["image"], atol=ATOL
  )
  np.testing.assert_allclose(art.embed_text(studies["input_ids"], studies["attention_mask"]), live["text"], atol=ATOL)

  (tmp_path / "other").mkdir()
  (tmp_path / "other" / "keep.txt").write_text("mine")
  proc = tiny_runs.cli("--mode=export", f"--output={tmp_path / 'other'}")
  assert proc.returncode == 1 and "not an exported artifact; not replacing it" in proc.stderr, proc.stderr[-2000:]
  assert (tmp_path / "other" / "keep.txt").read_text() == "mine"
