"""CEMA as an explicit recurrence: a parallel prefix scan and a step-by-step scan (spec §2.3).

Both carry the complex state as separate real and imaginary float32 arrays, so nothing here needs a complex dtype
(Pallas/TPU kernels have none). See `ops/cema.py` for the shared signature.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

from megalodon_jax.ops.cema import CEMACoeffs


def _readout(coeffs: CEMACoeffs, hr: jax.Array, hi: jax.Array) -> jax.Array:
  """Re(Σ_n γ̃_n h_n) for states (..., D, N): (..., D) float32."""
  return jnp.sum(coeffs.g_re * hr - coeffs.g_im * hi, axis=-1)


def _initial_state(h0: Optional[jax.Array], shape: tuple[int, ...]) -> tuple[jax.Array, jax.Array]:
  if h0 is None:
    zeros = jnp.zeros(shape, jnp.float32)
    return zeros, zeros
  h0 = h0.astype(jnp.float32)
  return h0[..., 0], h0[..., 1]


def cema_associative_scan(x: jax.Array, coeffs: CEMACoeffs, omega: jax.Array, h0: Optional[jax.Array] = None,
                          return_state: bool = False):
  """CEMA via `lax.associative_scan` over affine maps h ↦ a h + b along time.

  Composing (a1, b1) then (a2, b2) gives (a2 a1, a2 b1 + b2). The decay is the same q at every step, so it is
  stored once per time step without the batch axis, (1, L, D, N), and only the inputs b = p u carry the batch.
  h0 is folded into the first input, b_0 = q h0 + p u_0, so the prefix directly yields h_t.
  Memory is O(B·L·D·N) (the whole state history, plus the scan's intermediates); see `cema` for arguments.

  Args:
    x: (B, L, D) any float dtype.  coeffs: (D, N) float32 fields.  omega: (D, 1) or (D,).
    h0: optional (B, D, N, 2) float32.  return_state: also return h_{L-1}.
  Returns:
    y (B, L, D) float32 and the final state (B, D, N, 2) float32 or None.
  """
  batch, length, dim = x.shape
  u = x.astype(jnp.float32)
  nstate = coeffs.p.shape[-1]
  br = coeffs.p * u[..., None]  # (B, L, D, N)
  bi = jnp.zeros_like(br)
  if h0 is not None:
    h0r, h0i = _initial_state(h0, (batch, dim, nstate))
    br = br.at[:, 0].add(coeffs.q_re * h0r - coeffs.q_im * h0i)
    bi = bi.at[:, 0].add(coeffs.q_re * h0i + coeffs.q_im * h0r)
  ar = jnp.broadcast_to(coeffs.q_re, (1, length, dim, nstate))
  ai = jnp.broadcast_to(coeffs.q_im, (1, length, dim, nstate))

  def combine(first, second):
    a1r, a1i, b1r, b1i = first
    a2r, a2i, b2r, b2i = second
    return (a2r * a1r - a2i * a1i, a2r * a1i + a2i * a1r,
            a2r * b1r - a2i * b1i + b2r, a2r * b1i + a2i * b1r + b2i)

  _, _, hr, hi = jax.lax.associative_scan(combine, (ar, ai, br, bi), axis=1)
  y = _readout(coeffs, hr, hi) + u * omega.reshape(-1).astype(jnp.float32)
  state = jnp.stack([hr[:, -1], hi[:, -1]], axis=-1) if return_state else None
  return y, state


def _step(coeffs: CEMACoeffs, hr: jax.Array, hi: jax.Array, u: jax.Array):
  """One recurrence step. hr, hi: (B, D, N); u: (B, D). Returns the new (hr, hi)."""
  pu = coeffs.p * u[..., None]
  return coeffs.q_re * hr - coeffs.q_im * hi + pu, coeffs.q_re * hi + coeffs.q_im * hr


def cema_sequential(x: jax.Array, coeffs: CEMACoeffs, omega: jax.Array, h0: Optional[jax.Array] = None,
                    return_state: bool = False, *, unroll: int = 8):
  """CEMA with `lax.scan`, one time step per iteration: the decoding path (see `cema` for arguments).

  L = 1 skips the scan entirely (a handful of elementwise ops), which is what a decoding step needs.
  Memory is O(B·D·N) for the forward; reverse-mode AD stores the carry of every step, O(B·L·D·N).

  Args:
    x: (B, L, D) any float dtype.  coeffs: (D, N) float32 fields.  omega: (D, 1) or (D,).
    h0: optional (B, D, N, 2) float32.  return_state: also return h_{L-1}.
    unroll: time steps per scan iteration; amortises the per-iteration loop overhead on CPU/GPU.
  Returns:
    y (B, L, D) float32 and the final state (B, D, N, 2) float32 or None.
  """
  batch, length, dim = x.shape
  u = x.astype(jnp.float32)
  w = omega.reshape(-1).astype(jnp.float32)
  hr, hi = _initial_state(h0, (batch, dim, coeffs.p.shape[-1]))
  if length == 1:
    hr, hi = _step(coeffs, hr, hi, u[:, 0])
    y = (_readout(coeffs, hr, hi) + u[:, 0] * w)[:, None]
  else:
    def body(carry, u_t):
      hr, hi = _step(coeffs, *carry, u_t)
      return (hr, hi), _readout(coeffs, hr, hi)

    (hr, hi), ys = jax.lax.scan(body, (hr, hi), jnp.swapaxes(u, 0, 1), unroll=min(unroll, length))
    y = jnp.swapaxes(ys, 0, 1) + u * w
  state = jnp.stack([hr, hi], axis=-1) if return_state else None
  return y, state
