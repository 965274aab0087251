"""Evaluation outputs: results.json, paper-style Markdown tables, figures.

Units: ``results.json`` stores every score as a fraction in [0, 1] (as the
metrics return it), beside a few "<name>/<field>" entries that are not scores
but say which images were scored (strings and counts, e.g.
"rsna/list_sha256", "rsna/list_size", "chexpert_5x200/selection"); the Markdown tables print percents with one decimal, the
unit of the paper's tables.  ``assets/paper_results.json`` keeps the paper's
numbers in percent, as published, under the same keys as ``results.json``
("<dataset>/<task>/<metric>", e.g. "chexpert_8x200/image_to_image/P@5").

Scores come with companion keys named by a suffix of the metric (see
`split_metric`): "_chance" (a uniformly random ranking, or 0.5 AUC),
"_majority" (always the most frequent label; for P@K one ranking, by the
label prior, for every query), "_all_positive" (always positive), "_ci_low" /
"_ci_high" (95 % bootstrap interval) and "_std" (over folds).  The paper
tables show the base scores, with a line of chance levels and intervals under
each; the other tables put all of one score in one cell,
"47.2 [40.1–54.0] · chance 34.0".

Figures: `retrieval_figure` (paper Figures 3 and 4, with a caption of the
numbers that tell a trained model from an untrained one) and
`learning_curves_figure` (training loss and held-out scores against their
chance level, from a training run's metrics.jsonl).
"""

from collections.abc import Mapping, Sequence
import dataclasses
import json
import math
import os
import pathlib
import textwrap
from typing import Any, Optional

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
import numpy as np

from clinvla_jax.evaluate import metrics  # pylint: disable=g-import-not-at-top

PAPER_RESULTS_PATH = pathlib.Path(__file__).resolve().parent.parent / "assets" / "paper_results.json"
MISSING = "\u2014"  # em dash
OURS_LABEL = "ClinVLA (this implementation)"

_DATASET_LABELS = {
  "chexpert_8x200": "CheXpert 8x200",
  "chexpert_5x200": "CheXpert 5x200",
  "rsna": "RSNA Pneumonia",
  "ms_cxr_t": "MS-CXR-T",
}
_TASK_LABELS = {
  "image_to_image": "I\u2192I",
  "text_to_image": "T\u2192I",
  "image_to_text": "I\u2192T",
  "zero_shot": "ZS",
  "linear_probe": "",
}

# Metric-name suffixes of companion keys, and how a cell names the baseline
# ones; "ci" joins the two interval ends.
QUALIFIERS = ("_ci_low", "_ci_high", "_chance", "_majority", "_all_positive", "_std")
_BASELINE_WORDS = {"chance": "chance", "majority": "majority", "all_positive": "all-positive"}
EN_DASH = "\u2013"


# ---------------------------------------------------------------------------
# results.json
# ---------------------------------------------------------------------------


def flatten_results(results: Mapping[str, Any], prefix: str = "") -> dict[str, float]:
  """Nested {"a": {"b": x}} -> {"a/b": x}; keys already holding "/" pass."""
  flat = {}
  for key, value in results.items():
    name = f"{prefix}{key}"
    if isinstance(value, Mapping):
      flat.update(flatten_results(value, f"{name}/"))
    else:
      flat[name] = value
  return flat


def _check_number(key: str, value: Any) -> None:
  numeric = isinstance(value, (int, float, np.number))
  if isinstance(value, (bool, np.bool_)) or not numeric:
    raise TypeError(f"{key}: expected a number, got {type(value).__name__}")
  if not math.isfinite(float(value)):
    raise ValueError(f"{key}: not finite ({value})")


def check_set_info(set_info: Mapping[str, Any]) -> dict[str, str | int | float]:
  """``set_info`` as results.json writes it: strings, integers (counts) and finite numbers."""
  out: dict[str, str | int | float] = {}
  for key, value in set_info.items():
    if isinstance(value, str):
      out[key] = value
      continue
    _check_number(key, value)
    is_int = isinstance(value, (int, np.integer))
    out[key] = int(value) if is_int else float(value)
  return out


def write_results_json(
  results: Mapping[str, Any], path: str | pathlib.Path, set_info: Optional[Mapping[str, Any]] = None
) -> dict[str, Any]:
  """Writes the flat, key-sorted results; returns what was written.

  Scores (``results``) must be finite numbers (fractions).  Non-numeric
  entries such as per-fold lists are rejected so that the file stays a flat
  table.  ``set_info`` ("<name>/<field>": a string or a count, e.g.
  "rsna/list_sha256", "rsna/list_size") says which images an evaluator
  scored; it is written beside the scores, and must not reuse their keys.
  """
  flat = flatten_results(results)
  for key, value in flat.items():
    _check_number(key, value)
  out: dict[str, Any] = {k: float(v) for k, v in flat.items()}
  info = check_set_info(flatten_results(set_info or {}))
  clash = sorted(set(info) & set(out))
  if clash:
    raise ValueError(f"set_info reuses score keys: {', '.join(clash)}")
  out.update(info)
  out = {k: out[k] for k in sorted(out)}
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(json.dumps(out, indent=2) + "\n", encoding="utf-8")
  return out


def read_results_json(path: str | pathlib.Path) -> dict[str, Any]:
  return json.loads(pathlib.Path(path).read_text(encoding="utf-8"))


def set_info_markdown(set_info: Mapping[str, Any]) -> str:
  """The "Evaluation sets" lines of results.md: which images each evaluator scored."""
  by_name: dict[str, dict[str, Any]] = {}
  for key, value in set_info.items():
    name, _, field = key.partition("/")
    by_name.setdefault(name, {})[field] = value
  if not by_name:
    return ""
  lines = ["", "**Evaluation sets** (which images were scored)", ""]
  for name, fields in by_name.items():
    lines.append(f"- {name}: " + ", ".join(f"{k} {v}" for k, v in fields.items()))
  return "\n".join(lines) + "\n"


def load_paper_results(path: Optional[str | pathlib.Path] = None) -> dict:
  return json.loads(pathlib.Path(path or PAPER_RESULTS_PATH).read_text(encoding="utf-8"))


# ---------------------------------------------------------------------------
# Markdown tables.
# ---------------------------------------------------------------------------


def column_label(key: str) -> str:
  """ "chexpert_8x200/image_to_image/P@5" -> "CheXpert 8x200 I→I P@5"."""
  dataset, task, *rest = key.split("/")
  parts = [_DATASET_LABELS.get(dataset, dataset), _TASK_LABELS.get(task, task), *rest]
  return " ".join(p for p in parts if p)


def format_cell(value: Optional[float], std: Optional[float] = None) -> str:
  """One table cell in percent units; None -> em dash."""
  if value is None:
    return MISSING
  text = _fmt(value)
  return text if std is None else f"{text} \u00b1 {_fmt(std)}"


def split_metric(metric: str) -> tuple[str, str]:
  """ "P@5_ci_low" -> ("P@5", "ci_low"); a base metric -> (metric, "")."""
  for suffix in QUALIFIERS:
    if metric.endswith(suffix) and len(metric) > len(suffix):
      return metric[: -len(suffix)], suffix[1:]
  return metric, ""


def score_cell(scores: Mapping[str, float], base: str) -> str:
  """One score with its companions, in percent, for a Markdown cell.

  Args:
    scores: {metric: fraction} of one task, e.g. {"P@5": 0.472,
      "P@5_ci_low": 0.401, "P@5_ci_high": 0.54, "P@5_chance": 0.34}.
    base: the base metric, e.g. "P@5".

  Returns:
    e.g. "47.2 [40.1–54.0] · chance 34.0"; an em dash without the score.
  """
  if base not in scores:
    return MISSING
  pct = {k: 100.0 * float(v) for k, v in scores.items()}
  text = format_cell(pct[base], pct.get(f"{base}_std"))
  low, high = pct.get(f"{base}_ci_low"), pct.get(f"{base}_ci_high")
  if low is not None and high is not None:
    text += f" [{_fmt(low)}{EN_DASH}{_fmt(high)}]"
  for suffix, word in _BASELINE_WORDS.items():
    if f"{base}_{suffix}" in pct:
      text += f" \u00b7 {word} {_fmt(pct[f'{base}_{suffix}'])}"
  return text


def _fmt(x: float) -> str:
  # Integers stay as published (e.g. CheXRelNet's "47"); the rest get 1 decimal.
  return str(x) if isinstance(x, (int, np.integer)) else f"{float(x):.1f}"


def _markdown_row(cells: Sequence[str]) -> str:
  return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"


def markdown_table(table: Mapping[str, Any], ours: Optional[Mapping[str, float]] = None) -> str:
  """One paper table with our row first.

  Args:
    table: a table entry of paper_results.json (title, columns, rows, notes).
    ours: flat results (fractions); a column we did not measure shows an em
      dash.  Keys "<column>_std" fill a "± std" part where present.

  Returns:
    Markdown text: title, table, notes.
  """
  ours = ours or {}
  columns = list(table["columns"])
  extra = [c for c in ("pretraining", "input_size") if any(c in r for r in table["rows"])]
  header = ["Method"] + [c.replace("_", " ").capitalize() for c in extra]
  header += [column_label(c) for c in columns]

  def pct(key):
    return None if key not in ours else 100.0 * float(ours[key])

  our_row = [OURS_LABEL] + [MISSING] * len(extra)
  our_row += [format_cell(pct(c), pct(f"{c}_std")) for c in columns]
  lines = [
    f"**{table['title']}**",
    "",
    _markdown_row(header),
    _markdown_row(["---"] * len(header)),
    _markdown_row(our_row),
  ]
  for row in table["rows"]:
    name = row["method"] + (" (paper)" if row.get("ours") else "")
    cells = [name] + [MISSING if row.get(c) is None else str(row[c]) for c in extra]
    marks = row.get("marks", {})
    stds = row.get("std", {})
    cells += [format_cell(row["values"].get(c), stds.get(c)) + marks.get(c, "") for c in columns]
    lines.append(_markdown_row(cells))
  lines += _our_context_lines(columns, ours)
  notes = table.get("notes", [])
  if notes:
    lines += [""] + [f"- {n}" for n in notes]
  return "\n".join(lines) + "\n"


def _our_context_lines(columns: Sequence[str], ours: Mapping[str, float]) -> list[str]:
  """Chance levels and intervals of our row, where the results hold them."""
  chance, intervals = [], []
  for c in columns:
    label = column_label(c)
    for suffix, word in _BASELINE_WORDS.items():
      if f"{c}_{suffix}" in ours:
        what = "" if suffix == "chance" else f" ({word})"
        chance.append(f"{label} {_fmt(100.0 * ours[f'{c}_{suffix}'])}{what}")
    if f"{c}_ci_low" in ours and f"{c}_ci_high" in ours:
      intervals.append(f"{label} [{_fmt(100.0 * ours[f'{c}_ci_low'])}{EN_DASH}{_fmt(100.0 * ours[f'{c}_ci_high'])}]")
  lines = []
  if chance:
    lines += [
      "",
      "Chance level of our row on the same sets (random ranking; "
      "majority: always the most frequent class, or one ranking of the commonest findings for every query; "
      "all-positive: "
      "always positive): " + ", ".join(chance) + ".",
    ]
  if intervals:
    lines += ["", "95 % bootstrap intervals of our row: " + ", ".join(intervals) + "."]
  return lines


def markdown_report(
  results: Mapping[str, float],
  paper: Optional[Mapping[str, Any]] = None,
  tables: Sequence[str] = ("table3", "table4", "table5"),
) -> str:
  """Our results beside the paper's, one Markdown table per paper table."""
  paper = paper or load_paper_results()
  ours = flatten_results(results)
  parts = [
    "# Results beside the paper",
    "",
    f"Scores in percent. Paper: {paper['source']} {MISSING}: not measured (ours) or not published (paper).",
  ]
  for name in tables:
    parts += ["", markdown_table(paper["tables"][name], ours).rstrip("\n")]
  return "\n".join(parts) + "\n"


def write_markdown(
  results: Mapping[str, float],
  path: str | pathlib.Path,
  paper: Optional[Mapping[str, Any]] = None,
  tables: Sequence[str] = ("table3", "table4", "table5"),
) -> str:
  text = markdown_report(results, paper, tables)
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(text, encoding="utf-8")
  return text


# ---------------------------------------------------------------------------
# Qualitative figures (paper Figures 3 and 4).
# ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Hit:
  """One retrieved item: an image [H, W] / [H, W, C] or a report string."""

  item: Any
  score: float
  relevant: Optional[bool] = None


def top_hits(scores: np.ndarray, items: Sequence[Any], k: int = 5, relevant: Optional[np.ndarray] = None) -> list[Hit]:
  """The k best items of one query, ranked as the retrieval metrics rank."""
  order = metrics.rank_gallery(np.asarray(scores)[None, :])[0][:k]
  return [Hit(items[i], float(scores[i]), None if relevant is None else bool(relevant[i])) for i in order]


def snippet(text: str, max_chars: int = 160, width: int = 34) -> str:
  """A report shortened to max_chars and wrapped for a figure panel."""
  text = " ".join(str(text).split())
  if len(text) > max_chars:
    text = text[: max_chars - 1].rstrip() + "\u2026"
  return textwrap.fill(text, width)


def _frame(ax, relevant: Optional[bool]) -> None:
  """Green/red box for a relevant/irrelevant hit; thin grey when unknown."""
  ax.set_axis_on()
  ax.set_xticks([])
  ax.set_yticks([])
  colour, width = {True: ("tab:green", 3), False: ("tab:red", 3), None: ("0.6", 1)}[relevant]
  for spine in ax.spines.values():
    spine.set_edgecolor(colour)
    spine.set_linewidth(width)


def _show_image(ax, image: Any) -> None:
  image = np.asarray(image)
  ax.imshow(image, cmap="gray" if image.ndim == 2 else None)


def retrieval_captions(
  text_scores: np.ndarray, report_scores: np.ndarray, own_report: int, paired: Optional[Mapping[str, float]] = None
) -> tuple[str, str]:
  """Caption lines that tell informative retrieval scores from noise.

  Top-k scores alone look alike for a trained and an untrained model; what
  differs is where the query's own report lands among all reports, how far
  paired image-report cosines sit above unpaired ones, and how much the
  scores vary over the gallery at all.

  Args:
    text_scores: [G] scores of the text query against every gallery image.
    report_scores: [N] scores of the query image against every report.
    own_report: index of the query image's own report.
    paired: optional {"paired", "unpaired"} mean cosines of the whole set
      (see `retrieval.paired_cosine_summary`).

  Returns:
    (text->image caption, image->report caption).
  """
  t = np.asarray(text_scores, dtype=np.float64)
  r = np.asarray(report_scores, dtype=np.float64)
  t2i = (
    f"Text \u2192 image: scores over all {t.size} images span "
    f"{t.max() - t.min():.4f} (max \u2212 min; near 0: the query does "
    "not tell images apart)."
  )
  rank = int(metrics.rank_of(r[None, :], np.array([own_report]))[0])
  i2t = f"Image \u2192 report: own report ranked {rank} of {r.size} (random ranking: {(r.size + 1) / 2:.1f} on average)"
  if paired is not None:
    i2t += f"; mean cosine paired {paired['paired']:.4f} vs. unpaired {paired['unpaired']:.4f}"
  return t2i, i2t + "."


def retrieval_figure(
  path: str | pathlib.Path,
  text_query: Optional[str] = None,
  image_hits: Sequence[Hit] = (),
  image_query: Optional[np.ndarray] = None,
  report_hits: Sequence[Hit] = (),
  dpi: int = 100,
  *,
  t2i_caption: Optional[str] = None,
  i2t_caption: Optional[str] = None,
) -> pathlib.Path:
  """Saves a PNG with up to two rows, in the manner of the paper's figures.

  Row 1 (text->image): the query text, then the retrieved images with their
  similarity scores.  Row 2 (image->text): the query image, then the retrieved
  report snippets with their scores.  Hits with a known relevance get a green
  (relevant) or red (not) frame, others a thin grey one.  The captions of the
  rows shown (e.g. from `retrieval_captions`) form the figure title.

  Returns:
    The written path.
  """
  rows = []
  if text_query is not None:
    rows.append("t2i")
  if image_query is not None:
    rows.append("i2t")
  if not rows:
    raise ValueError("give a text query, an image query or both")
  cols = 1 + max(len(image_hits) if "t2i" in rows else 0, len(report_hits) if "i2t" in rows else 0, 1)
  captions = [c for kind, c in (("t2i", t2i_caption), ("i2t", i2t_caption)) if c and kind in rows]
  width = int(2.6 * cols * 11)  # characters per line at the title's size
  title = "\n".join(textwrap.fill(c, width) for c in captions)
  fig, axes = plt.subplots(len(rows), cols, squeeze=False, figsize=(2.6 * cols, 3.0 * len(rows)))
  for r, kind in enumerate(rows):
    for ax in axes[r]:
      ax.set_axis_off()
    if kind == "t2i":
      axes[r, 0].text(
        0.5, 0.5, "Query:\n" + snippet(text_query, 120, 22), ha="center", va="center", wrap=True, fontsize=10
      )
      for c, hit in enumerate(image_hits, start=1):
        ax = axes[r, c]
        _show_image(ax, hit.item)
        _frame(ax, hit.relevant)
        ax.set_title(f"#{c}  {hit.score:.4f}", fontsize=10)
    else:
      ax = axes[r, 0]
      _show_image(ax, image_query)
      _frame(ax, None)
      ax.set_title("Query image", fontsize=10)
      for c, hit in enumerate(report_hits, start=1):
        ax = axes[r, c]
        ax.text(0.03, 0.97, snippet(hit.item, 160, 26), ha="left", va="top", fontsize=8, transform=ax.transAxes)
        _frame(ax, hit.relevant)
        ax.set_title(f"#{c}  {hit.score:.4f}", fontsize=10)
  fig.tight_layout()
  if title:
    _add_title_strip(fig, title)
  return _save(fig, path, dpi)


def _add_title_strip(fig, title: str, fontsize: float = 10.0) -> None:
  """Puts ``title`` in a strip added above the laid-out panels.

  The figure grows by the strip's height and the panels keep their size in
  inches, so a caption never squeezes the rows into each other.
  """
  width, height = fig.get_size_inches()
  strip = (title.count("\n") + 1) * fontsize * 1.5 / 72 + 0.15
  params = fig.subplotpars
  top, bottom = params.top * height, params.bottom * height
  fig.set_size_inches(width, height + strip)
  fig.subplots_adjust(top=top / (height + strip), bottom=bottom / (height + strip))
  fig.suptitle(title, fontsize=fontsize, y=1.0 - 0.075 / (height + strip), va="top")


def _save(fig, path: str | os.PathLike[str], dpi: int) -> pathlib.Path:
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  fig.savefig(path, dpi=dpi, format="png")
  plt.close(fig)
  return path


# ---------------------------------------------------------------------------
# Learning curves.
# ---------------------------------------------------------------------------

LOSS_KEYS = ("loss", "loss_global", "loss_local")
EVAL_PREFIX = "eval/"


def read_metrics_jsonl(path: str | os.PathLike[str]) -> dict[str, dict[int, float]]:
  """{key: {step: value}} of a training run's metrics.jsonl.

  Training and evaluation write separate lines that may share a step, so
  values are kept per key.  A resumed run logs some steps again; the later
  line wins.  Lines that do not parse (a write cut short by a crash) and
  values that are not finite numbers are skipped.
  """
  series: dict[str, dict[int, float]] = {}
  with open(path, encoding="utf-8") as f:
    for line in f:
      try:
        record = json.loads(line)
        step = int(record["step"])
      except (ValueError, KeyError, TypeError):
        continue
      for key, value in record.items():
        if key == "step" or isinstance(value, bool):
          continue
        if isinstance(value, (int, float)) and math.isfinite(value):
          series.setdefault(key, {})[step] = float(value)
  return series


def _curve(points: Mapping[int, float]) -> tuple[np.ndarray, np.ndarray]:
  steps = np.array(sorted(points), dtype=np.int64)
  return steps, np.array([points[s] for s in steps], dtype=np.float64)


def learning_curves_figure(
  metrics_jsonl: str | os.PathLike[str],
  path: str | os.PathLike[str],
  metric_keys: Optional[Sequence[str]] = None,
  dpi: int = 100,
) -> pathlib.Path:
  """Saves a PNG of training loss and held-out scores against steps.

  (a) the training losses ("loss", "loss_global", "loss_local") per step;
  (b) the held-out scores in percent, each with its chance level as a dashed
  line of the same colour, its label-prior level (P@K of one ranking for every
  query, `metrics.majority_precision_per_query`) as a dotted one, and its
  bootstrap interval as a band, where the log holds "<key>_chance",
  "<key>_majority" and "<key>_ci_low" / "<key>_ci_high".  A score that rises
  away from its chance line is a model that learned; one above the dotted line
  reads the query beyond the label prior.

  Args:
    metrics_jsonl: the run's metrics.jsonl (see `read_metrics_jsonl`).
    path: the PNG to write.
    metric_keys: evaluation keys for panel (b), with or without the "eval/"
      prefix; default every "eval/.../P@5" and "eval/.../R@5" key.
    dpi: resolution.

  Returns:
    The written path.
  """
  series = read_metrics_jsonl(metrics_jsonl)
  if metric_keys is None:
    keys = sorted(k for k in series if k.startswith(EVAL_PREFIX) and k.endswith(("/P@5", "/R@5")))
  else:
    keys = [k if k.startswith(EVAL_PREFIX) else EVAL_PREFIX + k for k in metric_keys]
    keys = [k for k in keys if k in series]
  fig, (loss_ax, eval_ax) = plt.subplots(1, 2, figsize=(13.0, 4.8))

  losses = [k for k in LOSS_KEYS if k in series]
  for key in losses:
    loss_ax.plot(*_curve(series[key]), label=key, linewidth=2.0 if key == "loss" else 1.2)
  loss_ax.set_title("(a) training loss")
  loss_ax.set_xlabel("step")
  if losses:
    loss_ax.set_ylabel("loss")
    loss_ax.legend(fontsize=8)
  else:
    _say(loss_ax, "no training loss yet")

  for key in keys:
    steps, values = _curve(series[key])
    # Squares for instance recall, dots for class-level precision.
    (line,) = eval_ax.plot(
      steps, 100.0 * values, markersize=3, marker="s" if "/R@" in key else "o", label=key[len(EVAL_PREFIX) :]
    )
    colour = line.get_color()
    low, high = series.get(f"{key}_ci_low"), series.get(f"{key}_ci_high")
    if low and high:
      both = sorted(set(low) & set(high))
      eval_ax.fill_between(
        both, [100.0 * low[s] for s in both], [100.0 * high[s] for s in both], color=colour, alpha=0.15, linewidth=0
      )
    for name, level in baseline_levels(series, key).items():
      eval_ax.axhline(100.0 * level, color=colour, linestyle=_BASELINE_STYLES[name], linewidth=1.0)
  eval_ax.set_title("(b) held-out score (dashed: chance; dotted: label prior; band: 95 % CI)")
  eval_ax.set_xlabel("step")
  if keys:
    eval_ax.set_ylabel("%")
    eval_ax.legend(fontsize=7)
  else:
    _say(eval_ax, "no evaluation yet")
  fig.tight_layout()
  return _save(fig, path, dpi)


_BASELINE_STYLES = {"chance": "--", "majority": ":"}


def baseline_levels(series: Mapping[str, Mapping[int, float]], key: str) -> dict[str, float]:
  """The reference lines of one logged score: its chance level and its label-prior ("majority") level.

  Both depend on the held-out set alone, so the latest evaluation's value
  stands for the run; a level the log lacks is left out.
  """
  levels = {}
  for name in _BASELINE_STYLES:
    logged = series.get(f"{key}_{name}")
    if logged:
      levels[name] = logged[max(logged)]
  return levels


def _say(ax, text: str) -> None:
  ax.text(0.5, 0.5, text, ha="center", va="center", fontsize=12, color="0.4", transform=ax.transAxes)
  ax.set_xticks([])
  ax.set_yticks([])


CONSOLE_MAX_LINES = 15
# Which scores the console shows first when there are more than fit: the summary ones, then the usual cut-offs.
_CONSOLE_PRIORITY = ("AUC", "ACC", "@5", "@1", "@10")


def console_table(results: Mapping[str, float], paths: Sequence[str], max_lines: int = CONSOLE_MAX_LINES) -> list[str]:
  """The end of ``--mode=eval`` on the console: metric, value, 95 % interval, chance, majority; then the paths.

  chance: a uniformly random ranking or label; majority: the most frequent label, or for P@K one ranking for every
  query by the label prior.

  At most ``max_lines`` lines: when the base scores do not all fit, the summary ones (AUC, accuracy, @5, @1) are
  kept and a line says how many more results.md holds.
  """
  base = [k for k in results if not split_metric(k)[1]]
  room = max_lines - 3  # header, separator, the paths line
  if len(base) > room:
    room -= 1  # the "more in results.md" line
    rank = lambda k: next((i for i, p in enumerate(_CONSOLE_PRIORITY) if k.endswith(p)), len(_CONSOLE_PRIORITY))
    shown = sorted(sorted(base, key=lambda k: (rank(k), k))[:room])
  else:
    shown = sorted(base)
  width = max([len(k) for k in shown] + [len("metric")])
  header = f"{'metric':{width}s}  {'value':>6s}  {'95 % interval':>13s}  {'chance':>6s}  {'majority':>8s}"
  lines = [header, "-" * len(header)]

  def baseline(key, suffix, cell_width):
    value = results.get(f"{key}_{suffix}")
    return f"{MISSING if value is None else f'{value:.3f}':>{cell_width}s}"

  for key in shown:
    low, high = results.get(f"{key}_ci_low"), results.get(f"{key}_ci_high")
    interval = f"{low:.3f}{EN_DASH}{high:.3f}" if low is not None and high is not None else MISSING
    baselines = f"{baseline(key, 'chance', 6)}  {baseline(key, 'majority', 8)}"
    lines.append(f"{key:{width}s}  {results[key]:6.3f}  {interval:>13s}  {baselines}")
  if len(shown) < len(base):
    lines.append(f"... {len(base) - len(shown)} more scores, and every interval and baseline, in results.md")
  lines.append("results: " + ", ".join(paths))
  return lines
