"""The official golden fixtures (tests/fixtures/official) and helpers shared by the tests that compare against them.

Imports neither jax nor torch: tests/test_pytorch_model.py checks that the PyTorch model works without jax.
"""

from __future__ import annotations

import functools
import itertools
import json
import pathlib
from typing import NamedTuple

import numpy as np
from safetensors.numpy import load_file

FIXTURE_DIR = pathlib.Path(__file__).parent / "fixtures" / "official"
CASES = ("tiny_short", "tiny_swiglu", "tiny_tied")
STREAM_SPLITS = ("one_token_at_a_time", "odd_pieces", "whole_chunks", "long_then_short")  # keys of stream_splits


class Fixture(NamedTuple):
  name: str
  conf: dict  # official ModelConf kwargs
  state_dict: dict  # official key -> np.ndarray
  input_ids: np.ndarray  # (B, L) int64
  logits: np.ndarray  # (B, L, V) float32
  debug: dict  # 'timenorm_out', 'cema_out', 'attention_block_out', 'block_out'
  reference_streaming_err: float


def load(name: str) -> Fixture:
  meta = json.loads((FIXTURE_DIR / f"{name}.json").read_text())
  tensors = load_file(str(FIXTURE_DIR / f"{name}.safetensors"))
  sd = {k: v for k, v in tensors.items() if k not in ("input_ids", "logits") and not k.startswith("debug.")}
  debug = {k[len("debug.layer0."):]: v for k, v in tensors.items() if k.startswith("debug.layer0.")}
  return Fixture(name, meta["config"], sd, tensors["input_ids"], tensors["logits"], debug,
                 meta["reference_streaming_max_abs_err"])


@functools.cache
def cached(name: str) -> Fixture:
  """`load(name)` once per test session; the arrays are shared, so treat them as read-only."""
  return load(name)


def stream_splits(length: int, chunk: int) -> dict[str, list[int]]:
  """Named ways to cut a sequence into consecutive pieces (sizes may overrun the end; they are clipped)."""
  return {
      "one_token_at_a_time": [1] * length,
      "odd_pieces": list(itertools.islice(itertools.cycle([3, 5, 7]), length)),
      "whole_chunks": [chunk] * (length // chunk + 1),
      "long_then_short": [chunk + 3, 1, 2 * chunk - 1, 2] + [chunk] * (length // chunk + 1),
  }
