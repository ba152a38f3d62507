"""Mosaic TPU kernels for block-diagonal (chunked) causal attention: forward, dq, and dk/dv.

Arrays are in kernel layout (layout.py): q, k (B, rows, H·dz), v and o (B, rows, H·G·bv), a program handling value
head hg = h·G + g reads q/k head h. The key (or, for dk/dv, query) sequence is the last, "arbitrary" grid axis,
so each program visits only the tiles of its own chunk up to the diagonal: the index maps clamp the tile index at
the last useful tile, which repeats the previous block index and so issues no DMA, and `pl.when` skips the
compute; of the visited tiles only those crossing the diagonal apply the causal mask. Accumulators live in VMEM
scratch; row statistics are stored lane-replicated ((rows, 128) f32): a (rows, 1) array takes the same HBM space
once tiled, and a (rows,) vector would put the rows along lanes.

Not yet run or timed on a TPU. Compiled by the real TPU compiler (XLA:TPU + Mosaic, deviceless, on CPU) for v4,
v5e, v5p and v6e at the shipped configs' head shapes (benchmarks/pallas_tpu_compile.py). Verified on CPU (tests): in
the generic interpreter and in the Mosaic TPU interpreter (`pltpu.InterpretParams`: simulated DMAs and VMEM,
NaN-filled fresh memory). Each kernel estimates its VMEM use from the tiles before it is built (`_vmem_need`) and
raises a ValueError naming the BlockSizes field when the tiles cannot fit the generation's VMEM (vmem.py).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.chunked_attention import tile, vmem
from pallas_kernels.chunked_attention.blocks import TPU_LANES
from pallas_kernels.chunked_attention.layout import Geometry

_SEMANTICS = ("parallel", "parallel", "parallel", "arbitrary")


def _col(ref) -> jax.Array:
  """(rows, 1) column from a lane-replicated (rows, 128) ref."""
  return jnp.max(ref[...], axis=1, keepdims=True)


def _lanes(x: jax.Array) -> jax.Array:
  return jnp.broadcast_to(x, (x.shape[0], TPU_LANES))


SUBLANES = 8


def ids_to_kernel(segment_ids, block_k: int):
  """(query ids, key ids) (B, rows) int32 -> the TPU id layouts: queries lane-replicated (B, rows, 128) (a
  (bq, 128) block), keys sublane-replicated per key tile (B, rows / bk, 8, bk) (an (8, bk) block whose two dims
  are the array's own, so any tile width is a legal block)."""
  q_ids, k_ids = segment_ids
  b, rows = k_ids.shape
  q_lanes = jnp.broadcast_to(q_ids[:, :, None], (*q_ids.shape, TPU_LANES))
  k_rows = jnp.broadcast_to(k_ids.reshape(b, rows // block_k, 1, block_k), (b, rows // block_k, SUBLANES, block_k))
  return q_lanes, k_rows


def _tile_segments(id_refs, bk: int):
  """(query ids (bq, bk), key ids (1, bk)) of the current tile from the id blocks, or None."""
  if id_refs is None:
    return None
  q_ids = id_refs[0][...]  # (bq, 128): every lane holds the row's id
  q_ids = q_ids[:, :bk] if bk <= TPU_LANES else jnp.concatenate([q_ids] * (bk // TPU_LANES), axis=1)
  return q_ids, id_refs[1][0:1, :]


def _id_specs(bq: int, bk: int, q_index, k_index):
  """BlockSpecs of the two id layouts (`ids_to_kernel`): q_index / k_index map grid indices to the tile index."""
  return [pl.BlockSpec((None, bq, TPU_LANES), lambda b, hg, x, t, sc: (b, q_index(x, t, sc), 0)),
          pl.BlockSpec((None, None, SUBLANES, bk), lambda b, hg, x, t, sc: (b, k_index(x, t, sc), 0, 0))]


def _when_visited(visited, masked, step) -> None:
  """Runs step(causal=True) on visited tiles that cross the diagonal and step(causal=False) on the others, so
  only diagonal tiles pay for the mask."""
  pl.when(visited & masked)(lambda: step(True))
  pl.when(visited & jnp.logical_not(masked))(lambda: step(False))


def _vmem_need(kernel: str, tiles, *, dz: int, dtype, grad_dtype, segmented: bool = False) -> int:
  """Bytes of VMEM `kernel` ("fwd", "fwd_stats", "dq", "dkv") needs with tiles {"block_q…": bq, "block_k…": bk,
  "block_v": bv}: double-buffered blocks + scratch (the two terms Mosaic reports as its scoped allocation), plus
  in-kernel temporaries.

  The temporaries term, 8 (bq, bk) float32 tiles (scores, probabilities, their gradients, position iotas, masks)
  and two float32 (rows, bv) matmul results (doubled for float32 inputs, whose HIGHEST-precision matmuls keep split
  copies of their operands), is fitted to be an upper bound of what XLA:TPU reported on v5e at the default tiles
  (dz = 256, bv = 1024; reported sizes: benchmarks/RESULTS.md#figures-moved-from-code-comments-issue-21), so the
  estimate errs on the large side by a few MiB. Segment ids add their two id blocks ((bq, 128) and (8, bk) int32)
  and two (bq, bk) temporaries (the widened query ids and the mask).
  """
  suffix = "" if kernel.startswith("fwd") else "_bwd"
  bq, bk, bv = tiles["block_q" + suffix], tiles["block_k" + suffix], tiles["block_v"]
  f32 = jnp.float32
  stat = vmem.tile_bytes((bq, TPU_LANES), f32)
  q, k = vmem.tile_bytes((bq, dz), dtype), vmem.tile_bytes((bk, dz), dtype)
  v, o = vmem.tile_bytes((bk, bv), dtype), vmem.tile_bytes((bq, bv), dtype)  # o: the output, or do in backward
  if kernel in ("fwd", "fwd_stats"):
    blocks = q + k + v + o + (2 * stat if kernel == "fwd_stats" else 0)
    scratch = 2 * stat + vmem.tile_bytes((bq, bv), f32)
  elif kernel == "dq":
    blocks = q + k + v + o + 3 * stat + vmem.tile_bytes((bq, dz), grad_dtype)
    scratch = vmem.tile_bytes((bq, dz), f32)
  else:
    blocks = q + k + v + o + 3 * stat + vmem.tile_bytes((bk, dz), grad_dtype) + v  # … dk and dv out
    scratch = vmem.tile_bytes((bk, dz), f32) + vmem.tile_bytes((bk, bv), f32)
  if segmented:
    blocks += vmem.tile_bytes((bq, TPU_LANES), jnp.int32) + vmem.tile_bytes((SUBLANES, bk), jnp.int32)
  split = 2 if jnp.dtype(dtype) == jnp.float32 else 1
  temps = (10 if segmented else 8) * bq * bk * 4 + 2 * split * max(bq, bk) * bv * 4
  return 2 * blocks + scratch + temps


def _compiler_params(kernel: str, geo: Geometry, x, *, backward: bool, grad_dtype=None, interpret=False,
                     segmented: bool = False):
  """CompilerParams of one kernel; natively compiled kernels first pass the VMEM check (vmem.py)."""
  limit = None
  if not interpret:
    if backward:
      tiles = {"block_q_bwd": geo.block_q_bwd, "block_k_bwd": geo.block_k_bwd, "block_v": geo.bv}
    else:
      tiles = {"block_q": geo.block_q, "block_k": geo.block_k, "block_v": geo.bv}
    need = functools.partial(_vmem_need, kernel, dz=geo.dz, dtype=x.dtype, grad_dtype=grad_dtype or x.dtype,
                             segmented=segmented)
    limit = vmem.vmem_limit_bytes(f"chunked_attention_{kernel}", need, tiles, vmem.device_kind(x),
                                  geo.vmem_limit_bytes)
  return pltpu.CompilerParams(dimension_semantics=_SEMANTICS, vmem_limit_bytes=limit)


# ---------------------------------------------------------------------------------------------------- forward

def _fwd_kernel(sc_ref, q_ref, k_ref, v_ref, *rest, geo: Geometry, nkv: int, save_stats: bool, segmented: bool):
  """One (batch, value head, query tile) program, visited once per key tile t.

  Refs: sc (5,) int32 SMEM; q (bq, dz); k (bk, dz); v (bk, bv); [query ids (bq, 128), key ids (8, bk) int32];
  o (bq, bv); [m_out, l_out (bq, 128) f32]; scratch m, l (bq, 128) f32 and acc (bq, bv) f32.
  """
  id_refs = rest[:2] if segmented else None
  o_ref, *rest = rest[2:] if segmented else rest
  if save_stats:
    m_out, l_out, m_sc, l_sc, acc_sc = rest
  else:
    m_sc, l_sc, acc_sc = rest
  bq, bk = geo.block_q, geo.block_k
  b, hg, i, t = (pl.program_id(a) for a in range(4))
  offset, seeds, b_off, h_off = tile.scalars_unpack(sc_ref, geo.dynamic_offset)
  q0, q_chunk0, lo, hi = tile.q_tile_range(i, offset, geo, bq, bk)
  j = lo + t

  @pl.when(t == 0)
  def _init():
    m_sc[...] = jnp.full(m_sc.shape, -jnp.inf, jnp.float32)
    l_sc[...] = jnp.zeros(l_sc.shape, jnp.float32)
    acc_sc[...] = jnp.zeros(acc_sc.shape, jnp.float32)

  def step(causal: bool):
    q, k, v = q_ref[...], k_ref[...], v_ref[...]
    precision = tile.precision_for(q.dtype)
    coords = tile.make_coords(q0, j * bk, q_chunk0, geo, b, hg, b_off, h_off)
    s, _ = tile.masked_scores(tile.matmul_nt(q, k, precision), coords, seeds, geo.drop_threshold, causal,
                              _tile_segments(id_refs, bk))
    m, l, acc = tile.online_softmax_step(_col(m_sc), _col(l_sc), acc_sc[...], s, v, precision)
    m_sc[...], l_sc[...], acc_sc[...] = _lanes(m), _lanes(l), acc

  _when_visited(j <= hi, tile.needs_causal_mask(q0, q_chunk0, j * bk, geo.chunk, bq, bk), step)

  @pl.when(t == nkv - 1)
  def _finish():
    l = _col(l_sc)
    o_ref[...] = (acc_sc[...] * (1.0 / l)).astype(o_ref.dtype)
    if save_stats:
      m_out[...] = m_sc[...]
      l_out[...] = l_sc[...]


def forward(scalars, q, k, v, *, geo: Geometry, save_stats: bool, interpret=False, segment_ids=None):
  """Forward kernel.

  Args:
    scalars: (5,) int32 [query offset, seed0, seed1, batch offset, head offset].
    q: (B, q_rows, H·dz); k: (B, k_rows, H·dz); v: (B, k_rows, H·G·bv); one dtype.
    geo: the call's Geometry.
    save_stats: also return the row max m and row sum l, (B, H·G, q_rows, 128) float32 lane-replicated.
    segment_ids: None or (query ids (B, q_rows), key ids (B, k_rows)) int32: the document mask.
  Returns:
    o (B, q_rows, H·G·bv) in q.dtype [, m, l].
  """
  bsz = q.shape[0]
  bq, bk, G = geo.block_q, geo.block_k, geo.groups
  nkv = tile.num_kv_steps(geo, bq, bk)

  def kv_tile(i, t, sc):
    offset = sc[0] if geo.dynamic_offset else jnp.int32(0)
    _, _, lo, hi = tile.q_tile_range(i, offset, geo, bq, bk)
    return jnp.minimum(lo + t, hi)

  in_specs = [
      pl.BlockSpec((None, bq, geo.dz), lambda b, hg, i, t, sc: (b, i, lax.div(hg, G))),
      pl.BlockSpec((None, bk, geo.dz), lambda b, hg, i, t, sc: (b, kv_tile(i, t, sc), lax.div(hg, G))),
      pl.BlockSpec((None, bk, geo.bv), lambda b, hg, i, t, sc: (b, kv_tile(i, t, sc), hg)),
  ]
  ids = ()
  if segment_ids is not None:
    ids = ids_to_kernel(segment_ids, bk)
    in_specs += _id_specs(bq, bk, lambda i, t, sc: i, kv_tile)
  out_shape = [jax.ShapeDtypeStruct((bsz, geo.q_rows, geo.value_heads * geo.bv), q.dtype)]
  out_specs = [pl.BlockSpec((None, bq, geo.bv), lambda b, hg, i, t, sc: (b, i, hg))]
  if save_stats:
    stat = jax.ShapeDtypeStruct((bsz, geo.value_heads, geo.q_rows, TPU_LANES), jnp.float32)
    stat_spec = pl.BlockSpec((None, None, bq, TPU_LANES), lambda b, hg, i, t, sc: (b, hg, i, 0))
    out_shape += [stat, stat]
    out_specs += [stat_spec, stat_spec]
  grid_spec = pltpu.PrefetchScalarGridSpec(
      num_scalar_prefetch=1, grid=(bsz, geo.value_heads, geo.q_rows // bq, nkv), in_specs=in_specs,
      out_specs=out_specs,
      scratch_shapes=[pltpu.VMEM((bq, TPU_LANES), jnp.float32), pltpu.VMEM((bq, TPU_LANES), jnp.float32),
                      pltpu.VMEM((bq, geo.bv), jnp.float32)])
  kernel = functools.partial(_fwd_kernel, geo=geo, nkv=nkv, save_stats=save_stats, segmented=bool(ids))
  params = _compiler_params("fwd_stats" if save_stats else "fwd", geo, q, backward=False, interpret=interpret,
                            segmented=bool(ids))
  out = pl.pallas_call(kernel, out_shape=out_shape, grid_spec=grid_spec, compiler_params=params,
                       interpret=interpret, name="chunked_attention_fwd")(scalars, q, k, v, *ids)
  return tuple(out) if save_stats else out[0]


# ---------------------------------------------------------------------------------------------------- backward

def _dq_kernel(sc_ref, q_ref, k_ref, v_ref, do_ref, m_ref, l_ref, d_ref, *rest, geo: Geometry, nkv: int,
               segmented: bool):
  """dq of one (batch, value head, query tile); refs as in `_fwd_kernel`, plus do (bq, bv), delta (bq, 128),
  [the id blocks], out dq and scratch dq (bq, dz) f32."""
  id_refs = rest[:2] if segmented else None
  dq_ref, dq_sc = rest[2:] if segmented else rest
  bq, bk = geo.block_q_bwd, geo.block_k_bwd
  b, hg, i, t = (pl.program_id(a) for a in range(4))
  _, seeds, b_off, h_off = tile.scalars_unpack(sc_ref, False)
  q0, q_chunk0, lo, hi = tile.q_tile_range(i, jnp.int32(0), geo, bq, bk)
  j = lo + t

  @pl.when(t == 0)
  def _init():
    dq_sc[...] = jnp.zeros(dq_sc.shape, jnp.float32)

  def step(causal: bool):
    q, k, v = q_ref[...], k_ref[...], v_ref[...]
    precision = tile.precision_for(q.dtype)
    coords = tile.make_coords(q0, j * bk, q_chunk0, geo, b, hg, b_off, h_off)
    s, keep = tile.masked_scores(tile.matmul_nt(q, k, precision), coords, seeds, geo.drop_threshold, causal,
                                 _tile_segments(id_refs, bk))
    _, ds = tile.grad_tiles(s, keep, do_ref[...], v, _col(m_ref), _col(l_ref), _col(d_ref), precision)
    dq_sc[...] += tile.matmul_nn(ds.astype(k.dtype), k, precision)

  _when_visited(j <= hi, tile.needs_causal_mask(q0, q_chunk0, j * bk, geo.chunk, bq, bk), step)

  @pl.when(t == nkv - 1)
  def _finish():
    dq_ref[...] = dq_sc[...].astype(dq_ref.dtype)


def _dkv_kernel(sc_ref, q_ref, k_ref, v_ref, do_ref, m_ref, l_ref, d_ref, *rest, geo: Geometry, nqv: int,
                segmented: bool):
  """dk and dv of one (batch, value head, key tile), visited once per query tile t of the key tile's chunk.

  Refs after delta: [the id blocks], out dk, dv, scratch dk (bk, dz), dv (bk, bv) f32."""
  id_refs = rest[:2] if segmented else None
  dk_ref, dv_ref, dk_sc, dv_sc = rest[2:] if segmented else rest
  bq, bk = geo.block_q_bwd, geo.block_k_bwd
  b, hg, j, t = (pl.program_id(a) for a in range(4))
  _, seeds, b_off, h_off = tile.scalars_unpack(sc_ref, False)
  k0, chunk0, lo, hi = tile.k_tile_range(j, geo, bq, bk)
  i = lo + t

  @pl.when(t == 0)
  def _init():
    dk_sc[...] = jnp.zeros(dk_sc.shape, jnp.float32)
    dv_sc[...] = jnp.zeros(dv_sc.shape, jnp.float32)

  def step(causal: bool):
    q, k, v, do = q_ref[...], k_ref[...], v_ref[...], do_ref[...]
    precision = tile.precision_for(q.dtype)
    coords = tile.make_coords(i * bq, k0, chunk0, geo, b, hg, b_off, h_off)
    s, keep = tile.masked_scores(tile.matmul_nt(q, k, precision), coords, seeds, geo.drop_threshold, causal,
                                 _tile_segments(id_refs, bk))
    p, ds = tile.grad_tiles(s, keep, do, v, _col(m_ref), _col(l_ref), _col(d_ref), precision)
    dv_sc[...] += tile.matmul_tn(p.astype(do.dtype), do, precision)
    dk_sc[...] += tile.matmul_tn(ds.astype(q.dtype), q, precision)

  _when_visited(i <= hi, tile.needs_causal_mask(i * bq, chunk0, k0, geo.chunk, bq, bk), step)

  @pl.when(t == nqv - 1)
  def _finish():
    dk_ref[...] = dk_sc[...].astype(dk_ref.dtype)
    dv_ref[...] = dv_sc[...].astype(dv_ref.dtype)


def _delta_kernel(do_ref, o_ref, d_ref):
  """delta = rowsum(do · o) of one (batch, value head, query tile): do, o (bq, bv); d (bq, 128) f32 lane-replicated."""
  prod = do_ref[...].astype(jnp.float32) * o_ref[...].astype(jnp.float32)
  d_ref[...] = _lanes(jnp.sum(prod, axis=1, keepdims=True))


def delta(do, o, *, geo: Geometry, interpret=False):
  """rowsum(do · o) per value head, the backward pass's softmax correction (FlashAttention-2's preprocessing).

  A kernel rather than XLA: in XLA the per-head sum needs o reshaped from (rows, H·G·bv) to (rows, H·G, bv), which
  on TPU is a relayout that XLA performs on a float32 copy (2 · 4 bytes per element of o in HBM temporaries, 512 MiB
  per chip at the 7B head shape, L = 8192); here each (bq, bv) tile is read once.
  Args:
    do, o: (B, rows, H·G·bv), one dtype each.
  Returns:
    (B, H·G, rows, 128) float32, lane-replicated.
  """
  bsz, rows = o.shape[:2]
  bq = geo.block_q_bwd
  tile_spec = pl.BlockSpec((None, bq, geo.bv), lambda b, hg, i: (b, i, hg))
  limit = None
  if not interpret:
    def need(tiles):
      bq_, bv_ = tiles["block_q_bwd"], tiles["block_v"]
      blocks = (vmem.tile_bytes((bq_, bv_), do.dtype) + vmem.tile_bytes((bq_, bv_), o.dtype) +
                vmem.tile_bytes((bq_, TPU_LANES), jnp.float32))
      return 2 * blocks + 2 * bq_ * bv_ * 4  # the float32 product and one converted operand
    limit = vmem.vmem_limit_bytes("chunked_attention_delta", need, {"block_q_bwd": bq, "block_v": geo.bv},
                                  vmem.device_kind(o), geo.vmem_limit_bytes)
  return pl.pallas_call(
      _delta_kernel, grid=(bsz, geo.value_heads, rows // bq), in_specs=[tile_spec, tile_spec],
      out_specs=pl.BlockSpec((None, None, bq, TPU_LANES), lambda b, hg, i: (b, hg, i, 0)),
      out_shape=jax.ShapeDtypeStruct((bsz, geo.value_heads, rows, TPU_LANES), jnp.float32),
      compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel",) * 3, vmem_limit_bytes=limit),
      interpret=interpret, name="chunked_attention_delta")(do, o)


def backward(scalars, q, k, v, do, m, l, delta, *, geo: Geometry, interpret=False, segment_ids=None):
  """Backward kernels (prefill geometry: queries and keys on the same rows).

  Args:
    scalars, q, k, v: as for `forward`; do: (B, rows, H·G·bv) output cotangent.
    m, l: forward row statistics; delta: rowsum(do · o); each (B, H·G, rows, 128) float32 lane-replicated.
  Returns:
    dq, dk: (B, rows, H·G·dz), one partial per value group (the caller sums the G groups of a head), float32
      when G > 1, else q.dtype;
    dv: (B, rows, H·G·bv) in v.dtype.
  segment_ids: as for `forward` (prefill: both are the rows' ids).
  """
  if geo.dynamic_offset:
    raise NotImplementedError("the TPU backward kernels cover prefill geometry only")
  bsz, rows = q.shape[:2]
  bq, bk, G = geo.block_q_bwd, geo.block_k_bwd, geo.groups
  HG = geo.value_heads
  nkv, nqv = geo.chunk // bk, geo.chunk // bq
  scratch_q = [pltpu.VMEM((bq, geo.dz), jnp.float32)]
  grad_dtype = jnp.float32 if G > 1 else q.dtype  # partials that are summed later stay in float32

  def kv_tile(i, t):
    _, _, lo, hi = tile.q_tile_range(i, jnp.int32(0), geo, bq, bk)
    return jnp.minimum(lo + t, hi)

  def q_tile(j, t):
    _, _, lo, hi = tile.k_tile_range(j, geo, bq, bk)
    return jnp.minimum(lo + t, hi)

  def qside(width, by_head):  # spec of a query-row tensor when the grid's third axis walks queries (dq)
    return pl.BlockSpec((None, bq, width), lambda b, hg, i, t, sc: (b, i, lax.div(hg, G) if by_head else hg))

  def kside(width, by_head):
    return pl.BlockSpec((None, bk, width), lambda b, hg, i, t, sc: (b, kv_tile(i, t), lax.div(hg, G) if by_head
                                                                     else hg))

  ids, dq_ids, dkv_ids = (), [], []
  if segment_ids is not None:
    ids = ids_to_kernel(segment_ids, bk)
    dq_ids = _id_specs(bq, bk, lambda i, t, sc: i, lambda i, t, sc: kv_tile(i, t))
    dkv_ids = _id_specs(bq, bk, lambda j, t, sc: q_tile(j, t), lambda j, t, sc: j)
  stat_q = pl.BlockSpec((None, None, bq, TPU_LANES), lambda b, hg, i, t, sc: (b, hg, i, 0))
  dq_call = pl.pallas_call(
      functools.partial(_dq_kernel, geo=geo, nkv=nkv, segmented=bool(ids)),
      out_shape=jax.ShapeDtypeStruct((bsz, rows, HG * geo.dz), grad_dtype),
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=1, grid=(bsz, HG, rows // bq, nkv),
          in_specs=[qside(geo.dz, True), kside(geo.dz, True), kside(geo.bv, False), qside(geo.bv, False),
                    stat_q, stat_q, stat_q, *dq_ids],
          out_specs=pl.BlockSpec((None, bq, geo.dz), lambda b, hg, i, t, sc: (b, i, hg)), scratch_shapes=scratch_q),
      compiler_params=_compiler_params("dq", geo, q, backward=True, grad_dtype=grad_dtype, interpret=interpret,
                                       segmented=bool(ids)),
      interpret=interpret, name="chunked_attention_dq")
  dq = dq_call(scalars, q, k, v, do, m, l, delta, *ids)

  def q_of_k(width, by_head):  # query-row tensor when the grid's third axis walks key tiles (dk/dv)
    return pl.BlockSpec((None, bq, width), lambda b, hg, j, t, sc: (b, q_tile(j, t), lax.div(hg, G) if by_head
                                                                    else hg))

  def k_of_k(width, by_head):
    return pl.BlockSpec((None, bk, width), lambda b, hg, j, t, sc: (b, j, lax.div(hg, G) if by_head else hg))

  stat_k = pl.BlockSpec((None, None, bq, TPU_LANES), lambda b, hg, j, t, sc: (b, hg, q_tile(j, t), 0))
  dkv_call = pl.pallas_call(
      functools.partial(_dkv_kernel, geo=geo, nqv=nqv, segmented=bool(ids)),
      out_shape=[jax.ShapeDtypeStruct((bsz, rows, HG * geo.dz), grad_dtype),
                 jax.ShapeDtypeStruct((bsz, rows, HG * geo.bv), v.dtype)],
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=1, grid=(bsz, HG, rows // bk, nqv),
          in_specs=[q_of_k(geo.dz, True), k_of_k(geo.dz, True), k_of_k(geo.bv, False), q_of_k(geo.bv, False),
                    stat_k, stat_k, stat_k, *dkv_ids],
          out_specs=[k_of_k(geo.dz, False), k_of_k(geo.bv, False)],
          scratch_shapes=[pltpu.VMEM((bk, geo.dz), jnp.float32), pltpu.VMEM((bk, geo.bv), jnp.float32)]),
      compiler_params=_compiler_params("dkv", geo, q, backward=True, grad_dtype=grad_dtype, interpret=interpret,
                                       segmented=bool(ids)),
      interpret=interpret, name="chunked_attention_dkv")
  dk, dv = dkv_call(scalars, q, k, v, do, m, l, delta, *ids)
  return dq, dk, dv
