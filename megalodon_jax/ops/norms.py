"""RMSNorm and LayerNorm with the plus-one scale (effective scale = 1 + weight), float32 statistics."""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp


def rms_norm(x: jax.Array, weight: Optional[jax.Array], eps: float) -> jax.Array:
  """RMS-normalises the last axis: x / sqrt(mean(x^2) + eps) * (1 + weight).

  Args:
    x: (..., K) any float dtype; the mean square is taken in float32.
    weight: (K,) plus-one scale offsets, or None for no affine.
    eps: added to the mean square inside the square root.
  Returns:
    (..., K) in x.dtype.
  """
  xf = x.astype(jnp.float32)
  y = xf * jax.lax.rsqrt(jnp.mean(jnp.square(xf), axis=-1, keepdims=True) + eps)
  if weight is not None:
    y = y * (1.0 + weight.astype(jnp.float32))
  return y.astype(x.dtype)


def layer_norm(x: jax.Array, weight: Optional[jax.Array], bias: Optional[jax.Array], eps: float) -> jax.Array:
  """LayerNorm over the last axis with population variance: (x - mean) / sqrt(var + eps) * (1 + weight) + bias.

  Args:
    x: (..., K) any float dtype; statistics in float32.
    weight, bias: (K,) or None (no affine).
  Returns:
    (..., K) in x.dtype.
  """
  xf = x.astype(jnp.float32)
  mean = jnp.mean(xf, axis=-1, keepdims=True)
  var = jnp.mean(jnp.square(xf - mean), axis=-1, keepdims=True)
  y = (xf - mean) * jax.lax.rsqrt(var + eps)
  if weight is not None:
    y = y * (1.0 + weight.astype(jnp.float32))
  if bias is not None:
    y = y + bias.astype(jnp.float32)
  return y.astype(x.dtype)
