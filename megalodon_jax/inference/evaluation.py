"""Per-token losses of long sequences, streamed through the constant-size cache in segments.

`Evaluator.rows_nll` runs R rows side by side: each row starts from an empty cache and is fed in segments of S
tokens, so a row may be as long as the host memory for its token ids allows (the device holds one segment and
the cache). Without the window option the result does not depend on S (the model gives the full-forward logits
for any split, to float32 rounding).

The TimestepNorm window option (`NormWindow`, docs/streaming.md#evaluation) reproduces the official evaluation driver
(`megalodon/inference.py`): rows are fed `step_chunks` chunks at a time, and once `truncate_chunks` chunks have been
consumed, after every step that is not the last, the model is run again from an empty cache over only the latest
`truncate_chunks - step_chunks` chunks and every TimestepNorm state (each layer's and the final norm's) is replaced
by the one that run ends with; attention and CEMA states are kept. The normalisation statistics then cover the last
6 to 8 chunks instead of the whole history. Off by default.
"""

from __future__ import annotations

import functools
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from megalodon_jax.errors import InferenceError
from megalodon_jax.inference.options import NormWindow  # defined without jax: evaluate checks it before jax starts
from megalodon_jax.config import MegalodonConfig
from megalodon_jax.families import LanguageModel

# Bytes of activations and logits per token of a segment, roughly, to size the default segment: the logits
# (V floats) and the widest block activations dominate (inference keeps one block's activations live at a time).
_DEFAULT_SEGMENT_BYTES = 1 << 30
_MAX_DEFAULT_SEGMENT = 1 << 16


def default_segment_len(model: LanguageModel) -> int:
  """Tokens per call: a power-of-two multiple of the chunk whose logits and activations fit about 1 GiB."""
  c = model.config
  widest = max(c.model_dim, getattr(c, "value_dim", 0), c.ffn_hidden_dim)
  per_token = 4 * (getattr(c, "out_size", c.vocab_size) + 16 * widest)
  tokens = max(1, min(_MAX_DEFAULT_SEGMENT, _DEFAULT_SEGMENT_BYTES // per_token))
  return c.chunk_size * (1 << max(0, (tokens // c.chunk_size).bit_length() - 1))


def length_bucket(length: int, chunk_size: int) -> int:
  """The padded length of a row: the chunk times the next power of two, so row lengths share few shapes."""
  chunks = -(-length // chunk_size)
  return chunk_size * (1 << max(0, chunks - 1).bit_length())


# Programs are module-level with the graphdef static, so Evaluators of the same model structure share them.


@functools.partial(jax.jit, static_argnums=0)
def _segment(graphdef: nnx.GraphDef, state, cache, ids: jax.Array, targets: jax.Array):
  """ids, targets: (R, S) int32 -> (nll (R, S) float32, top (R, S) bool: the target is a most likely token, cache)."""
  logits, cache = nnx.merge(graphdef, state)(ids, cache=cache)
  lse = jax.nn.logsumexp(logits, axis=-1)
  picked = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
  return lse - picked, picked >= jnp.max(logits, axis=-1), cache


@functools.partial(jax.jit, static_argnums=0)
def _window_norms(graphdef: nnx.GraphDef, state, ids: jax.Array):
  """ids: (R, W) -> every TimestepNorm state after running ids from an empty cache (the blocks' stacked on axis 1,
  the final norm's)."""
  model = nnx.merge(graphdef, state)
  _, fresh = model(ids, cache=model.init_cache(ids.shape[0], max_length=ids.shape[1]))  # logits unused: dropped
  return fresh.layers.norm, fresh.final_norm


class Evaluator:
  """Streams rows of token ids through a model and returns per-token negative log-likelihoods (nats, float32).

  Args:
    model: put in eval mode.
    segment_len: tokens per row per call (default `default_segment_len`); ignored with a window, whose step is
      `window.step_chunks` chunks.
    window: the TimestepNorm window option, or None (off).
  Compiled programs are shared by all Evaluators of models with the same structure.
  """

  def __init__(self, model: LanguageModel, *, segment_len: Optional[int] = None, window: Optional[NormWindow] = None):
    c = model.config
    if segment_len is not None and segment_len < 1:
      raise InferenceError(f"segment_len must be >= 1, got {segment_len}")
    model.eval()
    self.model = model
    self.config = c
    self.window = window
    if window is not None and not isinstance(c, MegalodonConfig):
      raise InferenceError(f"the TimestepNorm window applies to Megalodon models only, not to a "
                           f"{type(c).__name__}")
    if window is not None:
      self.segment_len = window.step_chunks * c.chunk_size
    else:
      self.segment_len = segment_len or default_segment_len(model)
    self.graphdef, self.state = nnx.split(model)

  def pieces(self, length: int, row_len: int) -> list[tuple[int, int, bool]]:
    """The calls that feed rows of real length `length` held in arrays of `row_len`: (start, size, renormalise).

    Without a window: `min(segment_len, row_len)` tokens per call over the whole row (the last call padded). With
    the window: the
    official schedule for `length` tokens: whole chunks `step_chunks` at a time (the last such step may be
    shorter), the statistics replaced after a step once `truncate_chunks` chunks are consumed and tokens remain,
    then the partial chunk in one call (padded to a whole chunk, so its shape does not depend on the length).
    """
    w, c = self.window, self.config.chunk_size
    if w is None:
      s = min(self.segment_len, row_len)
      return [(start, s, False) for start in range(0, row_len, s)]
    out = []
    whole = length // c * c
    for start in range(0, whole, w.step_chunks * c):
      end = min(start + w.step_chunks * c, whole)
      out.append((start, end - start, end >= w.truncate_chunks * c and end < length))
    if whole < length:
      out.append((whole, c, False))
    return out

  def rows_nll(self, inputs: np.ndarray, targets: np.ndarray, length: Optional[int] = None) -> np.ndarray:
    """Per-token NLL of rows fed side by side from an empty cache: `rows_scores`' first array."""
    return self.rows_scores(inputs, targets, length)[0]

  def rows_scores(self, inputs: np.ndarray, targets: np.ndarray,
                  length: Optional[int] = None) -> tuple[np.ndarray, np.ndarray]:
    """Per-token NLL of rows fed side by side from an empty cache, and whether each target is the greedy choice.

    Args:
      inputs, targets: (R, T) integer arrays; targets[r, t] is the token that follows inputs[r, t].
      length: the real length of the rows (<= T; default T); positions past it are padding whose losses the
        caller ignores. With the window option, rows fed together follow the schedule of this length, so only
        rows of exactly this length reproduce the official driver.
    Returns:
      (R, T) float32 negative log-likelihoods in nats; (R, T) bool: the target's logit is the largest (greedy
      decoding would pick it; ties count as picked).
    """
    inputs = np.asarray(inputs)
    targets = np.asarray(targets)
    if inputs.ndim != 2 or inputs.shape != targets.shape or inputs.shape[1] == 0:
      raise InferenceError(f"inputs and targets must be equal (rows, length >= 1) arrays; got {inputs.shape} and "
                           f"{targets.shape}")
    v = self.config.vocab_size
    for name, arr in (("inputs", inputs), ("targets", targets)):
      if arr.min() < 0 or arr.max() >= v:
        bad = arr[(arr < 0) | (arr >= v)][0]
        raise InferenceError(f"{name}: token id {int(bad)} is outside the vocabulary [0, {v})")
    r, t = inputs.shape
    length = t if length is None else length
    plan = self.pieces(length, t)
    padded = max(t, max(start + size for start, size, _ in plan))
    x, y = (np.pad(a.astype(np.int32), ((0, 0), (0, padded - t))) for a in (inputs, targets))
    w, c = self.window, self.config.chunk_size
    cache = self.model.init_cache(r, max_length=padded)
    out, tops = [], []
    for start, size, renormalise in plan:
      end = start + size
      nll, top, cache = _segment(self.graphdef, self.state, cache, jnp.asarray(x[:, start:end]),
                                 jnp.asarray(y[:, start:end]))
      out.append(nll)  # kept on device: the host waits only once, at the end
      tops.append(top)
      if renormalise:
        norms, final = _window_norms(self.graphdef, self.state, jnp.asarray(x[:, end - w.window_chunks * c:end]))
        cache = cache._replace(layers=cache.layers._replace(norm=norms), final_norm=final)
    done = np.concatenate([np.asarray(o) for o in out], axis=1)
    top = np.concatenate([np.asarray(o) for o in tops], axis=1)
    # NaN (False) marks positions a window schedule never reached
    return (np.pad(done, ((0, 0), (0, padded - done.shape[1])), constant_values=np.nan)[:, :t],
            np.pad(top, ((0, 0), (0, padded - top.shape[1])), constant_values=False)[:, :t])
