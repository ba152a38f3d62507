"""CEMA as a parallel prefix (`lax.associative_scan`) over the affine maps h ↦ q h + p u along time."""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

from megalodon_jax.ops.cema.coefficients import CEMACoeffs, readout, state_planes


def cema_associative_scan(x: jax.Array, coeffs: CEMACoeffs, omega: jax.Array, h0: Optional[jax.Array] = None,
                          return_state: bool = False, *, resets: Optional[jax.Array] = None):
  """CEMA via `lax.associative_scan` over affine maps h ↦ a h + b along time.

  Composing (a1, b1) then (a2, b2) gives (a2 a1, a2 b1 + b2). The decay is the same q at every step, so it is
  stored once per time step without the batch axis, (1, L, D, N), and only the inputs b = p u carry the batch.
  h0 is folded into the first input, b_0 = q h0 + p u_0, so the prefix directly yields h_t.
  Memory is O(B·L·D·N) (the whole state history, plus the scan's intermediates). With resets (docs/model.md#cema)
  the decay at a document start is 0, so it becomes per row, (B, L, D, N), and h0 reaches only a row whose first
  step is not a reset.

  Args:
    x: (B, L, D) any float dtype.  coeffs: (D, N) float32 fields.  omega: (D, 1) or (D,).
    h0: optional (B, D, N, 2) float32.  return_state: also return h_{L-1}.
    resets: optional (B, L) bool, True where a document starts.
  Returns:
    y (B, L, D) float32 and the final state (B, D, N, 2) float32 or None.
  """
  batch, length, dim = x.shape
  u = x.astype(jnp.float32)
  nstate = coeffs.p.shape[-1]
  br = coeffs.p * u[..., None]  # (B, L, D, N)
  bi = jnp.zeros_like(br)
  keep = None if resets is None else jnp.where(resets, 0.0, 1.0)[..., None, None]  # (B, L, 1, 1) decay factor
  if h0 is not None:
    h0r, h0i = state_planes(h0, (batch, dim, nstate))
    if keep is not None:
      h0r, h0i = keep[:, 0] * h0r, keep[:, 0] * h0i
    br = br.at[:, 0].add(coeffs.q_re * h0r - coeffs.q_im * h0i)
    bi = bi.at[:, 0].add(coeffs.q_re * h0i + coeffs.q_im * h0r)
  if keep is None:
    ar = jnp.broadcast_to(coeffs.q_re, (1, length, dim, nstate))
    ai = jnp.broadcast_to(coeffs.q_im, (1, length, dim, nstate))
  else:
    ar, ai = keep * coeffs.q_re, keep * coeffs.q_im  # (B, L, D, N)

  def combine(first, second):
    a1r, a1i, b1r, b1i = first
    a2r, a2i, b2r, b2i = second
    return (a2r * a1r - a2i * a1i, a2r * a1i + a2i * a1r,
            a2r * b1r - a2i * b1i + b2r, a2r * b1i + a2i * b1r + b2i)

  _, _, hr, hi = jax.lax.associative_scan(combine, (ar, ai, br, bi), axis=1)
  y = readout(coeffs, hr, hi) + u * omega.reshape(-1).astype(jnp.float32)
  state = jnp.stack([hr[:, -1], hi[:, -1]], axis=-1) if return_state else None
  return y, state
