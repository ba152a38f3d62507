"""Building a `Mega` from official checkpoints: a state dict, or a directory with params.json and the weights.

A checkpoint directory holds
  params.json          the official `ModelConf` kwargs (or an official trainer config with a `model` entry);
  model.safetensors    the official state dict (exact keys), or
  model-0000K-of-0000N.safetensors + model.safetensors.index.json   the same in shards (Hugging Face's layout,
                       what `megalodon-convert to-pytorch --format safetensors` writes above --max_shard_size), or
  consolidated.pth     the same, saved with `torch.save` (the official consolidated format).
Every problem is reported with the file and what is wrong: missing files, unreadable or truncated files, and
all missing / unexpected / mis-shaped keys at once.
"""

from __future__ import annotations

import json
import os
import pathlib
from typing import Any, Mapping, Optional, Union

import torch
from torch import Tensor

from megalodon_jax.errors import CheckpointError, ConfigError
from megalodon_jax.pytorch.config import ModelConf
from megalodon_jax.pytorch.model import Mega

PARAMS_FILE = "params.json"
SAFETENSORS_FILE = "model.safetensors"
SAFETENSORS_INDEX = SAFETENSORS_FILE + ".index.json"  # {"weight_map": {name: shard file}} of sharded safetensors
TORCH_FILE = "consolidated.pth"

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16}


def _torch_dtype(dtype: Union[None, str, torch.dtype]) -> Optional[torch.dtype]:
  if dtype is None or isinstance(dtype, torch.dtype):
    return dtype
  if dtype not in _DTYPES:
    raise ValueError(f"dtype={dtype!r}: use a torch dtype or one of {sorted(_DTYPES)}")
  return _DTYPES[dtype]


def expected_state_dict(conf: ModelConf) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
  """Official key -> (shape, dtype) of a model with this config (taken from a weightless model)."""
  with torch.device("meta"):
    model = Mega(conf, init=False)
  return {k: (tuple(v.shape), v.dtype) for k, v in model.state_dict().items()}


def check_state_dict(state_dict: Mapping[str, Any], conf: ModelConf, source: str = "state dict") -> None:
  """Raises CheckpointError listing every missing, unexpected, mis-shaped or wrongly typed key."""
  expected = expected_state_dict(conf)
  missing = [k for k in expected if k not in state_dict]
  unexpected = sorted(k for k in state_dict if k not in expected)
  not_tensors = sorted(k for k in state_dict if k in expected and not isinstance(state_dict[k], Tensor))
  misshaped, mistyped = [], []
  for k, (shape, dtype) in expected.items():
    t = state_dict.get(k)
    if not isinstance(t, Tensor):
      continue
    if tuple(t.shape) != shape:
      misshaped.append(f"{k}: got {tuple(t.shape)}, expected {shape}")
    elif t.dtype.is_floating_point != dtype.is_floating_point:
      mistyped.append(f"{k}: got {t.dtype}, expected {dtype}")
  problems = []
  for what, keys in (("missing keys", missing), ("unexpected keys", unexpected), ("not tensors", not_tensors),
                     ("mis-shaped keys", misshaped), ("wrong dtype kind", mistyped)):
    if keys:
      problems.append(f"{what} ({len(keys)}): {keys}")
  if problems:
    c = conf
    raise CheckpointError(
        f"{source} does not match the config (num_layers={c.num_layers}, model_dim={c.model_dim}, "
        f"num_heads={c.num_heads}, z_dim={c.z_dim}, value_dim={c.value_dim}, ffn_hidden_dim={c.ffn_hidden_dim}, "
        f"swiglu={c.swiglu}, rescale_nffn={c.rescale_nffn}, share_emb={c.share_emb}, "
        f"norm_affine={c.norm_affine}):\n  " + "\n  ".join(problems))


def from_state_dict(state_dict: Mapping[str, Tensor], conf: Union[ModelConf, Mapping[str, Any]], *,
                    device: Union[None, str, torch.device] = None, dtype: Union[None, str, torch.dtype] = None,
                    source: str = "state dict", copy: bool = True) -> Mega:
  """A `Mega` holding an official state dict.

  Args:
    state_dict: official key -> tensor (numpy arrays are accepted too).
    conf: a ModelConf or the official ModelConf kwargs; vocab_size=-1 is taken from embed.weight.
    device: where the model lives (default CPU).
    dtype: parameter / activation dtype (e.g. torch.bfloat16); default: float32. Buffers stay as loaded
      (rope.freqs float32, prior_count int64).
    source: name used in error messages.
    copy: copy the tensors (False: the model may adopt them, sharing memory with `state_dict`).
  Returns:
    the model in eval mode.
  Raises:
    CheckpointError: key, shape or tying problems (all listed); ConfigError: a bad config.
  """
  conf = ModelConf.from_dict(conf)
  sd = {k: (torch.from_numpy(v.copy()) if not isinstance(v, Tensor) and hasattr(v, "dtype") else v)
        for k, v in state_dict.items()}
  if conf.vocab_size == -1:
    emb = sd.get("embed.weight")
    if not isinstance(emb, Tensor) or emb.dim() != 2:
      raise CheckpointError(f"{source}: vocab_size is -1 in the config and there is no 2-D embed.weight to take it "
                            "from; set vocab_size")
    conf = conf.replace(vocab_size=int(emb.shape[0]))
  check_state_dict(sd, conf, source)
  if conf.share_emb and not torch.equal(sd["embed.weight"], sd["output.output.weight"]):
    raise CheckpointError(f"{source}: share_emb=True but output.output.weight differs from embed.weight; load it "
                          "with share_emb=False")
  with torch.device("meta"):
    model = Mega(conf, init=False)
  # assign=True adopts the loaded tensors without allocating (and initialising) a second copy of the weights.
  model.load_state_dict({k: _owned(v, copy) for k, v in sd.items()}, strict=True, assign=True)
  if conf.share_emb:  # assignment replaced the shared Parameter by two; tie them again
    model.output.output.weight = model.embed.weight
  model.to(device=device or "cpu", dtype=_torch_dtype(dtype) or torch.float32)
  return model.eval()


def _owned(t: Tensor, copy: bool) -> Tensor:
  """float32 for floating tensors (cast to the requested dtype afterwards), copied if asked."""
  out = t.float() if t.is_floating_point() else t
  return out.clone() if copy and out.data_ptr() == t.data_ptr() else out


def _read_json(path: pathlib.Path) -> dict:
  try:
    data = json.loads(path.read_text())
  except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
    raise CheckpointError(f"{path}: not a readable JSON file ({e})") from e
  if not isinstance(data, dict):
    raise CheckpointError(f"{path}: expected a JSON object of ModelConf fields, got {type(data).__name__}")
  return data


def read_weights(path: Union[str, os.PathLike]) -> dict[str, Tensor]:
  """The state dict in a `.safetensors` file or a `torch.save`d `.pth` file (read on the CPU, no pickled code)."""
  path = pathlib.Path(path)
  if not path.is_file():
    raise CheckpointError(f"{path}: no such file")
  if path.suffix == ".safetensors":
    from safetensors.torch import load_file  # pylint: disable=import-outside-toplevel
    try:
      return load_file(str(path))
    except Exception as e:  # safetensors raises its own error types for truncated / malformed headers
      raise CheckpointError(f"{path}: not a valid safetensors file (truncated or corrupt?): {e}") from e
  try:
    obj = torch.load(str(path), map_location="cpu", weights_only=True)
  except Exception as e:  # zip / unpickling errors of truncated or foreign files
    raise CheckpointError(f"{path}: not a readable torch.save checkpoint (truncated, corrupt or not a checkpoint "
                          f"file): {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from e
  if isinstance(obj, Mapping) and "model" in obj and isinstance(obj["model"], Mapping):
    obj = obj["model"]  # a training checkpoint wrapping the state dict
  if not isinstance(obj, Mapping) or not all(isinstance(k, str) for k in obj):
    raise CheckpointError(f"{path}: expected a state dict (a dict of name -> tensor), got {type(obj).__name__}")
  bad = sorted(k for k, v in obj.items() if not isinstance(v, Tensor))
  if bad:
    raise CheckpointError(f"{path}: expected a state dict of tensors; these entries are not tensors: {bad}")
  return dict(obj)


def load(path: Union[str, os.PathLike], *, device: Union[None, str, torch.device] = None,
         dtype: Union[None, str, torch.dtype] = None, strict_config: bool = True) -> Mega:
  """Loads a checkpoint directory (params.json + model.safetensors or consolidated.pth) into a `Mega`.

  Args:
    path: the directory. When both weight files exist, model.safetensors is used.
    device, dtype: as in `from_state_dict`.
    strict_config: unknown keys in params.json are an error (False: ignored).
  Returns:
    the model in eval mode.
  Raises:
    CheckpointError: missing / unreadable files, key mismatches; ConfigError: invalid params.json values.
  """
  root = pathlib.Path(path)
  if not root.is_dir():
    raise CheckpointError(f"{root}: not a directory (expected a checkpoint directory with {PARAMS_FILE} and "
                          f"{SAFETENSORS_FILE} or {TORCH_FILE})")
  params = root / PARAMS_FILE
  if not params.is_file():
    raise CheckpointError(f"{root}: missing {PARAMS_FILE} (the official ModelConf fields as a JSON object)")
  try:
    conf = ModelConf.from_dict(_read_json(params), strict=strict_config)
  except (ConfigError, TypeError) as e:
    raise ConfigError(f"{params}: {e}") from e
  weights = next((root / f for f in (SAFETENSORS_FILE, SAFETENSORS_INDEX, TORCH_FILE) if (root / f).is_file()), None)
  if weights is None:
    raise CheckpointError(f"{root}: no weights file; expected {SAFETENSORS_FILE}, {SAFETENSORS_INDEX} or "
                          f"{TORCH_FILE}")
  state_dict = _read_shards(weights) if weights.name == SAFETENSORS_INDEX else read_weights(weights)
  return from_state_dict(state_dict, conf, device=device, dtype=dtype, source=str(weights), copy=False)


def _read_shards(index: pathlib.Path) -> dict[str, Tensor]:
  """The state dict of sharded safetensors: every shard the index's weight_map names, each tensor from the shard
  it maps to (a name missing from its shard is left out, and from_state_dict names it)."""
  weight_map = _read_json(index).get("weight_map")
  if not isinstance(weight_map, dict):
    raise CheckpointError(f"{index}: no \"weight_map\" (tensor name -> shard file)")
  out: dict[str, Tensor] = {}
  for shard in sorted(set(weight_map.values())):
    tensors = read_weights(index.parent / os.path.basename(str(shard)))
    out.update({k: v for k, v in tensors.items() if weight_map.get(k) == shard})
  return out


def save(model: Mega, path: Union[str, os.PathLike], *,
         format: str = "safetensors") -> pathlib.Path:  # pylint: disable=redefined-builtin
  """Writes params.json and the official state dict (model.safetensors or consolidated.pth) into `path`."""
  if format not in ("safetensors", "pth"):
    raise ValueError(f"format={format!r}: use 'safetensors' or 'pth'")
  root = pathlib.Path(path)
  root.mkdir(parents=True, exist_ok=True)
  (root / PARAMS_FILE).write_text(json.dumps(model.cfg.to_dict(), indent=2) + "\n")
  # Clones: safetensors refuses tensors sharing storage (the tied head).
  sd = {k: v.detach().cpu().clone().contiguous() for k, v in model.state_dict().items()}
  if format == "safetensors":
    from safetensors.torch import save_file  # pylint: disable=import-outside-toplevel
    save_file(sd, str(root / SAFETENSORS_FILE))
  else:
    torch.save(sd, root / TORCH_FILE)
  return root
