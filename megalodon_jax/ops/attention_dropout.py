"""Attention dropout masks from the counter hash of the Pallas kernels (pallas_kernels/chunked_attention/dropkey.py).

Every (batch, head, query, key) keeps or drops its logit (DropKey) or probability (post-softmax dropout) by a
32-bit hash of two seeds drawn from the dropout key and of its coordinates: the global b·H + h and the query and
key positions in the caller's frame (sequence positions for a full forward, cache-frame positions for a call that
continues a stream). The XLA attention (ops/attention.py) and the Pallas kernels therefore draw the same mask for
the same key, so switching `attention_impl` does not change a training run; and the mask of a chunk does not
depend on whether the chunks run batched or one at a time in a loop.

Under chunk parallelism (the length split over the `sequence` mesh axis, whole chunks per slice) each slice hashes
its local positions with seed1 + s·0x9E3779B1 (int32 wrap-around), s the slice index, exactly as the kernel's
`shard_map` does (pallas_kernels/chunked_attention/api.py): same distribution, different draws from an unsplit
call.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp

# DropKey removes a logit with a large finite penalty rather than -inf, so a row whose every key was dropped
# stays finite (it falls back to a uniform average over its causal keys) instead of producing NaN. The kernels
# use the same value (pallas_kernels/chunked_attention/tile.py, DROP_VALUE).
DROPKEY_PENALTY = -1e30
# The odd int32 multiplier (0x9E3779B1) by which a length slice's index enters seed1 (api.py, `_run_sharded`).
SLICE_SEED_STEP = -1640531535


def _dropkey():
  # Imported on first use: the package's __init__ loads the kernels (jax.experimental.pallas), which a model
  # without attention dropout never needs. dropkey.py itself is plain jnp.
  from pallas_kernels.chunked_attention import dropkey  # pylint: disable=import-outside-toplevel
  return dropkey


class AttentionDropout(NamedTuple):
  """One call's attention dropout.

  rate: drop probability in (0, 1).  drop_key: True for DropKey (before the softmax, no rescale), False for
  dropout of the probabilities (after the softmax, kept ones scaled by 1/(1 - rate)).
  seeds: (2,) int32 (`dropkey.seeds_from_key`).  bh: (B, H) int32, global b·H_total + h of these arrays.
  """
  rate: float
  drop_key: bool
  seeds: jax.Array
  bh: jax.Array


def head_coordinates(batch: int, heads: int, batch_offset=0, head_offset=0,
                     heads_total: Optional[int] = None) -> jax.Array:
  """(B, H) int32 global b·H_total + h for a (possibly sharded) block of `batch` sequences and `heads` heads."""
  total = heads if heads_total is None else heads_total
  b = jnp.arange(batch, dtype=jnp.int32) + jnp.asarray(batch_offset, jnp.int32)
  h = jnp.arange(heads, dtype=jnp.int32) + jnp.asarray(head_offset, jnp.int32)
  return b[:, None] * jnp.int32(total) + h[None, :]


def seeds_from_key(rng: jax.Array) -> jax.Array:
  """(2,) int32 hash seeds from a JAX PRNG key (typed or raw uint32), as the kernels derive them."""
  return _dropkey().seeds_from_key(rng)


def make(rate: float, rng: Optional[jax.Array], drop_key: bool, batch: int, heads: int) -> Optional[AttentionDropout]:
  """The dropout of an unsharded call on (B, L, H, d) arrays, or None when `rate` is 0."""
  if not 0.0 <= rate < 1.0:
    raise ValueError(f"attention dropout rate must be in [0, 1); got {rate!r}")
  if rate == 0.0:
    return None
  if rng is None:
    raise ValueError("attention dropout rate > 0 needs a dropout_rng")
  return AttentionDropout(rate, drop_key, seeds_from_key(rng), head_coordinates(batch, heads))


def keep_mask(drop: AttentionDropout, bh: jax.Array, q_pos: jax.Array, k_pos: jax.Array) -> jax.Array:
  """Keep mask (True = kept) for head coordinates and query/key positions, all broadcasting int32 arrays."""
  dropkey = _dropkey()
  return dropkey.keep_mask(drop.seeds, bh, q_pos.astype(jnp.int32), k_pos.astype(jnp.int32),
                           dropkey.threshold(drop.rate))
