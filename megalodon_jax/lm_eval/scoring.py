"""Log-likelihoods of token rows through the project's Evaluator, batched by padded length.

A request is one row of token ids (context then continuation, or the prefix token then a whole document) of which
the last `scored` tokens are scored. Row r feeds tokens[:-1] and predicts tokens[1:] from an empty cache, streamed
through the model in `Evaluator.segment_len` pieces, so a row may be as long as host memory allows: Megalodon's
cache has a constant size, and the Llama baseline's KV cache is sized to the row's padded length (its memory
grows with the document; its positions go past the trained length through RoPE, unlike Megalodon, for which any
length is in-distribution streaming).

Shapes are bucketed so that a run compiles a handful of programs, not one per request: a row of n <= segment_len
inputs is padded to `length_bucket(n)` (the chunk times a power of two; below one chunk, a power of two of at
least MIN_WIDTH), a longer one to whole segments (every call then has the segment's shape); a batch holds rows of one width: exactly `rows_per_call` (padded with empty
rows), or, without one, up to `segment_len` tokens of rows padded to a power of two rows.
Longest rows go first, so a batch too large for memory fails at once.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from megalodon_jax.inference.evaluation import Evaluator, length_bucket

MIN_WIDTH = 16  # the narrowest padded row: rows of a few tokens share one shape


@dataclasses.dataclass(frozen=True)
class Scored:
  """One request's answer: the summed log-probability (nats, float64 sum of float32 terms) of its scored tokens and
  whether greedy decoding would produce them all (lm_eval's `is_greedy`)."""
  logprob: float
  greedy: bool


def row_width(inputs: int, evaluator: Evaluator) -> int:
  """The padded length of a row of `inputs` model inputs (see the module docstring)."""
  seg, chunk = evaluator.segment_len, evaluator.config.chunk_size
  if inputs > seg:
    return -(-inputs // seg) * seg
  if inputs < chunk:  # one call of a partial chunk (as prefill feeds one): no need to pad to the whole chunk
    return min(chunk, max(MIN_WIDTH, _pow2_at_least(inputs)))
  return max(MIN_WIDTH, length_bucket(inputs, chunk))  # (the model takes any length: chunks of 1 for Llama)


def _pow2_at_least(n: int) -> int:
  return 1 << max(0, n - 1).bit_length()


def score_rows(evaluator: Evaluator, rows: Sequence[np.ndarray], scored: Sequence[int], *,
               rows_per_call: int | None) -> list[Scored]:
  """Scores each row's last `scored[i]` tokens (1 <= scored[i] < len(rows[i]); 0 gives logprob 0, greedy True).

  Args:
    evaluator: the model's Evaluator (its segment length sets the widths).
    rows: (n_i,) integer token ids.
    scored: how many trailing tokens of each row are scored.
    rows_per_call: rows per batch; None = as many as fill `segment_len` tokens (at least one).
  Returns:
    One Scored per row, in the order given.
  """
  out: list[Scored | None] = [None] * len(rows)
  groups: dict[int, list[int]] = {}
  for i, (row, k) in enumerate(zip(rows, scored)):
    if k == 0:
      out[i] = Scored(0.0, True)
      continue
    if not 0 < k < len(row):
      raise ValueError(f"row {i}: {k} scored tokens of a row of {len(row)} (the first token is never scored)")
    groups.setdefault(row_width(len(row) - 1, evaluator), []).append(i)
  for width in sorted(groups, reverse=True):
    members = groups[width]
    per_call = rows_per_call or max(1, evaluator.segment_len // min(width, evaluator.segment_len))
    for start in range(0, len(members), per_call):
      batch = members[start:start + per_call]
      # An explicit batch size is one shape per width; auto's (large) count shrinks to a power of two of rows.
      count = per_call if rows_per_call else min(per_call, _pow2_at_least(len(batch)))
      xy = np.zeros((2, count, width), np.int32)  # inputs, targets
      for r, i in enumerate(batch):
        ids = np.asarray(rows[i], np.int32)
        xy[0, r, :ids.size - 1], xy[1, r, :ids.size - 1] = ids[:-1], ids[1:]
      nll, top = evaluator.rows_scores(xy[0], xy[1])
      for r, i in enumerate(batch):
        n, k = len(rows[i]) - 1, scored[i]
        out[i] = Scored(-float(np.sum(nll[r, n - k:n], dtype=np.float64)), bool(np.all(top[r, n - k:n])))
  return out
