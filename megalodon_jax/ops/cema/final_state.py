"""The state after a whole sequence, h_L = q^L h0 + Σ_j p q^{L-1-j} u_j, by blocks of T steps.

Shared by the block-parallel implementation (chunked.py), which also uses `input_to_state` inside its blocks, and
the FFT implementation (fft.py), which has no state of its own to return.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

from megalodon_jax.ops.cema.coefficients import HIGHEST, CEMACoeffs, power_table

DEFAULT_BLOCK_SIZE = 32  # fastest on CPU for L = 1K..16K (benchmarks/RESULTS.md); 16 and 64 are close


def input_to_state(coeffs: CEMACoeffs, pr: jax.Array, pi: jax.Array, size: int) -> jax.Array:
  """Maps `size` ≥ 1 inputs to their state contribution Σ_s p q^{size-1-s} u_s: (D, 2N, size) float32.

  pr, pi: q^j for j = 0, 1, ... up to at least size - 1, (D, N, ≥size). Rows [:N] give the real part and [N:] the
  imaginary part, so one matmul produces both.
  """
  pr, pi = pr[..., size - 1::-1], pi[..., size - 1::-1]  # q^{size-1-s}, s < size
  return jnp.concatenate([coeffs.p[..., None] * pr, coeffs.p[..., None] * pi], axis=1)


def final_state_blocked(x: jax.Array, coeffs: CEMACoeffs, h0: Optional[jax.Array] = None, *,
                        block_size: int = DEFAULT_BLOCK_SIZE) -> jax.Array:
  """h_L = q^L h0 + Σ_j p q^{L-1-j} u_j without materialising q^j for all j < L: (B, D, N, 2) float32.

  O(D·N·(T + L/T)) coefficient memory instead of O(D·N·L), and no transcendentals. Zero inputs contribute nothing
  to the sum, so the input is padded at the front to whole blocks; each block is reduced to its state contribution
  by one matmul, and block m's contribution is then scaled by (q^T)^{M-1-m}.

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
  pr, pi = power_table(coeffs.q_re, coeffs.q_im, size + 1)
  contrib = jnp.einsum("dns,bmsd->bmdn", input_to_state(coeffs, pr, pi, size), ub, precision=HIGHEST)
  sr, si = power_table(pr[..., size], pi[..., size], nblocks)  # (q^T)^k, k < M: (D, N, M)
  sr, si = sr[..., ::-1], si[..., ::-1]
  cr, ci = contrib[..., :nstate], contrib[..., nstate:]
  hr = jnp.einsum("dnm,bmdn->bdn", sr, cr, precision=HIGHEST) - jnp.einsum("dnm,bmdn->bdn", si, ci, precision=HIGHEST)
  hi = jnp.einsum("dnm,bmdn->bdn", sr, ci, precision=HIGHEST) + jnp.einsum("dnm,bmdn->bdn", si, cr, precision=HIGHEST)
  if h0 is not None:
    # q^L = (q^T)^(M-1) · q^(L - (M-1)T), both already tabulated.
    tail = length - (nblocks - 1) * size
    lr = sr[..., 0] * pr[..., tail] - si[..., 0] * pi[..., tail]
    li = sr[..., 0] * pi[..., tail] + si[..., 0] * pr[..., tail]
    h0 = h0.astype(jnp.float32)
    hr = hr + lr * h0[..., 0] - li * h0[..., 1]
    hi = hi + lr * h0[..., 1] + li * h0[..., 0]
  return jnp.stack([hr, hi], axis=-1)
