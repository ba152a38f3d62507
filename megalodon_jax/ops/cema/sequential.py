"""CEMA as a step-by-step `lax.scan`: the decoding path (one step is a handful of elementwise ops)."""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

from megalodon_jax.ops.cema.coefficients import CEMACoeffs, readout, state_planes


def _step(coeffs: CEMACoeffs, hr: jax.Array, hi: jax.Array, u: jax.Array):
  """One recurrence step. hr, hi: (B, D, N); u: (B, D). Returns the new (hr, hi)."""
  pu = coeffs.p * u[..., None]
  return coeffs.q_re * hr - coeffs.q_im * hi + pu, coeffs.q_re * hi + coeffs.q_im * hr


def cema_sequential(x: jax.Array, coeffs: CEMACoeffs, omega: jax.Array, h0: Optional[jax.Array] = None,
                    return_state: bool = False, *, resets: Optional[jax.Array] = None, unroll: int = 8):
  """CEMA with `lax.scan`, one time step per iteration.

  L = 1 skips the scan entirely (a handful of elementwise ops), which is what a decoding step needs.
  Memory is O(B·D·N) for the forward; reverse-mode AD stores the carry of every step, O(B·L·D·N).

  Args:
    x: (B, L, D) any float dtype.  coeffs: (D, N) float32 fields.  omega: (D, 1) or (D,).
    h0: optional (B, D, N, 2) float32.  return_state: also return h_{L-1}.
    resets: optional (B, L) bool, True where a document starts: the state entering that step is dropped
      (docs/model.md#cema). None runs the plain recurrence.
    unroll: time steps per scan iteration; amortises the per-iteration loop overhead on CPU/GPU.
  Returns:
    y (B, L, D) float32 and the final state (B, D, N, 2) float32 or None.
  """
  batch, length, dim = x.shape
  u = x.astype(jnp.float32)
  w = omega.reshape(-1).astype(jnp.float32)
  hr, hi = state_planes(h0, (batch, dim, coeffs.p.shape[-1]))
  if resets is not None:
    def reset_body(carry, inputs):
      u_t, r_t = inputs
      hr, hi = (jnp.where(r_t[:, None, None], 0.0, h) for h in carry)
      hr, hi = _step(coeffs, hr, hi, u_t)
      return (hr, hi), readout(coeffs, hr, hi)

    (hr, hi), ys = jax.lax.scan(reset_body, (hr, hi), (jnp.swapaxes(u, 0, 1), jnp.swapaxes(resets, 0, 1)),
                                unroll=min(unroll, length))
    y = jnp.swapaxes(ys, 0, 1) + u * w
  elif length == 1:
    hr, hi = _step(coeffs, hr, hi, u[:, 0])
    y = (readout(coeffs, hr, hi) + u[:, 0] * w)[:, None]
  else:
    def body(carry, u_t):
      hr, hi = _step(coeffs, *carry, u_t)
      return (hr, hi), readout(coeffs, hr, hi)

    (hr, hi), ys = jax.lax.scan(body, (hr, hi), jnp.swapaxes(u, 0, 1), unroll=min(unroll, length))
    y = jnp.swapaxes(ys, 0, 1) + u * w
  state = jnp.stack([hr, hi], axis=-1) if return_state else None
  return y, state
