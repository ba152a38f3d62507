"""Official initialisers (megalodon/utils.py `get_init_fn`), as JAX functions of (key, shape).

The recipe is in docs/model.md#initialisation.

Linear kernels are stored (in, out) here, the transpose of torch's (out, in); fans are computed accordingly.
"""

from __future__ import annotations

import math
from typing import Callable

import jax
import jax.numpy as jnp

Initializer = Callable[[jax.Array, tuple, jnp.dtype], jax.Array]


def truncated_normal(std: float, bound_in_std: float = 3.0) -> Initializer:
  """N(0, std^2) truncated to ±bound_in_std·std (torch `trunc_normal_` with a = -b)."""
  def init(key, shape, dtype=jnp.float32):
    return (std * jax.random.truncated_normal(key, -bound_in_std, bound_in_std, shape, jnp.float32)).astype(dtype)
  return init


def linear_kernel_init(mode: str) -> Initializer:
  """Initialiser of an (in, out) kernel for the official `init_mode`."""
  def init(key, shape, dtype=jnp.float32):
    fan_in, fan_out = shape
    if mode == "he":  # kaiming_normal_ with a = √5: gain √(2 / (1 + 5)), std = 1 / √(3 fan_in)
      w = jax.random.normal(key, shape, jnp.float32) / math.sqrt(3.0 * fan_in)
    elif mode == "bert":
      w = 0.02 * jax.random.normal(key, shape, jnp.float32)
    elif mode == "gaussian":  # get_init_fn('gaussian') without dim: std 1, truncated at ±3
      w = truncated_normal(1.0)(key, shape)
    elif mode == "xavier":
      limit = math.sqrt(6.0 / (fan_in + fan_out))
      w = jax.random.uniform(key, shape, jnp.float32, -limit, limit)
    elif mode == "none":  # official: left uninitialised, to be overwritten by a checkpoint
      w = jnp.zeros(shape, jnp.float32)
    else:
      raise ValueError(f"unknown init_mode {mode!r}")
    return w.astype(dtype)
  return init
