"""Copies of the SentencePiece model that travel with runs, checkpoints and exports.

A run trained with `data.tokenizer="sentencepiece"` names its `.model` file by path; once the run directory is
copied to another machine, or the file moves, that path means nothing. So the model's bytes go with everything
that needs them:
- the run directory: `<workdir>/tokenizer.model` (written when training starts);
- every train.py checkpoint: inside the step's `meta` item (base64 and its SHA-256), so a step folder copied on its
  own still carries it;
- exports: `tokenizer.model` beside `params.json` / `config.json` (to-pytorch) and inside a params-only
  checkpoint (from-pytorch, when the PyTorch folder has one).
The inference tools use the stored copy unless `--tokenizer_path` overrides it.
"""

from __future__ import annotations

import base64
import hashlib
from typing import Any, Optional

from megalodon_jax import paths
from megalodon_jax.errors import CheckpointError

TOKENIZER_FILE = "tokenizer.model"
_META_KEY = "tokenizer_model"


def sha256(data: bytes) -> str:
  return hashlib.sha256(data).hexdigest()


def embed(meta: dict[str, Any], model: Optional[bytes]) -> dict[str, Any]:
  """`meta` with the SentencePiece model's bytes added (unchanged when there is none)."""
  if model is None:
    return meta
  return {**meta, _META_KEY: {"file": TOKENIZER_FILE, "sha256": sha256(model),
                              "base64": base64.b64encode(model).decode("ascii")}}


def embedded(meta: Any, where: str) -> Optional[bytes]:
  """The model bytes stored by `embed` in a checkpoint's meta, or None.

  Raises:
    CheckpointError: the stored copy is damaged (its SHA-256 does not match).
  """
  entry = meta.get(_META_KEY) if isinstance(meta, dict) else None
  if not isinstance(entry, dict):
    return None
  try:
    data = base64.b64decode(entry["base64"], validate=True)
  except (KeyError, ValueError, TypeError) as e:
    raise CheckpointError(f"{where}: the stored tokenizer model cannot be decoded ({e})") from e
  if sha256(data) != entry.get("sha256"):
    raise CheckpointError(f"{where}: the stored tokenizer model is damaged (SHA-256 mismatch)")
  return data


def read_copy(folder: str) -> Optional[bytes]:
  """`<folder>/tokenizer.model`'s bytes, or None when there is none."""
  path = paths.as_path(paths.join(folder, TOKENIZER_FILE))
  if not path.is_file():
    return None
  return path.read_bytes()


def write_copy(folder: str, model: bytes, *, what: str = "this folder") -> str:
  """Writes `<folder>/tokenizer.model` atomically; an identical existing copy is kept. Returns its path.

  Raises:
    CheckpointError: `folder` already holds a different tokenizer model (e.g. a run directory trained with
      another tokenizer): mixing them would silently change what the token ids mean.
  """
  path = paths.join(folder, TOKENIZER_FILE)
  existing = read_copy(folder)
  if existing is not None:
    if existing != model:
      raise CheckpointError(f"{path} holds another tokenizer model (SHA-256 {sha256(existing)[:12]}…, now "
                            f"{sha256(model)[:12]}…): {what} was made with a different tokenizer. Use a new "
                            f"directory, or the tokenizer it was made with")
    return path
  paths.makedirs(folder)
  paths.write_bytes_atomic(path, model)
  return path
