"""Documents to evaluate: any text files (one document per file), or a split of a training data config."""

from __future__ import annotations

import json
import os
import types
from typing import Iterator, Optional, Sequence

import numpy as np

from megalodon_jax import paths as paths_lib
from megalodon_jax.data import prepare
from megalodon_jax.data import sources
from megalodon_jax.data.config import FIELDS as DATA_FIELDS
from megalodon_jax.data.tokenizers import SentencePieceTokenizer, Tokenizer
from megalodon_jax.errors import InferenceError


def text_file_paths(spec: str) -> list[str]:
  """Files named by comma-separated paths, folders (every file below, sorted) or globs; checked to exist."""
  out: list[str] = []
  for part in (p.strip() for p in spec.split(",")):
    if not part:
      continue
    remote = paths_lib.is_remote(part)  # gs://...: the same rules through epath
    path = part if remote else os.path.expanduser(part)
    is_file = (lambda m: paths_lib.as_path(m).is_file()) if remote else os.path.isfile
    if paths_lib.as_path(path).is_dir():
      found = (paths_lib.list_files(path) if remote
               else sorted(os.path.join(d, f) for d, _, files in os.walk(path) for f in files))
    elif is_file(path):
      found = [path]
    else:
      found = [m for m in paths_lib.glob_files(path) if is_file(m)]
    if not found:
      raise InferenceError(f"--text_files: {part!r} matches no file")
    out.extend(found)
  if not out:
    raise InferenceError("--text_files is empty: name files, folders or globs, comma separated")
  return out


def text_file_documents(paths: Sequence[str], tokenizer: Tokenizer) -> Iterator[np.ndarray]:
  """Token ids of each file's bytes (UTF-8 text), read one at a time."""
  for path in paths:
    try:
      data = paths_lib.as_path(path).read_bytes()
    except OSError as e:
      raise InferenceError(f"--text_files: cannot read {path} ({type(e).__name__}: {e})") from None
    yield np.asarray(tokenizer.encode_bytes(data))


def data_config(stored: Optional[dict], overrides: Sequence[str], tokenizer: Tokenizer) -> types.SimpleNamespace:
  """The data settings to read a split with: the checkpoint's training `data` config, then `key=value` overrides.

  The tokenizer fields always name the tokenizer in use (the documents are read as bytes and encoded by it).
  """
  cfg = dict(stored or {})
  for item in overrides:
    key, sep, value = item.partition("=")
    if not sep or not key:
      raise InferenceError(f"--data {item!r}: expected KEY=VALUE, e.g. --data dataset=text_files")
    if key not in DATA_FIELDS:
      raise InferenceError(f"--data {key}: unknown data setting; known: {sorted(DATA_FIELDS)}")
    try:
      cfg[key] = json.loads(value)
    except ValueError:
      cfg[key] = value
  if isinstance(tokenizer, SentencePieceTokenizer):
    cfg.update(tokenizer="sentencepiece", tokenizer_path=tokenizer.path)
  else:
    cfg.update(tokenizer="bytes", tokenizer_path="")
  return types.SimpleNamespace(**cfg)


def split_documents(cfg: types.SimpleNamespace, split: str, tokenizer: Tokenizer,
                    max_documents: Optional[int] = None) -> Iterator[np.ndarray]:
  """Token ids of the documents of `split`, in stored order (the dataset is prepared first if needed)."""
  prepare(cfg)
  source = sources.open_split(cfg, split, "--split")
  n = len(source) if max_documents is None else min(len(source), max_documents)
  for i in range(n):
    yield np.asarray(tokenizer.encode_bytes(source[i]))
