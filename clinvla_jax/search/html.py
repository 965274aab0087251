"""A self-contained results page: per query, thumbnails of the top studies with scores and reports.

Thumbnails are embedded as data: URIs, so the page works offline and can be
mailed or archived as one file.
"""

from __future__ import annotations

import base64
import html
import io
from collections.abc import Callable, Sequence
from typing import Any, Optional

import numpy as np
from PIL import Image

THUMBNAIL_PX = 192

_STYLE = """
body { font-family: system-ui, sans-serif; margin: 24px; background: #f6f7f9; color: #1d2330; }
h1 { font-size: 20px; margin: 0 0 4px; }
.meta { color: #5a6372; font-size: 13px; margin-bottom: 20px; }
section.query { background: #fff; border: 1px solid #d9dde4; border-radius: 8px; padding: 16px; margin-bottom: 24px; }
section.query h2 { font-size: 16px; margin: 0 0 12px; display: flex; gap: 12px; align-items: center; }
section.query h2 img { width: 96px; height: 96px; border-radius: 4px; }
.results { display: grid; grid-template-columns: repeat(auto-fill, minmax(220px, 1fr)); gap: 12px; }
figure.hit { margin: 0; border: 1px solid #e3e6eb; border-radius: 6px; padding: 8px; background: #fbfbfc; }
figure.hit img { width: 100%; aspect-ratio: 1; object-fit: cover; border-radius: 4px; background: #000; }
.noimg { width: 100%; aspect-ratio: 1; display: flex; align-items: center; justify-content: center;
  background: #ddd; color: #666; border-radius: 4px; }
figcaption { font-size: 12px; margin-top: 6px; }
.rank { font-weight: 600; }
.score { float: right; font-variant-numeric: tabular-nums; }
.study { display: block; margin-top: 2px; word-break: break-all; }
.report { color: #39404d; margin-top: 4px; max-height: 9em; overflow: auto; }
"""


def data_uri(image: np.ndarray, size: int = THUMBNAIL_PX) -> str:
  """uint8 [H, W] -> a JPEG data: URI of at most ``size`` pixels a side."""
  img = Image.fromarray(np.asarray(image, np.uint8))
  img.thumbnail((size, size))
  buf = io.BytesIO()
  img.save(buf, format="JPEG", quality=85)
  return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _img(image: Optional[np.ndarray], alt: str) -> str:
  if image is None:
    return '<div class="noimg">no image</div>'
  return f'<img src="{data_uri(image)}" alt="{html.escape(alt)}">'


def render(
  queries: Sequence[dict[str, Any]],
  thumbnail: Callable[[int], Optional[np.ndarray]],
  *,
  title: str = "Study search",
  subtitle: str = "",
) -> str:
  """The page for ``queries``: [{"query": str, "results": [Hit, ...], "image": optional uint8 view}, ...].

  ``thumbnail(row)`` gives a hit's frontal view (None: shown as "no image").
  """
  cache: dict[int, str] = {}
  parts = [
    "<!DOCTYPE html>",
    '<html lang="en"><head><meta charset="utf-8">',
    f"<title>{html.escape(title)}</title><style>{_STYLE}</style></head><body>",
    f"<h1>{html.escape(title)}</h1>",
    f'<div class="meta">{html.escape(subtitle)}</div>',
  ]
  for qi, q in enumerate(queries):
    head = _img(q["image"], "query image") if q.get("image") is not None else ""
    parts.append(f'<section class="query" data-query="{qi}"><h2>{head}<span>{html.escape(str(q["query"]))}</span></h2>')
    parts.append('<div class="results">')
    for rank, hit in enumerate(q["results"], start=1):
      if hit.row not in cache:
        cache[hit.row] = _img(thumbnail(hit.row), hit.study_id)
      date = f" · {html.escape(hit.date)}" if hit.date else ""
      parts.append(
        f'<figure class="hit" data-study-id="{html.escape(hit.study_id)}" data-score="{hit.score:.6f}">'
        f"{cache[hit.row]}<figcaption>"
        f'<span class="rank">#{rank}</span><span class="score">{hit.score:.3f}</span>'
        f'<span class="study">{html.escape(hit.study_id)}{date}</span>'
        f'<div class="report">{html.escape(hit.report) or "<em>no report</em>"}</div>'
        "</figcaption></figure>"
      )
    parts.append("</div></section>")
  parts.append("</body></html>")
  return "\n".join(parts)
