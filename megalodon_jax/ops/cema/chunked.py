"""Block-parallel CEMA: matmuls within blocks of T steps, a scan over the block states across blocks.

Split the sequence into M = ⌈L/T⌉ blocks and let H_m be the state just before block m (H_0 = h0). Then for
t < T inside block m (docs/model.md#cema):
  y_{m,t} = Σ_{s≤t} K_{t-s} u_{m,s}  +  Re Σ_n γ̃_n q_n^{t+1} H_{m,n}  +  ω u_{m,t}      (Toeplitz + carry-in)
  H_{m+1} = q^T H_m + Σ_s p q^{T-1-s} u_{m,s}                                        (carry-out)
with K_j = Re Σ_n p γ̃_n q_n^j. Every term except the H recurrence is a matmul with a small constant matrix
((D, T, T) or (D, 2N, T)), and the recurrence runs over M steps on (B, D, N) states instead of L steps. Live
memory is O(B·L·D + B·M·D·N + D·T·(T + N)), never O(B·L·D·N). Complex values are real/imag float32 pairs.

Document resets (packed rows; the decay into a document start is 0). With c_t the last reset in the block at or
before t, a_m = 0 if block m holds a reset (else 1) and e the block's last reset (-∞ if none):
  y_{m,t} = Σ_{c_t≤s≤t} K_{t-s} u_{m,s}  +  [no reset in 0..t] Re Σ_n γ̃_n q_n^{t+1} H_{m,n}  +  ω u_{m,t}
  H_{m+1} = a_m q^T H_m + Σ_{s≥e} p q^{T-1-s} u_{m,s}
The carry terms stay matmuls with the same constant matrices, on masked inputs / outputs. The Toeplitz term does
not: its mask differs per (row, block), and a masked (T, T) matrix per block would be O(B·L·D·T). It is computed
as a shift-and-add over the T lags, y_t = Σ_{j<T} K_j [j ≤ t - max(c_t, 0)] u_{t-j}: T elementwise passes over
(D, B, M, T) with a (B, M, T) "steps since the block start or last reset" count as the mask, so memory stays
O(B·L·D) (XLA fuses the sum; its hand-written gradient is the same shifts reversed, with u as the only large
residual). Exact, at the price of vector instead of matmul throughput for that term, only when resets are given.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp

from megalodon_jax.ops.cema.coefficients import HIGHEST, CEMACoeffs, power_table
from megalodon_jax.ops.cema.final_state import DEFAULT_BLOCK_SIZE, input_to_state


def _toeplitz(kernel: jax.Array) -> jax.Array:
  """Lower-triangular Toeplitz matrices from a kernel (D, T): (D, T, T) float32 with [d, t, s] = K_{t-s}, t ≥ s."""
  size = kernel.shape[-1]
  lag = jnp.arange(size)[:, None] - jnp.arange(size)[None, :]
  return jnp.where(lag >= 0, kernel[:, jnp.maximum(lag, 0)], 0.0)


def _state_to_output(coeffs: CEMACoeffs, pr: jax.Array, pi: jax.Array) -> jax.Array:
  """Maps a carried-in state [Re H | Im H] to outputs Re Σ_n γ̃ q^{t+1} H: (D, 2N, T) float32.

  pr, pi: q^{t+1} for t < T, (D, N, T).
  """
  g_re, g_im = coeffs.g_re[..., None], coeffs.g_im[..., None]
  # Re(w H) = Re(w) Re(H) - Im(w) Im(H) with w = γ̃ q^{t+1}.
  return jnp.concatenate([g_re * pr - g_im * pi, -(g_re * pi + g_im * pr)], axis=1)


def _advance(qr: jax.Array, qi: jax.Array, h: jax.Array, c: jax.Array) -> jax.Array:
  """q h + c for stacked states h, c: (D, ..., 2N) with [Re | Im] halves; q: (D, ..., N) broadcastable."""
  n = qr.shape[-1]
  hr, hi = h[..., :n], h[..., n:]
  return jnp.concatenate([qr * hr - qi * hi, qr * hi + qi * hr], axis=-1) + c


class _ResetMasks(NamedTuple):
  """Where a block's terms apply under document resets, each (B, M, T) unless noted.

  since: int32 t - max(c_t, 0), the largest lag that stays inside the document (c_t: last reset at or before t).
  fresh: float32 1 where no reset in the block at or before t (the carried-in state reaches t).
  after: float32 1 where s is at or after the block's last reset (the input reaches the block's carry-out).
  keep: float32 (M, 1, B, 1), 0 for a block holding a reset (the carried-in state does not reach its end).
  """
  since: jax.Array
  fresh: jax.Array
  after: jax.Array
  keep: jax.Array


def _reset_masks(resets: jax.Array, nblocks: int, size: int) -> _ResetMasks:
  """Masks from resets (B, L) bool; the padding past L holds no reset."""
  batch, length = resets.shape
  rb = jnp.pad(resets, ((0, 0), (0, nblocks * size - length))).reshape(batch, nblocks, size)
  pos = jnp.arange(size, dtype=jnp.int32)
  last = jax.lax.cummax(jnp.where(rb, pos, -1), axis=2)  # last reset at or before t, -1 if none
  count = jnp.cumsum(rb, axis=2, dtype=jnp.int32)  # resets at or before t
  fresh = (count == 0).astype(jnp.float32)
  after = (count == count[..., -1:]).astype(jnp.float32)
  keep = jnp.transpose((count[..., -1] == 0).astype(jnp.float32))[:, None, :, None]
  return _ResetMasks(pos - jnp.maximum(last, 0), fresh, after, keep)


def _shift_right(a: jax.Array, j: int) -> jax.Array:
  """a[..., t - j] along the last axis (zeros for t < j)."""
  return jnp.pad(a[..., :a.shape[-1] - j], ((0, 0),) * (a.ndim - 1) + ((j, 0),))


def _shift_left(a: jax.Array, j: int) -> jax.Array:
  """a[..., t + j] along the last axis (zeros past the end)."""
  return jnp.pad(a[..., j:], ((0, 0),) * (a.ndim - 1) + ((0, j),))


@jax.custom_vjp
def _masked_toeplitz(kernel: jax.Array, ub: jax.Array, since: jax.Array) -> jax.Array:
  """Σ_{j ≤ since_t} K_j u_{t-j} within each block by shift-and-add (module docstring): (D, B, M, T) float32.

  kernel: (D, T).  ub: (D, B, M, T).  since: (B, M, T) int32 (≤ t, so a shift never leaves the block).

  The gradient is written by hand: autodiff of the T-term sum keeps each masked, shifted copy of u as a residual
  for dK_j, and XLA:TPU held several of them at once. Here the residuals are only (kernel, u, since), and the
  backward pass is T more shift-and-add passes (its effect on the 7B reset step, measured:
  benchmarks/RESULTS.md#shipped-configs-on-their-targets-auto-settings).
  """
  size = ub.shape[-1]
  y = kernel[:, 0, None, None, None] * ub
  for j in range(1, size):
    y = y + kernel[:, j, None, None, None] * jnp.where(since >= j, _shift_right(ub, j), 0.0)
  return y


def _masked_toeplitz_fwd(kernel, ub, since):
  return _masked_toeplitz(kernel, ub, since), (kernel, ub, since)


def _masked_toeplitz_bwd(residuals, dy):
  # y_t = Σ_j K_j [since_t ≥ j] u_{t-j}, so du_s = Σ_j K_j [since_{s+j} ≥ j] dy_{s+j} and
  # dK_j = Σ_{b,m,t} [since_t ≥ j] dy_t u_{t-j}.
  kernel, ub, since = residuals
  size = ub.shape[-1]
  du = kernel[:, 0, None, None, None] * dy
  dk = [jnp.sum(dy * ub, axis=(1, 2, 3))]
  for j in range(1, size):
    masked = jnp.where(since >= j, dy, 0.0)
    du = du + kernel[:, j, None, None, None] * _shift_left(masked, j)
    dk.append(jnp.sum(masked[..., j:] * ub[..., :size - j], axis=(1, 2, 3)))
  return jnp.stack(dk, axis=1), du, None


_masked_toeplitz.defvjp(_masked_toeplitz_fwd, _masked_toeplitz_bwd)


def cema_chunked(x: jax.Array, coeffs: CEMACoeffs, omega: jax.Array, h0: Optional[jax.Array] = None,
                 return_state: bool = False, *, resets: Optional[jax.Array] = None,
                 block_size: int = DEFAULT_BLOCK_SIZE):
  """CEMA with (T×T Toeplitz) matmuls inside blocks and a `lax.scan` over block states (see `dispatch.cema`).

  L need not be a multiple of the block size: the input is zero-padded at the end (which cannot change earlier
  outputs), and the final state is taken from the real length of the last block, not the padded one. Inputs and
  outputs are laid out channel-first inside, (D, B, M, T), so the matmuls are batched over D without transposing
  the big arrays; only the block states, (M, D, B, 2N), put M first for the scan.

  Args:
    x: (B, L, D) any float dtype.  coeffs: (D, N) float32 fields.  omega: (D, 1) or (D,).
    h0: optional (B, D, N, 2) float32.  return_state: also return h_{L-1}.
    resets: optional (B, L) bool, True where a document starts (module docstring). None: the plain recurrence.
    block_size: T, steps per block (clipped to L). Cost per step grows like T + 4N; memory like 1/T.
  Returns:
    y (B, L, D) float32 and the final state (B, D, N, 2) float32 or None.
  """
  batch, length, dim = x.shape
  nstate = coeffs.p.shape[-1]
  size = max(1, min(block_size, length))
  nblocks = -(-length // size)
  u = jnp.transpose(x.astype(jnp.float32), (2, 0, 1))  # (D, B, L)
  ub = jnp.pad(u, ((0, 0), (0, 0), (0, nblocks * size - length))).reshape(dim, batch, nblocks, size)

  pr, pi = power_table(coeffs.q_re, coeffs.q_im, size + 1)  # q^j, j = 0..T: (D, N, T + 1)
  kernel = jnp.sum(coeffs.p[..., None] * (coeffs.g_re[..., None] * pr[..., :size] - coeffs.g_im[..., None]
                                          * pi[..., :size]), axis=1)  # K_j, j < T: (D, T)
  masks = None if resets is None else _reset_masks(resets, nblocks, size)
  if masks is None:
    y = jnp.einsum("dts,dbms->dbmt", _toeplitz(kernel), ub, precision=HIGHEST)
  else:
    y = _masked_toeplitz(kernel, ub, masks.since)
  uc = ub if masks is None else ub * masks.after  # the inputs that reach each block's carry-out

  carry_in = h0 is not None or nblocks > 1
  if carry_in or return_state:
    qr, qi = pr[:, None, :, size], pi[:, None, :, size]  # q^T: (D, 1, N)
    if h0 is None:
      start = jnp.zeros((dim, batch, 2 * nstate), jnp.float32)
    else:
      h0 = jnp.transpose(h0.astype(jnp.float32), (1, 0, 2, 3))  # (D, B, N, 2)
      start = jnp.concatenate([h0[..., 0], h0[..., 1]], axis=-1)  # (D, B, 2N)
    contrib = jnp.einsum("dns,dbms->mdbn", input_to_state(coeffs, pr, pi, size), uc, precision=HIGHEST)

    # starts[m]: the state entering block m, (M, D, B, 2N). The carry after the last block is the final state only
    # when that block is full (zero padding still decays the state).
    if masks is None:
      def body(h, c):
        return _advance(qr, qi, h, c), h

      end, starts = jax.lax.scan(body, start, contrib)
    else:
      def reset_body(h, inputs):
        c, k = inputs  # k: (1, B, 1), 0 for a block holding a reset
        return _advance(k * qr, k * qi, h, c), h

      end, starts = jax.lax.scan(reset_body, start, (contrib, masks.keep))
  if carry_in:
    carried = jnp.einsum("dnt,mdbn->dbmt", _state_to_output(coeffs, pr[..., 1:], pi[..., 1:]), starts,
                         precision=HIGHEST)
    y = y + (carried if masks is None else carried * masks.fresh)

  y = y.reshape(dim, batch, nblocks * size)[..., :length]
  y = jnp.transpose(y + u * omega.reshape(-1, 1, 1).astype(jnp.float32), (1, 2, 0))

  state = None
  if return_state:
    tail = length - (nblocks - 1) * size  # real length of the last block, 1..T
    if tail == size:
      h = end  # (D, B, 2N)
    else:
      u_tail = u[..., length - tail:] if masks is None else uc[:, :, -1, :tail]
      tail_contrib = jnp.einsum("dns,dbs->dbn", input_to_state(coeffs, pr, pi, tail), u_tail, precision=HIGHEST)
      qr, qi = pr[:, None, :, tail], pi[:, None, :, tail]
      if masks is not None:
        qr, qi = masks.keep[-1] * qr, masks.keep[-1] * qi
      h = _advance(qr, qi, starts[-1], tail_contrib)
    state = jnp.transpose(jnp.stack([h[..., :nstate], h[..., nstate:]], axis=-1), (1, 0, 2, 3))
  return y, state

