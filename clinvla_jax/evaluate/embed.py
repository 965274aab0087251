"""Runs the model over evaluation data: global image and report embeddings.

Everything downstream (``evaluate/__init__.py``) works on the arrays made
here, so the model runs once per dataset:

  emb = embed_dataset(config, variables, "path/to/converted", split="val")
  emb.image, emb.text          # float [N, P], unit rows
  emb.labels, emb.ids          # [N, C] labels (NaN: not mentioned), study ids
  emb.frontal_image(i)         # uint8 [224, 224] of row i, for figures
  text_fn = make_text_embed_fn(config, variables, tokenizer)
  text_fn(["There is pneumonia"])  # float [1, P]

Both encoders are jitted over a 1-D ``"data"`` mesh (all devices by default):
the variables are replicated and each batch is split across the devices, so
the global batch is rounded up to a multiple of the device count.  The loader
pads the last batch; padding rows (``example_valid`` False) are dropped after
the forward pass.  Rows never interact inside the encoders, so the padding
does not change the embeddings of real rows.

Views (``config.eval.views``): "frontal" embeds the current frontal view only
(record slot 0, all 196 patches), the single-image setting of the published
protocols; "all" embeds every view the model is configured to use (laterals,
priors), missing views masked as in training.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, Optional

from absl import logging
import jax
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec
import numpy as np

import flax.linen as nn

from clinvla_jax import api
from clinvla_jax import sharding
from clinvla_jax.convert import common as convert_common
from clinvla_jax.data import pipeline
from clinvla_jax.data import records
from clinvla_jax.data import source as source_lib
from clinvla_jax.data import tokenizer as tokenizer_lib
from clinvla_jax.data.records import fit_token_length  # pylint: disable=unused-import  (part of this module's API)
from clinvla_jax.evaluate import EmbeddingSet
from clinvla_jax.model.clinvla import ClinVLA, ClinVLAConfig, matmul_ready_params

DATA_AXIS = "data"
VIEW_MODES = ("frontal", "all")
FRONTAL_SLOT = 0
DEFAULT_BATCH_SIZE = 32

DataLike = str | os.PathLike[str] | Sequence[str] | source_lib.ArrayRecordSource


@dataclasses.dataclass(frozen=True)
class DatasetEmbeddings(EmbeddingSet):
  """An `EmbeddingSet` that remembers where its rows came from.

  Attributes (besides `EmbeddingSet`'s, with ``ids`` the study ids and
  ``texts`` the report texts):
    record_index: int [N] index of each row's record in ``paths``.
    paths: the shard files read.
    label_names: names of the label columns, from the manifest (or empty).
  """

  record_index: Optional[np.ndarray] = None
  paths: tuple[str, ...] = ()
  label_names: tuple[str, ...] = ()

  def __len__(self) -> int:
    return 0 if self.record_index is None else len(self.record_index)

  def frontal_image(self, row: int) -> np.ndarray:
    """uint8 [224, 224] current frontal view of one row (for figures)."""
    return load_frontal_image(self.paths, int(self.record_index[row]))


# ---------------------------------------------------------------------------
# Inputs.
# ---------------------------------------------------------------------------


def split_paths(folder: str | os.PathLike[str], split: str) -> list[str]:
  """Shards of one split of a converter output folder, from manifest.json.

  Read here rather than through ``data_prep`` so that evaluation does not
  depend on the converters.
  """
  folder = os.fspath(folder)
  manifest = source_lib.read_manifest(folder)
  if manifest is None and os.path.isfile(os.path.join(folder, "dataset_info.json")):
    return source_lib.list_shards(folder, split=split)  # a TFDS builder directory
  if manifest is None:
    raise FileNotFoundError(f"{folder} has no manifest.json, so no splits")
  splits = manifest.get("splits", {})
  shards = splits.get(split, {}).get("shards", [])
  if not shards:
    raise ValueError(f"{folder}: no shards for split {split!r} (splits: {sorted(splits)})")
  return [os.path.join(folder, s) for s in shards]


def resolve_paths(data: DataLike, split: Optional[str] = None) -> tuple[str, ...]:
  """Shard files of ``data``; a folder with ``split`` reads that split only."""
  if isinstance(data, source_lib.ArrayRecordSource):
    if split:
      raise ValueError("give a folder, not a source, to select a split")
    return tuple(data.paths)
  if split and isinstance(data, (str, os.PathLike)) and os.path.isdir(data):
    return tuple(split_paths(data, split))
  return tuple(source_lib.list_shards(data))


def label_names_of(paths: Sequence[str]) -> tuple[str, ...]:
  """Label column names from the manifest beside the first shard, if any."""
  for path in paths:
    manifest = source_lib.read_manifest(os.path.dirname(path))
    if manifest and "label_names" in manifest:
      return tuple(manifest["label_names"])
    # A TFDS builder directory keeps them in metadata.json.
    metadata = os.path.join(os.path.dirname(path), "metadata.json")
    if os.path.isfile(metadata):
      with open(metadata, encoding="utf-8") as f:
        names = json.load(f).get("label_names")
      if names:
        return tuple(names)
  return ()


def eval_view_slots(config, view_slots: Optional[Sequence[int]] = None) -> Optional[tuple[int, ...]]:
  """Record view slots to embed; None means all the model is configured for.

  An explicit ``view_slots`` wins over ``config.eval.views``.
  """
  if view_slots is not None:
    return tuple(int(s) for s in view_slots)
  views = _eval_get(config, "views", "frontal")
  if views not in VIEW_MODES:
    raise ValueError(f"config.eval.views must be one of {VIEW_MODES}, got {views!r}")
  return (FRONTAL_SLOT,) if views == "frontal" else None


def _eval_get(config, key: str, default: Any) -> Any:
  sub = config.get("eval") if hasattr(config, "get") else None
  if sub is not None and key in sub:
    return sub[key]
  return default


def load_frontal_image(paths: Sequence[str], record_index: int) -> np.ndarray:
  """uint8 [224, 224] current frontal view of one record."""
  return _cached_source(tuple(paths)).frontal(record_index)


class _FrontalReader:
  """Opens a source once; decodes single records on demand."""

  def __init__(self, paths: tuple[str, ...]):
    self._source = source_lib.ArrayRecordSource(paths)

  def frontal(self, index: int) -> np.ndarray:
    rec = records.decode_record(self._source[index])
    return rec["images"][FRONTAL_SLOT]


@functools.lru_cache(maxsize=8)
def _cached_source(paths: tuple[str, ...]) -> _FrontalReader:
  return _FrontalReader(paths)


# ---------------------------------------------------------------------------
# Sharded encoders.
# ---------------------------------------------------------------------------


def data_mesh(devices: Optional[Sequence[jax.Device]] = None) -> Mesh:
  """A 1-D mesh named "data" over ``devices`` (default: all of them); the variables are replicated on it."""
  devices = list(jax.devices() if devices is None else devices)
  return Mesh(np.asarray(devices), (DATA_AXIS,))


def eval_mesh(config, mesh: Optional[Mesh] = None) -> Mesh:
  """The mesh evaluation runs on: ``mesh``, else the training mesh of ``config.mesh``.

  On the training mesh the variables keep the training's FSDP / tensor
  shardings (the config's logical rules), so a sharded model is never
  gathered onto every device to be evaluated.
  """
  if mesh is not None:
    return mesh
  if hasattr(config, "get") and config.get("mesh") is not None:
    return sharding.make_mesh(config.mesh)
  return data_mesh()


def _logical_rules(config, mesh: Mesh) -> Optional[tuple]:
  """The config's logical axis rules when ``mesh`` has the training axes, else None (replicated variables)."""
  if hasattr(config, "get") and config.get("sharding") is not None and set(sharding.MESH_AXES) <= set(mesh.axis_names):
    return sharding.logical_rules(config)
  return None


def _row_spec(mesh: Mesh) -> PartitionSpec:
  # Rows split like the training batch: over the batch axes the mesh has.
  axes = tuple(a for a in sharding.BATCH_AXES if a in mesh.axis_names) or (mesh.axis_names[0],)
  return PartitionSpec(axes if len(axes) > 1 else axes[0])


def padded_batch_size(batch_size: int, mesh: Mesh) -> int:
  """Smallest multiple of the mesh size that is >= batch_size."""
  n = mesh.size
  return max(1, -(-int(batch_size) // n)) * n


@functools.lru_cache(maxsize=None)
def _variable_shardings(mcfg: ClinVLAConfig, mesh: Mesh, rules: Optional[tuple]):
  """Shardings of {"params": ...}: the logical rules' (as in training), or replicated without rules.

  Cached: the encoders and ``place_variables`` ask for the same tree at every
  evaluation, and building it traces the model's initialisation.
  """
  if rules is None:
    return NamedSharding(mesh, PartitionSpec())
  boxed = jax.eval_shape(api.init_fn(mcfg, boxed=True), jax.random.key(0))
  return {"params": sharding.param_shardings(boxed["params"], mesh, rules)}


@functools.lru_cache(maxsize=None)
def _encoders(
  mcfg: ClinVLAConfig, view_slots: Optional[tuple[int, ...]], mesh: Mesh, rules: Optional[tuple] = None
) -> tuple[Callable[..., jax.Array], ...]:
  """(image_fn, text_fn) -> global embeddings, batch split over the mesh.

  The one prediction function of evaluation, embedding and search: variables
  sharded by ``rules`` (the training's) or replicated, rows split over the
  batch axes.  Only the global embeddings leave the functions, so XLA drops
  the local heads that evaluation does not need.
  """
  model = ClinVLA(mcfg)
  variables_sharding = _variable_shardings(mcfg, mesh, rules)
  rows = NamedSharding(mesh, _row_spec(mesh))

  def image(variables, patches, patch_idx, view_valid):
    out = model.apply(variables, patches, patch_idx, view_valid, view_slots, method=ClinVLA.encode_image)
    return out["global"]

  def text(variables, input_ids, attention_mask):
    out = model.apply(variables, input_ids, attention_mask, method=ClinVLA.encode_text)
    return out["global"]

  image_jit = jax.jit(image, in_shardings=(variables_sharding, rows, rows, rows), out_shardings=rows)
  text_jit = jax.jit(text, in_shardings=(variables_sharding, rows, rows), out_shardings=rows)
  if rules is None:
    return image_jit, text_jit

  def in_context(fn):
    # Traced under the mesh and the logical rules, so the model's activation
    # constraints shard as they do in training.
    def run(*args):
      with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        return fn(*args)

    return run

  return in_context(image_jit), in_context(text_jit)


def place_variables(variables, mesh: Mesh, mcfg: ClinVLAConfig, rules: Optional[tuple] = None):
  """Puts the variables where the encoders want them (once per evaluation).

  Sharded by ``rules`` on a training mesh, else replicated.  The kernels are
  cast to the matmul dtype of the precision policy first, once, instead of
  inside every embedding call.
  """
  return jax.device_put(matmul_ready_params(variables, mcfg), _variable_shardings(mcfg, mesh, rules))


def _global_rows(local: np.ndarray, mesh: Mesh) -> jax.Array:
  # Each process holds its own rows; this stitches them into one array
  # split over the batch axes (a plain device_put with one process).
  return jax.make_array_from_process_local_data(NamedSharding(mesh, _row_spec(mesh)), local)


def _to_host(x: jax.Array) -> np.ndarray:
  if x.is_fully_addressable:
    return np.asarray(x)
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def _gather_host(local: np.ndarray) -> np.ndarray:
  if jax.process_count() == 1:
    return np.asarray(local)
  return np.asarray(multihost_utils.process_allgather(local, tiled=True))


def _select_views(
  batch: Mapping[str, np.ndarray], view_slots: Optional[tuple[int, ...]]
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  patches, idx, valid = (batch["patches"], batch["patch_idx"], batch["view_valid"])
  if view_slots is not None:
    sel = list(view_slots)
    patches, idx, valid = patches[:, sel], idx[:, sel], valid[:, sel]
  return patches, idx, valid


# ---------------------------------------------------------------------------
# Datasets.
# ---------------------------------------------------------------------------


def iterate_embeddings(
  config,
  variables,
  data: DataLike,
  *,
  split: Optional[str] = None,
  batch_size: Optional[int] = None,
  view_slots: Optional[Sequence[int]] = None,
  mesh: Optional[Mesh] = None,
  with_text: bool = True,
) -> Iterator[dict[str, np.ndarray]]:
  """Per batch: {"image", "text", "labels", "record_index"} of the real rows.

  The streaming form of `embed_dataset`, for sets too large to keep whole.
  """
  mcfg = api.model_config(config)
  mesh = eval_mesh(config, mesh)
  rules = _logical_rules(config, mesh)
  slots = eval_view_slots(config, view_slots)
  paths = resolve_paths(data, split)
  global_batch = padded_batch_size(batch_size or _eval_get(config, "batch_size", DEFAULT_BATCH_SIZE), mesh)
  # The loader reads only the slots the encoder uses (frontal-only evaluation
  # skips three quarters of the pixels).
  loader = pipeline.make_eval_loader(list(paths), global_batch_size=global_batch, view_slots=slots)
  image_fn, text_fn = _encoders(mcfg, slots, mesh, rules)
  variables = place_variables(variables, mesh, mcfg, rules)
  for batch in loader:
    patches, idx, valid = _select_views(batch, None)
    image = image_fn(variables, _global_rows(patches, mesh), _global_rows(idx, mesh), _global_rows(valid, mesh))
    out = {"image": image}
    if with_text:
      ids, mask = fit_token_length(batch["input_ids"], batch["attention_mask"], mcfg.text.max_len)
      out["text"] = text_fn(variables, _global_rows(ids, mesh), _global_rows(mask, mesh))
    keep = _gather_host(batch["example_valid"]).astype(bool)
    rows = {k: _to_host(v)[keep] for k, v in out.items()}
    rows["labels"] = _gather_host(batch["labels"])[keep]
    rows["record_index"] = _gather_host(batch["record_index"])[keep]
    yield rows


def read_study_info(paths: Sequence[str], record_index: np.ndarray) -> tuple[list[str], list[str]]:
  """(study ids, report texts) of the given records, without their images."""
  src = source_lib.ArrayRecordSource(list(paths))
  ids, texts = [], []
  with src:
    for i in record_index:
      rec = records.decode_record(src[int(i)], with_images=False)
      ids.append(rec["study_id"])
      texts.append(rec["text"])
  return ids, texts


def embed_dataset(
  config,
  variables,
  data: DataLike,
  *,
  split: Optional[str] = None,
  batch_size: Optional[int] = None,
  view_slots: Optional[Sequence[int]] = None,
  mesh: Optional[Mesh] = None,
  with_text: bool = True,
) -> DatasetEmbeddings:
  """Embeds every study of a converted dataset.

  Args:
    config: full config (``model`` and optionally ``eval``).
    variables: {"params": ...} of the model.
    data: converter output folder, shard files / globs, or a source.
    split: with a folder, the split to read (e.g. "val"); None reads every
      shard of ``data``.
    batch_size: global batch; default ``config.eval.batch_size``; rounded up
      to a multiple of the mesh size.
    view_slots: record view slots to embed; default from
      ``config.eval.views`` (see module docstring).
    mesh: 1-D "data" mesh; default every device.
    with_text: also embed the reports.

  Returns:
    `DatasetEmbeddings` with rows in record order.
  """
  paths = resolve_paths(data, split)
  parts = list(
    iterate_embeddings(
      config, variables, list(paths), batch_size=batch_size, view_slots=view_slots, mesh=mesh, with_text=with_text
    )
  )
  if not parts:
    raise ValueError(f"no decodable studies in {list(paths)}")

  def cat(key):
    return np.concatenate([p[key] for p in parts], axis=0)

  record_index = cat("record_index")
  ids, texts = read_study_info(paths, record_index)
  logging.info("Embedded %d studies from %d shard(s)", len(ids), len(paths))
  return DatasetEmbeddings(
    image=cat("image"),
    text=cat("text") if with_text else None,
    labels=cat("labels"),
    ids=tuple(ids),
    texts=tuple(texts),
    record_index=record_index,
    paths=tuple(paths),
    label_names=label_names_of(paths),
  )


# ---------------------------------------------------------------------------
# Free text (prompts, text queries).
# ---------------------------------------------------------------------------


def tokenizer_from_config(config) -> tokenizer_lib.Tokenizer:
  """The tokenizer matching the text tower: vocab from ``config.init``.

  ``init.vocab`` if set, else ``vocab.txt`` beside ``init.text_weights``,
  else the bundled vocabulary; length ``model.text.max_len``.
  """
  init = config.get("init") if hasattr(config, "get") else None
  vocab = (init.get("vocab") if init is not None else "") or ""
  weights = (init.get("text_weights") if init is not None else "") or ""
  if vocab:
    vocab = convert_common.resolve_path(vocab)
  if not vocab and weights:
    weights = convert_common.resolve_path(weights)
    folder = weights if os.path.isdir(weights) else os.path.dirname(weights)
    candidate = os.path.join(folder, "vocab.txt")
    vocab = candidate if os.path.isfile(candidate) else ""
  return tokenizer_lib.Tokenizer(vocab or None, max_len=api.model_config(config).text.max_len)


def make_text_embed_fn(
  config, variables, tokenizer=None, *, batch_size: Optional[int] = None, mesh: Optional[Mesh] = None
) -> Callable[[Sequence[str]], np.ndarray]:
  """list[str] -> float [N, P] global text embeddings, batched and sharded.

  Every call runs fixed-size batches (the last one padded by repeating its
  final row), so prompts of any count reuse one compiled function.
  """
  mcfg = api.model_config(config)
  mesh = eval_mesh(config, mesh)
  rules = _logical_rules(config, mesh)
  tokenizer = tokenizer or tokenizer_from_config(config)
  size = padded_batch_size(batch_size or _eval_get(config, "batch_size", DEFAULT_BATCH_SIZE), mesh)
  _, text_fn = _encoders(mcfg, eval_view_slots(config), mesh, rules)
  placed = place_variables(variables, mesh, mcfg, rules)

  def embed(texts: Sequence[str]) -> np.ndarray:
    texts = list(texts)
    if not texts:
      return np.zeros((0, mcfg.proj_dim), np.float32)
    tokens = tokenizer(texts)
    ids, mask = fit_token_length(tokens["input_ids"], tokens["attention_mask"], mcfg.text.max_len)
    out = []
    for start in range(0, len(texts), size):
      n = min(size, len(texts) - start)
      pad = ((0, size - n), (0, 0))
      b_ids = np.pad(ids[start : start + n], pad, mode="edge")
      b_mask = np.pad(mask[start : start + n], pad, mode="edge")
      # Every process embeds the same prompts: its local rows are its share.
      share = size // jax.process_count()
      lo = jax.process_index() * share
      emb = text_fn(placed, _global_rows(b_ids[lo : lo + share], mesh), _global_rows(b_mask[lo : lo + share], mesh))
      out.append(_to_host(emb)[:n])
    return np.concatenate(out, axis=0)

  return embed
