"""Runs the model over evaluation data: global image and report embeddings.

Everything downstream (``evaluate/__init__.py``) works on the arrays made
here, so the model runs once per dataset:

  emb = embed_dataset(config, variables, "path/to/converted", split="val")
  emb.image, emb.text          # float [N, P], unit rows
  emb.labels, emb.ids          # [N, C] labels (NaN: not mentioned), study ids
  emb.frontal_image(i)         # uint8 [224, 224] of row i, for figures
  text_fn = make_text_embed_fn(config, variables, tokenizer)
  text_fn(["There is pneumonia"])  # float [1, P]

The model runs through one `clinvla_jax.predict.PredictFn`: by default on the
training mesh of ``config.mesh`` with the config's logical rules (an FSDP or
tensor-sharded model stays sharded), or on a given ``mesh`` (a 1-D
`predict.data_mesh` replicates the variables), or a given ``predict_fn`` (training
hands its own, ``TrainSetup.predict_fn``).  Each batch is split over the batch
axes, so the global batch is rounded up to a multiple of the mesh size.  The loader
pads the last batch; padding rows (``example_valid`` False) are dropped after
the forward pass.  Rows never interact inside the encoders, so the padding
does not change the embeddings of real rows.  Reports run at the length they
need (``config.eval.text_buckets``, `clinvla_jax.predict`), which gives the
full-length embeddings.

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
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Optional

from absl import logging
import jax
from jax.sharding import Mesh
import numpy as np

from clinvla_jax import api
from clinvla_jax import perf
from clinvla_jax import predict as predict_lib
from clinvla_jax.convert import common as convert_common
from clinvla_jax.data import pipeline
from clinvla_jax.data import records
from clinvla_jax.data import source as source_lib
from clinvla_jax.data import tokenizer as tokenizer_lib
from clinvla_jax.evaluate import options as options_lib
from clinvla_jax.evaluate.scoring import EmbeddingSet
from clinvla_jax.predict import PredictFn, gather_host

VIEW_MODES = ("frontal", "all")
FRONTAL_SLOT = 0

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
  views = eval_setting(config, "views")
  if views not in VIEW_MODES:
    raise ValueError(f"config.eval.views must be one of {VIEW_MODES}, got {views!r}")
  return (FRONTAL_SLOT,) if views == "frontal" else None


def eval_setting(config, key: str) -> Any:
  """``config.eval.<key>`` (how studies are embedded: batch_size, views), else its default (`EMBEDDING_DEFAULTS`)."""
  sub = config.get("eval") if hasattr(config, "get") else None
  if sub is not None and key in sub:
    return sub[key]
  return options_lib.EMBEDDING_DEFAULTS[key]


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
# The prediction function (clinvla_jax/predict.py).
# ---------------------------------------------------------------------------


def eval_mesh(config, mesh: Optional[Mesh] = None) -> Mesh:
  """The mesh evaluation runs on: ``mesh``, else the training mesh of ``config.mesh``.

  On the training mesh the variables keep the training's FSDP / tensor
  shardings (the config's logical rules), so a sharded model is never
  gathered onto every device to be evaluated.
  """
  return predict_lib.config_mesh(config, mesh)


def resolve_predict_fn(config, mesh: Optional[Mesh], predict_fn: Optional[PredictFn]) -> PredictFn:
  if predict_fn is not None:
    if mesh is not None and mesh != predict_fn.mesh:
      raise ValueError("give a mesh or a predict_fn, not both")
    return predict_fn
  return PredictFn.from_config(config, mesh)


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
  predict_fn: Optional[PredictFn] = None,
  placed=None,
  times: Optional[perf.StageTimes] = None,
) -> Iterator[dict[str, np.ndarray]]:
  """Per batch: {"image", "text", "labels", "record_index"} of the real rows.

  The streaming form of `embed_dataset`, for sets too large to keep whole.
  ``placed``: variables already put in place by ``predict_fn.place`` (then
  ``variables`` is not read).  ``times``: adds the seconds of the stages
  "decode" (the loader: read, decode, batch), "embed_image" and "embed_text"
  (`PredictFn.__call__`).
  """
  predict = resolve_predict_fn(config, mesh, predict_fn)
  slots = eval_view_slots(config, view_slots)
  paths = resolve_paths(data, split)
  global_batch = predict.padded_batch_size(batch_size or eval_setting(config, "batch_size"))
  # The loader reads only the slots the encoder uses (frontal-only evaluation
  # skips three quarters of the pixels).
  loader = pipeline.make_eval_loader(list(paths), global_batch_size=global_batch, view_slots=slots)
  placed = predict.place(variables) if placed is None else placed
  times = times or perf.NO_TIMES
  batches = iter(loader)
  while True:
    with times.stage("decode"):
      batch = next(batches, None)
    if batch is None:
      return
    rows = predict(placed, batch, view_slots=slots, with_text=with_text, times=times)
    keep = gather_host(batch["example_valid"]).astype(bool)
    rows = {k: v[keep] for k, v in rows.items()}
    rows["labels"] = gather_host(batch["labels"])[keep]
    rows["record_index"] = gather_host(batch["record_index"])[keep]
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


def read_image_ids(paths: Sequence[str], record_index: np.ndarray, slot: int = FRONTAL_SLOT) -> list[str]:
  """The source image id of view ``slot`` (default the current frontal) of the given records."""
  src = source_lib.ArrayRecordSource(list(paths))
  with src:
    return [records.decode_record(src[int(i)], with_images=False)["image_ids"][slot] for i in record_index]


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
  predict_fn: Optional[PredictFn] = None,
  placed=None,
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
    mesh: the mesh to embed on; default the training mesh of ``config.mesh``
      (`eval_mesh`).
    with_text: also embed the reports.
    predict_fn: the `PredictFn` to embed with (e.g. ``TrainSetup.predict_fn``);
      default one built from ``config`` and ``mesh``.
    placed: ``variables`` already placed by ``predict_fn.place``.

  Returns:
    `DatasetEmbeddings` with rows in record order.
  """
  paths = resolve_paths(data, split)
  parts = list(
    iterate_embeddings(
      config,
      variables,
      list(paths),
      batch_size=batch_size,
      view_slots=view_slots,
      mesh=mesh,
      with_text=with_text,
      predict_fn=predict_fn,
      placed=placed,
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
  """The tokenizer matching the text tower: vocab from ``config.init`` (`config_vocab_path`).

  Length ``model.text.max_len``; raises when the vocabulary has more ids
  than the tower's word table has rows.
  """
  text = api.model_config(config).text
  tokenizer = tokenizer_lib.Tokenizer(config_vocab_path(config), max_len=text.max_len)
  check_vocab_fits(tokenizer.vocab_size, text.vocab_size, tokenizer.vocab_path)
  return tokenizer


def config_vocab_path(config) -> Optional[str]:
  """``init.vocab`` if set, else ``vocab.txt`` beside ``init.text_weights``, else None (the bundled vocabulary)."""
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
  return vocab or None


def check_vocab_fits(tokenizer_vocab: int, table_rows: int, source: str) -> None:
  """Raises when ``source``'s token ids can pass the text tower's word table.

  An id past the table reads no row (a gather out of range gives NaN), so
  every embedding of such a text would be NaN rather than an error.
  """
  if tokenizer_vocab > table_rows:
    raise ValueError(
      f"{source}: {tokenizer_vocab} tokens, but model.text.vocab_size = {table_rows}; the word table must hold "
      "every id the vocabulary gives. Point init.text_weights (or init.vocab) at the weights' own vocab.txt, or "
      f"set --config.model.text.vocab_size={tokenizer_vocab} for a randomly initialised text tower."
    )


def make_text_embed_fn(
  config,
  variables,
  tokenizer=None,
  *,
  batch_size: Optional[int] = None,
  mesh: Optional[Mesh] = None,
  predict_fn: Optional[PredictFn] = None,
  placed=None,
) -> Callable[[Sequence[str]], np.ndarray]:
  """list[str] -> float [N, P] global text embeddings, batched and sharded.

  Every call runs fixed-size batches (the last one padded by repeating its
  final row), so prompts of any count reuse one compiled function.
  """
  predict = resolve_predict_fn(config, mesh, predict_fn)
  tokenizer = tokenizer or tokenizer_from_config(config)
  size = predict.padded_batch_size(batch_size or eval_setting(config, "batch_size"))
  placed = predict.place(variables) if placed is None else placed

  def embed(texts: Sequence[str]) -> np.ndarray:
    texts = list(texts)
    if not texts:
      return np.zeros((0, predict.proj_dim), np.float32)
    tokens = tokenizer(texts)
    ids, mask = tokens["input_ids"], tokens["attention_mask"]
    out = []
    for start in range(0, len(texts), size):
      n = min(size, len(texts) - start)
      pad = ((0, size - n), (0, 0))
      b_ids = np.pad(ids[start : start + n], pad, mode="edge")
      b_mask = np.pad(mask[start : start + n], pad, mode="edge")
      # Every process embeds the same prompts: its local rows are its share.
      share = size // jax.process_count()
      lo = jax.process_index() * share
      out.append(predict.texts(placed, b_ids[lo : lo + share], b_mask[lo : lo + share])[:n])
    return np.concatenate(out, axis=0)

  return embed
