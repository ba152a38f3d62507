"""Block-parallel CEMA: matmuls within blocks of T steps, a scan over the block states across blocks.

Split the sequence into M = ⌈L/T⌉ blocks and let H_m be the state just before block m (H_0 = h0). Then for
t < T inside block m (spec §2.3–2.4):
  y_{m,t} = Σ_{s≤t} K_{t-s} u_{m,s}  +  Re Σ_n γ̃_n q_n^{t+1} H_{m,n}  +  ω u_{m,t}      (Toeplitz + carry-in)
  H_{m+1} = q^T H_m + Σ_s p q^{T-1-s} u_{m,s}                                        (carry-out)
with K_j = Re Σ_n p γ̃_n q_n^j. Every term except the H recurrence is a matmul with a small constant matrix
((D, T, T) or (D, 2N, T)), and the recurrence runs over M steps on (B, D, N) states instead of L steps. Live
memory is O(B·L·D + B·M·D·N + D·T·(T + N)), never O(B·L·D·N). Complex values are real/imag float32 pairs.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

from megalodon_jax.ops.cema import HIGHEST, CEMACoeffs, _powers, cema_kernel

DEFAULT_BLOCK_SIZE = 64


def _toeplitz(kernel: jax.Array) -> jax.Array:
  """Lower-triangular Toeplitz matrices from a kernel (D, T): (D, T, T) float32 with [d, t, s] = K_{t-s}, t ≥ s."""
  size = kernel.shape[-1]
  lag = jnp.arange(size)[:, None] - jnp.arange(size)[None, :]
  return jnp.where(lag >= 0, kernel[:, jnp.maximum(lag, 0)], 0.0)


def _input_to_state(coeffs: CEMACoeffs, size: int) -> jax.Array:
  """Maps a block of `size` inputs to its state contribution Σ_s p q^{size-1-s} u_s: (D, 2N, size) float32.

  Rows [:N] give the real part and [N:] the imaginary part, so one matmul produces both.
  """
  pr, pi = _powers(coeffs, jnp.arange(size - 1, -1, -1, dtype=jnp.float32))
  return jnp.concatenate([coeffs.p[..., None] * pr, coeffs.p[..., None] * pi], axis=1)


def _state_to_output(coeffs: CEMACoeffs, size: int) -> jax.Array:
  """Maps a carried-in state to outputs Re Σ_n γ̃ q^{t+1} H, t < size: (D, 2N, size) float32, applied to [Re H, Im H]."""
  pr, pi = _powers(coeffs, jnp.arange(1, size + 1, dtype=jnp.float32))
  g_re, g_im = coeffs.g_re[..., None], coeffs.g_im[..., None]
  # Re(w H) = Re(w) Re(H) - Im(w) Im(H) with w = γ̃ q^{t+1}.
  return jnp.concatenate([g_re * pr - g_im * pi, -(g_re * pi + g_im * pr)], axis=1)


def _q_power(coeffs: CEMACoeffs, exponent: int) -> tuple[jax.Array, jax.Array]:
  pr, pi = _powers(coeffs, jnp.array([float(exponent)], jnp.float32))
  return pr[..., 0], pi[..., 0]


def _advance(qr: jax.Array, qi: jax.Array, h: jax.Array, c: jax.Array) -> jax.Array:
  """q h + c for stacked states h, c: (..., D, 2N) with [Re | Im] halves; q: (D, N)."""
  n = qr.shape[-1]
  hr, hi = h[..., :n], h[..., n:]
  return jnp.concatenate([qr * hr - qi * hi, qr * hi + qi * hr], axis=-1) + c


def _stack_state(h0: Optional[jax.Array], batch: int, dim: int, nstate: int) -> jax.Array:
  """(B, D, N, 2) state → (B, D, 2N) [Re | Im]; zeros when None."""
  if h0 is None:
    return jnp.zeros((batch, dim, 2 * nstate), jnp.float32)
  h0 = h0.astype(jnp.float32)
  return jnp.concatenate([h0[..., 0], h0[..., 1]], axis=-1)


def _unstack_state(h: jax.Array) -> jax.Array:
  n = h.shape[-1] // 2
  return jnp.stack([h[..., :n], h[..., n:]], axis=-1)


def cema_chunked(x: jax.Array, coeffs: CEMACoeffs, omega: jax.Array, h0: Optional[jax.Array] = None,
                 return_state: bool = False, *, block_size: int = DEFAULT_BLOCK_SIZE):
  """CEMA with (T×T Toeplitz) matmuls inside blocks and a `lax.scan` over block states (see `cema` for arguments).

  L need not be a multiple of the block size: the input is zero-padded at the end (which cannot change earlier
  outputs), and the final state is taken from the real length of the last block, not the padded one.

  Args:
    x: (B, L, D) any float dtype.  coeffs: (D, N) float32 fields.  omega: (D, 1) or (D,).
    h0: optional (B, D, N, 2) float32.  return_state: also return h_{L-1}.
    block_size: T, steps per block (clipped to L). Cost per step grows like T + 4N; memory like 1/T.
  Returns:
    y (B, L, D) float32 and the final state (B, D, N, 2) float32 or None.
  """
  batch, length, dim = x.shape
  nstate = coeffs.p.shape[-1]
  size = max(1, min(block_size, length))
  nblocks = -(-length // size)
  u = x.astype(jnp.float32)
  ub = jnp.pad(u, ((0, 0), (0, nblocks * size - length), (0, 0))).reshape(batch, nblocks, size, dim)

  y = jnp.einsum("dts,bmsd->bmtd", _toeplitz(cema_kernel(coeffs, size)), ub, precision=HIGHEST)

  carry_in = h0 is not None or nblocks > 1
  if carry_in or return_state:
    qr, qi = _q_power(coeffs, size)
    start = _stack_state(h0, batch, dim, nstate)  # (B, D, 2N)
    # Contributions of the full blocks 0..M-2; the last block may be partial and is handled below.
    contrib = jnp.einsum("dns,bmsd->mbdn", _input_to_state(coeffs, size), ub[:, :-1], precision=HIGHEST)

    def body(h, c):
      h_next = _advance(qr, qi, h, c)
      return h_next, h_next

    last_start, starts = jax.lax.scan(body, start, contrib)  # (B, D, 2N), (M-1, B, D, 2N)
    starts = jnp.concatenate([start[None], starts], axis=0)  # (M, B, D, 2N): the state entering each block
  if carry_in:
    y = y + jnp.einsum("dnt,mbdn->bmtd", _state_to_output(coeffs, size), starts, precision=HIGHEST)

  y = y.reshape(batch, nblocks * size, dim)[:, :length] + u * omega.reshape(-1).astype(jnp.float32)

  state = None
  if return_state:
    tail = length - (nblocks - 1) * size  # real length of the last block, 1..T
    lr, li = _q_power(coeffs, tail)
    tail_contrib = jnp.einsum("dns,bsd->bdn", _input_to_state(coeffs, tail), u[:, length - tail:],
                              precision=HIGHEST)
    state = _unstack_state(_advance(lr, li, last_start, tail_contrib))
  return y, state


def final_state_blocked(x: jax.Array, coeffs: CEMACoeffs, h0: Optional[jax.Array] = None, *,
                        block_size: int = DEFAULT_BLOCK_SIZE) -> jax.Array:
  """h_L = q^L h0 + Σ_j p q^{L-1-j} u_j without materialising q^j for all j < L: (B, D, N, 2) float32.

  Same value as `cema.final_state_direct`, with O(D·N·(T + L/T)) coefficient memory instead of O(D·N·L).
  Zero inputs contribute nothing to the sum, so the input is padded at the front to whole blocks; each block is
  reduced to its state contribution by one matmul, and block m's contribution is then scaled by q^{T(M-1-m)}.

  Args:
    x: (B, L, D) any float dtype.  coeffs: (D, N) float32 fields.  h0: optional (B, D, N, 2) float32.
    block_size: T, steps per block (clipped to L).
  """
  batch, length, dim = x.shape
  nstate = coeffs.p.shape[-1]
  size = max(1, min(block_size, length))
  nblocks = -(-length // size)
  u = x.astype(jnp.float32)
  ub = jnp.pad(u, ((0, 0), (nblocks * size - length, 0), (0, 0))).reshape(batch, nblocks, size, dim)
  contrib = jnp.einsum("dns,bmsd->bmdn", _input_to_state(coeffs, size), ub, precision=HIGHEST)  # (B, M, D, 2N)
  sr, si = _powers(coeffs, size * jnp.arange(nblocks - 1, -1, -1, dtype=jnp.float32))  # (D, N, M)
  cr, ci = contrib[..., :nstate], contrib[..., nstate:]
  hr = jnp.einsum("dnm,bmdn->bdn", sr, cr, precision=HIGHEST) - jnp.einsum("dnm,bmdn->bdn", si, ci, precision=HIGHEST)
  hi = jnp.einsum("dnm,bmdn->bdn", sr, ci, precision=HIGHEST) + jnp.einsum("dnm,bmdn->bdn", si, cr, precision=HIGHEST)
  if h0 is not None:
    lr, li = _q_power(coeffs, length)
    h0 = h0.astype(jnp.float32)
    hr = hr + lr * h0[..., 0] - li * h0[..., 1]
    hi = hi + lr * h0[..., 1] + li * h0[..., 0]
  return jnp.stack([hr, hi], axis=-1)
