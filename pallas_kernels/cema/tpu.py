"""CEMA scan kernels for TPU (Mosaic): grid (batch, channel tiles, sequence tiles), the state carried in VMEM.

The sequence axis is the innermost grid axis and "arbitrary" (run in order on one core), so a VMEM scratch holds the
state from one sequence tile to the next; batch and channel tiles are "parallel" (split across TensorCores where a
chip has several). Each grid step streams a (seq_tile, channel_tile) block of the input through VMEM and runs the
recurrence over it `group` rows at a time (one (8, 128) float32 tile, or (16, 128) for 16-bit inputs).

Blocks need not divide the array: the last sequence tile runs a static number of steps (the real length of that
tile) and touches only those rows; a partial last channel tile computes garbage in the lanes past D, which no other
lane reads (every operation is elementwise across channels) and which Pallas drops on write-back.

Not yet run on hardware. Compiled by the real TPU compiler (XLA:TPU + Mosaic, deviceless, on CPU) for v4, v5e, v5p and
v6e at D = 1024-4096, N = 16, L up to 32K (benchmarks/pallas_tpu_compile.py); tested in interpret mode. Before
building a kernel, its VMEM use is estimated from the tiles and checked against the generation's limit (vmem.py),
so oversized tiles are a ValueError naming the BlockSizes field, not a Mosaic out-of-memory error.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.cema import recurrence as rec
from pallas_kernels.chunked_attention import vmem

_SEMANTICS = ("parallel", "parallel", "arbitrary")


def _run_tile(j, ntiles: int, seq_tile: int, seq_len: int, first_is_last: bool, run) -> None:
  """Calls run(nsteps) with the static number of valid steps of sequence tile `j` (only the last one is partial).

  first_is_last: the grid visits time tiles in reverse, so grid step 0 holds the partial tile.
  """
  tail = seq_len - (ntiles - 1) * seq_tile
  if tail == seq_tile:
    run(seq_tile)
    return
  partial = j == (0 if first_is_last else ntiles - 1)
  pl.when(partial)(lambda: run(tail))
  pl.when(jnp.logical_not(partial))(lambda: run(seq_tile))


def _split_keep(refs, resets: bool):
  """(x_ref, keep_ref or None, the other refs): the keep input, when there is one, follows x."""
  if resets:
    return refs[0], refs[1], refs[2:]
  return refs[0], None, refs[1:]


def _keep_rows(keep_ref, start, count: int):
  """The (count, 1) float32 keep factors of a group's steps, or None without resets."""
  return None if keep_ref is None else keep_ref[pl.ds(start, count), :]


def _row(keep, k: int):
  return None if keep is None else keep[k:k + 1]


def _forward_kernel(*refs, seq_len: int, seq_tile: int, ntiles: int, group: int, resets: bool):
  """refs: x_ref, [keep_ref,] coef_ref, omega_ref, h0_ref, y_ref, hlast_ref, state_ref.

  x_ref, y_ref: (seq_tile, Dt).  keep_ref: (seq_tile, 1) float32, 0 at a document start.  coef_ref: (5, N, Dt).
  omega_ref: (1, Dt).  h0_ref, hlast_ref, state_ref: (2, N, Dt) float32 [re, im]."""
  x_ref, keep_ref, (coef_ref, omega_ref, h0_ref, y_ref, hlast_ref, state_ref) = _split_keep(refs, resets)
  j = pl.program_id(2)

  @pl.when(j == 0)
  def _init():
    state_ref[...] = h0_ref[...]

  coefs = rec.load_coefs(coef_ref, omega_ref)

  def group_fn(start, count, state):
    u = x_ref[pl.ds(start, count), :].astype(jnp.float32)
    keep = _keep_rows(keep_ref, start, count)
    rows = []
    for k in range(count):
      state, y = rec.forward_step(coefs, state, u[k:k + 1], _row(keep, k))
      rows.append(y)
    y_ref[pl.ds(start, count), :] = rec.stack_rows(rows).astype(y_ref.dtype)
    return state

  def run(nsteps):
    hr, hi = rec.sweep(nsteps, group, group_fn, (state_ref[0], state_ref[1]), reverse=False)
    state_ref[0] = hr
    state_ref[1] = hi

  _run_tile(j, ntiles, seq_tile, seq_len, False, run)

  @pl.when(j == ntiles - 1)
  def _finish():
    hlast_ref[...] = state_ref[...]


def _backward_kernel(*refs, seq_len: int, seq_tile: int, ntiles: int, group: int, resets: bool):
  """Reverse time. refs: x_ref, [keep_ref,] dy_ref, coef_ref, omega_ref, s0_ref, dx_ref, out_ref, carry_ref.

  x_ref, dy_ref, dx_ref: (seq_tile, Dt).  keep_ref: (seq_tile, 1) float32.  s0_ref: (2, N, Dt) conj(∂L/∂h_last).
  out_ref, carry_ref: (11, N, Dt) float32, the `recurrence.BwdCarry` planes."""
  x_ref, keep_ref, (dy_ref, coef_ref, omega_ref, s0_ref, dx_ref, out_ref, carry_ref) = _split_keep(refs, resets)
  j = pl.program_id(2)

  @pl.when(j == 0)
  def _init():
    carry_ref[...] = jnp.zeros(carry_ref.shape, jnp.float32)
    carry_ref[0] = s0_ref[0]
    carry_ref[1] = s0_ref[1]

  coefs = rec.load_coefs(coef_ref, omega_ref)

  def group_fn(start, count, carry):
    u = x_ref[pl.ds(start, count), :].astype(jnp.float32)
    dy = dy_ref[pl.ds(start, count), :].astype(jnp.float32)
    keep = _keep_rows(keep_ref, start, count)
    rows = [None] * count
    for k in reversed(range(count)):
      carry, rows[k] = rec.backward_step(coefs, carry, u[k:k + 1], dy[k:k + 1], _row(keep, k))
    dx_ref[pl.ds(start, count), :] = rec.stack_rows(rows).astype(dx_ref.dtype)
    return carry

  def run(nsteps):
    carry = rec.BwdCarry(*(carry_ref[k] for k in range(rec.NUM_BWD_PLANES)))
    carry = rec.sweep(nsteps, group, group_fn, carry, reverse=True)
    for k, plane in enumerate(carry):
      carry_ref[k] = plane

  _run_tile(j, ntiles, seq_tile, seq_len, True, run)

  @pl.when(j == ntiles - 1)
  def _finish():
    out_ref[...] = carry_ref[...]


def _keep_inputs(keep, lt: int, index_map):
  """BlockSpecs and arguments of the optional keep input (B, L, 1): a (lt, 1) block per sequence tile."""
  if keep is None:
    return [], []
  return [pl.BlockSpec((None, lt, 1), index_map)], [keep]


def _tiles(length: int, dim: int, seq_tile: int, channel_tile: int) -> tuple[int, int]:
  """Block sizes: the full dim where it fits in one tile (always a legal block), else the configured tile."""
  return min(seq_tile, length), (dim if dim <= channel_tile else channel_tile)


def _vmem_estimate(tiles, *, length: int, dim: int, nstate: int, x_dtype, backward: bool, resets: bool) -> int:
  """Bytes of VMEM one kernel needs: double-buffered blocks, the carried scratch, and the coefficient and carry
  planes the loop keeps live (they spill to VMEM when they outgrow the vector registers)."""
  lt, dt = _tiles(length, dim, tiles["seq_tile"], tiles["channel_tile"])
  f32 = jnp.float32
  plane = vmem.tile_bytes((nstate, dt), f32)
  seq_in = vmem.tile_bytes((lt, dt), x_dtype)
  keep = vmem.tile_bytes((lt, 1), f32) if resets else 0  # the (lt, 1) keep block pads to whole lanes
  seq_f32 = vmem.tile_bytes((lt, dt), f32)
  coefs = rec.NUM_COEF_PLANES * plane + vmem.tile_bytes((1, dt), f32)
  if backward:  # x, dy in; dx out; coef, omega, s0 in; carries out; carry scratch
    blocks = 2 * seq_in + keep + seq_f32 + coefs + 2 * plane + rec.NUM_BWD_PLANES * plane
    return 2 * blocks + rec.NUM_BWD_PLANES * plane + (rec.NUM_COEF_PLANES + 2 * rec.NUM_BWD_PLANES) * plane
  blocks = seq_in + keep + seq_f32 + coefs + 4 * plane  # x in, y out, coef, omega, h0 in, h_last out
  return 2 * blocks + 2 * plane + (rec.NUM_COEF_PLANES + 4) * plane


def _params(kernel: str, x, *, length: int, dim: int, nstate: int, seq_tile: int, channel_tile: int,
            vmem_limit, interpret, backward: bool, resets: bool):
  """CompilerParams of a native kernel after the VMEM check (interpret mode has no VMEM to run out of)."""
  limit = None
  if not interpret:
    estimate = functools.partial(_vmem_estimate, length=length, dim=dim, nstate=nstate, x_dtype=x.dtype,
                                 backward=backward, resets=resets)
    limit = vmem.vmem_limit_bytes(kernel, estimate, {"seq_tile": seq_tile, "channel_tile": channel_tile},
                                  vmem.device_kind(x), vmem_limit)
  return pltpu.CompilerParams(dimension_semantics=_SEMANTICS, vmem_limit_bytes=limit)


def forward(x: jax.Array, coef: jax.Array, omega: jax.Array, h0: jax.Array, *, seq_tile: int, channel_tile: int,
            group: int, interpret, vmem_limit=None, keep=None) -> tuple[jax.Array, jax.Array]:
  """x: (B, L, D) any float.  coef: (5, N, D) f32.  omega: (1, D) f32.  h0: (B, 2, N, D) f32.
  vmem_limit: BlockSizes.vmem_limit_bytes.  keep: optional (B, L, 1) float32, 0 where a document starts.
  Returns y (B, L, D) float32 and the last state (B, 2, N, D) float32."""
  batch, length, dim = x.shape
  nstate = coef.shape[1]
  params = _params("cema_scan_fwd", x, length=length, dim=dim, nstate=nstate, seq_tile=seq_tile,
                   channel_tile=channel_tile, vmem_limit=vmem_limit, interpret=interpret, backward=False,
                   resets=keep is not None)
  lt, dt = _tiles(length, dim, seq_tile, channel_tile)
  ntiles = pl.cdiv(length, lt)
  seq_block = pl.BlockSpec((None, lt, dt), lambda b, i, j: (b, j, i))
  state_block = pl.BlockSpec((None, 2, nstate, dt), lambda b, i, j: (b, 0, 0, i))
  kernel = functools.partial(_forward_kernel, seq_len=length, seq_tile=lt, ntiles=ntiles, group=group,
                             resets=keep is not None)
  keep_specs, keep_args = _keep_inputs(keep, lt, lambda b, i, j: (b, j, 0))
  return pl.pallas_call(
      kernel,
      grid=(batch, pl.cdiv(dim, dt), ntiles),
      in_specs=[seq_block, *keep_specs,
                pl.BlockSpec((rec.NUM_COEF_PLANES, nstate, dt), lambda b, i, j: (0, 0, i)),
                pl.BlockSpec((1, dt), lambda b, i, j: (0, i)),
                state_block],
      out_specs=[seq_block, state_block],
      out_shape=[jax.ShapeDtypeStruct((batch, length, dim), jnp.float32),
                 jax.ShapeDtypeStruct((batch, 2, nstate, dim), jnp.float32)],
      scratch_shapes=[pltpu.VMEM((2, nstate, dt), jnp.float32)],
      compiler_params=params,
      interpret=interpret,
      name="cema_scan_fwd",
  )(x, *keep_args, coef, omega, h0)


def backward(x: jax.Array, dy: jax.Array, coef: jax.Array, omega: jax.Array, s0: jax.Array, *, seq_tile: int,
             channel_tile: int, group: int, interpret, vmem_limit=None, keep=None) -> tuple[jax.Array, jax.Array]:
  """x: (B, L, D) any float.  dy: (B, L, D) f32.  s0: (B, 2, N, D) f32.  vmem_limit: BlockSizes.vmem_limit_bytes.
  keep: optional (B, L, 1) float32, 0 where a document starts.
  Returns dx (B, L, D) in x.dtype and the carries (B, 11, N, D) float32 (`recurrence.BwdCarry` planes)."""
  batch, length, dim = x.shape
  nstate = coef.shape[1]
  params = _params("cema_scan_bwd", x, length=length, dim=dim, nstate=nstate, seq_tile=seq_tile,
                   channel_tile=channel_tile, vmem_limit=vmem_limit, interpret=interpret, backward=True,
                   resets=keep is not None)
  lt, dt = _tiles(length, dim, seq_tile, channel_tile)
  ntiles = pl.cdiv(length, lt)
  # Grid step j visits time tile ntiles - 1 - j: the recurrence runs from the end of the sequence.
  seq_block = pl.BlockSpec((None, lt, dt), lambda b, i, j: (b, ntiles - 1 - j, i))
  kernel = functools.partial(_backward_kernel, seq_len=length, seq_tile=lt, ntiles=ntiles, group=group,
                             resets=keep is not None)
  keep_specs, keep_args = _keep_inputs(keep, lt, lambda b, i, j: (b, ntiles - 1 - j, 0))
  return pl.pallas_call(
      kernel,
      grid=(batch, pl.cdiv(dim, dt), ntiles),
      in_specs=[seq_block, *keep_specs, seq_block,
                pl.BlockSpec((rec.NUM_COEF_PLANES, nstate, dt), lambda b, i, j: (0, 0, i)),
                pl.BlockSpec((1, dt), lambda b, i, j: (0, i)),
                pl.BlockSpec((None, 2, nstate, dt), lambda b, i, j: (b, 0, 0, i))],
      out_specs=[seq_block, pl.BlockSpec((None, rec.NUM_BWD_PLANES, nstate, dt), lambda b, i, j: (b, 0, 0, i))],
      out_shape=[jax.ShapeDtypeStruct((batch, length, dim), x.dtype),
                 jax.ShapeDtypeStruct((batch, rec.NUM_BWD_PLANES, nstate, dim), jnp.float32)],
      scratch_shapes=[pltpu.VMEM((rec.NUM_BWD_PLANES, nstate, dt), jnp.float32)],
      compiler_params=params,
      interpret=interpret,
      name="cema_scan_bwd",
  )(x, *keep_args, dy, coef, omega, s0)
