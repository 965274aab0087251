"""Evaluation outputs: results.json, paper-style Markdown tables, figures.

Units: ``results.json`` stores every score as a fraction in [0, 1] (as the
metrics return it); the Markdown tables print percents with one decimal, the
unit of the paper's tables.  ``assets/paper_results.json`` keeps the paper's
numbers in percent, as published, under the same keys as ``results.json``
("<dataset>/<task>/<metric>", e.g. "chexpert_8x200/image_to_image/P@5").
"""

from collections.abc import Mapping, Sequence
import dataclasses
import json
import math
import pathlib
import textwrap
from typing import Any, Optional

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
import numpy as np

from clinvla_jax.evaluate import metrics  # pylint: disable=g-import-not-at-top

PAPER_RESULTS_PATH = (pathlib.Path(__file__).resolve().parent.parent
                      / "assets" / "paper_results.json")
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


# ---------------------------------------------------------------------------
# results.json
# ---------------------------------------------------------------------------


def flatten_results(results: Mapping[str, Any], prefix: str = ""
                    ) -> dict[str, float]:
  """Nested {"a": {"b": x}} -> {"a/b": x}; keys already holding "/" pass."""
  flat = {}
  for key, value in results.items():
    name = f"{prefix}{key}"
    if isinstance(value, Mapping):
      flat.update(flatten_results(value, f"{name}/"))
    else:
      flat[name] = value
  return flat


def write_results_json(results: Mapping[str, Any],
                       path: str | pathlib.Path) -> dict[str, float]:
  """Writes the flat, key-sorted results; returns what was written.

  Values must be finite numbers (fractions for scores).  Non-numeric entries
  such as per-fold lists are rejected so that the file stays a flat table.
  """
  flat = flatten_results(results)
  for key, value in flat.items():
    numeric = isinstance(value, (int, float, np.number))
    if isinstance(value, bool) or not numeric:
      raise TypeError(f"{key}: expected a number, got {type(value).__name__}")
    if not math.isfinite(float(value)):
      raise ValueError(f"{key}: not finite ({value})")
  out = {k: float(flat[k]) for k in sorted(flat)}
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(json.dumps(out, indent=2) + "\n", encoding="utf-8")
  return out


def read_results_json(path: str | pathlib.Path) -> dict[str, float]:
  return json.loads(pathlib.Path(path).read_text(encoding="utf-8"))


def load_paper_results(path: Optional[str | pathlib.Path] = None) -> dict:
  return json.loads(pathlib.Path(path or PAPER_RESULTS_PATH).read_text(
      encoding="utf-8"))


# ---------------------------------------------------------------------------
# Markdown tables.
# ---------------------------------------------------------------------------


def column_label(key: str) -> str:
  """"chexpert_8x200/image_to_image/P@5" -> "CheXpert 8x200 I→I P@5"."""
  dataset, task, *rest = key.split("/")
  parts = [_DATASET_LABELS.get(dataset, dataset),
           _TASK_LABELS.get(task, task), *rest]
  return " ".join(p for p in parts if p)


def format_cell(value: Optional[float], std: Optional[float] = None) -> str:
  """One table cell in percent units; None -> em dash."""
  if value is None:
    return MISSING
  text = _fmt(value)
  return text if std is None else f"{text} \u00b1 {_fmt(std)}"


def _fmt(x: float) -> str:
  # Integers stay as published (e.g. CheXRelNet's "47"); the rest get 1 decimal.
  return str(x) if isinstance(x, (int, np.integer)) else f"{float(x):.1f}"


def _markdown_row(cells: Sequence[str]) -> str:
  return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"


def markdown_table(table: Mapping[str, Any],
                   ours: Optional[Mapping[str, float]] = None) -> str:
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
  extra = [c for c in ("pretraining", "input_size")
           if any(c in r for r in table["rows"])]
  header = ["Method"] + [c.replace("_", " ").capitalize() for c in extra]
  header += [column_label(c) for c in columns]

  def pct(key):
    return None if key not in ours else 100.0 * float(ours[key])

  our_row = [OURS_LABEL] + [MISSING] * len(extra)
  our_row += [format_cell(pct(c), pct(f"{c}_std")) for c in columns]
  lines = [f"**{table['title']}**", "", _markdown_row(header),
           _markdown_row(["---"] * len(header)), _markdown_row(our_row)]
  for row in table["rows"]:
    name = row["method"] + (" (paper)" if row.get("ours") else "")
    cells = [name] + [MISSING if row.get(c) is None else str(row[c])
                      for c in extra]
    marks = row.get("marks", {})
    stds = row.get("std", {})
    cells += [format_cell(row["values"].get(c), stds.get(c)) + marks.get(c, "")
              for c in columns]
    lines.append(_markdown_row(cells))
  notes = table.get("notes", [])
  if notes:
    lines += [""] + [f"- {n}" for n in notes]
  return "\n".join(lines) + "\n"


def markdown_report(results: Mapping[str, float],
                    paper: Optional[Mapping[str, Any]] = None,
                    tables: Sequence[str] = ("table3", "table4", "table5"),
                    ) -> str:
  """Our results beside the paper's, one Markdown table per paper table."""
  paper = paper or load_paper_results()
  ours = flatten_results(results)
  parts = [
      "# Results beside the paper",
      "",
      f"Scores in percent. Paper: {paper['source']} "
      f"{MISSING}: not measured (ours) or not published (paper).",
  ]
  for name in tables:
    parts += ["", markdown_table(paper["tables"][name], ours).rstrip("\n")]
  return "\n".join(parts) + "\n"


def write_markdown(results: Mapping[str, float], path: str | pathlib.Path,
                   paper: Optional[Mapping[str, Any]] = None,
                   tables: Sequence[str] = ("table3", "table4", "table5")
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


def top_hits(scores: np.ndarray, items: Sequence[Any], k: int = 5,
             relevant: Optional[np.ndarray] = None) -> list[Hit]:
  """The k best items of one query, ranked as the retrieval metrics rank."""
  order = metrics.rank_gallery(np.asarray(scores)[None, :])[0][:k]
  return [Hit(items[i], float(scores[i]),
              None if relevant is None else bool(relevant[i])) for i in order]


def snippet(text: str, max_chars: int = 160, width: int = 34) -> str:
  """A report shortened to max_chars and wrapped for a figure panel."""
  text = " ".join(str(text).split())
  if len(text) > max_chars:
    text = text[:max_chars - 1].rstrip() + "\u2026"
  return textwrap.fill(text, width)


def _frame(ax, relevant: Optional[bool]) -> None:
  """Green/red box for a relevant/irrelevant hit; thin grey when unknown."""
  ax.set_axis_on()
  ax.set_xticks([])
  ax.set_yticks([])
  colour, width = {True: ("tab:green", 3), False: ("tab:red", 3),
                   None: ("0.6", 1)}[relevant]
  for spine in ax.spines.values():
    spine.set_edgecolor(colour)
    spine.set_linewidth(width)


def _show_image(ax, image: Any) -> None:
  image = np.asarray(image)
  ax.imshow(image, cmap="gray" if image.ndim == 2 else None)


def retrieval_figure(path: str | pathlib.Path,
                     text_query: Optional[str] = None,
                     image_hits: Sequence[Hit] = (),
                     image_query: Optional[np.ndarray] = None,
                     report_hits: Sequence[Hit] = (),
                     dpi: int = 100) -> pathlib.Path:
  """Saves a PNG with up to two rows, in the manner of the paper's figures.

  Row 1 (text->image): the query text, then the retrieved images with their
  similarity scores.  Row 2 (image->text): the query image, then the retrieved
  report snippets with their scores.  Hits with a known relevance get a green
  (relevant) or red (not) frame, others a thin grey one.

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
  cols = 1 + max(len(image_hits) if "t2i" in rows else 0,
                 len(report_hits) if "i2t" in rows else 0, 1)
  fig, axes = plt.subplots(len(rows), cols, squeeze=False,
                           figsize=(2.6 * cols, 3.0 * len(rows)))
  for r, kind in enumerate(rows):
    for ax in axes[r]:
      ax.set_axis_off()
    if kind == "t2i":
      axes[r, 0].text(0.5, 0.5, "Query:\n" + snippet(text_query, 120, 22),
                      ha="center", va="center", wrap=True, fontsize=10)
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
        ax.text(0.03, 0.97, snippet(hit.item, 160, 26), ha="left", va="top",
                fontsize=8, transform=ax.transAxes)
        _frame(ax, hit.relevant)
        ax.set_title(f"#{c}  {hit.score:.4f}", fontsize=10)
  fig.tight_layout()
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  fig.savefig(path, dpi=dpi, format="png")
  plt.close(fig)
  return path
