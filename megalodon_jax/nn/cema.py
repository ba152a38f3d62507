"""ComplexEMA: the CEMA parameters (official shapes) and their official initialisation.

See docs/model.md#cema and docs/model.md#initialisation.
"""

from __future__ import annotations

import math
from typing import Optional

import jax
import jax.numpy as jnp
from flax import nnx

from megalodon_jax.nn.init import truncated_normal
from megalodon_jax.ops import cema as cema_ops
from megalodon_jax.ops import sequence_parallel as sp


def theta_init(key: jax.Array, dim: int) -> jax.Array:
  """theta (D, 1, 1): logit of f_k = D^(-k/D), k = 1..D, under a random channel permutation."""
  k = jnp.arange(1, dim + 1, dtype=jnp.float32)
  f = jnp.exp(k * -(math.log(dim) / dim))
  f = f[jax.random.permutation(key, dim)]
  return jnp.log(f / (1.0 - f)).reshape(dim, 1, 1)


class ComplexEMA(nnx.Module):
  """Per-channel complex EMA with skip weight omega (the official `MultiHeadComplexEMA`).

  Parameters (official shapes): alpha, delta (D, N, 1); theta (D, 1, 1); gamma (D, N, 2) (re, im); omega (D, 1).
  Their model-width axis is the logical "cema", not "embed": they are small, and sharding them like the weight
  matrices makes XLA gather every chip's partial gradient of the (batch-sharded) recurrence at once, which the
  compiled TPU program of the 7B showed as a (chips, L, D) float32 buffer. The default rules replicate "cema".
  """

  def __init__(self, dim: int, ndim: int, *, impl: str, param_dtype: jnp.dtype, rngs: nnx.Rngs):
    ka, kd, kt, kg, ko = jax.random.split(rngs.params(), 5)
    self.alpha = nnx.Param((0.2 * jax.random.normal(ka, (dim, ndim, 1))).astype(param_dtype),
                           logical_axes=("cema", "cema_ndim", None))
    self.delta = nnx.Param((0.2 * jax.random.normal(kd, (dim, ndim, 1))).astype(param_dtype),
                           logical_axes=("cema", "cema_ndim", None))
    self.theta = nnx.Param(theta_init(kt, dim).astype(param_dtype), logical_axes=("cema", None, None))
    gamma_re = jax.random.normal(kg, (dim, ndim, 1))
    self.gamma = nnx.Param(jnp.concatenate([gamma_re, jnp.zeros_like(gamma_re)], axis=-1).astype(param_dtype),
                           logical_axes=("cema", "cema_ndim", None))
    # TruncatedNormal(0, 0.25) on [-1, 1], i.e. ±4 standard deviations.
    self.omega = nnx.Param(truncated_normal(0.25, 4.0)(ko, (dim, 1), param_dtype), logical_axes=("cema", None))
    self.impl = impl

  def coefficients(self) -> cema_ops.CEMACoeffs:
    return cema_ops.cema_coefficients(self.alpha[...], self.delta[...], self.theta[...], self.gamma[...])

  def __call__(self, x: jax.Array, h0: Optional[jax.Array] = None, return_state: bool = False,
               resets: Optional[jax.Array] = None):
    """x: (B, L, D) -> (y (B, L, D) float32, final state (B, D, N, 2) float32 or None).

    resets: optional (B, L) bool, True where a packed document starts; the state restarts there
    (docs/model.md#cema). None: the plain recurrence.

    Under a mesh whose `sequence` axis splits L, each slice runs `impl` locally and the state is carried across the
    slices (ops/sequence_parallel.py); the result is the same.
    """
    fn = sp.cema if sp.sequence_mesh(x.shape[1]) is not None else cema_ops.cema
    return fn(x, self.coefficients(), self.omega[...], h0, impl=self.impl, return_state=return_state,
              resets=resets)
