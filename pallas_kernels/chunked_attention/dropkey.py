"""DropKey masks from a counter-based hash, identical inside the kernels and in the pure-JAX reference.

A mask drawn with `jax.random.bernoulli` over the whole (B, H, L, C) score tensor cannot be reproduced tile by tile
inside a kernel, and materialising it costs B·H·L·C bytes (0.5 GiB per 32K-token sequence at C = 4096, H = 4).
Instead every (batch, head, query, key) gets its own 32-bit hash of the two seeds and its coordinates, so any
tile of the mask can be computed where it is needed, in any order, on any backend and under any sharding:

  row   = mix(mix(seed0 + (b·H + h)·0x9E3779B9) ^ q)
  bits  = mix(row ^ (k·0x85EBCA6B + seed1))
  keep  = (bits >>> 8) >= round(rate · 2^24)

with int32 wrap-around arithmetic, `mix` the "lowbias32" finaliser (C. Wellons, 2018; full avalanche on 32 bits),
b and h the global batch and head indices, and q, k the query and key positions in the caller's frame (sequence
positions for `chunked_attention`, cache-frame positions for the decode call). A key is dropped with probability
round(rate · 2^24) / 2^24, i.e. `rate` to within 6e-8.

The model's XLA attention draws its dropout masks from this same hash (megalodon_jax/ops/attention_dropout.py),
so the kernels and the XLA path drop the same keys for the same PRNG key.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

# Odd multipliers as wrapped int32 (the hash is defined on uint32 bit patterns; int32 multiply wraps the same way).
_M1 = int(np.uint32(0x7FEB352D).astype(np.int32))
_M2 = int(np.uint32(0x846CA68B).astype(np.int32))
_ROW_STEP = int(np.uint32(0x9E3779B9).astype(np.int32))
_COL_STEP = int(np.uint32(0x85EBCA6B).astype(np.int32))
THRESHOLD_BITS = 24


def threshold(rate: float) -> int:
  """Integer drop threshold for the top 24 hash bits: a key is dropped iff (bits >>> 8) < threshold(rate)."""
  if not 0.0 <= rate < 1.0:
    raise ValueError(f"dropout_rate must be in [0, 1); got {rate!r}")
  return int(round(rate * (1 << THRESHOLD_BITS)))


def seeds_from_key(rng: jax.Array) -> jax.Array:
  """Two int32 seeds (2,) from a JAX PRNG key (typed or raw uint32)."""
  return lax.bitcast_convert_type(jax.random.bits(rng, (2,), jnp.uint32), jnp.int32)


def mix32(x: jax.Array) -> jax.Array:
  """lowbias32 finaliser on int32 bit patterns (logical shifts, wrapping multiplies); any shape."""
  x = x ^ lax.shift_right_logical(x, jnp.int32(16))
  x = x * jnp.int32(_M1)
  x = x ^ lax.shift_right_logical(x, jnp.int32(15))
  x = x * jnp.int32(_M2)
  return x ^ lax.shift_right_logical(x, jnp.int32(16))


def row_hash(seed0: jax.Array, bh: jax.Array, q_pos: jax.Array) -> jax.Array:
  """Per-row part of the hash. seed0, bh: int32 scalars (bh = b·H + h, global); q_pos: int32 any shape."""
  return mix32(mix32(seed0 + bh * jnp.int32(_ROW_STEP)) ^ q_pos)


def keep_from_row(row: jax.Array, seed1: jax.Array, k_pos: jax.Array, drop_threshold: int) -> jax.Array:
  """Keep mask (True = key kept) from row hashes and key positions (broadcasting int32 arrays)."""
  bits = mix32(row ^ (k_pos * jnp.int32(_COL_STEP) + seed1))
  return lax.shift_right_logical(bits, jnp.int32(32 - THRESHOLD_BITS)) >= jnp.int32(drop_threshold)


def keep_mask(seeds: jax.Array, bh: jax.Array, q_pos: jax.Array, k_pos: jax.Array, drop_threshold: int) -> jax.Array:
  """Keep mask for query positions q_pos (…, Q, 1) and key positions k_pos (…, 1, K) of one (batch, head).

  Args:
    seeds: (2,) int32 from `seeds_from_key`.
    bh: () int32 global b·H + h.
    q_pos, k_pos: int32 arrays broadcasting against each other.
    drop_threshold: `threshold(rate)`.
  Returns:
    bool, the broadcast shape of q_pos and k_pos.
  """
  return keep_from_row(row_hash(seeds[0], bh, q_pos), seeds[1], k_pos, drop_threshold)
