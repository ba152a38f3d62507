"""Tokenizers: raw UTF-8 bytes (vocab 256) and SentencePiece models, behind one small interface."""

from __future__ import annotations

import os
from typing import Any, Optional, Protocol, Sequence, Union

import numpy as np

from megalodon_jax import paths
from megalodon_jax.errors import ConfigError, DataError

TOKENIZERS = ("bytes", "sentencepiece")

Ids = Union[np.ndarray, Sequence[int]]


class Tokenizer(Protocol):
  """What the pipeline and the trainer use of a tokenizer."""

  vocab_size: int
  eos_id: Optional[int]

  def encode(self, text: str) -> np.ndarray:
    """Token ids of `text`: (n,) int32, no EOS appended."""

  def encode_bytes(self, data: bytes) -> np.ndarray:
    """Token ids of UTF-8 `data` (invalid sequences are replaced by U+FFFD first where the model needs text)."""

  def decode(self, ids: Ids) -> str:
    """Text of `ids` (any int sequence or array)."""


class ByteTokenizer:
  """One token per UTF-8 byte: vocab 256, no EOS (documents are simply concatenated)."""

  vocab_size = 256
  eos_id: Optional[int] = None

  def encode(self, text: str) -> np.ndarray:
    return self.encode_bytes(text.encode("utf-8"))

  def encode_bytes(self, data: bytes) -> np.ndarray:
    # Stored documents are already UTF-8; reading their bytes directly skips a decode/encode round trip.
    return np.frombuffer(data, dtype=np.uint8).astype(np.int32)

  def decode(self, ids: Ids) -> str:
    arr = np.asarray(ids, dtype=np.int64).reshape(-1)
    if arr.size and (arr.min() < 0 or arr.max() > 255):
      raise ValueError(f"byte ids must lie in [0, 255], got range [{arr.min()}, {arr.max()}]")
    # Model samples can cut a multi-byte character or produce invalid sequences: show them as U+FFFD.
    return arr.astype(np.uint8).tobytes().decode("utf-8", errors="replace")

  def __repr__(self) -> str:
    return "ByteTokenizer()"


class SentencePieceTokenizer:
  """A SentencePiece `.model` file (e.g. Llama-2's tokenizer.model); EOS is the model's `</s>` when it has one.

  Built from a file `path`, or from the model's bytes (`model_proto`: the copy a checkpoint carries).
  """

  def __init__(self, path: str = "", *, model_proto: Optional[bytes] = None):
    import sentencepiece as spm  # pylint: disable=import-outside-toplevel  # only runs that use it pay the import

    self.path = path
    self._proto = model_proto
    # Read through epath (the file may be on gs://) and loaded from the bytes: SentencePiece only opens local files.
    data = model_proto if model_proto is not None else paths.as_path(path).read_bytes()
    self._sp = spm.SentencePieceProcessor(model_proto=data)
    self.vocab_size: int = int(self._sp.vocab_size())
    eos = int(self._sp.eos_id())
    self.eos_id: Optional[int] = eos if eos >= 0 else None

  def encode(self, text: str) -> np.ndarray:
    return np.asarray(self._sp.encode(text), dtype=np.int32)

  def encode_bytes(self, data: bytes) -> np.ndarray:
    return self.encode(data.decode("utf-8", errors="replace"))

  def decode(self, ids: Ids) -> str:
    return self._sp.decode([int(i) for i in np.asarray(ids).reshape(-1)])

  def model_bytes(self) -> bytes:
    """The serialized SentencePiece model (what a `.model` file holds), for the copies checkpoints carry."""
    return self._sp.serialized_model_proto()

  def __getstate__(self) -> dict[str, Any]:
    # The processor is a C++ object; rebuild it from the file or bytes (grain worker processes pickle the pipeline).
    return {"path": self.path, "proto": self._proto}

  def __setstate__(self, state: dict[str, Any]) -> None:
    self.__init__(state["path"], model_proto=state.get("proto"))

  def __repr__(self) -> str:
    return f"SentencePieceTokenizer({self.path or '<stored model>'!r})"


def check_tokenizer_config(data_cfg: Any) -> None:
  """Raises DataError for an unknown `data.tokenizer` or a missing `data.tokenizer_path`, ConfigError for a
  `data.tokenizer_path` that the byte tokenizer would ignore; loads nothing."""
  name = getattr(data_cfg, "tokenizer", "bytes")
  path = getattr(data_cfg, "tokenizer_path", "") or ""
  if name not in TOKENIZERS:
    raise DataError(f"data.tokenizer={name!r} is unknown; use one of {TOKENIZERS}")
  if name == "bytes" and path:
    raise ConfigError(f"data.tokenizer_path={path!r} is set but data.tokenizer='bytes' never "
                      f"reads it: pass --config.data.tokenizer=sentencepiece to train with that model, or leave "
                      f"data.tokenizer_path empty for bytes")
  if name == "sentencepiece" and not path:
    raise DataError("data.tokenizer_path is empty; data.tokenizer='sentencepiece' needs the .model file, e.g. "
                    "--config.data.tokenizer_path=/path/to/tokenizer.model")
  if name == "sentencepiece" and not paths.as_path(path).is_file():
    raise DataError(f"data.tokenizer_path={path!r} does not exist (or is not a file)")


def make_tokenizer(data_cfg: Any) -> Union[ByteTokenizer, SentencePieceTokenizer]:
  """The tokenizer that `data_cfg.tokenizer` (and `tokenizer_path`) name.

  Raises:
    DataError: unknown tokenizer, missing model file, or a file SentencePiece cannot load.
    ConfigError: a `tokenizer_path` given with the byte tokenizer.
  """
  check_tokenizer_config(data_cfg)
  if data_cfg.tokenizer == "bytes":
    return ByteTokenizer()
  path = os.fspath(paths.as_path(data_cfg.tokenizer_path))
  try:
    return SentencePieceTokenizer(path)
  except (OSError, RuntimeError) as e:
    raise DataError(f"data.tokenizer_path={path!r} is not a SentencePiece model: {e}") from e
