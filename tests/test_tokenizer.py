"""Tests for clinvla_jax.data.tokenizer against transformers' reference tokenizers."""

import os

import numpy as np
import pytest

from clinvla_jax.data import schema
from clinvla_jax.data import tokenizer as tokenizer_lib


@pytest.fixture(scope="module")
def tok():
  return tokenizer_lib.Tokenizer()


def test_bundled_vocab(tok):
  assert os.path.isfile(tokenizer_lib.DEFAULT_VOCAB)
  assert os.path.isfile(os.path.join(os.path.dirname(tokenizer_lib.DEFAULT_VOCAB), "LICENSE.md"))
  assert tok.vocab_size == 30522
  assert tok.lowercase  # inferred: uncased vocabulary
  assert (tok.pad_id, tok.unk_id, tok.cls_id, tok.sep_id, tok.mask_id) == (0, 100, 101, 102, 103)


def test_known_sentence_gives_known_ids(tok):
  out = tok("No pleural effusion or pneumothorax. Heart size is normal.")
  ids = out["input_ids"]
  assert ids.shape == (1, schema.MAX_TEXT_LEN) and ids.dtype == np.int32
  assert out["attention_mask"].dtype == np.int32
  expected = [
    101,
    2053,
    20228,
    11236,
    2389,
    1041,
    4246,
    14499,
    2030,
    1052,
    2638,
    2819,
    29288,
    2527,
    2595,
    1012,
    2540,
    2946,
    2003,
    3671,
    1012,
    102,
  ]
  assert ids[0, : len(expected)].tolist() == expected
  assert not ids[0, len(expected) :].any()
  assert out["attention_mask"][0].tolist() == [1] * len(expected) + [0] * (128 - len(expected))
  assert tok.decode(ids[0]) == "no pleural effusion or pneumothorax. heart size is normal."
  assert tok.unk_id not in ids


def test_matches_transformers_reference(tok, minilm_dir, report_sentences):
  from transformers import AutoTokenizer
  from tokenizers import BertWordPieceTokenizer

  ref = AutoTokenizer.from_pretrained(str(minilm_dir))  # uses the model's tokenizer.json
  wp = BertWordPieceTokenizer(tokenizer_lib.DEFAULT_VOCAB, lowercase=True)
  ours = tok(report_sentences)
  theirs = ref(report_sentences, padding="max_length", truncation=True, max_length=128, return_tensors="np")
  np.testing.assert_array_equal(ours["input_ids"], theirs["input_ids"])
  np.testing.assert_array_equal(ours["attention_mask"], theirs["attention_mask"])
  for s, row in zip(report_sentences, ours["input_ids"]):
    ids = wp.encode(s).ids[:128]
    ids = ids[:127] + [102] if len(ids) == 128 else ids
    assert row[: len(ids)].tolist() == ids


def test_truncation_and_batch(tok):
  long = " ".join(["the lungs are clear."] * 100)
  out = tok([long, "ok"])
  assert out["input_ids"].shape == (2, 128)
  assert out["input_ids"][0, -1] == tok.sep_id and out["attention_mask"][0].all()
  assert tok.decode(out["input_ids"])[1] == "ok"


def test_cased_vocab_inference(tmp_path):
  vocab = tmp_path / "vocab.txt"
  vocab.write_text(
    "\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "Heart", "heart", "is", "normal", "."]) + "\n"
  )
  cased = tokenizer_lib.Tokenizer(str(vocab), max_len=8)
  assert not cased.lowercase
  assert cased("Heart is normal.")["input_ids"][0].tolist() == [2, 5, 7, 8, 9, 3, 0, 0]
  assert cased("heart")["input_ids"][0, 1] == 6


def test_missing_vocab():
  with pytest.raises(FileNotFoundError, match="vocabulary"):
    tokenizer_lib.Tokenizer("/nonexistent/vocab.txt")


def test_config_tokenizer_refuses_a_vocabulary_larger_than_the_word_table():
  from clinvla_jax.config import load_config
  from clinvla_jax.evaluate import embed

  # configs/base.py sizes its table for BioBERT's cased vocabulary; without those weights the bundled one is larger.
  config = load_config("configs/base.py")
  assert config.model.text.vocab_size == 28996 and not config.init.text_weights
  with pytest.raises(ValueError, match=r"vocab.txt: 30522 tokens, but model.text.vocab_size = 28996") as err:
    embed.tokenizer_from_config(config)
  assert "--config.model.text.vocab_size=30522" in str(err.value)
  config.model.text.vocab_size = 30522
  assert embed.tokenizer_from_config(config).vocab_size == 30522
