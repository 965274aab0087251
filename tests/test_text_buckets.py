"""Texts embedded at the length they need (``config.eval.text_buckets``) against the full-length path.

The tiny config in float32 with random weights: the grouped embeddings must
equal the full-length ones within 1e-5, come back in input order, and the text
function must compile a bounded set of shapes however the lengths fall.
"""

import dataclasses

import jax
from jax import monitoring
import numpy as np
import pytest

from clinvla_jax import api
from clinvla_jax import predict as predict_lib
from clinvla_jax.evaluate import embed as embed_lib
from configs import tiny

# The name jax reports when it traces the text encoder (`predict._encoders`).
TRACE_EVENT = "/jax/core/compile/jaxpr_trace_duration"
TEXT_FN = "text"

MIXED_TEXTS = [
  "",  # an empty report: [CLS] [SEP]
  "Clear lungs.",
  "No acute cardiopulmonary process. " * 40,  # cut to the full 128 tokens
  "Small left pleural effusion with adjacent atelectasis. " * 3,
  "Heart size normal. Lungs clear. " * 6,
  "Stable cardiomegaly. " * 30,
  "a",
  "Right lower lobe opacity, possibly pneumonia. " * 9,
]


@pytest.fixture(scope="module")
def model():
  cfg = tiny.get_config()
  cfg.model.precision = "float32"
  predict = predict_lib.PredictFn.from_config(cfg, predict_lib.data_mesh(jax.devices()[:1]))
  return cfg, predict, predict.place(api.init_params(cfg, jax.random.key(0)))


def _tokens(cfg, texts):
  t = embed_lib.tokenizer_from_config(cfg)(texts)
  return t["input_ids"], t["attention_mask"]


def test_bucketed_texts_equal_the_full_length_path_in_input_order(model):
  cfg, predict, placed = model
  assert predict.text_buckets == (32, 64, 96)  # on by default
  ids, mask = _tokens(cfg, MIXED_TEXTS)
  lengths = predict_lib.token_lengths(mask)
  assert lengths.min() == 2 and lengths.max() == cfg.model.text.max_len
  full = dataclasses.replace(predict, text_buckets=()).texts(placed, ids, mask)
  grouped = predict.texts(placed, ids, mask)
  np.testing.assert_allclose(grouped, full, atol=1e-5)
  # Reordering the batch reorders the rows and nothing else.
  perm = np.random.default_rng(0).permutation(len(ids))
  np.testing.assert_allclose(predict.texts(placed, ids[perm], mask[perm]), full[perm], atol=1e-5)


def test_text_embed_fn_groups_prompts_like_the_full_length(model):
  cfg, predict, placed = model
  full = dataclasses.replace(predict, text_buckets=())
  texts = MIXED_TEXTS * 2
  a = embed_lib.make_text_embed_fn(cfg, None, batch_size=4, predict_fn=predict, placed=placed)(texts)
  b = embed_lib.make_text_embed_fn(cfg, None, batch_size=4, predict_fn=full, placed=placed)(texts)
  np.testing.assert_allclose(a, b, atol=1e-5)


def test_groups_hold_every_row_once_at_a_width_that_fits_it():
  rng = np.random.default_rng(1)
  widths = predict_lib.text_widths((32, 64, 96, 500), 128)
  assert widths == (32, 64, 96, 128)
  sizes = predict_lib.sub_batch_sizes(32, 2)
  assert sizes == (4, 8, 16, 32)
  for _ in range(50):
    lengths = rng.integers(0, 129, size=32)
    groups = predict_lib.plan_text_groups(lengths, widths, sizes)
    rows = np.concatenate([g.rows for g in groups])
    assert sorted(rows.tolist()) == list(range(32))
    for g in groups:
      assert g.width in widths and g.size in sizes and len(g.rows) <= g.size
      assert lengths[g.rows].max() <= g.width
    # Never more tokens than running the whole batch at full length.
    assert sum(g.size * g.width for g in groups) <= 32 * 128
  # Same lengths: one group; a few short rows ride in a long group's padding.
  assert [(g.size, g.width) for g in predict_lib.plan_text_groups([50] * 32, widths, sizes)] == [(32, 64)]
  plan = predict_lib.plan_text_groups([120] * 15 + [10], widths, predict_lib.sub_batch_sizes(16, 1))
  assert [(g.size, g.width) for g in plan] == [(16, 128)]
  # Else several smaller groups beat one padded one: 14 long rows as 8 + 4 + 2, the 2 short ones apart.
  plan = predict_lib.plan_text_groups([120] * 14 + [10] * 2, widths, predict_lib.sub_batch_sizes(16, 1))
  assert sorted((g.size, g.width) for g in plan) == [(2, 32), (2, 128), (4, 128), (8, 128)]


def test_text_function_compiles_a_bounded_number_of_shapes(model):
  _, predict, placed = model
  # One bucket below the full length keeps the shapes (hence the compiles) few.
  predict = dataclasses.replace(predict, text_buckets=(64,))
  _, text_fn = predict.encoders()
  text_fn.clear_cache()  # counts from an empty cache (later users of the tiny model recompile)
  traces = []

  def count(event, duration, **kwargs):
    del duration
    if event == TRACE_EVENT and kwargs.get("fun_name") == TEXT_FN:
      traces.append(1)

  batch, width = 4, 128
  widths = predict_lib.text_widths(predict.text_buckets, width)
  sizes = predict_lib.sub_batch_sizes(batch, predict.mesh.size)
  rng = np.random.default_rng(2)
  planned, patterns = set(), set()
  monitoring.register_event_duration_secs_listener(count)
  try:
    for _ in range(16):
      lengths = rng.integers(2, width + 1, size=batch)
      mask = (np.arange(width)[None] < lengths[:, None]).astype(np.int32)
      predict.texts(placed, rng.integers(1000, 2000, size=(batch, width)).astype(np.int32) * mask, mask)
      planned |= {(g.size, g.width) for g in predict_lib.plan_text_groups(lengths, widths, sizes)}
      patterns.add(tuple(sorted(lengths.tolist())))
  finally:
    monitoring.unregister_event_duration_listener(count)
  bound = len(widths) * len(sizes)
  assert bound == 6 and len(patterns) > bound
  # One trace per shape the plans used, however many batches and length patterns ran.
  assert len(traces) == len(planned) <= bound
