"""CEMA as a causal FFT convolution with the kernel K_j = Re Σ_n p γ̃ q^j: the official training path."""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

from megalodon_jax.ops.cema.chunked import cema_chunked
from megalodon_jax.ops.cema.coefficients import CEMACoeffs
from megalodon_jax.ops.cema.final_state import final_state_blocked
from megalodon_jax.ops.cema.powers import cema_kernel, initial_state_contribution


def fft_causal_conv(x: jax.Array, kernel: jax.Array) -> jax.Array:
  """y_t = Σ_{s≤t} K_{t-s} x_s along axis 1, via a zero-padded (linear, not circular) real FFT.

  Args:
    x: (B, L, D) float32.  kernel: (D, L) float32.
  Returns:
    (B, L, D) float32.
  """
  length = x.shape[1]
  n = 2 * (1 << max(0, (length - 1).bit_length()))  # 2 × next power of two ≥ L, as the official fftconv
  xf = jnp.fft.rfft(x, n=n, axis=1)
  kf = jnp.fft.rfft(kernel.T, n=n, axis=0)
  return jnp.fft.irfft(xf * kf[None], n=n, axis=1)[:, :length]


def cema_fft(x: jax.Array, coeffs: CEMACoeffs, omega: jax.Array, h0: Optional[jax.Array] = None,
             return_state: bool = False, *, resets: Optional[jax.Array] = None):
  """CEMA via FFT convolution; the final state, if asked for, from `final_state_blocked`.

  With resets the recurrence is no longer one convolution (the kernel restarts at every document start, a
  different Toeplitz matrix per row), so this runs the block-parallel path, `cema_chunked(..., resets=resets)`,
  which is exact and keeps O(B·L·D) memory; per-document FFTs would need dynamic shapes.

  Args:
    x: (B, L, D) any float dtype.  coeffs: (D, N) float32 fields.  omega: (D, 1) or (D,).
    h0: optional (B, D, N, 2) float32.  return_state: also return h_{L-1}.
    resets: optional (B, L) bool, True where a document starts (docs/model.md#cema).
  Returns:
    y (B, L, D) float32 and the final state (B, D, N, 2) float32 or None.
  """
  if resets is not None:
    return cema_chunked(x, coeffs, omega, h0, return_state, resets=resets)
  length = x.shape[1]
  u = x.astype(jnp.float32)
  y = fft_causal_conv(u, cema_kernel(coeffs, length))
  if h0 is not None:
    y = y + initial_state_contribution(coeffs, h0, length)
  y = y + u * omega.reshape(-1).astype(jnp.float32)
  state = final_state_blocked(x, coeffs, h0) if return_state else None
  return y, state
