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

Loading is two steps: `check_checkpoint` reads no arrays and imports no jax (the path, the flags that apply to it,
an Orbax checkpoint's config and its tokenizer), so a command line reports a bad checkpoint path or tokenizer flag
before jax starts; `load_checked` then reads the weights. `load_model` does both.
"""

from __future__ import annotations

import dataclasses
import os
import types
from typing import TYPE_CHECKING, Any, Optional

from megalodon_jax import paths
from megalodon_jax.checkpoints import layout, tokenizer_copy
from megalodon_jax.checkpoints.locate import EXECUTION_FIELDS, CheckpointInfo, locate_checkpoint
from megalodon_jax.config import MegalodonConfig
from megalodon_jax.data.tokenizers import TOKENIZERS, SentencePieceTokenizer, Tokenizer, make_tokenizer
from megalodon_jax.errors import InferenceError

if TYPE_CHECKING:  # jax, flax and the model are imported by `load_checked` only, after the cheap checks
  import jax

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


@dataclasses.dataclass
class Checked:
  """A checkpoint path `check_checkpoint` accepted, with what `load_checked` needs.

  source: the absolute path.  kind: "orbax" | "pytorch".  step, config_path, tokenizer_args (tokenizer,
  tokenizer_path), execution: the caller's arguments.  info: an Orbax checkpoint's `locate_checkpoint` answer.
  tokenizer, notes: an Orbax checkpoint's tokenizer, resolved from its recorded config (None for PyTorch files,
  whose config is read with the tensors).
  """
  source: str
  kind: str
  step: Optional[int]
  config_path: Optional[str]
  tokenizer_args: tuple[Optional[str], Optional[str]]
  execution: dict
  info: Optional[CheckpointInfo] = None
  tokenizer: Optional[Tokenizer] = None
  notes: list = dataclasses.field(default_factory=list)

  @property
  def data_config(self) -> Optional[dict]:
    """The `data` section of the training config saved with a train.py step (None for other checkpoints)."""
    data = self.info.train_config.get("data") if self.info is not None and self.info.train_config else None
    return data if isinstance(data, dict) else None


def check_checkpoint(path: str, *, step: Optional[int] = None, config_path: Optional[str] = None,
                     tokenizer: Optional[str] = None, tokenizer_path: Optional[str] = None,
                     **execution: Any) -> Checked:
  """Every check of `load_model` that reads no arrays (and imports no jax): the path exists, the arguments apply
  to its kind, an Orbax checkpoint's step and config are found and its tokenizer resolved. Arguments and errors:
  see `load_model`."""
  full = paths.abspath(path)
  if not paths.as_path(full).exists():
    raise InferenceError(f"checkpoint {full} does not exist")
  checked = Checked(full, "orbax", step, config_path, (tokenizer, tokenizer_path), execution)
  if _is_torch(full):
    if step is not None:
      raise InferenceError(f"--step does not apply to the PyTorch checkpoint {full}")
    bad = sorted(set(execution) - set(EXECUTION_FIELDS))  # (an Orbax checkpoint's loader checks them itself)
    if bad:
      raise InferenceError(f"{bad} are not execution settings; allowed: {list(EXECUTION_FIELDS)}")
    checked.kind = "pytorch"
    return checked
  if config_path is not None:
    raise InferenceError("--config applies to PyTorch checkpoints only (an Orbax checkpoint records its config)")
  checked.info = locate_checkpoint(full, step)
  checked.tokenizer, checked.notes = resolve_tokenizer(checked.info.config, checked.data_config, tokenizer,
                                                       tokenizer_path, checked.info.tokenizer_model)
  return checked


def load_checked(checked: Checked, device: Optional[jax.Device] = None) -> Loaded:
  """Reads the weights of a checkpoint `check_checkpoint` accepted; `device`: where the arrays go (default: the
  first device). Errors: see `load_model`."""
  # pylint: disable=import-outside-toplevel  (jax and the model: after the cheap checks, see the module docstring)
  import jax

  full, execution = checked.source, checked.execution
  if checked.kind == "pytorch":
    # Imported here: only PyTorch checkpoints need torch.
    from megalodon_jax.convert import torch_files
    from megalodon_jax.convert.official import from_official_state_dict
    tensors, config = torch_files.read_official(full, checked.config_path)
    config = config.replace(**execution) if execution else config
    with jax.default_device(device or jax.devices()[0]):
      model = from_official_state_dict(tensors, config)
    stored_model = tokenizer_copy.read_copy(full if paths.as_path(full).is_dir() else os.path.dirname(full))
    tok, notes = resolve_tokenizer(config, None, *checked.tokenizer_args, stored_model)
    return Loaded(model, config, tok, None, full, "pytorch", None, notes)
  from megalodon_jax.checkpoints.model_io import load_checkpoint
  model, config, loaded_step = load_checkpoint(full, step=checked.step, device=device, **execution)
  return Loaded(model, config, checked.tokenizer, loaded_step, full, "orbax", checked.data_config, checked.notes)


def load_model(path: str, *, step: Optional[int] = None, config_path: Optional[str] = None,
               tokenizer: Optional[str] = None, tokenizer_path: Optional[str] = None,
               device: Optional[jax.Device] = None, **execution: Any) -> Loaded:
  """Loads a checkpoint (see the module docstring) and its tokenizer: `check_checkpoint`, then `load_checked`.

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
  checked = check_checkpoint(path, step=step, config_path=config_path, tokenizer=tokenizer,
                             tokenizer_path=tokenizer_path, **execution)
  return load_checked(checked, device)
