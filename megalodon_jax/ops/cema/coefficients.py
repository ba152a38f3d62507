"""CEMA coefficients from the official parameters, and the state layout every implementation shares.

For every channel c and order n (N complex states per channel; docs/model.md#cema):
  h_t = q ⊙ h_{t-1} + p ⊙ u_t,   y_t = Re(Σ_n γ̃_n h_{t,n}) + ω_c u_t
with p = σ(alpha), q = (1 - σ(alpha)σ(delta)) e^{i n ϑ_c}, ϑ_c = σ(theta_c)·2π/N and γ̃ = gamma / √N.
Complex values are carried as real/imaginary float32 planes (nothing here needs a complex dtype, which Pallas/TPU
kernels lack); the state is (B, D, N, 2), the layout of the official chunk-parallel packing (`view_as_real`).
"""

from __future__ import annotations

import functools
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
  """b^j for j < count, real and imaginary parts, each (..., count) float32.

  Products instead of exp/cos/sin: transcendentals are the slowest ops on CPU, and the phase error of b^j grows
  with log j here rather than with j as it does for exp(j log b). The gradient is written by hand
  (`_power_table_bwd`: one elementwise pass and a sum over j) instead of the transposes of every doubling's
  concatenation and products.
  """
  return _power_table(base_re.astype(jnp.float32), base_im.astype(jnp.float32), count)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _power_table(base_re: jax.Array, base_im: jax.Array, count: int) -> tuple[jax.Array, jax.Array]:
  tr = jnp.ones(base_re.shape + (1,), jnp.float32)
  ti = jnp.zeros_like(tr)
  br, bi = base_re[..., None], base_im[..., None]
  while tr.shape[-1] < count:
    tr, ti = jnp.concatenate([tr, tr * br - ti * bi], -1), jnp.concatenate([ti, tr * bi + ti * br], -1)
    br, bi = br * br - bi * bi, 2 * br * bi
  return tr[..., :count], ti[..., :count]


def _power_table_fwd(base_re, base_im, count):
  tr, ti = _power_table(base_re, base_im, count)
  return (tr, ti), (tr, ti)


def _power_table_bwd(count, table, cotangents):
  # b^j is holomorphic in b with derivative j b^(j-1), so the cotangent of b is Σ_j conj(j b^(j-1)) c_j with
  # c_j = ct_re_j + i ct_im_j (the real-pair convention of JAX's complex gradients).
  tr, ti = table
  ct_re, ct_im = cotangents
  if count < 2:
    return jnp.zeros(tr.shape[:-1], jnp.float32), jnp.zeros(tr.shape[:-1], jnp.float32)
  j = jnp.arange(1, count, dtype=jnp.float32)
  pr, pi, cr, ci = tr[..., :-1], ti[..., :-1], ct_re[..., 1:], ct_im[..., 1:]
  return jnp.sum(j * (pr * cr + pi * ci), axis=-1), jnp.sum(j * (pr * ci - pi * cr), axis=-1)


_power_table.defvjp(_power_table_fwd, _power_table_bwd)


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
