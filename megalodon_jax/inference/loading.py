"""A model and its tokenizer for the inference tools, from any checkpoint this project reads.

Accepted checkpoints:
- Orbax: a train.py workdir, its `checkpoints/` folder, a step folder, or a `from-pytorch` params-only folder
  (`checkpoints.model_io.load_checkpoint`);
- PyTorch: an official `consolidated.pth` (or a folder of `consolidated.NN.pth` shards, or a folder holding
  `consolidated.pth` / `model.safetensors`), or a `.safetensors` file with official or megalodon-hf keys, converted
  in memory (`convert.torch_files.read_official`); `params.json` / `config.json` beside it, or `config_path`.

Tokenizer: a checkpoint that carries a SentencePiece model (a train.py step's `meta` item, `tokenizer.model` in a
params-only checkpoint or beside PyTorch files; checkpoints/tokenizer_copy.py) uses that copy. Otherwise a train.py
step folder records its data config (`data.tokenizer`, `data.tokenizer_path`) in the `meta`
item; the `tokenizer` / `tokenizer_path` arguments override it. Other checkpoints record none: then the
arguments are needed, except for a 256-token vocabulary, where the byte tokenizer is assumed.
"""

from __future__ import annotations

import dataclasses
import os
import types
from typing import Any, Optional

import jax

from megalodon_jax import paths
from megalodon_jax.checkpoints import layout, tokenizer_copy
from megalodon_jax.checkpoints.locate import EXECUTION_FIELDS, locate_checkpoint
from megalodon_jax.checkpoints.model_io import load_checkpoint
from megalodon_jax.config import MegalodonConfig
from megalodon_jax.data.tokenizers import TOKENIZERS, SentencePieceTokenizer, Tokenizer, make_tokenizer
from megalodon_jax.errors import InferenceError
from megalodon_jax.model import MegalodonLM

TORCH_SUFFIXES = (".pth", ".pt", ".safetensors")


@dataclasses.dataclass
class Loaded:
  """A loaded model with what the inference tools need to know about it.

  step: the training step (None if unknown).  data_config: the training run's `data` settings (dict) or None.
  notes: human-readable remarks for stderr (e.g. which tokenizer was assumed).
  """
  model: MegalodonLM
  config: MegalodonConfig
  tokenizer: Tokenizer
  step: Optional[int]
  source: str
  kind: str  # "orbax" | "pytorch"
  data_config: Optional[dict]
  notes: list


def _is_torch(path: str) -> bool:
  p = paths.as_path(path)
  if p.is_file():
    return path.endswith(TORCH_SUFFIXES)
  names = [c.name for c in p.iterdir()] if p.is_dir() else []
  has_torch = any(n == "model.safetensors" or (n.startswith("consolidated") and n.endswith(".pth")) for n in names)
  return has_torch and layout.folder_kind(path) == "steps"  # no Orbax item, step folder or workdir


def _training_data_config(path: str, step: Optional[int]) -> tuple[Optional[dict], Optional[bytes]]:
  """The `data` section of the training config saved with a train.py step (None for other checkpoints), and the
  SentencePiece model the checkpoint carries (None if none)."""
  info = locate_checkpoint(path, step)
  data = info.train_config.get("data") if info.train_config is not None else None
  return (data if isinstance(data, dict) else None), info.tokenizer_model


def resolve_tokenizer(config: MegalodonConfig, data_config: Optional[dict], tokenizer: Optional[str],
                      tokenizer_path: Optional[str], stored_model: Optional[bytes] = None) -> tuple[Tokenizer, list]:
  """The tokenizer from flags over stored settings; checks it against the model's vocabulary.

  stored_model: a SentencePiece model's bytes that came with the checkpoint (checkpoints/tokenizer_copy.py): used
  unless the flags name another tokenizer or file, so a run directory or export works wherever it is copied.
  """
  stored = dict(data_config or {})
  notes = []
  name = tokenizer or stored.get("tokenizer")
  if stored_model is not None and not tokenizer_path and name in (None, "sentencepiece"):
    tok = SentencePieceTokenizer(model_proto=stored_model)
    notes.append("tokenizer: the SentencePiece model stored with the checkpoint")
    return _check_vocab(tok, "sentencepiece", config), notes
  path = tokenizer_path or (stored.get("tokenizer_path") if name == stored.get("tokenizer") else "") or ""
  if tokenizer_path and not name:
    name = "sentencepiece"
  if name is None:
    if config.vocab_size != 256:
      raise InferenceError(f"the checkpoint records no tokenizer and its vocabulary has {config.vocab_size} tokens: "
                           f"pass --tokenizer sentencepiece --tokenizer_path /path/to/tokenizer.model")
    name = "bytes"
    notes.append("no tokenizer recorded; vocabulary 256: using the byte tokenizer (override with --tokenizer)")
  if name not in TOKENIZERS:
    raise InferenceError(f"--tokenizer={name!r} is unknown; use one of {TOKENIZERS}")
  if name == "bytes":
    if tokenizer_path:
      raise InferenceError(f"--tokenizer_path {tokenizer_path} applies to --tokenizer sentencepiece; the byte "
                           f"tokenizer reads no model file")
    path = ""  # a run's stored setting: the byte tokenizer never read it
  tok = make_tokenizer(types.SimpleNamespace(tokenizer=name, tokenizer_path=path))
  return _check_vocab(tok, name, config), notes


def _check_vocab(tok: Tokenizer, name: str, config: MegalodonConfig) -> Tokenizer:
  if tok.vocab_size > config.vocab_size:
    raise InferenceError(f"the {name} tokenizer has {tok.vocab_size} tokens but the model's vocabulary has only "
                         f"{config.vocab_size}: they do not belong together")
  return tok


def load_model(path: str, *, step: Optional[int] = None, config_path: Optional[str] = None,
               tokenizer: Optional[str] = None, tokenizer_path: Optional[str] = None,
               device: Optional[jax.Device] = None, **execution: Any) -> Loaded:
  """Loads a checkpoint (see the module docstring) and its tokenizer.

  Args:
    path: checkpoint path.
    step: the step of a train.py workdir / checkpoints folder (default: the latest).
    config_path: params.json / config.json of a PyTorch checkpoint (default: beside it).
    tokenizer, tokenizer_path: override the recorded tokenizer ("bytes" | "sentencepiece", the .model file).
    device: where the arrays go (default: the first device).
    **execution: execution settings (dtype="bfloat16", cema_impl=..., see checkpoints.locate.EXECUTION_FIELDS).
  Raises:
    InferenceError (bad path or tokenizer); ConvertError, StateDictError, CheckpointError (damaged or mismatching
    checkpoints); DataError (tokenizer file).
  """
  full = paths.abspath(path)
  if not paths.as_path(full).exists():
    raise InferenceError(f"checkpoint {full} does not exist")
  if _is_torch(full):
    # Imported here: only PyTorch checkpoints need torch.
    from megalodon_jax.convert import torch_files  # pylint: disable=import-outside-toplevel
    from megalodon_jax.convert.official import from_official_state_dict  # pylint: disable=import-outside-toplevel
    if step is not None:
      raise InferenceError(f"--step does not apply to the PyTorch checkpoint {full}")
    tensors, config = torch_files.read_official(full, config_path)
    bad = sorted(set(execution) - set(EXECUTION_FIELDS))
    if bad:
      raise InferenceError(f"{bad} are not execution settings; allowed: {list(EXECUTION_FIELDS)}")
    config = config.replace(**execution) if execution else config
    with jax.default_device(device or jax.devices()[0]):
      model = from_official_state_dict(tensors, config)
    loaded_step, kind, data_config = None, "pytorch", None
    stored_model = tokenizer_copy.read_copy(full if paths.as_path(full).is_dir() else os.path.dirname(full))
  else:
    if config_path is not None:
      raise InferenceError("--config applies to PyTorch checkpoints only (an Orbax checkpoint records its config)")
    model, config, loaded_step = load_checkpoint(full, step=step, device=device, **execution)
    kind = "orbax"
    data_config, stored_model = _training_data_config(full, step)
  tok, notes = resolve_tokenizer(config, data_config, tokenizer, tokenizer_path, stored_model)
  return Loaded(model, config, tok, loaded_step, full, kind, data_config, notes)
