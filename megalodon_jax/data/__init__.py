"""Training data: TFDS datasets prepared as array_record, read with `as_data_source`, packed and batched by grain.

`config.data.dataset` picks the corpus:
- `stdlib`: this Python's standard-library `.py` sources (built in, no download; `stdlib_corpus.py`),
- `text_files`: local text files named by `data.path` (`text_files.py`),
- `jsonl`: JSON-lines files (plain, .gz, .zst) named by `data.path`, the text in field `data.text_key` (`jsonl.py`),
- `enwik8`: the byte-level benchmark from `data.manual_dir` (`enwik8.py`),
- `tfds`: a TFDS dataset already prepared in array_record format under `data.data_dir` (`data.name`).

Order of use (the trainer's): `check_data_config` (cheap, before anything else), `prepare` (idempotent; builds the
dataset once per set of inputs), then `make_train_iterator` and `make_eval_batches` (`pipeline.py`; the training order:
`row_streams.py`).
"""

from __future__ import annotations

import importlib
from typing import Any

from megalodon_jax.errors import DataError

# Imported on first use (PEP 562): the command line checks a config before jax, grain and TFDS start, and
# `check_data_config` needs only sources.py.
_LAZY = {"TrainIterator": "pipeline", "make_eval_batches": "pipeline", "make_train_iterator": "pipeline",
         "merge_states": "pipeline", "ByteTokenizer": "tokenizers", "SentencePieceTokenizer": "tokenizers",
         "Tokenizer": "tokenizers", "make_tokenizer": "tokenizers"}

__all__ = [
    "ByteTokenizer", "DataError", "SentencePieceTokenizer", "Tokenizer", "TrainIterator", "check_data_config",
    "make_eval_batches", "make_tokenizer", "make_train_iterator", "merge_states", "prepare",
]


def __getattr__(name: str) -> Any:
  module = _LAZY.get(name)
  if module is None:
    raise AttributeError(f"module 'megalodon_jax.data' has no attribute {name!r}")
  value = getattr(importlib.import_module(f"megalodon_jax.data.{module}"), name)
  globals()[name] = value
  return value


def __dir__() -> list[str]:
  return sorted(set(globals()) | set(__all__))


def check_data_config(data_cfg: Any) -> None:
  """Raises DataError for a bad `config.data` (names, paths, splits, tokenizer file); prepares and reads nothing big.

  Checks: `dataset` known; `path` non-empty with every entry matching a file, and each file UTF-8 text when the
  dataset is not prepared yet (text_files: `text_files.check_text_files`); `manual_dir` set and its enwik8 file of
  the right size when enwik8 is not prepared yet; `name` prepared under `data_dir` in array_record with feature
  `text_key` (tfds); `tokenizer` known, `tokenizer_path` present for sentencepiece and empty for bytes (a
  ConfigError: the byte tokenizer would ignore it); `train_split` / `eval_split` existing; the training split
  non-empty; `validation_percent`, `max_documents`, `add_eos`, `worker_count` valid.
  """
  from megalodon_jax.data import sources  # pylint: disable=import-outside-toplevel
  sources.check(data_cfg)


def prepare(data_cfg: Any) -> None:
  """Prepares `config.data`'s dataset under `data_dir` if it is not there yet (safe when processes share it).

  Raises:
    DataError: as `check_data_config`, or the enwik8 file could not be found or downloaded.
  """
  from megalodon_jax.data import sources  # pylint: disable=import-outside-toplevel
  sources.prepare(data_cfg)
