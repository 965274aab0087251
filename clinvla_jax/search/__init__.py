"""Search a study archive: index chest X-ray studies, find them by text or by image.

  index = Index.build(config, "archive/", "index/")  # --mode=index
  index = Index.load("index/", config)               # --mode=search
  hits = index.search_text("small left pleural effusion", k=10)

See `clinvla_jax.search.index` (the index folder, resuming and appending),
`clinvla_jax.search.ingest` (plain folders of studies) and
`clinvla_jax.search.html` (the results page).
"""

from clinvla_jax.search.index import (
  Hit,
  Index,
  IndexMismatchError,
  SearchIndexError,
  config_hash,
  variables_for,
)

__all__ = ["Hit", "Index", "IndexMismatchError", "SearchIndexError", "config_hash", "variables_for"]
