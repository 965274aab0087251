"""Evaluators by name: ``config.evals.<name>`` -> an evaluator of the named ``type``.

  evaluators = build_evaluators(config)          # {name: Evaluator}, in config order
  result = evaluators["covid_cxr"].run(context)  # EvaluatorResult: scores, notes

Each type (`EVALUATOR_TYPES`) embeds its data through the run's one
`clinvla_jax.predict.PredictFn` and scores the embeddings with its type's
numpy-level scorer (`clinvla_jax.evaluate.scoring.EVALUATORS`).  Scores are keyed
"<name>/<task>/<metric>"; the options and their defaults are in
`clinvla_jax.evaluate.options`.  An evaluator whose ``path`` is empty is not
built, so a config can list the protocols and a run enables one by giving
its path (``--config.evals.rsna.path=DIR``).  The chexpert_5x200 and rsna
types also take the published list their papers score on
(``--config.evals.rsna.list=test_list.txt``, `ListedEvaluator`).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Sequence
from typing import Any, Optional

from absl import logging
import numpy as np

from clinvla_jax import api
from clinvla_jax.data import source as source_lib
from clinvla_jax.evaluate import embed as embed_lib
from clinvla_jax.evaluate import labels as labels_lib
from clinvla_jax.evaluate import lists as lists_lib
from clinvla_jax.evaluate import options as options_lib
from clinvla_jax.evaluate import report
from clinvla_jax.evaluate import retrieval
from clinvla_jax.evaluate import scoring
from clinvla_jax.evaluate import zeroshot
from clinvla_jax.evaluate.scoring import EmbeddingSet
from clinvla_jax.predict import PredictFn

TextEmbedFn = Callable[[Sequence[str]], np.ndarray]


# What ``config.eval`` still holds: how studies are embedded, for every evaluator and --mode=embed.
EVAL_KEYS = tuple(options_lib.EMBEDDING_DEFAULTS)


def texts_or_none(emb: embed_lib.DatasetEmbeddings) -> Optional[np.ndarray]:
  """The report embeddings, or None for a set without report text.

  Sets without report text (CheXpert, RSNA) still come with an embedding of
  the empty string; it must not enter text retrieval.
  """
  if emb.text is None or not any(t.strip() for t in emb.texts):
    return None
  return emb.text


# ---------------------------------------------------------------------------
# Evaluators.
# ---------------------------------------------------------------------------


@dataclasses.dataclass
class EvalContext:
  """What every evaluator of one evaluation shares: the model, placed once, and the prompt embedder."""

  config: Any
  predict: PredictFn
  placed: Any
  text_fn: TextEmbedFn

  def embed(self, path: str, split: str, **kwargs) -> embed_lib.DatasetEmbeddings:
    return embed_lib.embed_dataset(
      self.config, None, path, split=split or None, predict_fn=self.predict, placed=self.placed, **kwargs
    )


@dataclasses.dataclass
class EvaluatorResult:
  """Scores keyed "<name>/<task>/<metric>", notes for results.md, and the set the figure may show.

  ``set_info`` says which images were scored, keyed "<name>/<field>" (e.g.
  "rsna/list_sha256"): strings and counts that go to results.json and
  results.md beside the scores, but are not scores.
  """

  scores: dict[str, float]
  notes: list[str] = dataclasses.field(default_factory=list)
  figure_set: Optional[embed_lib.DatasetEmbeddings] = None
  set_info: dict[str, Any] = dataclasses.field(default_factory=dict)


class Evaluator:
  """One named evaluator; subclasses say what to embed and how to score it."""

  type_name: str = ""

  def __init__(self, name: str, options: options_lib.EvaluatorOptions):
    self.name = name
    self.options = options

  @property
  def every_steps(self) -> int:
    return int(self.options.every_steps)

  def due(self, step: int) -> bool:
    """Whether training evaluates it at ``step``."""
    return self.every_steps > 0 and step % self.every_steps == 0

  def scoring_config(self) -> dict[str, Any]:
    """The options as the flat overrides of `run_evaluators`."""
    return dataclasses.asdict(self.options)

  def score(self, inputs: Any, text_fn: TextEmbedFn, **overrides) -> dict[str, float]:
    """This type's numpy-level scorer (`scoring.EVALUATORS`), keys under this evaluator's name."""
    scores = scoring.EVALUATORS[self.type_name](inputs, text_fn, {**self.scoring_config(), **overrides})
    return {f"{self.name}/{k}": v for k, v in scores.items()}

  def inputs(self, context: EvalContext) -> Any:
    raise NotImplementedError

  def run(self, context: EvalContext) -> EvaluatorResult:
    return EvaluatorResult(self.score(self.inputs(context), context.text_fn))


class RetrievalEvaluator(Evaluator):
  """Generic retrieval in every direction the set allows, plus zero-shot over its label names."""

  type_name = "retrieval"

  def run(self, context: EvalContext) -> EvaluatorResult:
    opts = self.options
    emb = context.embed(opts.path, opts.split)
    views = embed_lib.eval_setting(context.config, "views")
    notes = [f"{self.name}: {len(emb)} studies ({opts.split or 'all shards'}), views: {views}."]
    ks, skipped = retrieval.usable_ks(opts.retrieval_ks, len(emb))
    if skipped:
      note = f"{self.name}: P@{', P@'.join(map(str, skipped))} skipped: {len(emb)} studies leave fewer than K rankable items."
      logging.warning(note)
      notes.append(note)
    scores = {}
    generic = EmbeddingSet(image=emb.image, text=texts_or_none(emb), labels=emb.labels, ids=emb.ids, texts=emb.texts)
    if ks:
      scores.update(self.score(generic, None, retrieval_ks=ks))
    if emb.label_names:
      zero_shot = labels_lib.label_zero_shot(
        emb.image,
        emb.labels,
        emb.label_names,
        context.text_fn,
        labels_lib.load_label_prompts(opts.label_prompts or None),
        num_resamples=int(opts.bootstrap_resamples),
        seed=int(opts.bootstrap_seed),
      )
      scores.update(report.flatten_results({self.name: zero_shot}))
    else:
      notes.append(f"{self.name}: no label names in the manifest, no zero-shot.")
    shown = emb if (opts.figure and texts_or_none(emb) is not None and emb.label_names) else None
    return EvaluatorResult(scores, notes, shown)


def _rows(emb: embed_lib.DatasetEmbeddings, rows: Optional[np.ndarray]) -> embed_lib.DatasetEmbeddings:
  if rows is None:
    return emb
  take = lambda x: None if x is None else np.asarray(x)[rows]  # pylint: disable=unnecessary-lambda-assignment
  pick = lambda x: None if x is None else tuple(x[int(i)] for i in rows)  # pylint: disable=unnecessary-lambda-assignment
  return dataclasses.replace(
    emb,
    image=take(emb.image),
    text=take(emb.text),
    labels=take(emb.labels),
    ids=pick(emb.ids),
    texts=pick(emb.texts),
    record_index=take(emb.record_index),
  )


class ListedEvaluator(Evaluator):
  """A protocol that papers score on one published list (`options.PublishedListOptions`).

  With ``list`` the embedded split is cut to the list's images, in list
  order; ``set_info`` then carries the list's sha256, size and missing count.
  Without, every record of the split is scored and ``set_info`` says how the
  converter chose them.
  """

  list_kind: str = ""

  def list_labels(self, emb: embed_lib.DatasetEmbeddings) -> tuple[np.ndarray, tuple[str, ...]]:
    """[N, C] record labels and their names, as the list's labels are checked against them."""
    return np.asarray(emb.labels), tuple(emb.label_names)

  def listed(self, emb: embed_lib.DatasetEmbeddings) -> tuple[embed_lib.DatasetEmbeddings, dict[str, Any], list[str]]:
    """(the rows to score, set_info keyed "<name>/<field>", notes)."""
    opts = self.options
    where = f"{opts.path} ({opts.split or 'all shards'})"
    if not opts.list:
      manifest = source_lib.read_manifest(opts.path) if os.path.isdir(opts.path) else None
      selection = lists_lib.converter_selection(manifest, opts.split)
      notes = [f"{self.name}: {len(emb)} images of {where}, selection {selection} (the converter's), no list given."]
      if selection != lists_lib.PUBLISHED_LIST:
        notes.append(
          f"{self.name}: not scored on the published list, so its numbers do not compare with the papers'; "
          f"give config.evals.{self.name}.list=PATH."
        )
      return emb, {f"{self.name}/selection": selection}, notes
    labels, names = self.list_labels(emb)
    published = lists_lib.read_list(opts.list, self.list_kind, names or None)
    keys = [lists_lib.record_key(self.list_kind, i) for i in embed_lib.read_image_ids(emb.paths, emb.record_index)]
    chosen = lists_lib.select_listed(
      published, keys, labels, names, allow_missing=bool(opts.allow_missing), what=f"the records of {where}"
    )
    notes = [
      f"{self.name}: {len(chosen.rows)} of the {len(published)} images of the list {opts.list} "
      f"(sha256 {published.sha256}) from {where}; {chosen.unlisted} records of the split are not listed."
    ]
    if chosen.missing:
      first = ", ".join(e.name for e in chosen.missing[: lists_lib.SHOWN])
      note = (
        f"{self.name}: {len(chosen.missing)} listed images are not in {where} and were not scored (first: {first})."
      )
      logging.warning(note)
      notes.append(note)
    if not len(chosen.rows):
      raise ValueError(f"config.evals.{self.name}: none of the {len(published)} images of {opts.list} is in {where}")
    info = {f"{self.name}/{k}": v for k, v in chosen.set_info.items()}
    return _rows(emb, chosen.rows), info, notes

  def embed(self, context: EvalContext, **kwargs) -> embed_lib.DatasetEmbeddings:
    return context.embed(self.options.path, self.options.split, **kwargs)

  def inputs_of(self, emb: embed_lib.DatasetEmbeddings) -> EmbeddingSet:
    raise NotImplementedError

  def inputs(self, context: EvalContext) -> EmbeddingSet:
    return self.inputs_of(self.listed(self.embed(context))[0])

  def run(self, context: EvalContext) -> EvaluatorResult:
    emb, info, notes = self.listed(self.embed(context))
    return EvaluatorResult(self.score(self.inputs_of(emb), context.text_fn), notes, set_info=info)


class Chexpert5x200Evaluator(ListedEvaluator):
  type_name = "chexpert_5x200"
  list_kind = "chexpert"

  def inputs_of(self, emb: embed_lib.DatasetEmbeddings) -> EmbeddingSet:
    return EmbeddingSet(
      image=emb.image,
      text=texts_or_none(emb),
      ids=emb.ids,
      labels=labels_lib.class_names_of(emb.labels, emb.label_names, zeroshot.CHEXPERT_5X200_CLASSES),
    )


class Chexpert8x200Evaluator(Evaluator):
  type_name = "chexpert_8x200"

  def scoring_config(self) -> dict[str, Any]:
    return {**super().scoring_config(), "chexpert_8x200_dir": self.options.lists}

  def inputs(self, context: EvalContext) -> dict[str, EmbeddingSet]:
    if not self.options.lists:
      raise ValueError(f"config.evals.{self.name} needs lists= (the folder of the published 8x200 CSVs)")
    sets = {"candidates": context.embed(self.options.path, self.options.split, with_text=False)}
    if self.options.queries:
      sets["image_queries"] = context.embed(self.options.queries, self.options.split, with_text=False)
    return sets


class RsnaEvaluator(ListedEvaluator):
  type_name = "rsna"
  list_kind = "rsna"

  def embed(self, context: EvalContext, **kwargs) -> embed_lib.DatasetEmbeddings:
    return super().embed(context, with_text=False, **kwargs)

  @staticmethod
  def pneumonia(emb: embed_lib.DatasetEmbeddings) -> np.ndarray:
    """int [N] 0/1: the Pneumonia column (the first when the records do not name theirs)."""
    col = list(emb.label_names).index("Pneumonia") if "Pneumonia" in emb.label_names else 0
    return labels_lib.positive_labels(emb.labels)[:, col].astype(np.int64)

  def list_labels(self, emb: embed_lib.DatasetEmbeddings) -> tuple[np.ndarray, tuple[str, ...]]:
    return self.pneumonia(emb)[:, None], ("Pneumonia",)

  def inputs_of(self, emb: embed_lib.DatasetEmbeddings) -> EmbeddingSet:
    return EmbeddingSet(image=emb.image, ids=emb.ids, labels=self.pneumonia(emb))


class MsCxrTEvaluator(Evaluator):
  type_name = "ms_cxr_t"

  def inputs(self, context: EvalContext) -> dict[str, EmbeddingSet]:
    if not self.options.labels:
      raise ValueError(f"config.evals.{self.name} needs labels= (the temporal labels CSV)")
    # Temporal classification needs the prior views whatever config.eval.views says.
    slots = api.model_config(context.config).view_slots
    emb = context.embed(self.options.path, self.options.split, with_text=False, view_slots=slots)
    row = {sid: i for i, sid in enumerate(emb.ids)}
    sets = {}
    for finding, by_study in labels_lib.read_temporal_labels(self.options.labels).items():
      found = [(row[s], lab) for s, lab in by_study.items() if s in row]
      if found:
        idx, labs = zip(*sorted(found))
        sets[finding] = EmbeddingSet(image=emb.image[list(idx)], labels=np.asarray(labs))
    return sets


EVALUATOR_TYPES: dict[str, type[Evaluator]] = {
  cls.type_name: cls
  for cls in (RetrievalEvaluator, Chexpert5x200Evaluator, Chexpert8x200Evaluator, RsnaEvaluator, MsCxrTEvaluator)
}
assert set(EVALUATOR_TYPES) == set(scoring.EVALUATORS)


def check_no_legacy_keys(config) -> None:
  """Fails on a key of the former flat ``config.eval`` block, naming the form that replaced it."""
  eval_block = config.get("eval") if hasattr(config, "get") else None
  if eval_block is None:
    return
  for key in eval_block:
    if key in options_lib.LEGACY_EVAL_KEYS:
      raise ValueError(
        f"config.eval.{key} is no longer read; use {options_lib.LEGACY_EVAL_KEYS[key]} (see configs/base.py)"
      )
    if key not in EVAL_KEYS:
      raise ValueError(f"config.eval.{key} is not an evaluation setting; config.eval holds {', '.join(EVAL_KEYS)}")


def build_evaluators(config, names: Optional[Sequence[str]] = None) -> dict[str, Evaluator]:
  """{name: Evaluator} of ``config.evals`` entries that have a path, in config order.

  ``names`` restricts to those entries (each must exist and have a path).
  """
  check_no_legacy_keys(config)
  evals = config.get("evals") if hasattr(config, "get") else None
  evals = evals if evals is not None else {}
  out = {}
  for name, spec in evals.items():
    opts = options_lib.parse_options(name, spec)
    if name in options_lib.PROTOCOL_TYPES and opts.type != name:
      raise ValueError(
        f"config.evals.{name} has type {opts.type!r}: the name {name!r} is the {name} protocol's, whose keys the "
        "paper tables read; give the evaluator another name"
      )
    if not opts.path:
      continue
    out[name] = EVALUATOR_TYPES[opts.type](name, opts)
  if names is not None:
    missing = [n for n in names if n not in out]
    if missing:
      raise ValueError(f"no evaluator {', '.join(missing)} with a path in config.evals (configured: {sorted(out)})")
    out = {n: out[n] for n in names}
  return out
