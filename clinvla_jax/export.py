"""Exported embedders: the image and report embedding functions as `jax.export` artifacts, with their weights.

  manifest = export_embedders(config, variables, "artifact/", platforms=("cpu", "cuda", "tpu"))
  art = load_exported("artifact/")                 # cv.load_exported; runs no model code
  art.embed_images(images, view_valid)             # uint8 [B, V, H, W] (+ bool [B, V]) -> float32 [B, P] unit rows
  art.embed_text(input_ids, attention_mask)        # int [B, L] -> float32 [B, P] unit rows
  art.embed_text(**art.tokenize(["small left pleural effusion"]))

An artifact is one folder:

  manifest.json            format and version, platforms, every input's name / shape / dtype, the sizes of the
                           model (proj_dim, image size, patch size, views, text length), sha256 of every file
  embed_images.jaxexport   serialized `jax.export.Exported`: (params, images, view_valid) -> [B, P]
  embed_text.jaxexport     serialized `jax.export.Exported`: (params, input_ids, attention_mask) -> [B, P]
  weights.safetensors      the {"params": ...} tree, one tensor per leaf named by its path ("params/text_tower/...")
  vocab.txt                the text tower's WordPiece vocabulary, to tokenize reports with

Both functions take the whole parameter tree (the weights are an input, not constants of the program, so the
programs stay small and one weights file serves both).  The batch dimension is symbolic: any batch size runs, each
new size compiling once.  The image function takes whole images, every patch used, in the views of
``config.eval.views`` ("frontal": V = 1, the current frontal; "all": V = 4, the record's view slots), as
evaluation and the search index embed them.  Attention is lowered through the portable "xla" path (fused kernels
are GPU-only), at the precision the config resolves to on the exporting machine (recorded in the manifest).

A folder that is damaged, incomplete, of another format version, or exported for platforms other than the one
asked for (or this machine's) is refused with `ExportedArtifactError`, naming the file and the reason.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
from collections.abc import Mapping, Sequence
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax import export as jax_export

from clinvla_jax import files

FORMAT = "clinvla-exported-embedders"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
IMAGE_FILE = "embed_images.jaxexport"
TEXT_FILE = "embed_text.jaxexport"
WEIGHTS_FILE = "weights.safetensors"
VOCAB_FILE = "vocab.txt"
# jax.export's platform names; "cuda" and "rocm" run on JAX's "gpu" backend.
PLATFORMS = ("cpu", "cuda", "rocm", "tpu")
_BACKENDS = {"cpu": "cpu", "cuda": "gpu", "rocm": "gpu", "tpu": "tpu"}
BATCH_DIM = "b"
RECORD_VIEWS = 4


class ExportedArtifactError(Exception):
  """An artifact that cannot be written or loaded: the message names the file and the reason."""


# --- the functions --------------------------------------------------------------------------------------------


def check_platforms(platforms: Sequence[str] | str) -> tuple[str, ...]:
  """``platforms`` (a sequence or "cpu,cuda") as a tuple of jax.export platform names, duplicates dropped."""
  if isinstance(platforms, str):
    platforms = platforms.split(",")
  names = tuple(dict.fromkeys(p.strip().lower() for p in platforms if p.strip()))
  unknown = [p for p in names if p not in PLATFORMS]
  if not names or unknown:
    raise ExportedArtifactError(f"platforms {list(platforms)}: expected one or more of {', '.join(PLATFORMS)}")
  return names


def embedding_model_config(config):
  """The model config the embedders are exported from: the config's, with the portable "xla" attention path."""
  from clinvla_jax import api

  mcfg = api.model_config(config)
  return dataclasses.replace(
    mcfg,
    image=dataclasses.replace(mcfg.image, attention_impl="xla"),
    text=dataclasses.replace(mcfg.text, attention_impl="xla"),
  )


def export_view_slots(config) -> Optional[tuple[int, ...]]:
  """The record view slots embedded, as evaluation embeds them (``config.eval.views``); None: the record's 4."""
  from clinvla_jax.evaluate import embed

  return embed.eval_view_slots(config)


def embedding_functions(mcfg, view_slots: Optional[tuple[int, ...]]):
  """(image_fn, text_fn): (params, images, view_valid) and (params, input_ids, attention_mask) -> float32 [B, P]."""
  from clinvla_jax import api
  from clinvla_jax.model.clinvla import ClinVLA

  model = ClinVLA(mcfg)

  def image_fn(params, images, view_valid):
    patches, idx = api.patchify(images, mcfg.image.patch_size)
    patch_idx = jnp.broadcast_to(idx, patches.shape[:-1])
    out = model.apply(params, patches, patch_idx, view_valid, view_slots, method=ClinVLA.encode_image)
    return out["global"].astype(jnp.float32)

  def text_fn(params, input_ids, attention_mask):
    return model.apply(params, input_ids, attention_mask, method=ClinVLA.encode_text)["global"].astype(jnp.float32)

  return image_fn, text_fn


def abstract_inputs(mcfg, view_slots: Optional[tuple[int, ...]], batch) -> dict[str, dict[str, jax.ShapeDtypeStruct]]:
  """{"image": {name: spec}, "text": {name: spec}} of the embedders' inputs; ``batch`` an int or a symbolic dim."""
  views = len(view_slots) if view_slots is not None else RECORD_VIEWS
  size, length = mcfg.image.image_size, mcfg.text.max_len
  spec = jax.ShapeDtypeStruct
  return {
    "image": {"images": spec((batch, views, size, size), jnp.uint8), "view_valid": spec((batch, views), jnp.bool_)},
    "text": {"input_ids": spec((batch, length), jnp.int32), "attention_mask": spec((batch, length), jnp.int32)},
  }


def export_functions(mcfg, view_slots, abstract_variables, platforms: Sequence[str]) -> dict[str, jax_export.Exported]:
  """{"image": Exported, "text": Exported} for ``platforms``, batch dimension symbolic."""
  (batch,) = jax_export.symbolic_shape(BATCH_DIM)
  inputs = abstract_inputs(mcfg, view_slots, batch)
  image_fn, text_fn = embedding_functions(mcfg, view_slots)
  out = {}
  for name, fn in (("image", image_fn), ("text", text_fn)):
    exporter = jax_export.export(jax.jit(fn), platforms=list(platforms))
    out[name] = exporter(abstract_variables, *inputs[name].values())
  return out


# --- writing --------------------------------------------------------------------------------------------------


def flatten_tree(tree) -> dict[str, np.ndarray]:
  """{"params/image_tower/...": array} of a tree of nested dicts (the keys are its paths joined by "/")."""
  flat = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    keys = [getattr(k, "key", None) for k in path]
    if any(not isinstance(k, str) or "/" in k for k in keys):
      raise ExportedArtifactError(f"weights: tree path {jax.tree_util.keystr(path)} is not a path of dict keys")
    flat["/".join(keys)] = np.array(leaf, order="C")  # not ascontiguousarray: it makes scalars 1-d
  return flat


def unflatten_tree(flat: Mapping[str, Any]) -> dict:
  """The nested dicts that `flatten_tree` flattened."""
  tree: dict = {}
  for name, value in flat.items():
    *parents, leaf = name.split("/")
    node = tree
    for key in parents:
      node = node.setdefault(key, {})
    node[leaf] = value
  return tree


def _io_spec(exported: jax_export.Exported, names: Sequence[str]) -> dict[str, Any]:
  """Names, shapes (a symbolic dim as its name) and dtypes of an Exported's non-weight inputs and its output."""

  def shape(aval):
    return [d if isinstance(d, int) else str(d) for d in aval.shape]

  avals = exported.in_avals[-len(names) :]
  return {
    "inputs": [{"name": n, "shape": shape(a), "dtype": str(a.dtype)} for n, a in zip(names, avals)],
    "output": {"shape": shape(exported.out_avals[0]), "dtype": str(exported.out_avals[0].dtype)},
  }


def _manifest(config, mcfg, view_slots, exported, platforms, tokenizer, source) -> dict[str, Any]:
  from clinvla_jax.data import schema

  slots = list(view_slots) if view_slots is not None else list(range(RECORD_VIEWS))
  return {
    "format": FORMAT,
    "version": FORMAT_VERSION,
    "platforms": list(platforms),
    "proj_dim": int(mcfg.proj_dim),
    "batch": f"symbolic ({BATCH_DIM}): any batch size, each new size compiles once",
    "attention_impl": "xla",
    "precision": {"image": mcfg.image.precision, "text": mcfg.text.precision},
    "image": {
      "file": IMAGE_FILE,
      **_io_spec(exported["image"], ("images", "view_valid")),
      "image_size": int(mcfg.image.image_size),
      "patch_size": int(mcfg.image.patch_size),
      "views": [schema.VIEW_NAMES[s] for s in slots],
      "pixels": "uint8 grayscale, higher is brighter (clinvla_jax.data.images.preprocess)",
    },
    "text": {
      "file": TEXT_FILE,
      **_io_spec(exported["text"], ("input_ids", "attention_mask")),
      "max_len": int(mcfg.text.max_len),
      "vocab": VOCAB_FILE,
      "lowercase": bool(tokenizer.lowercase),
      "pad_id": int(tokenizer.pad_id),
    },
    "weights": WEIGHTS_FILE,
    "source": {"checkpoint": source, "seed": int(config.seed)},
    "jax_version": jax.__version__,
  }


def _write_files(folder: str, exported, variables, vocab_path: str) -> dict[str, dict[str, Any]]:
  """Writes the two programs, the weights and the vocabulary into ``folder``; {file: {"sha256", "bytes"}}."""
  from safetensors.numpy import save_file

  files.atomic_write_bytes(os.path.join(folder, IMAGE_FILE), bytes(exported["image"].serialize()))
  files.atomic_write_bytes(os.path.join(folder, TEXT_FILE), bytes(exported["text"].serialize()))
  save_file(flatten_tree(variables), os.path.join(folder, WEIGHTS_FILE), metadata={"format": FORMAT})
  os.chmod(
    os.path.join(folder, WEIGHTS_FILE), 0o644
  )  # safetensors writes it owner-only; a server may run as another user
  shutil.copyfile(vocab_path, os.path.join(folder, VOCAB_FILE))
  out = {}
  for name in (IMAGE_FILE, TEXT_FILE, WEIGHTS_FILE, VOCAB_FILE):
    path = os.path.join(folder, name)
    out[name] = {"sha256": files.sha256_file(path), "bytes": os.path.getsize(path)}
  return out


def check_destination(out_dir: str) -> None:
  """Refuses to replace a folder that holds anything but an earlier artifact (nothing of it is touched)."""
  if not os.path.exists(out_dir):
    return
  if not os.path.isdir(out_dir):
    raise ExportedArtifactError(f"{out_dir}: exists and is not a folder; not replacing it")
  if not os.listdir(out_dir):
    return
  try:
    with open(os.path.join(out_dir, MANIFEST), encoding="utf-8") as f:
      ours = json.load(f).get("format") == FORMAT
  except (OSError, ValueError, AttributeError):
    ours = False
  if not ours:
    raise ExportedArtifactError(f"{out_dir}: a folder that is not an exported artifact; not replacing it")


def _replace_folder(staging: str, out_dir: str) -> None:
  """Moves the finished ``staging`` folder to ``out_dir``; an earlier artifact there is removed only after."""
  old = None
  if os.path.exists(out_dir):
    old = f"{out_dir}.old-{os.getpid()}"
    os.rename(out_dir, old)
  try:
    os.rename(staging, out_dir)
  except OSError:
    if old:
      os.rename(old, out_dir)
    raise
  files.fsync_dir(os.path.dirname(out_dir))
  if old:
    shutil.rmtree(old, ignore_errors=True)


def export_embedders(
  config, variables, out_dir: str, platforms: Sequence[str] | str = ("cpu",), *, source: Optional[str] = None
) -> dict[str, Any]:
  """Writes the artifact of ``variables`` ({"params": ...}) to ``out_dir``; returns its manifest.

  The folder is built beside ``out_dir`` and moved in place when complete, so a failed export leaves ``out_dir``
  as it was; an existing ``out_dir`` is replaced only if it is empty or an earlier artifact.  ``source``: where
  the weights came from (a checkpoint path), recorded in the manifest.
  """
  from clinvla_jax.evaluate import embed

  platforms = check_platforms(platforms)
  if jax.process_count() > 1:
    raise ExportedArtifactError(f"{out_dir}: export runs in one process (this run has {jax.process_count()})")
  out_dir = os.path.abspath(os.fspath(out_dir))
  check_destination(out_dir)
  mcfg, view_slots = embedding_model_config(config), export_view_slots(config)
  host = jax.tree_util.tree_map(np.asarray, jax.device_get(variables))
  abstract = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), host)
  exported = export_functions(mcfg, view_slots, abstract, platforms)
  tokenizer = embed.tokenizer_from_config(config)
  source = os.path.abspath(source) if source else None
  manifest = _manifest(config, mcfg, view_slots, exported, platforms, tokenizer, source)
  os.makedirs(os.path.dirname(out_dir), exist_ok=True)
  staging = f"{out_dir}.staging-{os.getpid()}"
  shutil.rmtree(staging, ignore_errors=True)
  os.makedirs(staging)
  try:
    manifest["files"] = _write_files(staging, exported, host, tokenizer.vocab_path)
    files.atomic_write_json(os.path.join(staging, MANIFEST), manifest)
    _replace_folder(staging, out_dir)
  finally:
    shutil.rmtree(staging, ignore_errors=True)
  return manifest


# --- loading --------------------------------------------------------------------------------------------------


def read_manifest(directory: str) -> dict[str, Any]:
  """The artifact's manifest, its format and version checked."""
  path = os.path.join(directory, MANIFEST)
  if not os.path.isdir(directory):
    raise ExportedArtifactError(f"{directory}: no such folder")
  try:
    with open(path, encoding="utf-8") as f:
      manifest = json.load(f)
  except FileNotFoundError:
    raise ExportedArtifactError(f"{path}: missing; {directory} is not an exported artifact") from None
  except (OSError, ValueError) as e:
    raise ExportedArtifactError(f"{path}: unreadable ({e})") from e
  if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
    raise ExportedArtifactError(f"{path}: not a {FORMAT} manifest")
  if manifest.get("version") != FORMAT_VERSION:
    raise ExportedArtifactError(
      f"{path}: format version {manifest.get('version')!r}; this version of clinvla_jax reads version {FORMAT_VERSION}"
    )
  missing = [k for k in ("platforms", "files", "image", "text", "weights", "proj_dim") if k not in manifest]
  if missing:
    raise ExportedArtifactError(f"{path}: missing field(s) {', '.join(missing)}")
  return manifest


def resolve_platform(manifest: Mapping[str, Any], platform: Optional[str], directory: str) -> str:
  """``platform`` (default: this machine's), refused unless the artifact was exported for it."""
  exported_for = list(manifest["platforms"])
  here = platform is None
  platform = (platform or jax_export.default_export_platform()).lower()
  if platform not in exported_for:
    where = "this machine runs" if here else "asked for"
    raise ExportedArtifactError(
      f"{os.path.join(directory, MANIFEST)}: exported for {', '.join(exported_for)}; {where} {platform} "
      f"(re-export with --platforms={','.join([*exported_for, platform])})"
    )
  return platform


def platform_device(platform: str, directory: str) -> jax.Device:
  """The first device of ``platform``'s backend on this machine."""
  try:
    return jax.devices(_BACKENDS.get(platform, platform))[0]
  except RuntimeError as e:
    raise ExportedArtifactError(
      f"{directory}: asked to run on {platform}, but this machine has no {platform} device"
    ) from e


def verified_bytes(directory: str, name: str, manifest: Mapping[str, Any]) -> bytes:
  """The bytes of one listed file, refused when missing or when its sha256 is not the manifest's."""
  entry = manifest["files"].get(name)
  path = os.path.join(directory, name)
  if not isinstance(entry, dict) or "sha256" not in entry:
    raise ExportedArtifactError(f"{path}: not listed in {MANIFEST}")
  try:
    with open(path, "rb") as f:
      data = f.read()
  except FileNotFoundError:
    raise ExportedArtifactError(f"{path}: missing") from None
  if hashlib.sha256(data).hexdigest() != entry["sha256"]:
    raise ExportedArtifactError(f"{path}: sha256 differs from the manifest's (damaged or changed since export)")
  return data


def deserialize_program(directory: str, name: str, manifest: Mapping[str, Any]) -> jax_export.Exported:
  """One program of the artifact, its bytes verified and its platforms the manifest's."""
  data = verified_bytes(directory, name, manifest)
  try:
    exported = jax_export.deserialize(bytearray(data))
  except Exception as e:  # pylint: disable=broad-exception-caught
    raise ExportedArtifactError(f"{os.path.join(directory, name)}: not a serialized jax.export program ({e})") from e
  if sorted(exported.platforms) != sorted(manifest["platforms"]):
    raise ExportedArtifactError(
      f"{os.path.join(directory, name)}: exported for {', '.join(exported.platforms)}, "
      f"the manifest says {', '.join(manifest['platforms'])}"
    )
  return exported


def read_weights(directory: str, manifest: Mapping[str, Any]) -> dict:
  from safetensors import SafetensorError
  from safetensors.numpy import load

  name = manifest["weights"]
  data = verified_bytes(directory, name, manifest)
  try:
    return unflatten_tree(load(data))
  except (SafetensorError, ValueError) as e:
    raise ExportedArtifactError(f"{os.path.join(directory, name)}: unreadable weights ({e})") from e


def _check_weights_fit(weights, exported: jax_export.Exported, path: str) -> None:
  """Refuses weights whose tree or shapes are not the program's parameter input."""
  params_tree = exported.in_tree.children()[0].children()[0]
  leaves, tree = jax.tree_util.tree_flatten(weights)
  if tree != params_tree:
    raise ExportedArtifactError(f"{path}: the weights' tree is not the one {exported.fun_name} was exported with")
  for leaf, aval in zip(leaves, exported.in_avals):
    if tuple(leaf.shape) != tuple(aval.shape) or leaf.dtype != aval.dtype:
      raise ExportedArtifactError(f"{path}: a weight of {leaf.dtype}{list(leaf.shape)} where {aval} is expected")


class ExportedEmbedders:
  """The loaded artifact: `embed_images` and `embed_text` on one device, numpy in and numpy out.

  Attributes: ``directory``, ``manifest``, ``platform``, ``device``, ``proj_dim``.
  """

  def __init__(self, directory: str, manifest: dict, platform: str, device: jax.Device, programs: dict, weights):
    self.directory, self.manifest, self.platform, self.device = directory, manifest, platform, device
    self.proj_dim = int(manifest["proj_dim"])
    self._weights = jax.device_put(weights, device)
    # One jitted wrapper per program: a batch size seen before reuses its compiled executable.
    self._calls = {name: jax.jit(program.call) for name, program in programs.items()}
    self._tokenizer = None

  def _run(self, name: str, *inputs: np.ndarray) -> np.ndarray:
    if len(inputs[0]) == 0:
      return np.zeros((0, self.proj_dim), np.float32)
    placed = [jax.device_put(x, self.device) for x in inputs]
    return np.asarray(self._calls[name](self._weights, *placed))

  def embed_images(self, images, view_valid=None) -> np.ndarray:
    """float32 [B, P] unit rows of uint8 images [B, V, H, W] (V, H, W as the manifest's); view_valid bool [B, V]."""
    image = self.manifest["image"]
    per_study = image["inputs"][0]["shape"][1:]
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 4 or list(images.shape[1:]) != per_study:
      raise ValueError(
        f"images: expected uint8 [B, {', '.join(map(str, per_study))}] (views {', '.join(image['views'])}), "
        f"got {images.dtype} {list(images.shape)}"
      )
    valid = np.ones(images.shape[:2], bool) if view_valid is None else np.asarray(view_valid, bool)
    if valid.shape != images.shape[:2]:
      raise ValueError(f"view_valid: expected bool {list(images.shape[:2])}, got {list(valid.shape)}")
    return self._run("image", images, valid)

  def embed_text(self, input_ids, attention_mask) -> np.ndarray:
    """float32 [B, P] unit rows of token ids and mask [B, L]; L is cut or padded to the manifest's max_len."""
    from clinvla_jax.data.records import fit_token_length

    ids, mask = np.asarray(input_ids), np.asarray(attention_mask)
    if ids.ndim != 2 or ids.shape != mask.shape or not np.issubdtype(ids.dtype, np.integer):
      raise ValueError(
        f"input_ids, attention_mask: expected integer [B, L] each, got {ids.dtype} {list(ids.shape)} "
        f"and {list(mask.shape)}"
      )
    text = self.manifest["text"]
    ids, mask = fit_token_length(ids, mask, text["max_len"])
    pad = ((0, 0), (0, text["max_len"] - ids.shape[1]))
    ids, mask = np.pad(ids, pad, constant_values=text["pad_id"]), np.pad(mask, pad)
    return self._run("text", ids.astype(np.int32), mask.astype(np.int32))

  def tokenizer(self):
    """A `clinvla_jax.Tokenizer` on the artifact's vocabulary, length and casing (built once)."""
    if self._tokenizer is None:
      from clinvla_jax.data.tokenizer import Tokenizer

      text = self.manifest["text"]
      vocab = os.path.join(self.directory, text["vocab"])
      verified_bytes(self.directory, text["vocab"], self.manifest)
      self._tokenizer = Tokenizer(vocab, max_len=text["max_len"], lowercase=text["lowercase"])
    return self._tokenizer

  def tokenize(self, texts: Sequence[str] | str) -> dict[str, np.ndarray]:
    """{"input_ids", "attention_mask"}: int32 [N, max_len], for `embed_text`."""
    return self.tokenizer()(texts)


def load_exported(directory: str | os.PathLike, platform: Optional[str] = None) -> ExportedEmbedders:
  """The artifact in ``directory`` (from `export_embedders` or ``--mode=export``), ready to embed.

  ``platform``: a jax.export platform name ("cpu", "cuda", "rocm", "tpu") to run on; default this machine's.
  Every file is checked against the manifest's sha256 before use.  Raises `ExportedArtifactError` for a
  damaged or incomplete folder, another format version, or a platform the artifact was not exported for.
  """
  directory = os.path.abspath(os.fspath(directory))
  manifest = read_manifest(directory)
  platform = resolve_platform(manifest, platform, directory)
  device = platform_device(platform, directory)
  programs = {
    "image": deserialize_program(directory, manifest["image"]["file"], manifest),
    "text": deserialize_program(directory, manifest["text"]["file"], manifest),
  }
  weights = read_weights(directory, manifest)
  for program in programs.values():
    _check_weights_fit(weights, program, os.path.join(directory, manifest["weights"]))
  return ExportedEmbedders(directory, manifest, platform, device, programs, weights)


# --- lowering for accelerators, without one ------------------------------------------------------------------


def target_config(config, platform: str):
  """A copy of ``config`` as ``platform`` would build it: "auto" precision and gradient barrier resolved for that
  platform's backend instead of this machine's, and the "xla" attention path."""
  from clinvla_jax.model import layers

  backend = _BACKENDS[platform]
  out = config.copy_and_resolve_references()
  model = out.model
  with out.unlocked():
    for node in (model, model.image, model.text):
      if node.get("precision") == "auto":
        node.precision = layers.auto_precision_name(backend)
    if model.get("residual_grad_barrier") == "auto":
      model.residual_grad_barrier = "on" if layers.grad_barrier_enabled("auto", backend) else "off"
    model.image.attention_impl = model.text.attention_impl = "xla"
  return out


def abstract_train_step(config):
  """(the jitted train step, its abstract (state, frozen, batch)): shapes only, no weights initialised."""
  from clinvla_jax import api, optim, train
  from clinvla_jax.data.records import num_kept_patches

  mcfg = api.model_config(config)
  rules = list(config.optim.param_groups)
  trainable, frozen = optim.split_params(api.abstract_params(config, boxed=False)["params"], rules)
  tx, schedules = optim.make_optimizer(config.optim, trainable, rules, int(config.train.num_steps))
  state = {
    "step": jax.ShapeDtypeStruct((), jnp.int32),
    "params": trainable,
    "opt_state": jax.eval_shape(tx.init, trainable),
  }
  batch, kept, length = (
    int(config.optim.batch_size),
    num_kept_patches(config.data.mask_ratio, mcfg.image.num_patches),
    mcfg.text.max_len,
  )
  spec = jax.ShapeDtypeStruct
  inputs = {
    "patches": spec((batch, RECORD_VIEWS, kept, mcfg.image.patch_size**2), jnp.uint8),
    "patch_idx": spec((batch, RECORD_VIEWS, kept), jnp.int32),
    "view_valid": spec((batch, RECORD_VIEWS), jnp.bool_),
    "input_ids": spec((batch, length), jnp.int32),
    "attention_mask": spec((batch, length), jnp.int32),
  }
  step = train.make_train_step(config, api.build_model(config), tx, schedules)
  return jax.jit(step), (state, frozen, inputs)


def lower_for_platforms(config, platforms: Sequence[str] | str) -> dict[str, jax_export.Exported]:
  """Lowers the train step and both embedders of ``config`` for ``platforms`` from abstract shapes.

  Runs on any machine: a lowering that fails only on an accelerator (a primitive or kernel it has no rule for)
  fails here, without one.  Platforms whose builds of the config agree are lowered together.  Returns
  {"train_step/<platforms>": Exported, "embed_images/<platforms>", "embed_text/<platforms>"}.
  """
  from clinvla_jax import api

  groups: dict[str, list] = {}
  for platform in check_platforms(platforms):
    target = target_config(config, platform)
    groups.setdefault(repr(api.model_config(target)), [target, []])[1].append(platform)
  out = {}
  for target, group in groups.values():
    tag = ",".join(group)
    step, args = abstract_train_step(target)
    out[f"train_step/{tag}"] = jax_export.export(step, platforms=group)(*args)
    mcfg, view_slots = embedding_model_config(target), export_view_slots(target)
    exported = export_functions(mcfg, view_slots, api.abstract_params(target, boxed=False), group)
    out[f"embed_images/{tag}"], out[f"embed_text/{tag}"] = exported["image"], exported["text"]
  return out
