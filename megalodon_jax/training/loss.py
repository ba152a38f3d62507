"""Next-token cross-entropy computed a piece of the sequence at a time, so the (B, L, V) logits never exist whole.

At 32K tokens and a 32K vocabulary the float32 logits of one sequence are 4 GiB, and the backward pass holds
their gradient too. `chunked_lm_loss` splits the length into pieces, applies the LM head and the loss to one
piece at a time inside a `lax.scan`, and rematerialises each piece's logits in the backward pass: only one
piece's logits (and their gradient) are live at any time. The result equals the loss over the full logits up to
float32 summation order.

With chunk parallelism (a `sequence` mesh axis of size S splitting L) each step of the scan takes one piece from
every length slice, (B, S·T) positions whose S parts live on S devices: the scan runs along the unsplit axis, so
no device ever gathers another's features. The sum is over the whole global sequence either way.
"""

from __future__ import annotations

from typing import Callable, Optional

import jax
import jax.numpy as jnp

from megalodon_jax import mesh_axes


def cross_entropy(logits: jax.Array, targets: jax.Array,
                  weights: Optional[jax.Array] = None) -> tuple[jax.Array, jax.Array]:
  """Summed next-token cross-entropy in float32.

  Args:
    logits: (B, L, V) float32.
    targets: (B, L) int32 token ids in [0, V).
    weights: optional (B, L) 0/1 (any number type): which targets count. document_boundaries="reset" gives 0 to
      the first token of a document, which the model cannot predict from the previous one.
  Returns:
    (loss_sum () float32 in nats, token_count () float32).
  """
  logits = logits.astype(jnp.float32)
  log_z = jax.nn.logsumexp(logits, axis=-1)
  target_logit = jnp.take_along_axis(logits, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
  if weights is None:
    return jnp.sum(log_z - target_logit), jnp.asarray(targets.size, jnp.float32)
  w = weights.astype(jnp.float32)
  return jnp.sum((log_z - target_logit) * w), jnp.sum(w)


def piece_length(seq_len: int, max_piece: int) -> int:
  """The largest divisor of `seq_len` that is <= `max_piece` (`seq_len` itself when max_piece <= 0 or larger)."""
  if max_piece <= 0 or max_piece >= seq_len:
    return seq_len
  for size in range(max_piece, 0, -1):
    if seq_len % size == 0:
      return size
  return seq_len


def _sequence_shards(length: int) -> int:
  """The size of the ambient mesh's `sequence` axis when it splits `length`, else 1."""
  mesh = jax.sharding.get_abstract_mesh()
  axis = mesh_axes.sequence_axis(mesh, length)
  return mesh.shape[axis] if axis else 1


def chunked_lm_loss(head: Callable[[jax.Array], jax.Array], features: jax.Array, targets: jax.Array,
                    max_piece: int, weights: Optional[jax.Array] = None) -> tuple[jax.Array, jax.Array]:
  """Summed cross-entropy of `head(features)` against `targets`, `max_piece` positions at a time.

  Args:
    head: (B, T, D) -> (B, T, V) float32 logits (the model's LM head; may close over its parameters).
    features: (B, L, D) the head's input.
    targets: (B, L) int32.
    max_piece: positions per piece (the largest divisor of L not above it is used); <= 0: the whole length at once.
    weights: optional (B, L) 0/1 target weights (see `cross_entropy`).
  Returns:
    (loss_sum () float32 in nats, token_count () float32).
  """
  b, length = targets.shape
  shards = _sequence_shards(length)
  size = piece_length(length // shards, max_piece)
  if size * shards == length:
    return cross_entropy(head(features), targets, weights)
  pieces = length // (size * shards)

  def split(a):  # (B, S, P, T, ...) -> (P, B, S·T, ...): piece p of every slice, each slice on its own device
    return jnp.moveaxis(a.reshape(b, shards, pieces, size, *a.shape[2:]), 2, 0).reshape(
        pieces, b, shards * size, *a.shape[2:])

  xs, ts = split(features), split(targets)

  @jax.checkpoint  # recompute the piece's logits in the backward pass instead of saving them
  def piece_loss(x, t, *w):
    return cross_entropy(head(x), t, *w)[0]

  def body(total, xt):
    return total + piece_loss(*xt), None

  scanned = (xs, ts) if weights is None else (xs, ts, split(weights))
  total, _ = jax.lax.scan(body, jnp.zeros((), jnp.float32), scanned)
  count = jnp.asarray(targets.size, jnp.float32) if weights is None else jnp.sum(weights.astype(jnp.float32))
  return total, count
