"""Comparing what a checkpoint holds with what is about to be restored, key by key, before any array is read."""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from megalodon_jax.errors import CheckpointDamagedError, CheckpointError
from megalodon_jax.checkpoints.layout import MOVE

MAX_LISTED = 8


def _key(path: tuple) -> str:
  parts = []
  for k in path:
    # DictKey/FlattenedIndexKey, GetAttrKey (namedtuples: orbax saves them as dicts), SequenceKey; int dict keys
    # (nnx layer lists) are saved as strings, so everything is compared as a string.
    attr = next((a for a in ("key", "name", "idx") if hasattr(k, a)), None)
    parts.append(str(getattr(k, attr)) if attr else str(k))
  return "/".join(parts)


def leaves(tree: Any) -> dict[str, Any]:
  """{"a/b/0": leaf}: a pytree's leaves by their key path, spelled as orbax stores it."""
  return {_key(p): v for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


def saved_leaves(item_dir: epath.Path) -> dict[str, Any]:
  """The leaves (shape and dtype metadata) of a saved pytree item, by key path."""
  try:
    return leaves(ocp.PyTreeCheckpointHandler().metadata(item_dir).tree)
  except Exception as e:  # orbax/tensorstore raise many types for damaged metadata
    raise CheckpointDamagedError(f"cannot read the array metadata of {item_dir}: {damage(e)}", MOVE) from e


def _describe(x: Any) -> str:
  shape, dtype = getattr(x, "shape", None), getattr(x, "dtype", None)
  return f"{tuple(shape) if shape is not None else '?'} {np.dtype(dtype).name if dtype is not None else '?'}"


def match(saved: dict[str, Any], expected: dict[str, Any], where: epath.Path, check_dtype: bool) -> None:
  """Raises CheckpointError listing missing, unexpected and mis-shaped (or, with `check_dtype`, mistyped) keys."""
  problems = [f"{k}: expected {_describe(expected[k])}, not in the checkpoint" for k in expected if k not in saved]
  problems += [f"{k}: saved {_describe(saved[k])}, not expected" for k in saved if k not in expected]
  for k in expected.keys() & saved.keys():
    s, e = saved[k], expected[k]
    bad_shape = tuple(getattr(s, "shape", ())) != tuple(e.shape)
    if bad_shape or (check_dtype and np.dtype(getattr(s, "dtype", e.dtype)) != np.dtype(e.dtype)):
      problems.append(f"{k}: saved {_describe(s)}, expected {_describe(e)}")
  if problems:
    listed = "\n  ".join(sorted(problems)[:MAX_LISTED])
    raise CheckpointError(f"{where} does not match the model/optimizer being restored ({len(problems)} mismatching "
                          f"keys, first {min(len(problems), MAX_LISTED)}):\n  {listed}\nIt was written with a "
                          f"different config (e.g. another model size with the same workdir): use a new workdir or "
                          f"the config it was written with.")


def abstract(tree: Any) -> Any:
  """`jax.ShapeDtypeStruct`s of `tree`'s leaves; leaves without a sharding go to the first local device."""
  default = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)
                                                     or default), tree)


def damage(e: BaseException, limit: int = 300) -> str:
  """One line saying what failed in a damaged checkpoint read: the innermost error of the chain (TensorStore's own
  status names the array and the file, e.g. 'OUT_OF_RANGE: Error reading "params...value/0.0" in OCDBT database at
  local file ".../state/": ...'), without the JSON spec dump the outer orbax errors embed."""
  chain, seen = [], set()
  while e is not None and id(e) not in seen and len(chain) < 16:
    seen.add(id(e))
    chain.append(e)
    e = e.__cause__ or e.__context__
  text = ""
  for err in reversed(chain):  # innermost first
    text = " ".join(str(err).split(" See full TensorStore details")[0].split())
    if text:
      text = f"{type(err).__name__}: {text}" if not text.split(":")[0].isupper() else text
      break
  return text if len(text) <= limit else text[:limit] + " ..."
