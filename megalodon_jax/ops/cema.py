"""Complex exponential moving average (CEMA, spec §2): coefficients and the recurrence.

For every channel c and order n (N complex states per channel):
  h_t = q ⊙ h_{t-1} + p ⊙ u_t,   y_t = Re(Σ_n γ̃_n h_{t,n}) + ω_c u_t
with p = σ(alpha), q = (1 - σ(alpha)σ(delta)) e^{i n ϑ_c}, ϑ_c = σ(theta_c)·2π/N and γ̃ = gamma / √N.

All implementations take and return the same things and agree to float32 rounding:
  "fft"               causal FFT convolution with the kernel K_j = Re Σ p γ̃ q^j (the official training path)
  "associative_scan"  parallel prefix over (decay, input) pairs  (ops/cema_scan.py)
  "sequential"        `lax.scan`, one step at a time; the decoding path  (ops/cema_scan.py)
  "chunked"           matmuls within blocks, a scan across blocks  (ops/cema_chunked.py)
The state is carried as real/imaginary float32 planes, (B, D, N, 2), the layout of the official
chunk-parallel packing (`view_as_real`).
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp

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

  @property
  def log_q(self) -> tuple[jax.Array, jax.Array]:
    """(log|q|, arg q), each (D, N) float32; q^j = exp(j log|q|) e^{i j arg q}."""
    return jnp.log(jnp.hypot(self.q_re, self.q_im)), jnp.arctan2(self.q_im, self.q_re)


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


def _powers(coeffs: CEMACoeffs, exponents: jax.Array) -> tuple[jax.Array, jax.Array]:
  """q^j for the given float32 exponents (J,): real and imaginary parts, each (D, N, J)."""
  log_mag, arg = coeffs.log_q
  mag = jnp.exp(log_mag[..., None] * exponents)
  ang = arg[..., None] * exponents
  return mag * jnp.cos(ang), mag * jnp.sin(ang)


def _initial_state_contribution(coeffs: CEMACoeffs, h0: jax.Array, length: int) -> jax.Array:
  """b_t = Re Σ_n γ̃ q^{t+1} h0 for t < L: (B, L, D) float32. h0: (B, D, N, 2)."""
  pr, pi = _powers(coeffs, jnp.arange(1, length + 1, dtype=jnp.float32))  # (D, N, L)
  # Re(γ̃ · q^{t+1} · h0) = Re(w · h0) with w = γ̃ q^{t+1}.
  wr = coeffs.g_re[..., None] * pr - coeffs.g_im[..., None] * pi
  wi = coeffs.g_re[..., None] * pi + coeffs.g_im[..., None] * pr
  return (jnp.einsum("dnl,bdn->bld", wr, h0[..., 0], precision=HIGHEST)
          - jnp.einsum("dnl,bdn->bld", wi, h0[..., 1], precision=HIGHEST))


def final_state_direct(x: jax.Array, coeffs: CEMACoeffs, h0: Optional[jax.Array]) -> jax.Array:
  """h_L = q^L h0 + Σ_j p q^{L-1-j} u_j as one contraction over time: (B, D, N, 2) float32.

  Materialises q^j for j < L, (D, N, L): meant for short inputs (decoding steps, tests).
  """
  length = x.shape[1]
  pr, pi = _powers(coeffs, jnp.arange(length - 1, -1, -1, dtype=jnp.float32))  # (D, N, L)
  u = x.astype(jnp.float32)
  hr = jnp.einsum("dnl,bld->bdn", coeffs.p[..., None] * pr, u, precision=HIGHEST)
  hi = jnp.einsum("dnl,bld->bdn", coeffs.p[..., None] * pi, u, precision=HIGHEST)
  if h0 is not None:
    lr, li = _powers(coeffs, jnp.array([float(length)], jnp.float32))
    lr, li = lr[..., 0], li[..., 0]
    hr = hr + lr * h0[..., 0] - li * h0[..., 1]
    hi = hi + lr * h0[..., 1] + li * h0[..., 0]
  return jnp.stack([hr, hi], axis=-1)


def cema_kernel(coeffs: CEMACoeffs, length: int) -> jax.Array:
  """The convolution kernel K_j = Re Σ_n p γ̃ q^j, j < L: (D, L) float32."""
  pr, pi = _powers(coeffs, jnp.arange(length, dtype=jnp.float32))
  return jnp.sum(coeffs.p[..., None] * (coeffs.g_re[..., None] * pr - coeffs.g_im[..., None] * pi), axis=1)


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
    y = y + _initial_state_contribution(coeffs, h0, length)
  y = y + u * omega.reshape(-1).astype(jnp.float32)
  state = final_state_direct(x, coeffs, h0) if return_state else None
  return y, state


def _implementations():
  from megalodon_jax.ops import cema_scan, cema_chunked  # pylint: disable=import-outside-toplevel
  return {
      "fft": cema_fft,
      "associative_scan": cema_scan.cema_associative_scan,
      "sequential": cema_scan.cema_sequential,
      "chunked": cema_chunked.cema_chunked,
  }


def default_impl(length: int, backend: Optional[str] = None) -> str:
  """The implementation `impl="auto"` picks for a sequence of `length` on `backend` (default backend if None)."""
  backend = backend or jax.default_backend()
  if length == 1:
    return "sequential"  # a decoding step: a few elementwise ops, no kernel or FFT to build
  if backend == "cpu":
    # Measured (benchmarks/RESULTS.md, D=256, N=16, B=1): "sequential" is fastest below ~128 steps; from there on
    # "chunked" wins forward and forward+backward, 8-19× over "fft", whose q^j for all j costs D·N·L exp/sin/cos.
    return "sequential" if length < 128 else "chunked"
  # GPU/TPU: not measured yet (no accelerator was available); keep the official FFT training path.
  return "fft"


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
