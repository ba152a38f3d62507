"""Loading the official golden fixtures (tests/fixtures/official)."""

from __future__ import annotations

import json
import pathlib
from typing import NamedTuple

import numpy as np
from safetensors.numpy import load_file

FIXTURE_DIR = pathlib.Path(__file__).parent / "fixtures" / "official"
CASES = ("tiny_short", "tiny_swiglu", "tiny_tied")


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
