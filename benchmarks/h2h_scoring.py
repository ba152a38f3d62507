"""Scoring helpers of benchmarks/head_to_head.py: next-token NLL of long documents, and generation cache sizes.

Three ways to score the first L+1 tokens of a document (L scored tokens, each predicted from the tokens before it):
- `stream_nll`: the model's own cache, fed piece by piece (Megalodon: a constant-size cache; Llama: a KV cache
  of `max_length=L`, so every token sees the whole document before it);
- `sliding_window_nll`: no cache; windows of `window` tokens with stride `window // 2`, each window scoring only the
  tokens no earlier window scored (the first window scores all of its tokens), so a token sees between
  window/2 and window tokens of context (the first window's tokens fewer);
Every compiled program is keyed by the model's graph and the piece / window shape, so each shape compiles once.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


def _token_nll(logits: jax.Array, targets: jax.Array) -> jax.Array:
  logits = logits.astype(jnp.float32)
  lse = jax.nn.logsumexp(logits, axis=-1)
  return lse - jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]


@functools.partial(jax.jit, static_argnums=0)
def _stream_piece(graphdef: nnx.GraphDef, state: Any, cache: Any, ids: jax.Array, targets: jax.Array):
  """(1, P) ids and targets through the cache -> (summed NLL in nats, new cache)."""
  logits, cache = nnx.merge(graphdef, state)(ids, cache=cache)
  return jnp.sum(_token_nll(logits, targets), dtype=jnp.float32), cache


@functools.partial(jax.jit, static_argnums=0)
def _window_rows(graphdef: nnx.GraphDef, state: Any, ids: jax.Array, targets: jax.Array, weights: jax.Array):
  """(R, W) windows scored without a cache -> summed NLL of the weighted (scored) positions."""
  model = nnx.merge(graphdef, state)
  logits = model.head(model.features(ids))
  return jnp.sum(_token_nll(logits, targets) * weights, dtype=jnp.float32)


def _split(model: Any) -> tuple[nnx.GraphDef, Any]:
  model.eval()
  return nnx.split(model)


def new_cache(model: Any, family: str, length: int) -> Any:
  """The empty generation cache of one sequence: Llama's KV cache holds `length` tokens, Megalodon's is fixed."""
  if family == "llama":
    return model.init_cache(1, max_length=length)
  return model.init_cache(1)


def stream_nll(model: Any, family: str, tokens: np.ndarray, piece: int) -> float:
  """Summed NLL (nats) of tokens[1:] given everything before each, streamed through the model's cache in pieces
  of `piece` tokens (len(tokens) - 1 must be a multiple of `piece`)."""
  length = len(tokens) - 1
  if length % piece:
    raise ValueError(f"{length} scored tokens are not a multiple of the piece {piece}")
  graphdef, state = _split(model)
  cache = new_cache(model, family, length)
  x = jnp.asarray(np.asarray(tokens[:-1], np.int32)[None])
  y = jnp.asarray(np.asarray(tokens[1:], np.int32)[None])
  total = jnp.zeros((), jnp.float32)
  for start in range(0, length, piece):
    nll, cache = _stream_piece(graphdef, state, cache, x[:, start:start + piece], y[:, start:start + piece])
    total = total + nll
  return float(total)


def sliding_window_nll(model: Any, tokens: np.ndarray, window: int, rows: int = 8) -> float:
  """Summed NLL (nats) of tokens[1:], each predicted inside a window of at most `window` tokens; windows move by
  `window // 2` and score only the positions not scored before (see the module docstring)."""
  length = len(tokens) - 1
  window = min(window, length)
  stride = max(1, window // 2)
  starts = list(range(0, length - window + 1, stride))
  if starts[-1] + window < length:
    starts.append(length - window)  # a last window flush with the end
  x_all = np.asarray(tokens[:-1], np.int32)
  y_all = np.asarray(tokens[1:], np.int32)
  xs, ys, ws = [], [], []
  scored_until = 0
  for s in starts:
    xs.append(x_all[s:s + window])
    ys.append(y_all[s:s + window])
    w = (np.arange(s, s + window) >= scored_until).astype(np.float32)
    ws.append(w)
    scored_until = s + window
  graphdef, state = _split(model)
  total = jnp.zeros((), jnp.float32)
  for b in range(0, len(xs), rows):
    n = len(xs[b:b + rows])
    pad = rows - n  # one shape per window size: a short last batch is padded with unscored rows
    x = np.stack(xs[b:b + rows] + [xs[0]] * pad)
    y = np.stack(ys[b:b + rows] + [ys[0]] * pad)
    w = np.stack(ws[b:b + rows] + [np.zeros(window, np.float32)] * pad)
    total = total + _window_rows(graphdef, state, jnp.asarray(x), jnp.asarray(y), jnp.asarray(w))
  assert int(sum(w.sum() for w in ws)) == length
  return float(total)


def bits_per_token(nll_nats: float, tokens: int) -> float:
  return nll_nats / tokens / math.log(2.0)


def cache_bytes(model: Any, family: str, tokens: int) -> dict:
  """Bytes of the one-sequence generation cache holding `tokens` tokens of context (shapes only: nothing is
  allocated, so 1M tokens is fine). `length_bytes`: the leaves with an axis of size `tokens` (a KV cache's keys
  and values, and any per-slot bookkeeping); `kv_bytes`: those of rank >= 3 (keys and values: the part
  `LlamaConfig.kv_cache_bytes` counts); `fixed_bytes`: the leaves that do not grow with the context."""
  shapes = jax.eval_shape(lambda: new_cache(model, family, tokens))
  leaves = jax.tree.leaves(shapes)
  size = lambda a: math.prod(a.shape) * np.dtype(a.dtype).itemsize  # noqa: E731
  total = sum(size(a) for a in leaves)
  growing = [a for a in leaves if family == "llama" and tokens in a.shape]
  return {"tokens": tokens, "bytes": int(total), "length_bytes": int(sum(size(a) for a in growing)),
          "kv_bytes": int(sum(size(a) for a in growing if len(a.shape) >= 3)),
          "fixed_bytes": int(total - sum(size(a) for a in growing))}


def choose_documents(docs: list[np.ndarray], length: int, count: int) -> list[np.ndarray]:
  """Up to `count` of the longest documents holding at least length + 1 tokens, each cut to length + 1."""
  long_enough = sorted((d for d in docs if len(d) >= length + 1), key=len, reverse=True)
  return [d[:length + 1] for d in long_enough[:count]]


def context_lengths(requested: list[int], longest: int, piece: int) -> list[int]:
  """The requested lengths the documents allow; when the longest document is shorter than some requested length,
  also the longest length (a multiple of `piece`) it allows."""
  usable = (longest - 1) // piece * piece
  out = [n for n in requested if n <= usable]
  if usable > (max(out) if out else 0) and any(n > usable for n in requested):
    out.append(usable)
  return out


def score_contexts(model: Any, family: str, docs: list[np.ndarray], *, lengths: list[int], num_docs: int,
                   piece: int, train_window: int, log: Optional[Any] = None) -> list[dict]:
  """bpb by evaluation context length (tokens are bytes): Megalodon through its stream; Llama two ways (full
  context through its KV cache, and sliding windows of the trained length)."""
  import time  # pylint: disable=import-outside-toplevel
  rows = []
  for length in lengths:
    chosen = choose_documents(docs, length, num_docs)
    if not chosen:
      continue
    ways = {"stream": lambda d: stream_nll(model, family, d, min(piece, length))}
    if family == "llama":
      ways = {"full_kv_cache": ways["stream"], "sliding_window": lambda d: sliding_window_nll(model, d, train_window)}
    for way, score in ways.items():
      t0 = time.perf_counter()
      nll = sum(score(d) for d in chosen)
      seconds = time.perf_counter() - t0
      tokens = length * len(chosen)
      rows.append({"family": family, "method": way, "context": length, "documents": len(chosen), "tokens": tokens,
                   "bpb": bits_per_token(nll, tokens), "seconds": seconds})
      if log is not None:
        log(f"  {family:9s} {way:15s} context {length:7d}: {rows[-1]['bpb']:.4f} bpb over {len(chosen)} document(s)"
            f" ({seconds:.1f} s)")
  return rows
