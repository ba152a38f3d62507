"""CEMA coefficients from the official parameters, and the state layout every implementation shares.

For every channel c and order n (N complex states per channel; docs/model.md#cema):
  h_t = q ⊙ h_{t-1} + p ⊙ u_t,   y_t = Re(Σ_n γ̃_n h_{t,n}) + ω_c u_t
with p = σ(alpha), q = (1 - σ(alpha)σ(delta)) e^{i n ϑ_c}, ϑ_c = σ(theta_c)·2π/N and γ̃ = gamma / √N.
Complex values are carried as real/imaginary float32 planes (nothing here needs a complex dtype, which Pallas/TPU
kernels lack); the state is (B, D, N, 2), the layout of the official chunk-parallel packing (`view_as_real`).
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp

HIGHEST = jax.lax.Precision.HIGHEST


class CEMACoeffs(NamedTuple):
  """CEMA coefficients, each (D, N) float32.

  p: input weight σ(alpha).  q_re, q_im: complex decay q.  g_re, g_im: output projection γ̃ = gamma/√N.
  """
  p: jax.Array
  q_re: jax.Array
  q_im: jax.Array
  g_re: jax.Array
  g_im: jax.Array


def cema_coefficients(alpha: jax.Array, delta: jax.Array, theta: jax.Array, gamma: jax.Array) -> CEMACoeffs:
  """Coefficients from the official parameters, computed in float32.

  Args:
    alpha, delta: (D, N, 1) logits.  theta: (D, 1, 1) logit of the base angle.  gamma: (D, N, 2) (re, im).
  """
  n = alpha.shape[1]
  base = jax.nn.sigmoid(theta.astype(jnp.float32)) * (2 * math.pi / n)  # (D, 1, 1)
  wavelets = jnp.arange(1, n + 1, dtype=jnp.float32).reshape(1, n, 1)
  phase = (wavelets * base)[..., 0]  # (D, N)
  a = jax.nn.sigmoid(alpha.astype(jnp.float32))[..., 0]
  d = jax.nn.sigmoid(delta.astype(jnp.float32))[..., 0]
  mag = 1.0 - a * d
  scale = math.sqrt(1.0 / n)
  g = gamma.astype(jnp.float32) * scale
  return CEMACoeffs(p=a, q_re=mag * jnp.cos(phase), q_im=mag * jnp.sin(phase), g_re=g[..., 0], g_im=g[..., 1])


def power_table(base_re: jax.Array, base_im: jax.Array, count: int) -> tuple[jax.Array, jax.Array]:
  """b^j for j < count by repeated doubling, real and imaginary parts, each (..., count) float32.

  Products instead of exp/cos/sin: transcendentals are the slowest ops on CPU, and the phase error of b^j grows
  with log j here rather than with j as it does for exp(j log b).
  """
  tr = jnp.ones(base_re.shape + (1,), jnp.float32)
  ti = jnp.zeros_like(tr)
  br, bi = base_re[..., None], base_im[..., None]
  while tr.shape[-1] < count:
    tr, ti = jnp.concatenate([tr, tr * br - ti * bi], -1), jnp.concatenate([ti, tr * bi + ti * br], -1)
    br, bi = br * br - bi * bi, 2 * br * bi
  return tr[..., :count], ti[..., :count]


def readout(coeffs: CEMACoeffs, hr: jax.Array, hi: jax.Array) -> jax.Array:
  """Re(Σ_n γ̃_n h_n) for states (..., D, N) given as real and imaginary planes: (..., D) float32."""
  return jnp.sum(coeffs.g_re * hr - coeffs.g_im * hi, axis=-1)


def state_planes(h0: Optional[jax.Array], shape: tuple[int, ...]) -> tuple[jax.Array, jax.Array]:
  """Real and imaginary float32 planes, each `shape` (B, D, N), of an initial state (B, D, N, 2) or of zeros."""
  if h0 is None:
    zeros = jnp.zeros(shape, jnp.float32)
    return zeros, zeros
  h0 = h0.astype(jnp.float32)
  return h0[..., 0], h0[..., 1]
