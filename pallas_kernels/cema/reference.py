"""Pure-JAX reference of the CEMA scan on plain arrays: the ground truth the Pallas kernels are tested against.

For each batch b, channel d and state n (N complex states per channel):
  h_t = q ⊙ h_{t-1} + p ⊙ u_t,   y_t = Re(Σ_n g_n h_{t,n}) + ω u_t,   h_{-1} = h0
and, with document resets, h_t = p ⊙ u_t at a step t where a new document starts.
with a real input weight p, complex decay q and complex output weight g, all (D, N) and carried as real/imaginary
float32 planes. One `lax.scan` step per time step; gradients come from JAX autodiff, independently of the kernels'
hand-written backward.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp


def cema_scan_reference(x: jax.Array, p: jax.Array, q_re: jax.Array, q_im: jax.Array, g_re: jax.Array,
                        g_im: jax.Array, omega: jax.Array, h0: Optional[jax.Array] = None,
                        dtype: jnp.dtype = jnp.float32,
                        resets: Optional[jax.Array] = None) -> tuple[jax.Array, jax.Array]:
  """Runs the recurrence one step at a time.

  Args:
    x: (B, L, D) input, any float dtype.
    p: (D, N) real input weight.  q_re, q_im: (D, N) complex decay.  g_re, g_im: (D, N) complex output weight.
    omega: (D,) skip weight.
    h0: optional (B, D, N, 2) initial state (real, imag); None means zeros.
    dtype: computation dtype (float32; float64 under `jax.enable_x64` for a sharper reference).
    resets: optional (B, L) bool, True where a new document starts (the state entering that step is dropped).
  Returns:
    y: (B, L, D) `dtype`, and the state after the last step, (B, D, N, 2) `dtype`.
  """
  u = x.astype(dtype)
  p, q_re, q_im, g_re, g_im = (a.astype(dtype) for a in (p, q_re, q_im, g_re, g_im))
  batch, _, dim = u.shape
  if h0 is None:
    hr = hi = jnp.zeros((batch, dim, p.shape[-1]), dtype)
  else:
    hr, hi = h0[..., 0].astype(dtype), h0[..., 1].astype(dtype)

  def step(carry, inputs):  # u_t: (B, D); r_t: (B,) bool or None
    u_t, r_t = inputs
    hr, hi = carry
    if r_t is not None:
      hr, hi = (jnp.where(r_t[:, None, None], 0, h) for h in (hr, hi))
    hr, hi = q_re * hr - q_im * hi + p * u_t[..., None], q_re * hi + q_im * hr
    return (hr, hi), jnp.sum(g_re * hr - g_im * hi, axis=-1)

  rs = None if resets is None else jnp.swapaxes(resets, 0, 1)
  (hr, hi), ys = jax.lax.scan(step, (hr, hi), (jnp.swapaxes(u, 0, 1), rs))
  y = jnp.swapaxes(ys, 0, 1) + u * omega.reshape(-1).astype(dtype)
  return y, jnp.stack([hr, hi], axis=-1)
