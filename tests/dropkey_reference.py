"""The DropKey counter hash (pallas_kernels/chunked_attention/dropkey.py's docstring) in NumPy uint32 arithmetic:
an independent reference for the kernels' masks and the XLA attention's."""

from __future__ import annotations

import numpy as np


def np_mix(x):
  """lowbias32 on uint32."""
  x = x.astype(np.uint32)
  x ^= x >> np.uint32(16)
  x *= np.uint32(0x7FEB352D)
  x ^= x >> np.uint32(15)
  x *= np.uint32(0x846CA68B)
  return x ^ (x >> np.uint32(16))


def np_keep(seeds, bh, q, k, rate):
  """Keep mask (True = kept) for seeds (s0, s1) (any int type; their low 32 bits count), global b·H + h, query and
  key positions (broadcasting arrays) and the drop rate."""
  s0, s1 = (np.uint32(np.int64(s) & 0xFFFFFFFF) for s in seeds)
  with np.errstate(over="ignore"):
    row = np_mix(np_mix(s0 + np.asarray(bh, np.uint32) * np.uint32(0x9E3779B9)) ^ np.asarray(q, np.uint32))
    bits = np_mix(row ^ (np.asarray(k, np.uint32) * np.uint32(0x85EBCA6B) + s1))
  return (bits >> np.uint32(8)) >= np.uint32(round(rate * 2 ** 24))


def np_seeds(key) -> tuple[int, int]:
  """The two seeds of a JAX PRNG key: its first two uint32 random bits (jax.random.bits(key, (2,), uint32))."""
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  bits = np.asarray(jax.random.bits(key, (2,), jnp.uint32))
  return int(bits[0]), int(bits[1])
