"""`cema`: runs CEMA with a named implementation, or with the one `default_impl` picks for the length and backend.

All implementations take and return the same things and agree to float32 rounding:
  "fft"               causal FFT convolution (fft.py), the official training path
  "associative_scan"  parallel prefix over (decay, input) pairs (associative_scan.py)
  "sequential"        `lax.scan`, one step at a time; the decoding path (sequential.py)
  "chunked"           matmuls within blocks, a scan across blocks (chunked.py)
  "pallas"            the Pallas scan kernel for TPU/GPU, interpreted on CPU (pallas.py)
"""

from __future__ import annotations

from typing import Callable, Optional

import jax

from megalodon_jax.ops.cema.associative_scan import cema_associative_scan
from megalodon_jax.ops.cema.chunked import cema_chunked
from megalodon_jax.ops.cema.coefficients import CEMACoeffs
from megalodon_jax.ops.cema.fft import cema_fft
from megalodon_jax.ops.cema.pallas import cema_pallas
from megalodon_jax.ops.cema.sequential import cema_sequential
from megalodon_jax.ops import impl_table
from megalodon_jax.ops.impl_names import CEMA_IMPLEMENTATIONS
from pallas_kernels.platform import current_platform, normalize

# name (impl_names, in order) -> fn(x, coeffs, omega, h0, return_state, *, resets=None) -> (y, state or None)
IMPLEMENTATIONS: dict[str, Callable] = dict(zip(
    CEMA_IMPLEMENTATIONS, (cema_fft, cema_associative_scan, cema_sequential, cema_chunked, cema_pallas), strict=True))


def default_impl(length: int, backend: Optional[str] = None, dim: Optional[int] = None) -> str:
  """The implementation `impl="auto"` picks for a sequence of `length` (and `dim` channels, None: unknown) on
  `backend` (default backend if None): the measured table's entry (ops/impl_table.py) where it has one, else the
  fixed rules below."""
  backend = normalize(backend or current_platform())
  if length == 1:
    return "sequential"  # a decoding step: a few elementwise ops, no kernel or FFT to build
  measured = impl_table.measured_impl("cema", backend, length=length, dim=dim)
  if measured is not None:
    return measured
  if backend == "cpu":
    # "sequential" is fastest below ~128 steps (benchmarks/RESULTS.md#cema-benchmarkscemapy). Inside the whole
    # train step "fft" beats "chunked" at 512 and 2K tokens and ties it at 8K, though "chunked" is as fast or
    # faster as an op alone; the step is what runs (benchmarks/RESULTS.md, "CPU train step: CEMA by fft").
    if length < 128:
      return "sequential"
    return "fft" if 512 <= length <= 4096 else "chunked"
  # TPU / GPU: chosen for memory. With "fft" the gradient of the FFT kernel is summed over the batch through a
  # (chips, L/2, D) float32 buffer and its FFTs keep float32 (batch, D, 2L) buffers, so the 7B step at 32K tokens
  # does not fit a v5p chip; with "chunked" or "pallas" it does. Speed on hardware is still to be measured.
  # Compiler-reported peaks (deviceless planner):
  # benchmarks/RESULTS.md#the-7b-at-32k-on-v5p-128-64-chips-fsdp-64-2-sequences-of-32768-tokens-per-chip
  return "chunked"


def cema(x: jax.Array, coeffs: CEMACoeffs, omega: jax.Array, h0: Optional[jax.Array] = None, *,
         impl: str = "auto", return_state: bool = False, resets: Optional[jax.Array] = None):
  """Runs CEMA over a sequence.

  Args:
    x: (B, L, D) input (the TimestepNorm output), any float dtype; computed in float32.
    coeffs: from `cema_coefficients`.
    omega: (D, 1) or (D,) skip weight.
    h0: optional (B, D, N, 2) float32 initial state (real, imag); None means zeros.
    impl: "auto" or one of the names of `IMPLEMENTATIONS` (module docstring).
    return_state: also return the state after the last step.
    resets: optional (B, L) bool, True where a new document starts at step t (packed training windows): there the
      state restarts, h_t = p u_t (the decay into t is 0; docs/model.md#cema), and so does the final state's
      history. The first document of a row continues from h0. None runs the plain recurrence unchanged.
  Returns:
    y: (B, L, D) float32, and the final state (B, D, N, 2) float32 (None unless return_state).
  """
  if impl == "auto":
    impl = default_impl(x.shape[1], dim=x.shape[2])
  if impl not in IMPLEMENTATIONS:
    raise ValueError(f"unknown CEMA implementation {impl!r}; choose one of {['auto', *IMPLEMENTATIONS]}")
  if resets is None:
    return IMPLEMENTATIONS[impl](x, coeffs, omega, h0, return_state)
  if resets.shape != x.shape[:2]:
    raise ValueError(f"resets must be (B, L) = {x.shape[:2]}, got {resets.shape}")
  return IMPLEMENTATIONS[impl](x, coeffs, omega, h0, return_state, resets=resets.astype(bool))
