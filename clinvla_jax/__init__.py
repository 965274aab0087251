"""clinvla_jax: ClinVLA chest X-ray / report alignment in JAX and Flax.

Public API::

    import clinvla_jax as cv
    cfg = cv.load_config("configs/base.py", overrides={"model.text.num_layers": 6})
    variables = cv.init_params(cfg, jax.random.key(0))
    variables = cv.convert.load_text_weights(variables, "path/to/hf_bert")
    variables = cv.convert.load_image_weights(variables, state_dict)
    variables = cv.convert.load_alta(variables, "ALTA.pth")  # with configs/alta.py
    tok = cv.Tokenizer("path/to/vocab.txt", max_len=128)
    out = cv.encode_text(cfg, variables, ids, mask)
    out = cv.encode_images(cfg, variables, images, view_valid)
    index = cv.Index.build(cfg, "archive/", "index/", checkpoint="runs/demo")
    hits = cv.Index.load("index/", cfg).search_text("small left pleural effusion", k=10)
    art = cv.load_exported("artifact/")  # from --mode=export: embed_images / embed_text, no model code
"""

from clinvla_jax import convert
from clinvla_jax.api import abstract_params, build_model, encode_images, encode_text, init_params, patchify
from clinvla_jax.config import load_config
from clinvla_jax.losses import clinvla_loss

__version__ = "0.1.0"
__all__ = [
  "Index",
  "Tokenizer",
  "abstract_params",
  "build_model",
  "clinvla_loss",
  "convert",
  "encode_images",
  "encode_text",
  "init_params",
  "load_config",
  "load_exported",
  "patchify",
]


def __getattr__(name):
  # The tokenizer pulls in transformers (slow to import); load it on first use.
  if name == "Tokenizer":
    from clinvla_jax.data.tokenizer import Tokenizer

    return Tokenizer
  if name == "Index":
    from clinvla_jax.search.index import Index

    return Index
  if name == "load_exported":
    from clinvla_jax.export import load_exported

    return load_exported
  raise AttributeError(f"module 'clinvla_jax' has no attribute {name!r}")
