"""Sums over powers q^j for every j < L without an (D, N, L) table: the FFT kernel and the initial-state term.

q^(j + shift) for j = a·T + b (a < M, b < T) is (q^T)^a · q^(b + shift) with T ≈ √L, so only (D, N, T) and
(D, N, M) tables are built, and the sums over n become einsums over them.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

from megalodon_jax.ops.cema.coefficients import HIGHEST, CEMACoeffs, power_table


class BlockedPowers(NamedTuple):
  """q^(j + shift) for j = a·T + b (a < M, b < T) as (q^T)^a · q^(b + shift).

  inner_re/im: q^(b + shift), (D, N, T).  outer_re/im: (q^T)^a, (D, N, M).
  """
  inner_re: jax.Array
  inner_im: jax.Array
  outer_re: jax.Array
  outer_im: jax.Array


def blocked_powers(coeffs: CEMACoeffs, length: int, shift: int = 0) -> BlockedPowers:
  """Powers q^(j + shift) for j < length, factored in blocks of T ≈ √length (M·T ≥ length)."""
  block = max(1, math.isqrt(max(length - 1, 0)) + 1)
  nblocks = -(-length // block)
  ir, ii = power_table(coeffs.q_re, coeffs.q_im, block + max(1, shift))  # up to q^T and q^(T - 1 + shift)
  orr, oi = power_table(ir[..., block], ii[..., block], nblocks)
  return BlockedPowers(ir[..., shift:shift + block], ii[..., shift:shift + block], orr, oi)


def contract_blocked(wr: jax.Array, wi: jax.Array, pw: BlockedPowers, spec: str) -> jax.Array:
  """Re Σ_n w_n (q^T)^a_n q^(b+shift)_n for complex weights w (..., D, N); `spec` lays out the (a, b) axes.

  The einsum over n of Re(w (q^T)^a) with Re(q^b) minus Im(w (q^T)^a) with Im(q^b); callers merge the a and b
  axes into time j = a·T + b and cut it to their length.
  """
  ar = wr[..., None] * pw.outer_re - wi[..., None] * pw.outer_im  # (..., D, N, M)
  ai = wr[..., None] * pw.outer_im + wi[..., None] * pw.outer_re
  return (jnp.einsum(spec, ar, pw.inner_re, precision=HIGHEST) - jnp.einsum(spec, ai, pw.inner_im, precision=HIGHEST))


def initial_state_contribution(coeffs: CEMACoeffs, h0: jax.Array, length: int) -> jax.Array:
  """b_t = Re Σ_n γ̃ q^{t+1} h0 for t < L: (B, L, D) float32. h0: (B, D, N, 2)."""
  h0 = h0.astype(jnp.float32)
  wr = coeffs.g_re * h0[..., 0] - coeffs.g_im * h0[..., 1]  # γ̃ h0: (B, D, N)
  wi = coeffs.g_re * h0[..., 1] + coeffs.g_im * h0[..., 0]
  pw = blocked_powers(coeffs, length, shift=1)
  b = contract_blocked(wr, wi, pw, "bdnm,dnt->bmtd")  # (B, M, T, D)
  return b.reshape(b.shape[0], -1, b.shape[-1])[:, :length]


def cema_kernel(coeffs: CEMACoeffs, length: int) -> jax.Array:
  """The convolution kernel K_j = Re Σ_n p γ̃ q^j, j < L: (D, L) float32."""
  pw = blocked_powers(coeffs, length)
  k = contract_blocked(coeffs.p * coeffs.g_re, coeffs.p * coeffs.g_im, pw, "dnm,dnt->dmt")  # (D, M, T)
  return k.reshape(k.shape[0], -1)[:, :length]
