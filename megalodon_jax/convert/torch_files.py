"""PyTorch-side files: reading and writing `consolidated*.pth`, `model.safetensors`, `params.json`, `config.json`.

Tensors are handled as NumPy arrays (bfloat16 as `ml_dtypes.bfloat16`, moved bit for bit between torch and NumPy);
torch and safetensors are imported only here, so the JAX side never needs them.
"""

from __future__ import annotations

import glob
import json
import os
import re
import tempfile
from typing import Any, Mapping, Optional

import ml_dtypes
import numpy as np

from megalodon_jax import paths
from megalodon_jax.errors import ConvertError
from megalodon_jax.config import ConfigError, MegalodonConfig, rope_inv_freq
from megalodon_jax.convert import hf as hf_lib
from megalodon_jax.convert import safetensors_shards, tp_shards
from megalodon_jax.convert.official import StateDictError, check_state_dict

PARAMS_JSON = "params.json"
HF_CONFIG_JSON = "config.json"
_SHARD = re.compile(r"^consolidated\.(\d{2,})\.pth$")
_FLOATS = {np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64), np.dtype(ml_dtypes.bfloat16)}
DTYPES = {"float32": np.dtype(np.float32), "bfloat16": np.dtype(ml_dtypes.bfloat16)}


def _short(e: BaseException, limit: int = 200) -> str:
  text = " ".join(f"{type(e).__name__}: {e}".split())  # one line
  return text if len(text) <= limit else text[:limit] + " ..."


def to_numpy(t: Any) -> np.ndarray:
  """A torch tensor as NumPy (bfloat16 reinterpreted bit for bit as ml_dtypes.bfloat16)."""
  import torch  # pylint: disable=import-outside-toplevel
  t = t.detach().cpu().contiguous()
  if t.dtype == torch.bfloat16:
    return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
  return t.numpy()


def to_torch(a: np.ndarray) -> Any:
  """A NumPy array as a torch tensor (bfloat16 bit for bit); always a fresh, contiguous copy."""
  import torch  # pylint: disable=import-outside-toplevel
  a = np.array(a, order="C")
  if a.dtype == np.dtype(ml_dtypes.bfloat16):
    return torch.from_numpy(a.view(np.int16)).view(torch.bfloat16)
  return torch.from_numpy(a)


def load_tensor_file(path: str) -> dict[str, np.ndarray]:
  """The tensors of a `.pth` (torch.save of a state dict) or `.safetensors` file, as NumPy arrays.

  Raises:
    ConvertError: unreadable, truncated or not a state dict (one line, naming the file).
  """
  import torch  # pylint: disable=import-outside-toplevel
  if path.endswith(".safetensors"):
    from safetensors.torch import load_file  # pylint: disable=import-outside-toplevel
    try:
      obj = load_file(path, device="cpu")
    except Exception as e:  # safetensors raises SafetensorError / OSError for damaged files
      raise ConvertError(f"{path} is not a readable safetensors file ({_short(e)})") from None
  else:
    try:
      obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated zip, pickle garbage, text files: many exception types
      raise ConvertError(f"{path} is not a readable PyTorch checkpoint ({_short(e)})") from None
  if isinstance(obj, Mapping) and len(obj) == 1 and next(iter(obj)) in ("model", "state_dict"):
    obj = next(iter(obj.values()))  # {"model": state_dict} wrappers
  if not isinstance(obj, Mapping):
    raise ConvertError(f"{path} holds a {type(obj).__name__}, not a state dict (a mapping of name -> tensor)")
  bad = [k for k, v in obj.items() if not isinstance(v, torch.Tensor)]
  if bad:
    raise ConvertError(f"{path}: entries that are not tensors: {bad[:8]}{' ...' if len(bad) > 8 else ''}")
  return {str(k): to_numpy(v) for k, v in obj.items()}


def read_params_json(path: str, embed_rows: Optional[int] = None) -> MegalodonConfig:
  """The config of an official `params.json` (ModelConf kwargs); vocab_size -1 is taken from `embed_rows`."""
  try:
    with open(path, encoding="utf-8") as f:
      conf = json.load(f)
  except FileNotFoundError:
    raise ConvertError(f"{path} is missing: pass the model config with --config params.json") from None
  except (OSError, ValueError) as e:
    raise ConvertError(f"{path} is not a readable JSON file ({_short(e)})") from None
  if not isinstance(conf, dict):
    raise ConvertError(f"{path} must be a JSON object of official ModelConf fields")
  if conf.get("vocab_size", -1) == -1 and embed_rows is not None:
    conf = {**conf, "vocab_size": embed_rows}  # the official "set later from the tokenizer" default
  if isinstance(conf.get("rope_base"), int):
    conf = {**conf, "rope_base": float(conf["rope_base"])}
  try:
    if conf.get("model_type") == "megalodon":
      return hf_lib.config_from_hf(conf)
    return MegalodonConfig.from_official(conf)
  except (ConfigError, TypeError) as e:
    raise ConvertError(f"{path}: {e}") from None


def _source_files(path: str) -> tuple[str, list[str]]:
  """(kind, files) for --torch PATH: kind is "pth", "shards", "safetensors" or "index" (sharded safetensors: the
  files are [model.safetensors.index.json])."""
  if not os.path.exists(path):
    raise ConvertError(f"{path} does not exist")
  if os.path.isfile(path):
    if path.endswith(".safetensors.index.json"):
      return "index", [path]
    return ("safetensors" if path.endswith(".safetensors") else "pth"), [path]
  found = []
  if os.path.isfile(os.path.join(path, "consolidated.pth")):
    found.append(("pth", [os.path.join(path, "consolidated.pth")]))
  shards = sorted((int(m.group(1)), p) for p in glob.glob(os.path.join(glob.escape(path), "consolidated.*.pth"))
                  if (m := _SHARD.match(os.path.basename(p))))
  if shards:
    ranks = [r for r, _ in shards]
    if ranks != list(range(len(ranks))):
      raise ConvertError(f"{path}: tensor-parallel shards must be consolidated.00.pth .. consolidated."
                         f"{len(ranks) - 1:02d}.pth; found ranks {ranks}")
    found.append(("shards", [p for _, p in shards]))
  if os.path.isfile(os.path.join(path, "model.safetensors")):
    found.append(("safetensors", [os.path.join(path, "model.safetensors")]))
  if os.path.isfile(os.path.join(path, safetensors_shards.INDEX_FILE)):
    found.append(("index", [os.path.join(path, safetensors_shards.INDEX_FILE)]))
  if not found:
    raise ConvertError(f"{path} holds no consolidated.pth, consolidated.NN.pth shards, model.safetensors or "
                       f"{safetensors_shards.INDEX_FILE} (sharded safetensors)")
  if len(found) > 1:
    raise ConvertError(f"{path} holds several checkpoints ({[k for k, _ in found]}); pass the file to convert")
  return found[0]


def read_official(path: str, config_path: Optional[str] = None) -> tuple[dict[str, np.ndarray], MegalodonConfig]:
  """Reads any supported PyTorch-side checkpoint as a validated official state dict and its config.

  Args:
    path: a consolidated.pth, a folder of consolidated.NN.pth shards (merged, docs/export.md#model-parallel-shards),
      a folder holding consolidated.pth, model.safetensors or sharded safetensors (model.safetensors.index.json and
      its shards, convert/safetensors_shards.py), a .safetensors file or such an index file, with official or
      megalodon-hf keys.
    config_path: params.json (official) or config.json (megalodon-hf); default: beside `path`.

  Returns:
    (official key -> NumPy array, in `state_dict_entries` order; config).

  Raises:
    ConvertError: unreadable files, missing config. StateDictError: any key/shape/dtype/buffer mismatch.
  """
  if paths.is_remote(path) or (config_path is not None and paths.is_remote(config_path)):
    return _read_remote(path, config_path)
  path = os.path.abspath(os.path.expanduser(path))
  kind, files = _source_files(path)
  if kind == "shards":
    tensors = tp_shards.merge_state_dicts([load_tensor_file(f) for f in files], [os.path.basename(f) for f in files])
  elif kind == "index":
    tensors = safetensors_shards.load_shards(files[0], load_tensor_file)
  else:
    tensors = load_tensor_file(files[0])
  is_hf = "model.embed.weight" in tensors
  where = path if os.path.isdir(path) else os.path.dirname(path)
  if config_path is None:
    config_path = os.path.join(where, HF_CONFIG_JSON if is_hf else PARAMS_JSON)
  embed = tensors.get("model.embed.weight" if is_hf else "embed.weight")
  config = read_params_json(config_path, None if embed is None or embed.ndim != 2 else embed.shape[0])
  if is_hf:
    tensors = hf_lib.hf_to_official(tensors, config)
  validate_official(tensors, config)
  return tensors, config


def validate_official(tensors: Mapping[str, np.ndarray], config: MegalodonConfig) -> None:
  """Keys, shapes, dtypes, buffers and tying of an official state dict, every problem listed.

  Buffers must be what the config implies (a params-only checkpoint does not store them): `rope.freqs` =
  base^(-2i/dz) for `rope_base`, TimestepNorm priors 0 (count, mean and log-variance).

  Raises:
    StateDictError: the message lists every offending key.
  """
  entries = check_state_dict(tensors, config)
  problems = []
  for e in entries:
    x = tensors[e.key]
    if e.dtype == np.int64 and x.dtype != np.int64:
      problems.append(f"{e.key}: dtype {x.dtype}, expected int64")
    elif e.dtype != np.int64 and x.dtype not in _FLOATS:
      problems.append(f"{e.key}: dtype {x.dtype}, expected a floating type (float32, bfloat16, float16)")
    elif e.key.endswith((".prior_count", ".prior_mean", ".prior_logv")) and np.any(x.astype(np.float64) != 0):
      problems.append(f"{e.key}: learned TimestepNorm priors are not supported (expected 0, got max |x| = "
                      f"{float(np.max(np.abs(x.astype(np.float64)))):.3g})")
    elif e.key == "rope.freqs":
      want, got = rope_inv_freq(config), x.astype(np.float32)
      rel = float(np.max(np.abs(got - want) / want))
      if rel > (1e-6 if x.dtype in (np.float32, np.float64) else 1e-2):
        implied = f"; the buffer implies rope_base ≈ {float(got[1]) ** (-config.z_head_dim / 2):.6g}" if (
            got.size > 1 and 0 < got[1] < 1) else ""
        problems.append(f"rope.freqs does not match rope_base={config.effective_rope_base} of the config (max "
                        f"relative difference {rel:.3g}){implied}")
  if config.share_emb and not problems:
    if not np.array_equal(tensors["embed.weight"], tensors["output.output.weight"]):
      problems.append("output.output.weight differs from embed.weight but share_emb=True (tied weights must be "
                      "equal); set share_emb to false in the config")
  if problems:
    raise StateDictError(f"state dict does not match the config ({len(problems)} problems):\n  "
                         + "\n  ".join(problems))


def _read_remote(path: str, config_path: Optional[str]) -> tuple[dict[str, np.ndarray], MegalodonConfig]:
  """`read_official` of remote files (gs://...): torch and safetensors read local files, so the checkpoint's files
  (a folder's top-level files, or the file and the configs beside it) are downloaded into a temporary folder."""
  source = paths.as_path(path)
  if not source.exists():
    raise ConvertError(f"{path} does not exist")
  with tempfile.TemporaryDirectory(prefix="megalodon_torch_") as tmp:
    folder = source if source.is_dir() else source.parent
    # An index file needs its shards beside it: the whole folder is copied then.
    wanted = None if source.is_dir() or source.name.endswith(".index.json") else {
        source.name, PARAMS_JSON, HF_CONFIG_JSON}
    for f in folder.iterdir():
      if f.is_file() and (wanted is None or f.name in wanted):
        f.copy(os.path.join(tmp, f.name))
    local = tmp if source.is_dir() else os.path.join(tmp, source.name)
    if config_path is None:
      return read_official(local)
    with paths.local_copy(config_path, suffix=".json") as local_config:
      return read_official(local, local_config)


def cast(tensors: Mapping[str, np.ndarray], dtype: str) -> dict[str, np.ndarray]:
  """Casts floating tensors to `dtype` ("float32" | "bfloat16"); int64 buffers and `rope.freqs` stay as they are
  (the RoPE table is kept in float32, docs/export.md#official-key-map)."""
  target = DTYPES[dtype]
  return {k: v if (v.dtype not in _FLOATS or k == "rope.freqs") else v.astype(target) for k, v in tensors.items()}


def _write_json(path: str, obj: Any) -> None:
  with open(path, "w", encoding="utf-8") as f:
    json.dump(obj, f, indent=2)
    f.write("\n")


def write_official(folder: str, tensors: Mapping[str, np.ndarray], config: MegalodonConfig,
                   model_parallel: int = 1) -> list[str]:
  """Writes consolidated.pth (or consolidated.{rank:02d}.pth shards) + params.json into `folder`; returns files."""
  import torch  # pylint: disable=import-outside-toplevel
  os.makedirs(folder, exist_ok=True)
  if model_parallel == 1:
    parts, names = [tensors], ["consolidated.pth"]
  else:
    parts = tp_shards.split_state_dict(tensors, model_parallel)
    names = [f"consolidated.{r:02d}.pth" for r in range(model_parallel)]
  for part, name in zip(parts, names):
    torch.save({k: to_torch(v) for k, v in part.items()}, os.path.join(folder, name))
  _write_json(os.path.join(folder, PARAMS_JSON), config.official_kwargs())
  return names + [PARAMS_JSON]


def write_safetensors(folder: str, tensors: Mapping[str, np.ndarray], config: MegalodonConfig,
                      max_shard_size: str = safetensors_shards.DEFAULT_MAX_SHARD_SIZE) -> list[str]:
  """Writes model.safetensors (official keys; sharded above `max_shard_size`, convert/safetensors_shards.py) +
  params.json into `folder`; returns the file names."""
  files = safetensors_shards.write_shards(folder, {k: to_torch(v) for k, v in tensors.items()}, max_shard_size)
  _write_json(os.path.join(folder, PARAMS_JSON), config.official_kwargs())
  return files + [PARAMS_JSON]


def write_hf(folder: str, tensors: Mapping[str, np.ndarray], config: MegalodonConfig, dtype: str,
             max_shard_size: str = safetensors_shards.DEFAULT_MAX_SHARD_SIZE) -> list[str]:
  """Writes the megalodon-hf layout (model.safetensors, sharded above `max_shard_size` as
  convert/safetensors_shards.py describes, + config.json) into `folder`; returns the file names.

  Raises:
    StateDictError: not representable in megalodon-hf (see `hf.hf_export_problems`).
  """
  hf = hf_lib.official_to_hf(tensors, config)
  files = safetensors_shards.write_shards(folder, {k: to_torch(v) for k, v in hf.items()}, max_shard_size)
  _write_json(os.path.join(folder, HF_CONFIG_JSON), hf_lib.hf_config(config, dtype))
  return files + [HF_CONFIG_JSON]
