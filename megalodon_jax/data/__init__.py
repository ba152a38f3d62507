"""Training data: TFDS datasets prepared as array_record, read with `as_data_source`, packed and batched by grain.

`config.data.dataset` picks the corpus:
- `stdlib`: this Python's standard-library `.py` sources (built in, no download; `stdlib_corpus.py`),
- `text_files`: local text files named by `data.path` (`text_files.py`),
- `jsonl`: JSON-lines files (plain, .gz, .zst) named by `data.path`, the text in field `data.text_key` (`jsonl.py`),
- `enwik8`: the byte-level benchmark from `data.manual_dir` (`enwik8.py`),
- `tfds`: a TFDS dataset already prepared in array_record format under `data.data_dir` (`data.name`).

Order of use (the trainer's): `plan = plan(config.data)` (cheap checks, before anything else; the source is
resolved here, once: `sources.py`), `prepare(plan)` (idempotent; builds the dataset once per set of inputs), then
`make_train_iterator(plan, ...)` and `make_eval_batches(plan, ...)` (`pipeline.py`; the training order:
`row_streams.py`). These also take a `config.data`, which each call then plans on its own. With `data.mixture`
(several sources with weights, `mixture.py`) the plan is a `MixturePlan` and the batches come from
`mixture_pipeline.py`, where the package's `make_train_iterator` and `make_eval_batches` live (they hand a single
dataset to `pipeline.py`).
"""

from __future__ import annotations

import importlib
from typing import Any

from megalodon_jax.errors import DataError

# Imported on first use (PEP 562): the command line checks a config before jax, grain and TFDS start, and
# `plan` (`check_data_config`) needs only sources.py.
_LAZY = {"TrainIterator": "pipeline", "make_eval_batches": "mixture_pipeline",
         "make_train_iterator": "mixture_pipeline", "MixtureIterator": "mixture_pipeline", "MixturePlan": "mixture",
         "merge_states": "pipeline", "ByteTokenizer": "tokenizers", "SentencePieceTokenizer": "tokenizers",
         "Tokenizer": "tokenizers", "make_tokenizer": "tokenizers", "DataPlan": "sources", "plan": "sources",
         "prepare": "sources", "check_data_config": "sources"}

__all__ = sorted(["DataError", *_LAZY])


def __getattr__(name: str) -> Any:
  module = _LAZY.get(name)
  if module is None:
    raise AttributeError(f"module 'megalodon_jax.data' has no attribute {name!r}")
  value = getattr(importlib.import_module(f"megalodon_jax.data.{module}"), name)
  globals()[name] = value
  return value


def __dir__() -> list[str]:
  return sorted(set(globals()) | set(__all__))
