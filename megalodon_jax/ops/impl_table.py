"""Measured implementation choices: what `attention_impl="auto"` and `cema_impl="auto"` pick where a device check
measured the candidates, before the fixed rules of ops/attention.py and ops/cema/dispatch.py apply.

The table is JSON (`impl_table.json` next to this module; the environment variable MEGALODON_JAX_IMPL_TABLE names
another file) holding, per backend ("cpu" | "gpu" | "tpu"), a list of entries; `benchmarks/device_check.py` writes
them from its timings (the fastest implementation that passed its numerics check). Keys starting with "_" are
notes. An entry is a dict with "op", "impl" and the shape it was measured at:

  {"op": "attention", "chunk_size": 2048, "z_head_dim": 256, "v_head_dim": 2048, "impl": "pallas"}
  {"op": "cema", "min_length": 4096, "max_length": 8191, "dim": 1024, "impl": "chunked"}

Every shape key an entry has must equal the query's (cema: min_length <= length <= max_length, a null bound is
open); a key the entry lacks matches anything. The first matching entry wins, so a lookup is deterministic. Only a
JSON read, once per file: no jax import, no device work.

A malformed table (not JSON, wrong layout, an unknown op or implementation) is ignored as a whole, with a warning:
every implementation computes the same thing, so a bad table may cost speed but never changes a result, and a
training run should not fail on it. Any other "auto" rule (length 1 -> "sequential", Pallas attention only where its
dropout allows it) is applied by the callers, not here.
"""

from __future__ import annotations

import functools
import json
import os
import warnings
from typing import Any, Optional

from megalodon_jax.ops.impl_names import ATTENTION_IMPLEMENTATIONS, CEMA_IMPLEMENTATIONS

ENV_VAR = "MEGALODON_JAX_IMPL_TABLE"
DEFAULT_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "impl_table.json")
BACKENDS = ("cpu", "gpu", "tpu")
IMPLS = {"attention": ATTENTION_IMPLEMENTATIONS, "cema": CEMA_IMPLEMENTATIONS}
SHAPE_KEYS = {"attention": ("chunk_size", "z_head_dim", "v_head_dim"), "cema": ("min_length", "max_length", "dim")}


def table_path() -> str:
  return os.environ.get(ENV_VAR) or DEFAULT_PATH


def validate(table: Any) -> dict[str, list[dict]]:
  """The table's entries per backend, notes dropped; raises ValueError on anything malformed."""
  if not isinstance(table, dict):
    raise ValueError(f"expected a JSON object {{backend: [entries]}}, got {type(table).__name__}")
  out = {}
  for backend, entries in table.items():
    if backend.startswith("_"):
      continue
    if backend not in BACKENDS or not isinstance(entries, list):
      raise ValueError(f"{backend!r}: expected a backend of {BACKENDS} with a list of entries")
    for entry in entries:
      op = entry.get("op") if isinstance(entry, dict) else None
      if op not in IMPLS or entry.get("impl") not in IMPLS[op]:
        raise ValueError(f"{backend}: entry {entry!r} needs op in {tuple(IMPLS)} and an impl of that op")
      for key in SHAPE_KEYS[op]:
        value = entry.get(key)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
          raise ValueError(f"{backend}: entry {entry!r}: {key} must be a positive int or null")
    out[backend] = entries
  return out


@functools.lru_cache(maxsize=8)
def load(path: str) -> dict[str, list[dict]]:
  """The validated table at `path` ({} when the file is absent; {} with a warning when it is malformed)."""
  if not os.path.exists(path):
    return {}
  try:
    with open(path, encoding="utf-8") as f:
      return validate(json.load(f))
  except (OSError, ValueError) as e:  # json.JSONDecodeError is a ValueError
    warnings.warn(f"ignoring the implementation table {path}: {e}", RuntimeWarning, stacklevel=2)
    return {}


def _matches(entry: dict, query: dict) -> bool:
  for key, value in entry.items():
    if key in ("op", "impl") or key.startswith("_") or value is None:
      continue
    if key == "min_length":
      ok = query.get("length") is not None and query["length"] >= value
    elif key == "max_length":
      ok = query.get("length") is not None and query["length"] <= value
    elif key in SHAPE_KEYS[entry["op"]]:
      ok = query.get(key) == value
    else:
      continue  # measurement notes (times, errors) ride along with the entry
    if not ok:
      return False
  return True


def measured_impl(op: str, backend: str, **shape: Optional[int]) -> Optional[str]:
  """The table's implementation for `op` ("attention" | "cema") on `backend` at `shape`, or None (no entry).

  shape: attention: chunk_size, z_head_dim, v_head_dim; cema: length, dim (None: unknown, matches no entry that
  names that key)."""
  for entry in load(table_path()).get(backend, ()):
    if entry["op"] == op and _matches(entry, shape):
      return entry["impl"]
  return None
