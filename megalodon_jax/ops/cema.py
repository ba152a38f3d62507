"""Complex exponential moving average (CEMA, spec §2): coefficients and the recurrence.

For every channel c and order n (N complex states per channel):
  h_t = q ⊙ h_{t-1} + p ⊙ u_t,   y_t = Re(Σ_n γ̃_n h_{t,n}) + ω_c u_t
with p = σ(alpha), q = (1 - σ(alpha)σ(delta)) e^{i n ϑ_c}, ϑ_c = σ(theta_c)·2π/N and γ̃ = gamma / √N.

All implementations take and return the same things and agree to float32 rounding:
  "fft"               causal FFT convolution with the kernel K_j = Re Σ p γ̃ q^j (the official training path)
  "associative_scan"  parallel prefix over (decay, input) pairs  (ops/cema_scan.py)
  "sequential"        `lax.scan`, one step at a time; the decoding path  (ops/cema_scan.py)
  "chunked"           matmuls within blocks, a scan across blocks  (ops/cema_chunked.py)
  "pallas"            the Pallas scan kernel for TPU/GPU (pallas_kernels/cema), interpreted on CPU
The state is carried as real/imaginary float32 planes, (B, D, N, 2), the layout of the official
chunk-parallel packing (`view_as_real`).
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp

from pallas_kernels.platform import current_platform

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
  """b^j for j < count by repeated doubling, real and imaginary parts, each (..., count) float32.

  Products instead of exp/cos/sin: transcendentals are the slowest ops on CPU, and the phase error of b^j grows
  with log j here rather than with j as it does for exp(j log b).
  """
  tr = jnp.ones(base_re.shape + (1,), jnp.float32)
  ti = jnp.zeros_like(tr)
  br, bi = base_re[..., None], base_im[..., None]
  while tr.shape[-1] < count:
    tr, ti = jnp.concatenate([tr, tr * br - ti * bi], -1), jnp.concatenate([ti, tr * bi + ti * br], -1)
    br, bi = br * br - bi * bi, 2 * br * bi
  return tr[..., :count], ti[..., :count]


class _BlockedPowers(NamedTuple):
  """q^(j + shift) for j = a·T + b (a < M, b < T) as (q^T)^a · q^(b + shift), so no (D, N, L) table is built.

  inner_re/im: q^(b + shift), (D, N, T).  outer_re/im: (q^T)^a, (D, N, M).
  """
  inner_re: jax.Array
  inner_im: jax.Array
  outer_re: jax.Array
  outer_im: jax.Array


def _blocked_powers(coeffs: CEMACoeffs, length: int, shift: int = 0) -> _BlockedPowers:
  """Powers q^(j + shift) for j < length, factored in blocks of T ≈ √length (M·T ≥ length)."""
  block = max(1, math.isqrt(max(length - 1, 0)) + 1)
  nblocks = -(-length // block)
  ir, ii = power_table(coeffs.q_re, coeffs.q_im, block + max(1, shift))  # up to q^T and q^(T - 1 + shift)
  orr, oi = power_table(ir[..., block], ii[..., block], nblocks)
  return _BlockedPowers(ir[..., shift:shift + block], ii[..., shift:shift + block], orr, oi)


def _contract_blocked(wr: jax.Array, wi: jax.Array, pw: _BlockedPowers, spec: str) -> jax.Array:
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
  pw = _blocked_powers(coeffs, length, shift=1)
  b = _contract_blocked(wr, wi, pw, "bdnm,dnt->bmtd")  # (B, M, T, D)
  return b.reshape(b.shape[0], -1, b.shape[-1])[:, :length]


def final_state_direct(x: jax.Array, coeffs: CEMACoeffs, h0: Optional[jax.Array]) -> jax.Array:
  """h_L = q^L h0 + Σ_j p q^{L-1-j} u_j as one contraction over time: (B, D, N, 2) float32.

  Materialises q^j for every j < L, (D, N, L): a plain statement of the formula, kept as a cross-check of
  `cema_chunked.final_state_blocked`, which the implementations use.
  """
  length = x.shape[1]
  pr, pi = power_table(coeffs.q_re, coeffs.q_im, length + 1)  # (D, N, L + 1)
  rr, ri = pr[..., length - 1::-1], pi[..., length - 1::-1]  # q^{L-1-j}
  u = x.astype(jnp.float32)
  hr = jnp.einsum("dnl,bld->bdn", coeffs.p[..., None] * rr, u, precision=HIGHEST)
  hi = jnp.einsum("dnl,bld->bdn", coeffs.p[..., None] * ri, u, precision=HIGHEST)
  if h0 is not None:
    lr, li = pr[..., length], pi[..., length]
    hr = hr + lr * h0[..., 0] - li * h0[..., 1]
    hi = hi + lr * h0[..., 1] + li * h0[..., 0]
  return jnp.stack([hr, hi], axis=-1)


def cema_kernel(coeffs: CEMACoeffs, length: int) -> jax.Array:
  """The convolution kernel K_j = Re Σ_n p γ̃ q^j, j < L: (D, L) float32."""
  pw = _blocked_powers(coeffs, length)
  k = _contract_blocked(coeffs.p * coeffs.g_re, coeffs.p * coeffs.g_im, pw, "dnm,dnt->dmt")  # (D, M, T)
  return k.reshape(k.shape[0], -1)[:, :length]


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
             return_state: bool = False):
  """CEMA via FFT convolution (see `cema` for arguments)."""
  length = x.shape[1]
  u = x.astype(jnp.float32)
  y = fft_causal_conv(u, cema_kernel(coeffs, length))
  if h0 is not None:
    y = y + initial_state_contribution(coeffs, h0, length)
  y = y + u * omega.reshape(-1).astype(jnp.float32)
  state = None
  if return_state:
    from megalodon_jax.ops.cema_chunked import final_state_blocked  # pylint: disable=import-outside-toplevel
    state = final_state_blocked(x, coeffs, h0)
  return y, state


def cema_pallas(x: jax.Array, coeffs: CEMACoeffs, omega: jax.Array, h0: Optional[jax.Array] = None,
                return_state: bool = False):
  """CEMA with the Pallas scan kernel (pallas_kernels/cema; interpreted on CPU). See `cema` for arguments.

  Under a mesh the kernel runs in `shard_map` over the ambient mesh's batch axes ("data", "fsdp"), as the Pallas
  attention does: XLA cannot partition a Mosaic kernel. The sequence axis is never split (the scan runs along it).
  """
  from pallas_kernels.cema import cema_scan  # pylint: disable=import-outside-toplevel
  mesh = jax.sharding.get_abstract_mesh()
  names = () if mesh.empty else mesh.axis_names
  # Axes already manual (inside the chunk-parallel shard_map, ops/sequence_parallel.py) are split by the caller.
  batch_axes = tuple(a for a in ("data", "fsdp") if a in names and a not in mesh.manual_axes)
  y, state = cema_scan(x, coeffs.p, coeffs.q_re, coeffs.q_im, coeffs.g_re, coeffs.g_im, omega.reshape(-1), h0,
                       batch_axes=batch_axes)
  return y, (state if return_state else None)


def _implementations():
  from megalodon_jax.ops import cema_scan, cema_chunked  # pylint: disable=import-outside-toplevel
  return {
      "fft": cema_fft,
      "associative_scan": cema_scan.cema_associative_scan,
      "sequential": cema_scan.cema_sequential,
      "chunked": cema_chunked.cema_chunked,
      "pallas": cema_pallas,
  }


def default_impl(length: int, backend: Optional[str] = None) -> str:
  """The implementation `impl="auto"` picks for a sequence of `length` on `backend` (default backend if None)."""
  backend = backend or current_platform()
  if length == 1:
    return "sequential"  # a decoding step: a few elementwise ops, no kernel or FFT to build
  if backend == "cpu":
    # Measured (benchmarks/RESULTS.md, D=256, N=16, B=1): "sequential" is fastest below ~128 steps; from there on
    # "chunked" wins forward and forward+backward (1.2-2x over "fft" with blocked powers, 8-19x before them).
    return "sequential" if length < 128 else "chunked"
  # TPU / GPU: chosen for memory, by the deviceless planner (benchmarks/RESULTS.md, "Fitting the hardware"). The
  # 7B step at 32K tokens, 2 sequences per v5p chip: with "fft" XLA:TPU runs out of memory (115.3 GiB of
  # temporaries: the gradient of the FFT kernel is summed over the batch through a (chips, L/2, D) float32 buffer,
  # 32 GiB, and its FFTs keep float32 (batch, D, 2L) buffers), with "chunked" it compiles to a 60.9 GiB peak and
  # with "pallas" to 53.6 GiB. Speed on hardware is still to be measured.
  return "chunked"


def cema(x: jax.Array, coeffs: CEMACoeffs, omega: jax.Array, h0: Optional[jax.Array] = None, *,
         impl: str = "auto", return_state: bool = False):
  """Runs CEMA over a sequence.

  Args:
    x: (B, L, D) input (the TimestepNorm output), any float dtype; computed in float32.
    coeffs: from `cema_coefficients`.
    omega: (D, 1) or (D,) skip weight.
    h0: optional (B, D, N, 2) float32 initial state (real, imag); None means zeros.
    impl: "auto" or one of the implementation names in the module docstring.
    return_state: also return the state after the last step.
  Returns:
    y: (B, L, D) float32, and the final state (B, D, N, 2) float32 (None unless return_state).
  """
  if impl == "auto":
    impl = default_impl(x.shape[1])
  impls = _implementations()
  if impl not in impls:
    raise ValueError(f"unknown CEMA implementation {impl!r}; choose one of {['auto', *impls]}")
  return impls[impl](x, coeffs, omega, h0, return_state)
