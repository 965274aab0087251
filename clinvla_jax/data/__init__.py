"""Data: the record schema, report text, tokenizer, images and the input pipeline.

Submodules are imported explicitly (``from clinvla_jax.data import records``) so
that light users such as the converters do not pay for JAX or Grain imports.
"""

from pathlib import Path

DEMO_DIR = Path(__file__).resolve().parents[1] / "assets" / "demo"
