"""WordPiece tokenisation of report text into fixed-length id arrays.

A thin wrapper over ``transformers.BertTokenizerFast`` that always pads/truncates
to ``max_len`` and returns int32 numpy arrays shaped like the record schema.

The vocabulary is passed with ``vocab=`` (a path): ``vocab_file=`` is silently
ignored by the fast tokenizer, which then maps every word to ``[UNK]``.
"""

import os
from pathlib import Path
from typing import Sequence, Union

import numpy as np

from clinvla_jax.data import schema

DEFAULT_VOCAB = str(Path(__file__).resolve().parents[1] / "assets" / "vocab" / "bert-base-uncased-vocab.txt")


def read_vocab(vocab_path: Union[str, os.PathLike]) -> list[str]:
  with open(vocab_path, encoding="utf-8") as f:
    return [line.rstrip("\n") for line in f]


def infer_lowercase(tokens: Sequence[str]) -> bool:
  """True if the vocabulary looks uncased (no ordinary entry has an A-Z capital).

  Only ASCII capitals count: uncased BERT still holds a few symbols such as
  "\u211d" that Python calls upper case, while any cased English vocabulary has
  thousands of capitalised words.
  """
  for tok in tokens:
    if tok.startswith("[") and tok.endswith("]"):
      continue  # [CLS], [unused0], ...
    if any("A" <= c <= "Z" for c in tok):
      return False
  return True


class Tokenizer:
  """Report text -> ``{"input_ids", "attention_mask"}``, int32 ``[N, max_len]``.

  Attributes:
    vocab_path: the vocabulary file.
    max_len: fixed output length (``[CLS] ... [SEP]`` then ``[PAD]``).
    lowercase: whether text is lower-cased (and accents stripped) first.
  """

  def __init__(
    self,
    vocab_path: Union[str, os.PathLike, None] = None,
    max_len: int = schema.MAX_TEXT_LEN,
    lowercase: bool | None = None,
  ):
    from transformers import BertTokenizerFast  # pylint: disable=g-import-not-at-top

    self.vocab_path = str(vocab_path or DEFAULT_VOCAB)
    if not os.path.isfile(self.vocab_path):
      raise FileNotFoundError(f"vocabulary not found: {self.vocab_path}")
    vocab = read_vocab(self.vocab_path)
    self.lowercase = infer_lowercase(vocab) if lowercase is None else bool(lowercase)
    self.max_len = int(max_len)
    self._tok = BertTokenizerFast(vocab=self.vocab_path, do_lower_case=self.lowercase, model_max_length=self.max_len)
    if self._tok.vocab_size != len(vocab):
      raise ValueError(
        f"{self.vocab_path}: tokenizer kept {self._tok.vocab_size} of "
        f"{len(vocab)} vocabulary entries (duplicate lines?)"
      )
    self.pad_id = self._tok.pad_token_id
    self.cls_id = self._tok.cls_token_id
    self.sep_id = self._tok.sep_token_id
    self.unk_id = self._tok.unk_token_id
    self.mask_id = self._tok.mask_token_id

  @property
  def vocab_size(self) -> int:
    return self._tok.vocab_size

  def __call__(self, texts: Union[str, Sequence[str]]) -> dict[str, np.ndarray]:
    if isinstance(texts, str):
      texts = [texts]
    enc = self._tok(
      list(texts),
      padding="max_length",
      truncation=True,
      max_length=self.max_len,
      return_tensors="np",
      return_token_type_ids=False,
    )
    return {"input_ids": enc["input_ids"].astype(np.int32), "attention_mask": enc["attention_mask"].astype(np.int32)}

  def num_tokens(self, text: str) -> int:
    """WordPiece count of ``text`` without special tokens (for truncation rules)."""
    return len(self._tok(text, add_special_tokens=False)["input_ids"])

  def tokenize(self, text: str) -> list[str]:
    return self._tok.tokenize(text)

  def decode(self, ids, skip_special_tokens: bool = True) -> Union[str, list[str]]:
    """Ids ``[L]`` -> str, or ``[N, L]`` -> list of str."""
    ids = np.asarray(ids)
    if ids.ndim == 2:
      return [self.decode(row, skip_special_tokens) for row in ids]
    return self._tok.decode(ids.tolist(), skip_special_tokens=skip_special_tokens)

  def __getstate__(self):
    # The Rust tokenizer pickles fine, but rebuilding from the path keeps worker
    # start-up cheap and avoids version skew between processes.
    return {"vocab_path": self.vocab_path, "max_len": self.max_len, "lowercase": self.lowercase}

  def __setstate__(self, state):
    self.__init__(state["vocab_path"], state["max_len"], state["lowercase"])
