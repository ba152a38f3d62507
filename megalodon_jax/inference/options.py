"""The checks of the inference settings, in a module that imports no jax: the command lines run them on their flags
before jax starts (so a bad flag fails within 2 s), and the jax classes that take the settings run the same ones.

- `check_sampling`: `sampling.Sampler`'s temperature, top_k and top_p.
- `check_decode_sizes`: `generation.Generator`'s prefill_piece and block_size (`DEFAULT_BLOCK_SIZE`, its default,
  is here so that generate's --block_size default needs no jax either).
- `NormWindow`: the evaluation's TimestepNorm window (plain numbers; `evaluation.Evaluator` runs it).
"""

from __future__ import annotations

import dataclasses
from typing import Optional

from megalodon_jax.errors import InferenceError

DEFAULT_BLOCK_SIZE = 32  # decode steps per jitted call of `generation.Generator`


def check_sampling(temperature: float, top_k: int, top_p: float) -> None:
  """Raises ValueError (naming the setting first, so a command line can prefix "--") for settings no sampler takes."""
  if not temperature >= 0:  # also rejects NaN
    raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
  if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0:
    raise ValueError(f"top_k must be an int >= 0 (0 = no top-k filter), got {top_k!r}")
  if not 0.0 < top_p <= 1.0:
    raise ValueError(f"top_p must be in (0, 1] (1 = no nucleus filter), got {top_p}")


def check_decode_sizes(prefill_piece: Optional[int], block_size: int, chunk_size: Optional[int]) -> None:
  """Raises InferenceError for a prefill piece that is not a positive multiple of the chunk or a block below one
  step. `prefill_piece` None (the default piece) or `chunk_size` None (not known yet: a PyTorch checkpoint's config
  comes with its tensors) leaves the piece to be checked later."""
  if prefill_piece is not None and chunk_size is not None and (prefill_piece < chunk_size or
                                                               prefill_piece % chunk_size):
    raise InferenceError(f"prefill_piece={prefill_piece} must be a positive multiple of the chunk size {chunk_size}")
  if block_size < 1:
    raise InferenceError(f"block_size={block_size} must be >= 1")


@dataclasses.dataclass(frozen=True)
class NormWindow:
  """The official evaluation's TimestepNorm truncation: constants of `megalodon/inference.py`.

  See docs/streaming.md#evaluation.
  """
  truncate_chunks: int = 8  # TRUNCATE_CHUNKS
  step_chunks: int = 2  # MAX_CHUNKS_PER_BATCH

  def __post_init__(self):
    if not 1 <= self.step_chunks < self.truncate_chunks:
      raise InferenceError(f"window: need 1 <= step_chunks ({self.step_chunks}) < truncate_chunks "
                           f"({self.truncate_chunks})")

  @property
  def window_chunks(self) -> int:
    """Chunks the recomputed statistics cover."""
    return self.truncate_chunks - self.step_chunks
