"""Scoring helpers of benchmarks/head_to_head.py: next-token NLL of long documents, and generation cache sizes.

Two ways to score the first L+1 tokens of a document (L scored tokens, each predicted from the tokens before it),
both giving per-token NLL in nats:
- `stream_nll`: the model's own cache, fed piece by piece (Megalodon: a constant-size cache; Llama: a KV cache
  of `max_length=L`, so every token sees the whole document before it);
- `sliding_window_nll`: no cache; windows of `window` tokens with stride `window // 2`, each window scoring only the
  tokens no earlier window scored (the first window scores all of its tokens), so a token sees between
  window/2 and window tokens of context (the first window's tokens fewer).
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

from megalodon_jax.inference.evaluation import Evaluator


def _token_nll(logits: jax.Array, targets: jax.Array) -> jax.Array:
  logits = logits.astype(jnp.float32)
  lse = jax.nn.logsumexp(logits, axis=-1)
  return lse - jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]


@functools.partial(jax.jit, static_argnums=0)
def _window_rows(graphdef: nnx.GraphDef, state: Any, ids: jax.Array, targets: jax.Array):
  """(R, W) windows scored without a cache -> (R, W) NLL in nats."""
  model = nnx.merge(graphdef, state)
  return _token_nll(model.head(model.features(ids)), targets)


def _split(model: Any) -> tuple[nnx.GraphDef, Any]:
  model.eval()
  return nnx.split(model)


def stream_nll(model: Any, tokens: np.ndarray, piece: int) -> np.ndarray:
  """Per-token NLL (nats, (len(tokens) - 1,)) of tokens[1:], each given every token before it, streamed through the
  model's cache in pieces of `piece` tokens (len(tokens) - 1 must be a multiple of `piece`): the project's
  `Evaluator`, which gives a growing cache the whole length."""
  length = len(tokens) - 1
  if length % piece:
    raise ValueError(f"{length} scored tokens are not a multiple of the piece {piece}")
  x = np.asarray(tokens[:-1], np.int32)[None]
  y = np.asarray(tokens[1:], np.int32)[None]
  return Evaluator(model, segment_len=piece).rows_nll(x, y)[0].astype(np.float64)


def sliding_window_nll(model: Any, tokens: np.ndarray, window: int, rows: int = 8) -> np.ndarray:
  """Per-token NLL (nats, (len(tokens) - 1,)) of tokens[1:], each predicted inside a window of at most `window`
  tokens; windows move by `window // 2` and score only the positions no earlier window scored (see the module
  docstring)."""
  length = len(tokens) - 1
  window = min(window, length)
  stride = max(1, window // 2)
  starts = list(range(0, length - window + 1, stride))
  if starts[-1] + window < length:
    starts.append(length - window)  # a last window flush with the end
  x_all = np.asarray(tokens[:-1], np.int32)
  y_all = np.asarray(tokens[1:], np.int32)
  graphdef, state = _split(model)
  out = np.full(length, np.nan)
  scored_until = 0
  for b in range(0, len(starts), rows):
    batch = starts[b:b + rows]
    pad = rows - len(batch)  # one shape per window size: a short last batch is padded with repeated rows
    x = np.stack([x_all[s:s + window] for s in batch] + [x_all[:window]] * pad)
    y = np.stack([y_all[s:s + window] for s in batch] + [y_all[:window]] * pad)
    nll = np.asarray(_window_rows(graphdef, state, jnp.asarray(x), jnp.asarray(y)), np.float64)
    for i, s in enumerate(batch):
      first = max(scored_until, s)  # the window's positions not scored before
      out[first:s + window] = nll[i, first - s:]
      scored_until = s + window
  assert not np.isnan(out).any()
  return out


def cache_bytes(model: Any, family: str, tokens: int) -> dict:
  """Bytes of the one-sequence generation cache holding `tokens` tokens of context (shapes only: nothing is
  allocated, so 1M tokens is fine). `length_bytes`: the leaves with an axis of size `tokens` (a KV cache's keys
  and values, and any per-slot bookkeeping); `kv_bytes`: those of rank >= 3 (keys and values: the part
  `LlamaConfig.kv_cache_bytes` counts); `fixed_bytes`: the leaves that do not grow with the context."""
  shapes = jax.eval_shape(lambda: model.init_cache(1, max_length=tokens))
  leaves = jax.tree.leaves(shapes)
  size = lambda a: math.prod(a.shape) * np.dtype(a.dtype).itemsize  # noqa: E731
  total = sum(size(a) for a in leaves)
  growing = [a for a in leaves if family == "llama" and tokens in a.shape]
  return {"tokens": tokens, "bytes": int(total), "length_bytes": int(sum(size(a) for a in growing)),
          "kv_bytes": int(sum(size(a) for a in growing if len(a.shape) >= 3)),
          "fixed_bytes": int(total - sum(size(a) for a in growing))}


def choose_documents(docs: list[np.ndarray], count: int) -> list[np.ndarray]:
  """The `count` longest documents (longest first)."""
  return sorted(docs, key=len, reverse=True)[:count]


def context_lengths(requested: list[int], longest: int, piece: int) -> list[int]:
  """The requested lengths a document of `longest` tokens allows (a length L scores L tokens, so needs L + 1); when
  it is shorter than some requested length, also the longest multiple of `piece` it allows."""
  usable = (longest - 1) // piece * piece
  out = [n for n in requested if n <= usable]
  if usable > (max(out) if out else 0) and any(n > usable for n in requested):
    out.append(usable)
  return out


def score_contexts(model: Any, family: str, docs: list[np.ndarray], *, contexts: list[int], num_docs: int,
                   piece: int, train_window: int, kv_cache_max_context: int = 0,
                   log: Optional[Any] = None) -> list[dict]:
  """bpb by evaluation context length on the `num_docs` longest documents (tokens are bytes).

  Each document's first Lmax + 1 tokens (Lmax: the longest requested context the shortest chosen document allows)
  are scored once per method, token by token: Megalodon through its stream ("stream"); Llama through its KV cache
  over the whole prefix ("full_kv_cache") and with sliding windows of its trained length ("sliding_window"). For each
  context length L the rows give `bpb`: the mean over the first L tokens of every document (each token given all
  the tokens before it, up to L - 1), and `bpb_last_half`: over the tokens at positions [L/2, L) only (those that
  have between L/2 and L tokens of context), so the rows of one method differ only in how much context their
  tokens had. `kv_cache_max_context` (> 0) stops Llama's full-context scoring at that context (its cost is
  quadratic in the context)."""
  import time  # pylint: disable=import-outside-toplevel
  chosen = choose_documents(docs, num_docs)
  if not chosen:
    return []
  lengths = context_lengths(contexts, min(len(d) for d in chosen), piece)
  if not lengths:
    return []
  longest = max(lengths)
  chosen = [d[:longest + 1] for d in chosen]
  stream = lambda d, n: stream_nll(model, d[:n + 1], min(piece, n))  # noqa: E731
  ways = {"stream": (stream, longest)}
  if family == "llama":
    capped = [n for n in lengths if n <= kv_cache_max_context] if kv_cache_max_context > 0 else lengths
    ways = {"sliding_window": (lambda d, n: sliding_window_nll(model, d[:n + 1], train_window), longest)}
    if capped:
      ways["full_kv_cache"] = (stream, max(capped))
  rows = []
  for way, (score, upto) in ways.items():
    t0 = time.perf_counter()
    nll = np.stack([score(d, upto) for d in chosen])  # (documents, upto)
    seconds = time.perf_counter() - t0
    for length in (n for n in lengths if n <= upto):
      rows.append({"family": family, "method": way, "context": length, "documents": len(chosen),
                   "tokens": length * len(chosen), "bpb": float(nll[:, :length].mean() / math.log(2.0)),
                   "bpb_last_half": float(nll[:, length // 2:length].mean() / math.log(2.0)),
                   "seconds_all_contexts": seconds})
      if log is not None:
        log(f"  {family:9s} {way:15s} context {length:7d}: {rows[-1]['bpb']:.4f} bpb, positions [L/2, L): "
            f"{rows[-1]['bpb_last_half']:.4f} ({len(chosen)} document(s))")
    if log is not None:
      log(f"  {family:9s} {way:15s} {len(chosen)} x {upto} tokens in {seconds:.1f} s")
  return rows
