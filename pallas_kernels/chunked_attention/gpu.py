"""Triton (Pallas GPU) kernels for block-diagonal (chunked) causal attention: forward, dq, and dk/dv.

Arrays are in kernel layout (layout.py): q, k (B, rows, H·dz), v and o (B, rows, H·G·bv). One program owns a query
tile (forward, dq) or a key tile (dk/dv) of one (batch, value head) and loops over the tiles of the other side
that share its chunk, up to the diagonal, so the grid is (tiles, B, H·G) and no work is spent on other chunks;
each loop is split so that only the tiles crossing the diagonal pay for the causal mask.
Row statistics are (rows,) float32 vectors of a (B, H·G, rows) array.

Not yet timed on a GPU. Verified on CPU (tests) in interpret mode, and compiled for real for H100 (sm_90a) and A100
(sm_80) from a CPU host at the shipped head shapes (dz 256, dv 2048), fwd / dq / dk,dv / decode, bfloat16 and float32:
Triton, PTX, ptxas (benchmarks/pallas_gpu_compile.py, whose table lists shared memory, registers and spills).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.chunked_attention import tile
from pallas_kernels.chunked_attention.layout import Geometry

SCALARS = 8  # the int32 scalar vector is padded to a power of two for Triton
MIN_TILE = 16  # tl.dot's smallest operand dimension
# Bytes of one q/k row plus one v row of a program, (dz + bv) · itemsize, up to which the caller's tiles compile as
# they are: bfloat16 at dz = bv = 256 (the shipped head shape) fits the A100's 163 KiB of shared memory with the
# default tiles, and ptxas reports no spills.
WIDE_ROW_BYTES = 1024


def _native_geometry(geo: Geometry, dtype, interpret) -> Geometry:
  """The geometry a compiled (not interpreted) kernel uses: the caller's, except for rows wider than WIDE_ROW_BYTES.

  float32 inputs take twice the shared memory of bfloat16 and, at Precision.HIGHEST, go through FMA dots whose
  operands sit in registers. With the GPU default tiles at dz = bv = 256 the forward kernel needs more shared memory
  than the A100's 163 KiB (a compile error), and the forward and dk/dv kernels spill heavily on an H100. Halving
  every sequence tile (not below 16) and using one pipeline stage fits the A100 and leaves little or no spill on
  both GPUs (ptxas figures before and after: benchmarks/RESULTS.md#figures-moved-from-code-comments-issue-21,
  per shape: benchmarks/results/pallas_gpu_compile.md). Halving keeps every constraint of layout.py (chunk and row
  counts stay multiples of each tile; a decode query tile stays within the chunk). The interpreter has neither
  limit, so interpret mode runs the caller's tiles.
  """
  if interpret or (geo.dz + geo.bv) * jnp.dtype(dtype).itemsize <= WIDE_ROW_BYTES:
    return geo
  half = lambda n: max(MIN_TILE, n // 2)
  return dataclasses.replace(geo, block_q=half(geo.block_q), block_k=half(geo.block_k),
                             block_q_bwd=half(geo.block_q_bwd), block_k_bwd=half(geo.block_k_bwd),
                             num_warps=max(geo.num_warps, 8), num_stages=1)


def _params(geo: Geometry):
  return plgpu.CompilerParams(num_warps=geo.num_warps, num_stages=geo.num_stages)


def _rows(ref, start, size):
  return ref[pl.ds(pl.multiple_of(start, size), size), :]


def _vec(ref, start, size):
  return ref[pl.ds(pl.multiple_of(start, size), size)]


# ---------------------------------------------------------------------------------------------------- forward

def _split_ids(refs, segmented: bool):
  """(query ids ref, key ids ref) or None, and the remaining refs: the id refs follow the kernel's other inputs."""
  if not segmented:
    return None, refs
  return refs[:2], refs[2:]


def _segments(id_refs, q_ids, k0, bk):
  """(query ids column, key ids row) of a tile, or None without segment ids."""
  if id_refs is None:
    return None
  return q_ids[:, None], _vec(id_refs[1], k0, bk)[None, :]


def _fwd_kernel(sc_ref, q_ref, k_ref, v_ref, *refs, geo: Geometry, segmented: bool):
  """One (query tile, batch, value head) program.

  Refs: sc (8,) int32; q (bq, dz); k (k_rows, dz); v (k_rows, bv); [query ids (bq,), key ids (k_rows,) int32];
  o (bq, bv); [m, l (bq,) float32].
  """
  id_refs, (o_ref, *stat_refs) = _split_ids(refs, segmented)
  bq, bk = geo.block_q, geo.block_k
  i, b, hg = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  offset, seeds, b_off, h_off = tile.scalars_unpack(sc_ref, geo.dynamic_offset)
  q0, q_chunk0, lo, hi = tile.q_tile_range(i, offset, geo, bq, bk)
  q = q_ref[...]
  q_ids = None if id_refs is None else id_refs[0][...]
  precision = tile.precision_for(q.dtype)

  def body(j, carry, causal):
    k, v = _rows(k_ref, j * bk, bk), _rows(v_ref, j * bk, bk)
    coords = tile.make_coords(q0, j * bk, q_chunk0, geo, b, hg, b_off, h_off)
    s, _ = tile.masked_scores(tile.matmul_nt(q, k, precision), coords, seeds, geo.drop_threshold, causal,
                              _segments(id_refs, q_ids, j * bk, bk))
    return tile.online_softmax_step(*carry, s, v, precision)

  init = (jnp.full((bq,), -jnp.inf, jnp.float32), jnp.zeros((bq,), jnp.float32),
          jnp.zeros((bq, geo.bv), jnp.float32))
  split = tile.first_masked_k_tile(q0, q_chunk0, lo, hi, geo.chunk, bq, bk)
  carry = lax.fori_loop(lo, split, functools.partial(body, causal=False), init)
  m, l, acc = lax.fori_loop(split, hi + 1, functools.partial(body, causal=True), carry)
  o_ref[...] = (acc * (1.0 / l)[:, None]).astype(o_ref.dtype)
  if stat_refs:
    stat_refs[0][...] = m
    stat_refs[1][...] = l


def forward(scalars, q, k, v, *, geo: Geometry, save_stats: bool, interpret=False, segment_ids=None):
  """Forward kernel; arguments and results as tpu.forward, except m and l are (B, H·G, q_rows) float32."""
  geo = _native_geometry(geo, q.dtype, interpret)
  bsz = q.shape[0]
  bq, G = geo.block_q, geo.groups
  sc = jnp.zeros((SCALARS,), jnp.int32).at[:scalars.shape[0]].set(scalars)
  in_specs = [
      pl.BlockSpec((SCALARS,), lambda i, b, hg: (0,)),
      pl.BlockSpec((None, bq, geo.dz), lambda i, b, hg: (b, i, lax.div(hg, G))),
      pl.BlockSpec((None, geo.k_rows, geo.dz), lambda i, b, hg: (b, 0, lax.div(hg, G))),
      pl.BlockSpec((None, geo.k_rows, geo.bv), lambda i, b, hg: (b, 0, hg)),
  ]
  ids = ()
  if segment_ids is not None:
    ids = tuple(segment_ids)
    in_specs += [pl.BlockSpec((None, bq), lambda i, b, hg: (b, i)),
                 pl.BlockSpec((None, geo.k_rows), lambda i, b, hg: (b, 0))]
  out_shape = [jax.ShapeDtypeStruct((bsz, geo.q_rows, geo.value_heads * geo.bv), q.dtype)]
  out_specs = [pl.BlockSpec((None, bq, geo.bv), lambda i, b, hg: (b, i, hg))]
  if save_stats:
    stat = jax.ShapeDtypeStruct((bsz, geo.value_heads, geo.q_rows), jnp.float32)
    out_shape += [stat, stat]
    out_specs += [pl.BlockSpec((None, None, bq), lambda i, b, hg: (b, hg, i))] * 2
  out = pl.pallas_call(
      functools.partial(_fwd_kernel, geo=geo, segmented=bool(ids)), out_shape=out_shape,
      grid=(geo.q_rows // bq, bsz, geo.value_heads), in_specs=in_specs, out_specs=out_specs,
      compiler_params=_params(geo), interpret=interpret, name="chunked_attention_fwd")(sc, q, k, v, *ids)
  return tuple(out) if save_stats else out[0]


# ---------------------------------------------------------------------------------------------------- backward

def _dq_kernel(sc_ref, q_ref, k_ref, v_ref, do_ref, m_ref, l_ref, d_ref, *refs, geo: Geometry, segmented: bool):
  """dq of one (query tile, batch, value head): q (bq, dz), do (bq, bv), m/l/delta (bq,), k/v whole rows;
  [query ids (bq,), key ids (rows,)]; out dq (bq, dz)."""
  id_refs, (dq_ref,) = _split_ids(refs, segmented)
  bq, bk = geo.block_q_bwd, geo.block_k_bwd
  i, b, hg = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  _, seeds, b_off, h_off = tile.scalars_unpack(sc_ref, False)
  q0, q_chunk0, lo, hi = tile.q_tile_range(i, jnp.int32(0), geo, bq, bk)
  q, do, m, l, delta = q_ref[...], do_ref[...], m_ref[...], l_ref[...], d_ref[...]
  q_ids = None if id_refs is None else id_refs[0][...]
  precision = tile.precision_for(q.dtype)

  def body(j, dq, causal):
    k, v = _rows(k_ref, j * bk, bk), _rows(v_ref, j * bk, bk)
    coords = tile.make_coords(q0, j * bk, q_chunk0, geo, b, hg, b_off, h_off)
    s, keep = tile.masked_scores(tile.matmul_nt(q, k, precision), coords, seeds, geo.drop_threshold, causal,
                                 _segments(id_refs, q_ids, j * bk, bk))
    _, ds = tile.grad_tiles(s, keep, do, v, m, l, delta, precision)
    return dq + tile.matmul_nn(ds.astype(k.dtype), k, precision)

  split = tile.first_masked_k_tile(q0, q_chunk0, lo, hi, geo.chunk, bq, bk)
  dq = lax.fori_loop(lo, split, functools.partial(body, causal=False), jnp.zeros((bq, geo.dz), jnp.float32))
  dq = lax.fori_loop(split, hi + 1, functools.partial(body, causal=True), dq)
  dq_ref[...] = dq.astype(dq_ref.dtype)


def _dkv_kernel(sc_ref, q_ref, k_ref, v_ref, do_ref, m_ref, l_ref, d_ref, *refs, geo: Geometry, segmented: bool):
  """dk, dv of one (key tile, batch, value head): k (bk, dz), v (bk, bv), q/do/m/l/delta whole rows;
  [query ids (rows,), key ids (bk,)]; out dk (bk, dz), dv (bk, bv)."""
  id_refs, (dk_ref, dv_ref) = _split_ids(refs, segmented)
  bq, bk = geo.block_q_bwd, geo.block_k_bwd
  j, b, hg = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  _, seeds, b_off, h_off = tile.scalars_unpack(sc_ref, False)
  k0, chunk0, lo, hi = tile.k_tile_range(j, geo, bq, bk)
  k, v = k_ref[...], v_ref[...]
  k_ids = None if id_refs is None else id_refs[1][...]
  precision = tile.precision_for(k.dtype)

  def body(i, carry, causal):
    dk, dv = carry
    q, do = _rows(q_ref, i * bq, bq), _rows(do_ref, i * bq, bq)
    m, l, delta = _vec(m_ref, i * bq, bq), _vec(l_ref, i * bq, bq), _vec(d_ref, i * bq, bq)
    coords = tile.make_coords(i * bq, k0, chunk0, geo, b, hg, b_off, h_off)
    segments = None if id_refs is None else (_vec(id_refs[0], i * bq, bq)[:, None], k_ids[None, :])
    s, keep = tile.masked_scores(tile.matmul_nt(q, k, precision), coords, seeds, geo.drop_threshold, causal,
                                 segments)
    p, ds = tile.grad_tiles(s, keep, do, v, m, l, delta, precision)
    dv = dv + tile.matmul_tn(p.astype(do.dtype), do, precision)
    dk = dk + tile.matmul_tn(ds.astype(q.dtype), q, precision)
    return dk, dv

  init = (jnp.zeros((bk, geo.dz), jnp.float32), jnp.zeros((bk, geo.bv), jnp.float32))
  split = tile.first_unmasked_q_tile(k0, lo, hi, bq, bk)
  carry = lax.fori_loop(lo, split, functools.partial(body, causal=True), init)
  dk, dv = lax.fori_loop(split, hi + 1, functools.partial(body, causal=False), carry)
  dk_ref[...] = dk.astype(dk_ref.dtype)
  dv_ref[...] = dv.astype(dv_ref.dtype)


def backward(scalars, q, k, v, do, m, l, delta, *, geo: Geometry, interpret=False, segment_ids=None):
  """Backward kernels; as tpu.backward, except m, l, delta are (B, H·G, rows) float32."""
  if geo.dynamic_offset:
    raise NotImplementedError("the GPU backward kernels cover prefill geometry only")
  geo = _native_geometry(geo, q.dtype, interpret)
  bsz, rows = q.shape[:2]
  bq, bk, G = geo.block_q_bwd, geo.block_k_bwd, geo.groups
  HG = geo.value_heads
  grad_dtype = jnp.float32 if G > 1 else q.dtype  # partials that are summed later stay in float32
  sc = jnp.zeros((SCALARS,), jnp.int32).at[:scalars.shape[0]].set(scalars)
  sc_spec = pl.BlockSpec((SCALARS,), lambda *_: (0,))

  def tiled(size, width, by_head):
    return pl.BlockSpec((None, size, width), lambda x, b, hg: (b, x, lax.div(hg, G) if by_head else hg))

  def whole(width, by_head):
    return pl.BlockSpec((None, rows, width), lambda x, b, hg: (b, 0, lax.div(hg, G) if by_head else hg))

  ids, dq_ids, dkv_ids = (), [], []
  if segment_ids is not None:
    ids = tuple(segment_ids)
    whole_ids = pl.BlockSpec((None, rows), lambda x, b, hg: (b, 0))
    dq_ids = [pl.BlockSpec((None, bq), lambda i, b, hg: (b, i)), whole_ids]
    dkv_ids = [whole_ids, pl.BlockSpec((None, bk), lambda j, b, hg: (b, j))]
  stat_tile = pl.BlockSpec((None, None, bq), lambda i, b, hg: (b, hg, i))
  stat_whole = pl.BlockSpec((None, None, rows), lambda j, b, hg: (b, hg, 0))
  dq = pl.pallas_call(
      functools.partial(_dq_kernel, geo=geo, segmented=bool(ids)),
      out_shape=jax.ShapeDtypeStruct((bsz, rows, HG * geo.dz), grad_dtype), grid=(rows // bq, bsz, HG),
      in_specs=[sc_spec, tiled(bq, geo.dz, True), whole(geo.dz, True), whole(geo.bv, False),
                tiled(bq, geo.bv, False), stat_tile, stat_tile, stat_tile, *dq_ids],
      out_specs=tiled(bq, geo.dz, False), compiler_params=_params(geo), interpret=interpret,
      name="chunked_attention_dq")(sc, q, k, v, do, m, l, delta, *ids)
  dk, dv = pl.pallas_call(
      functools.partial(_dkv_kernel, geo=geo, segmented=bool(ids)),
      out_shape=[jax.ShapeDtypeStruct((bsz, rows, HG * geo.dz), grad_dtype),
                 jax.ShapeDtypeStruct((bsz, rows, HG * geo.bv), v.dtype)], grid=(rows // bk, bsz, HG),
      in_specs=[sc_spec, whole(geo.dz, True), tiled(bk, geo.dz, True), tiled(bk, geo.bv, False),
                whole(geo.bv, False), stat_whole, stat_whole, stat_whole, *dkv_ids],
      out_specs=[tiled(bk, geo.dz, False), tiled(bk, geo.bv, False)], compiler_params=_params(geo),
      interpret=interpret, name="chunked_attention_dkv")(sc, q, k, v, do, m, l, delta, *ids)
  return dq, dk, dv
