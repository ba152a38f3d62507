"""Incremental detokenization: text for streamed token ids, printed once and never revised."""

from __future__ import annotations

import codecs
from typing import Sequence

from megalodon_jax.data.tokenizers import ByteTokenizer, Tokenizer

_REPLACEMENT = "\ufffd"


class TextStream:
  """Turns ids arriving in pieces into text pieces whose concatenation is the decoded text of all ids.

  Bytes: an incremental UTF-8 decoder (a character split across pieces waits for its last byte; invalid bytes
  become U+FFFD). Other tokenizers: the whole id list is decoded again and the new suffix is returned (their
  pieces depend on neighbours, e.g. SentencePiece's leading spaces); trailing U+FFFD is held back until the next
  piece, since it may be an incomplete byte-fallback character.
  """

  def __init__(self, tokenizer: Tokenizer):
    self._tokenizer = tokenizer
    self._bytes = isinstance(tokenizer, ByteTokenizer)
    self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    self._ids: list[int] = []
    self._printed = 0  # characters printed so far

  def push(self, ids: Sequence[int]) -> str:
    """The printable text that `ids` (the next tokens) add."""
    if self._bytes:
      return self._decoder.decode(bytes(int(i) for i in ids))
    self._ids.extend(int(i) for i in ids)
    return self._past_printed(self._tokenizer.decode(self._ids).rstrip(_REPLACEMENT))

  def flush(self) -> str:
    """Whatever was held back (an incomplete character at the very end, shown as U+FFFD)."""
    if self._bytes:
      return self._decoder.decode(b"", final=True)
    return self._past_printed(self._tokenizer.decode(self._ids))

  def _past_printed(self, text: str) -> str:
    """The part of the decoded `text` past the printed length, which it then counts as printed.

    Normally `text` extends what was printed; if a tokenizer rewrote earlier text, only the part past the printed
    length is new (printed text cannot be taken back).
    """
    new = text[self._printed:]
    self._printed = max(self._printed, len(text))
    return new
