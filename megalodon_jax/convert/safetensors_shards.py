"""Sharded safetensors in the Hugging Face layout: `model.safetensors` below `max_shard_size`, above it
`model-00001-of-0000N.safetensors` shards and `model.safetensors.index.json` = {"metadata": {"total_size": bytes,
...}, "weight_map": {tensor name: shard file}}.

Splitting, file names and the index are `huggingface_hub.save_torch_state_dict`'s (huggingface_hub >= 0.24), so
`--max_shard_size` means what it means there ("5GB" = 5·10^9 bytes, "500MB", "10KB", or a number of bytes; default
"5GB"; the limit is per shard, and a tensor larger than it gets a shard of its own). `transformers`'
`from_pretrained` and this project's `from-pytorch` read both layouts.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any, Callable, Mapping, Union

import numpy as np

from megalodon_jax.errors import ConvertError

WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = WEIGHTS_FILE + ".index.json"
DEFAULT_MAX_SHARD_SIZE = "5GB"  # huggingface_hub's MAX_SHARD_SIZE
# Every file `write_shards` may create (a full match of the name); --overwrite replaces these.
ENTRY_PATTERN = r"model(-\d{5}-of-\d{5})?\.safetensors|model\.safetensors\.index\.json"
ENTRY_TEXT = "model.safetensors or model-NNNNN-of-NNNNN.safetensors + model.safetensors.index.json"
_SIZE = re.compile(r"\d+")


def parse_max_shard_size(text: Union[str, int]) -> int:
  """Bytes of a `--max_shard_size` ("5GB", "500MB", "64KB", "1000"); raises ConvertError for anything else.

  Units are huggingface_hub's (`parse_size_to_int`: decimal KB/MB/GB/TB); a bare number is bytes."""
  from huggingface_hub.serialization._base import parse_size_to_int  # pylint: disable=import-outside-toplevel
  if isinstance(text, int):
    size = text
  elif _SIZE.fullmatch(text.strip()):
    size = int(text.strip())
  else:
    try:
      size = parse_size_to_int(text)
    except ValueError:
      raise ConvertError(f"--max_shard_size {text!r} is not a size: use a number of bytes or a number with a unit "
                         "KB, MB, GB or TB (e.g. 500MB, 5GB)") from None
  if size < 1:
    raise ConvertError(f"--max_shard_size must be at least 1 byte, got {text!r}")
  return size


def write_shards(folder: str, state_dict: Mapping[str, Any], max_shard_size: Union[str, int] =
                 DEFAULT_MAX_SHARD_SIZE) -> list[str]:
  """Writes `state_dict` (name -> torch tensor, no two sharing storage, which huggingface_hub would deduplicate:
  `torch_files.to_torch` copies) into `folder` as model.safetensors, or as shards of at most `max_shard_size` each
  plus model.safetensors.index.json; returns the file names written, the index last. The tensors keep their order
  across the shards (huggingface_hub splits in key order)."""
  from huggingface_hub import save_torch_state_dict  # pylint: disable=import-outside-toplevel
  os.makedirs(folder, exist_ok=True)
  before = set(os.listdir(folder))
  save_torch_state_dict(dict(state_dict), folder, max_shard_size=parse_max_shard_size(max_shard_size))
  written = sorted(n for n in set(os.listdir(folder)) - before if re.fullmatch(ENTRY_PATTERN, n))
  return [n for n in written if n != INDEX_FILE] + [n for n in written if n == INDEX_FILE]


def shard_files(index_path: str) -> dict[str, list[str]]:
  """{shard file path: [tensor names]} of a model.safetensors.index.json, in the order of the shards.

  Raises:
    ConvertError: unreadable index, no weight_map, or a shard that is not a plain file name beside the index or is
      missing.
  """
  try:
    with open(index_path, encoding="utf-8") as f:
      index = json.load(f)
  except (OSError, ValueError) as e:
    raise ConvertError(f"{index_path} is not a readable JSON file ({type(e).__name__}: {e})") from None
  weight_map = index.get("weight_map") if isinstance(index, dict) else None
  if not isinstance(weight_map, dict) or not weight_map:
    raise ConvertError(f"{index_path} has no \"weight_map\" (tensor name -> shard file): not a sharded checkpoint "
                       "index")
  folder = os.path.dirname(index_path)
  files: dict[str, list[str]] = {}
  for name, shard in weight_map.items():
    if not isinstance(shard, str) or os.path.basename(shard) != shard or shard in ("", ".", ".."):
      raise ConvertError(f"{index_path}: tensor {name!r} maps to {shard!r}, not a file name beside the index")
    files.setdefault(os.path.join(folder, shard), []).append(name)
  missing = [os.path.basename(p) for p in files if not os.path.isfile(p)]
  if missing:
    raise ConvertError(f"{index_path} names shard files that are missing: {', '.join(sorted(missing))}")
  return dict(sorted(files.items()))


def load_shards(index_path: str, load_file: Callable[[str], dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
  """The tensors of a sharded checkpoint (name -> NumPy array) read with `load_file` shard by shard, each shard
  checked against the index: every tensor the index names is in its shard, and no shard holds a tensor the index
  does not map to it.

  Raises:
    ConvertError: the index and the shards disagree (every difference named).
  """
  out: dict[str, np.ndarray] = {}
  problems = []
  for path, names in shard_files(index_path).items():
    tensors = load_file(path)
    shard, mapped = os.path.basename(path), set(names)
    problems += [f"{n} is mapped to {shard} but is not in it" for n in names if n not in tensors]
    problems += [f"{shard} holds {n}, which the index does not map to it" for n in tensors if n not in mapped]
    out.update({n: tensors[n] for n in names if n in tensors})
  if problems:
    raise ConvertError(f"{index_path} does not match its shards ({len(problems)} problems):\n  "
                       + "\n  ".join(problems[:20]) + ("\n  ..." if len(problems) > 20 else ""))
  return out
