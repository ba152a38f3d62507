"""CEMA scan kernels for GPU (Pallas Triton backend): grid (batch, channel tiles), the sequence as a loop inside.

Triton runs grid programs in no particular order and has no memory that persists from one program to the next, so
the state cannot be handed from one sequence-tile program to another as on TPU; each program owns one
(batch, channel tile) pair and walks the whole sequence with the state in registers, `group` rows (1, Dt) at a time.
Parallelism is therefore B·D/Dt programs of N·Dt lanes each.

Triton needs power-of-two tensor sizes and does not mask blocks that overhang the array, so the caller pads the
channel axis to a multiple of the channel tile and N to a power of two (zero coefficients leave those lanes at zero).

NOT YET RUN ON A GPU: tested in interpret mode, and compiled for real (Triton, PTX, ptxas) for H100 (sm_90a) and
A100 (sm_80) from a CPU host at D = 1024-4096, N = 16, bfloat16 and float32 (benchmarks/pallas_gpu_compile.py;
threads, shared memory, registers and spills per kernel: benchmarks/results/pallas_gpu_compile.md). With few
programs (small B·D: 128 programs of 2 warps at B = 1, D = 4096, on 132 SMs) the GPU is under-occupied; a
sequence-parallel variant (local states per tile, a short scan across tiles, then a second pass) is the next step
if a timed run shows it.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.cema import recurrence as rec


def _load_rows(ref, start, count: int) -> list[jax.Array]:
  """Rows start .. start + count - 1 of a (L, Dt) ref as (1, Dt) float32 values.

  All loads of a group are issued before any store: the compiler cannot prove the input and output pointers apart,
  so a load placed after a store would wait for it, and each step would pay the full memory latency.
  """
  return [ref[pl.ds(start + k, 1), :].astype(jnp.float32) for k in range(count)]


def _store_rows(ref, start, rows: list[jax.Array]) -> None:
  for k, row in enumerate(rows):
    ref[pl.ds(start + k, 1), :] = row.astype(ref.dtype)


def _split_keep(refs, resets: bool):
  """(x_ref, keep_ref or None, the other refs): the keep input, when there is one, follows x."""
  if resets:
    return refs[0], refs[1], refs[2:]
  return refs[0], None, refs[1:]


def _keep_rows(keep_ref, start, count: int) -> list:
  """The (1, 1) float32 keep factors of a group's steps, or Nones without resets."""
  return [None] * count if keep_ref is None else _load_rows(keep_ref, start, count)


def _forward_kernel(*refs, seq_len: int, group: int, resets: bool):
  """refs: x_ref, [keep_ref,] coef_ref, omega_ref, h0_ref, y_ref, hlast_ref.

  x_ref, y_ref: (L, Dt).  keep_ref: (L, 1) f32, 0 at a document start.  coef_ref: (5, N, Dt).  omega_ref: (1, Dt).
  h0_ref, hlast_ref: (2, N, Dt) f32."""
  x_ref, keep_ref, (coef_ref, omega_ref, h0_ref, y_ref, hlast_ref) = _split_keep(refs, resets)
  coefs = rec.load_coefs(coef_ref, omega_ref)

  def group_fn(start, count, state):
    u, keep = _load_rows(x_ref, start, count), _keep_rows(keep_ref, start, count)
    ys = []
    for k in range(count):
      state, y = rec.forward_step(coefs, state, u[k], keep[k])
      ys.append(y)
    _store_rows(y_ref, start, ys)
    return state

  hr, hi = rec.sweep(seq_len, group, group_fn, (h0_ref[0], h0_ref[1]), reverse=False)
  hlast_ref[0] = hr
  hlast_ref[1] = hi


def _backward_kernel(*refs, seq_len: int, group: int, resets: bool):
  """Reverse time. refs: x_ref, [keep_ref,] dy_ref, coef_ref, omega_ref, s0_ref, dx_ref, out_ref.

  x_ref, dy_ref, dx_ref: (L, Dt).  keep_ref: (L, 1) f32.  s0_ref: (2, N, Dt).  out_ref: (11, N, Dt) `BwdCarry`
  planes."""
  x_ref, keep_ref, (dy_ref, coef_ref, omega_ref, s0_ref, dx_ref, out_ref) = _split_keep(refs, resets)
  coefs = rec.load_coefs(coef_ref, omega_ref)
  zeros = jnp.zeros_like(coefs.p)
  carry = rec.BwdCarry(s0_ref[0], s0_ref[1], *([zeros] * (rec.NUM_BWD_PLANES - 2)))

  def group_fn(start, count, carry):
    u, dy = _load_rows(x_ref, start, count), _load_rows(dy_ref, start, count)
    keep = _keep_rows(keep_ref, start, count)
    dx = [None] * count
    for k in reversed(range(count)):
      carry, dx[k] = rec.backward_step(coefs, carry, u[k], dy[k], keep[k])
    _store_rows(dx_ref, start, dx)
    return carry

  carry = rec.sweep(seq_len, group, group_fn, carry, reverse=True)
  for k, plane in enumerate(carry):
    out_ref[k] = plane


def _check(dim: int, nstate: int, channel_tile: int) -> None:
  if dim % channel_tile or nstate & (nstate - 1):
    raise ValueError(f"GPU kernel needs D ({dim}) a multiple of the channel tile ({channel_tile}) and N ({nstate}) a "
                     "power of two; pad them (api.cema_scan does)")


def _keep_inputs(keep, length: int):
  """BlockSpecs and arguments of the optional keep input (B, L, 1): the whole sequence per program."""
  if keep is None:
    return [], []
  return [pl.BlockSpec((None, length, 1), lambda b, i: (b, 0, 0))], [keep]


def forward(x: jax.Array, coef: jax.Array, omega: jax.Array, h0: jax.Array, *, channel_tile: int, group: int,
            num_warps: int, interpret, keep=None) -> tuple[jax.Array, jax.Array]:
  """x: (B, L, D) any float.  coef: (5, N, D) f32.  omega: (1, D) f32.  h0: (B, 2, N, D) f32.
  keep: optional (B, L, 1) float32, 0 where a document starts.
  Returns y (B, L, D) float32 and the last state (B, 2, N, D) float32."""
  batch, length, dim = x.shape
  nstate = coef.shape[1]
  _check(dim, nstate, channel_tile)
  seq_block = pl.BlockSpec((None, length, channel_tile), lambda b, i: (b, 0, i))
  state_block = pl.BlockSpec((None, 2, nstate, channel_tile), lambda b, i: (b, 0, 0, i))
  keep_specs, keep_args = _keep_inputs(keep, length)
  return pl.pallas_call(
      functools.partial(_forward_kernel, seq_len=length, group=group, resets=keep is not None),
      grid=(batch, dim // channel_tile),
      in_specs=[seq_block, *keep_specs,
                pl.BlockSpec((rec.NUM_COEF_PLANES, nstate, channel_tile), lambda b, i: (0, 0, i)),
                pl.BlockSpec((1, channel_tile), lambda b, i: (0, i)),
                state_block],
      out_specs=[seq_block, state_block],
      out_shape=[jax.ShapeDtypeStruct((batch, length, dim), jnp.float32),
                 jax.ShapeDtypeStruct((batch, 2, nstate, dim), jnp.float32)],
      compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=1),
      interpret=interpret,
      name="cema_scan_fwd",
  )(x, *keep_args, coef, omega, h0)


def backward(x: jax.Array, dy: jax.Array, coef: jax.Array, omega: jax.Array, s0: jax.Array, *, channel_tile: int,
             group: int, num_warps: int, interpret, keep=None) -> tuple[jax.Array, jax.Array]:
  """x: (B, L, D) any float.  dy: (B, L, D) f32.  s0: (B, 2, N, D) f32.  keep: optional (B, L, 1) float32.
  Returns dx (B, L, D) in x.dtype and the carries (B, 11, N, D) float32 (`recurrence.BwdCarry` planes)."""
  batch, length, dim = x.shape
  nstate = coef.shape[1]
  _check(dim, nstate, channel_tile)
  seq_block = pl.BlockSpec((None, length, channel_tile), lambda b, i: (b, 0, i))
  keep_specs, keep_args = _keep_inputs(keep, length)
  return pl.pallas_call(
      functools.partial(_backward_kernel, seq_len=length, group=group, resets=keep is not None),
      grid=(batch, dim // channel_tile),
      in_specs=[seq_block, *keep_specs, seq_block,
                pl.BlockSpec((rec.NUM_COEF_PLANES, nstate, channel_tile), lambda b, i: (0, 0, i)),
                pl.BlockSpec((1, channel_tile), lambda b, i: (0, i)),
                pl.BlockSpec((None, 2, nstate, channel_tile), lambda b, i: (b, 0, 0, i))],
      out_specs=[seq_block, pl.BlockSpec((None, rec.NUM_BWD_PLANES, nstate, channel_tile), lambda b, i: (b, 0, 0, i))],
      out_shape=[jax.ShapeDtypeStruct((batch, length, dim), x.dtype),
                 jax.ShapeDtypeStruct((batch, rec.NUM_BWD_PLANES, nstate, dim), jnp.float32)],
      compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=1),
      interpret=interpret,
      name="cema_scan_bwd",
  )(x, *keep_args, dy, coef, omega, s0)
