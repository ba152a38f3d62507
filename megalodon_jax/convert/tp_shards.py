"""Tensor-parallel shards of the official state dict (`consolidated.{rank:02d}.pth`,
docs/export.md#model-parallel-shards).

The official model splits its weights Megatron-style over `mp` ranks; every rank's file holds the same keys with
the split tensors cut into `mp` equal contiguous slices along one dimension:

- ColumnParallel `wv`, `wz`, `wr`, `wh1`, `fc1`, `fc3`: the output dim (dim 0 of the torch weight and of the bias).
- RowParallel `wh2`, `fc2`, `output.output`: the input dim (dim 1 of the torch weight).
- `embed.weight`: D (dim 1).
- CEMA tensors, TimestepNorm weight/bias and prior mean/logv (layers' `timenorm` and `output.final_norm`): D or G
  (dim 0).
- `mega.gamma` / `mega.beta` (2, Z): Z (dim 1).
- Everything else (`rmsnorm`, `nffn.norm`, `rope.freqs`, the scalar `prior_count`) is replicated.

Assumption (the official layout does not say): `nffn.alpha` (D,) scales the fc2 output, which RowParallel
reduce-scatters back to D shards (the official residual stream is D-sharded), so it is split along D like the other
per-feature vectors of the residual stream.
"""

from __future__ import annotations

import re
from typing import Any, Mapping, Optional, Sequence

import numpy as np

from megalodon_jax.convert.official import StateDictError

_COLUMN = re.compile(r"^layers\.\d+\.(mega\.(wv|wz|wr|wh1)|nffn\.(fc1|fc3))\.(weight|bias)$")
_ROW = re.compile(r"^(layers\.\d+\.(mega\.wh2|nffn\.fc2)|output\.output)\.weight$")
_FEATURE = re.compile(r"^(layers\.\d+\.mega\.cema\.\w+|layers\.\d+\.mega\.timenorm\.(weight|bias|prior_mean|prior_logv)"
                      r"|output\.final_norm\.(weight|bias|prior_mean|prior_logv)|layers\.\d+\.nffn\.alpha)$")
_LISTED = 12  # keys listed in a divisibility error (the same few dimensions repeat in every layer)
_Z = re.compile(r"^layers\.\d+\.mega\.(gamma|beta)$")


def split_dim(key: str) -> Optional[int]:
  """The dimension along which `key` is split across tensor-parallel ranks, or None when it is replicated."""
  if _COLUMN.match(key) or _FEATURE.match(key):
    return 0
  if _ROW.match(key) or _Z.match(key) or key == "embed.weight":
    return 1
  return None


def split_state_dict(tensors: Mapping[str, Any], num_shards: int) -> list[dict[str, np.ndarray]]:
  """Cuts an official (model-parallel 1) state dict into `num_shards` rank state dicts.

  Args:
    tensors: official key -> array (NumPy), e.g. `to_official_state_dict(model)`.
    num_shards: the model-parallel size (>= 1).

  Returns:
    One dict per rank, same keys and order; split tensors are contiguous copies of their slice.

  Raises:
    StateDictError: a split dimension is not divisible by `num_shards` (every such key is listed).
  """
  if num_shards < 1:
    raise ValueError(f"model-parallel size must be >= 1, got {num_shards}")
  bad = []
  for key, value in tensors.items():
    dim = split_dim(key)
    if dim is not None and np.shape(value)[dim] % num_shards:
      bad.append(f"{key}: dim {dim} of shape {tuple(np.shape(value))} is not divisible by {num_shards}")
  if bad:
    more = f"\n  ... and {len(bad) - _LISTED} more" if len(bad) > _LISTED else ""
    raise StateDictError(f"cannot split the state dict over {num_shards} model-parallel ranks ({len(bad)} keys have "
                         f"a dimension not divisible by {num_shards}):\n  " + "\n  ".join(bad[:_LISTED]) + more)
  shards: list[dict[str, np.ndarray]] = [{} for _ in range(num_shards)]
  for key, value in tensors.items():
    value = np.asarray(value)
    dim = split_dim(key)
    parts = np.split(value, num_shards, axis=dim) if dim is not None else [value] * num_shards
    for shard, part in zip(shards, parts):
      shard[key] = np.array(part, order="C")  # a copy: torch.save must not serialize the whole parent buffer
  return shards


def merge_state_dicts(shards: Sequence[Mapping[str, Any]], names: Optional[Sequence[str]] = None
                      ) -> dict[str, np.ndarray]:
  """Inverse of `split_state_dict`: concatenates split tensors and checks that replicated ones agree.

  Args:
    shards: the rank state dicts in rank order (official key -> NumPy array).
    names: what to call each shard in messages (file names); defaults to "rank r".

  Returns:
    The model-parallel-1 state dict, keys in the order of shard 0.

  Raises:
    StateDictError: shards with different key sets, dtypes or unsplit dimensions, or replicated tensors that
      differ between ranks (every offending key is listed).
  """
  if not shards:
    raise StateDictError("no tensor-parallel shards to merge")
  names = list(names) if names is not None else [f"rank {r}" for r in range(len(shards))]
  problems = []
  keys0 = list(shards[0])
  for name, shard in zip(names[1:], shards[1:]):
    missing, extra = [k for k in keys0 if k not in shard], sorted(k for k in shard if k not in shards[0])
    if missing or extra:
      problems.append(f"{name} has different keys than {names[0]}: missing {missing}, extra {extra}")
  if problems:
    raise StateDictError("tensor-parallel shards do not match:\n  " + "\n  ".join(problems))
  merged: dict[str, np.ndarray] = {}
  for key in keys0:
    parts = [np.asarray(s[key]) for s in shards]
    dim = split_dim(key)
    dtypes = {p.dtype for p in parts}
    if len(dtypes) > 1:
      problems.append(f"{key}: dtypes differ across shards {[str(p.dtype) for p in parts]}")
      continue
    if dim is None:
      differ = [n for n, p in zip(names[1:], parts[1:]) if p.shape != parts[0].shape or not np.array_equal(p, parts[0])]
      if differ:
        problems.append(f"{key}: replicated tensor differs between {names[0]} and {differ}")
      merged[key] = parts[0]
      continue
    shapes = [p.shape for p in parts]
    if any(p.ndim <= dim for p in parts) or len({s[:dim] + s[dim + 1:] for s in shapes}) > 1:
      problems.append(f"{key}: shard shapes {shapes} cannot be concatenated along dim {dim}")
      continue
    merged[key] = np.concatenate(parts, axis=dim)
  if problems:
    raise StateDictError(f"cannot merge {len(shards)} tensor-parallel shards ({len(problems)} keys):\n  "
                         + "\n  ".join(problems))
  return merged
