"""The options of each evaluator type, with their defaults: the one place they are written.

A config names its evaluators in ``config.evals``, each built from these:

  config.evals.covid_cxr = options.evaluator_options(
      "retrieval", path="clinvla_jax/assets/demo/covid_cxr", split="val", every_steps=100)
  config.evals.rsna = options.evaluator_options("rsna", path="/data/rsna_converted")

`evaluator_options` returns a ConfigDict holding every option of the type, so
any of them can be set on the command line
(``--config.evals.rsna.split=val``).  ``configs/base.py`` lists the published
protocols this way with empty paths (an empty path skips an evaluator), and
`clinvla_jax.evaluate.DEFAULT_CONFIG` (the defaults of the numpy-level
`run_evaluators`) is read from the same dataclasses.

This module imports no JAX, so config files can use it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, Optional

from clinvla_jax.evaluate import retrieval


@dataclasses.dataclass(frozen=True)
class EvaluatorOptions:
  """Options every evaluator has.

  Attributes:
    type: the evaluator type (a key of `OPTIONS_BY_TYPE`).
    path: the converted dataset folder (shards + manifest.json, or a TFDS
      builder directory); empty: the evaluator is skipped.
    split: the split to read; empty: every shard of ``path``.
    every_steps: during training, run every N steps; 0: never during
      training (``--mode=eval`` runs every evaluator with a path).
    bootstrap_resamples: percentile-bootstrap resamples of every interval
      over queries; 0: no interval keys.
    bootstrap_seed: seed of those resamples.
  """

  type: str = ""
  path: str = ""
  split: str = ""
  every_steps: int = 0
  bootstrap_resamples: int = retrieval.BOOTSTRAP_RESAMPLES
  bootstrap_seed: int = retrieval.BOOTSTRAP_SEED


@dataclasses.dataclass(frozen=True)
class RetrievalOptions(EvaluatorOptions):
  """Any converted set with named labels: image<->text and image->image P@K (a shared positive
  label is relevant), R@K of paired image<->report directions, and label zero-shot.

  Attributes:
    retrieval_ks: P@K cut-offs; K not below the set size is skipped and noted.
    recall_ks: R@K cut-offs of the paired directions.
    label_prompts: prompt file of the label zero-shot; empty: the bundled
      assets/prompts/label_prompts.json.
    figure: write retrieval_examples.png (the first retrieval evaluator with
      report texts does).
  """

  type: str = "retrieval"
  split: str = "val"
  retrieval_ks: tuple[int, ...] = (5, 10, 50)
  recall_ks: tuple[int, ...] = retrieval.RECALL_KS
  label_prompts: str = ""
  figure: bool = True


@dataclasses.dataclass(frozen=True)
class PublishedListOptions(EvaluatorOptions):
  """Options of the protocols that papers score on one published image list.

  Attributes:
    list: the published list file; the evaluator then scores exactly its
      images found in ``split``, in list order, after checking their labels
      against the records (`clinvla_jax.evaluate.lists`), and results.json
      carries "<name>/list_sha256" and "<name>/list_size".  Empty: every
      record of ``split``, as the converter chose them ("<name>/selection"
      says how, from the manifest); only numbers on the published list
      compare with the papers'.
    allow_missing: list images missing from the converted split are scored
      without and counted in "<name>/list_missing" instead of failing.
  """

  list: str = ""
  allow_missing: bool = False


@dataclasses.dataclass(frozen=True)
class Chexpert5x200Options(PublishedListOptions):
  """CheXpert 5x200 (protocols.md 5): image->text P@K and 5-class zero-shot.

  The papers' numbers are on GLoRIA's published list of 1,000 images
  (``list=chexpert_5x200.csv``; convert it with ``data_prep.chexpert
  --mode=5x200 --list_csv=chexpert_5x200.csv``).  ``--mode=5x200`` without
  ``--list_csv`` draws a set by the seeded 5x200 rule ("<name>/selection" =
  "seeded_rule"), whose numbers do not compare with the papers'.

  Attributes:
    path: converted folder (``data_prep.chexpert --mode=5x200``).
    chexpert_5x200_ks: P@K cut-offs of image->text retrieval.
    zero_shot_max_prompts: prompts per class; 0: every GLoRIA combination.
    zero_shot_seed: seed of the prompt subsample.
  """

  type: str = "chexpert_5x200"
  split: str = "5x200"
  chexpert_5x200_ks: tuple[int, ...] = retrieval.CHEXPERT_5X200_KS
  zero_shot_max_prompts: int = 0
  zero_shot_seed: int = 0


@dataclasses.dataclass(frozen=True)
class Chexpert8x200Options(EvaluatorOptions):
  """CheXpert 8x200 (protocols.md 5): image->image and text->image P@K on the published lists.

  Attributes:
    path: converted candidate list (``data_prep.chexpert --mode=list``).
    queries: converted image query list; empty: text->image only.
    lists: folder of the published image-retrieval/ and text-retrieval/ CSVs.
    chexpert_8x200_ks: P@K cut-offs.
  """

  type: str = "chexpert_8x200"
  queries: str = ""
  lists: str = ""
  chexpert_8x200_ks: tuple[int, ...] = retrieval.CHEXPERT_8X200_KS


@dataclasses.dataclass(frozen=True)
class RsnaOptions(PublishedListOptions):
  """RSNA Pneumonia zero-shot (protocols.md 5): AUC, ACC and F1 with their baselines.

  The papers' numbers are on ALTA's 3,000-image test list (``list=test_list.txt``,
  lines ``<folder>/<patientId>.dcm <label>``, matched by patientId; convert
  with ``data_prep.rsna_pneumonia --test_list=test_list.txt``).

  Attributes:
    path: converted RSNA Pneumonia folder.
    rsna_prompt_set: prompt set of assets/prompts.
    rsna_logit_scale: 1.0: raw cosines, as the protocol says.
    rsna_folds, rsna_seed: folds and seed of the threshold selection.
  """

  type: str = "rsna"
  split: str = "test"
  rsna_prompt_set: str = "alta_rsna"
  rsna_logit_scale: float = 1.0
  rsna_folds: int = 10
  rsna_seed: int = 0


@dataclasses.dataclass(frozen=True)
class MsCxrTOptions(EvaluatorOptions):
  """MS-CXR-T temporal classification (protocols.md 5): a cross-validated linear probe per finding.

  The studies are embedded with every view the model uses (the priors),
  whatever ``config.eval.views`` says.

  Attributes:
    path: converted MIMIC-CXR studies with priors.
    labels: CSV of study_id and one column per finding, named as in Table 5.
    linear_probe_folds, linear_probe_seed, linear_probe_l2: the probe's
      cross-validation and ridge penalty.
  """

  type: str = "ms_cxr_t"
  split: str = "test"
  labels: str = ""
  linear_probe_folds: int = 5
  linear_probe_seed: int = 0
  linear_probe_l2: float = 1e-3


OPTIONS_BY_TYPE: dict[str, type[EvaluatorOptions]] = {
  "retrieval": RetrievalOptions,
  "chexpert_5x200": Chexpert5x200Options,
  "chexpert_8x200": Chexpert8x200Options,
  "rsna": RsnaOptions,
  "ms_cxr_t": MsCxrTOptions,
}
# Evaluator types whose results the paper's tables read under their own name.
PROTOCOL_TYPES = ("chexpert_5x200", "chexpert_8x200", "rsna", "ms_cxr_t")
# Options that say where data is and when to run, rather than how to score.
_PLACEMENT = (
  "type",
  "path",
  "split",
  "every_steps",
  "queries",
  "lists",
  "labels",
  "label_prompts",
  "figure",
  "list",
  "allow_missing",
)


def option_fields(type_name: str) -> dict[str, Any]:
  """{option: default} of an evaluator type."""
  cls = options_class(type_name)
  return {f.name: f.default for f in dataclasses.fields(cls)}


def options_class(type_name: str) -> type[EvaluatorOptions]:
  if type_name not in OPTIONS_BY_TYPE:
    raise ValueError(f"unknown evaluator type {type_name!r}; known types: {', '.join(OPTIONS_BY_TYPE)}")
  return OPTIONS_BY_TYPE[type_name]


def evaluator_options(type_name: str, **overrides):
  """A ConfigDict of every option of ``type_name``, defaults overridden by ``overrides``."""
  import ml_collections  # pylint: disable=g-import-not-at-top

  fields = option_fields(type_name)
  unknown = sorted(set(overrides) - set(fields))
  if unknown:
    raise ValueError(f"evaluator type {type_name!r} has no option {', '.join(unknown)}; options: {', '.join(fields)}")
  fields.update(overrides)
  return ml_collections.ConfigDict(fields)


def parse_options(name: str, spec) -> EvaluatorOptions:
  """``config.evals.<name>`` (a mapping with ``type``) -> the type's options dataclass; unknown keys fail."""
  spec = dict(spec.items()) if hasattr(spec, "items") else None
  if spec is None:
    raise ValueError(f"config.evals.{name} must be a mapping with a type, e.g. evaluator_options('retrieval', ...)")
  type_name = spec.get("type") or ""
  if not type_name:
    raise ValueError(f"config.evals.{name} has no type; one of: {', '.join(OPTIONS_BY_TYPE)}")
  cls = options_class(type_name)
  fields = {f.name: f for f in dataclasses.fields(cls)}
  unknown = sorted(set(spec) - set(fields))
  if unknown:
    raise ValueError(
      f"config.evals.{name} (type {type_name}) has no option {', '.join(unknown)}; options: {', '.join(fields)}"
    )
  values = {}
  for key, value in spec.items():
    default = fields[key].default
    values[key] = tuple(value) if isinstance(default, tuple) else value
  return cls(**values)


def scoring_defaults() -> dict[str, Any]:
  """Every scoring option of every type with its default (the flat overrides of `run_evaluators`)."""
  out: dict[str, Any] = {}
  for cls in OPTIONS_BY_TYPE.values():
    for f in dataclasses.fields(cls):
      if f.name not in _PLACEMENT:
        out.setdefault(f.name, f.default)
  return out


# Keys of the former flat ``config.eval`` block, each with the form that replaced it.
# ``config.eval``: how studies are embedded, by every evaluator, --mode=embed and the search index
# (configs/base.py reads these).  ``batch_size`` is global, rounded up to a multiple of the device count;
# ``views``: "frontal" (the current frontal only, as the protocols score) or "all" (every view the model uses).
# ``text_buckets``: the token lengths reports are embedded at (`clinvla_jax.predict.plan_text_groups`): each text of
# a batch runs at the shortest bucket that holds its tokens, longer ones at the text tower's full length; () runs
# every text at the full length.  The embeddings equal the full-length ones (the attention mask hides padding); on
# the IU X-ray reports (median 62 tokens of 128) the text tower ran over 0.66 of the tokens, in half the time.
EMBEDDING_DEFAULTS = {"batch_size": 32, "views": "frontal", "text_buckets": (32, 64, 96)}

LEGACY_EVAL_KEYS = {
  "datasets": 'config.evals.NAME = evaluator_options("retrieval", path=DIR, split="val")',
  "every_steps": "config.evals.NAME.every_steps (each evaluator has its own cadence)",
  "split": "config.evals.NAME.split",
  "retrieval_ks": "config.evals.NAME.retrieval_ks (a retrieval evaluator's option)",
  "recall_ks": "config.evals.NAME.recall_ks",
  "label_prompts": "config.evals.NAME.label_prompts",
  "figure": "config.evals.NAME.figure",
  "bootstrap_resamples": "config.evals.NAME.bootstrap_resamples",
  "bootstrap_seed": "config.evals.NAME.bootstrap_seed",
  "zero_shot_max_prompts": "config.evals.chexpert_5x200.zero_shot_max_prompts",
  "chexpert_5x200": "config.evals.chexpert_5x200.path",
  "chexpert_5x200_split": "config.evals.chexpert_5x200.split",
  "chexpert_8x200": "config.evals.chexpert_8x200.path",
  "chexpert_8x200_queries": "config.evals.chexpert_8x200.queries",
  "chexpert_8x200_lists": "config.evals.chexpert_8x200.lists",
  "rsna": "config.evals.rsna.path",
  "rsna_split": "config.evals.rsna.split",
  "ms_cxr_t": "config.evals.ms_cxr_t.path",
  "ms_cxr_t_split": "config.evals.ms_cxr_t.split",
  "ms_cxr_t_labels": "config.evals.ms_cxr_t.labels",
}


def legacy_flag_error(argv: Sequence[str]) -> Optional[str]:
  """The message for a ``--config.eval.<former key>`` flag in ``argv`` (ml_collections would only say "not found")."""
  for arg in argv:
    if arg.startswith("--config.eval."):
      key = arg[len("--config.eval.") :].split("=", 1)[0].split(".", 1)[0]
      if key in LEGACY_EVAL_KEYS:
        return f"{arg.split('=', 1)[0]} is no longer read; use {LEGACY_EVAL_KEYS[key]} (see configs/base.py)"
  return None
