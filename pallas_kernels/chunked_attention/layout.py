"""Static geometry of a kernel call and the padding that puts (B, L, H, d) tensors into kernel layout.

Kernel layout is (B, rows, H·d_pad): heads stay where they are (no transpose), a program reads head h as the
column block h of width d_pad. Three paddings make every tile full, all with zeros and all exact:
  * head dims: q/k to dz_pad, v to G·bv (G value groups of bv columns); zero columns add nothing to q·kᵀ and
    produce output columns that are cut off;
  * chunks: each chunk of c tokens (c = min(chunk_size, L)) is padded to ck, a multiple of every sequence tile;
    padded keys sit after every real query of their chunk, so the causal mask hides them;
  * the last chunk: a sequence of L tokens is first padded to ⌈L / c⌉·c (the padded keys are again after every
    real query).
Padded query rows compute finite garbage that is cut off; their output cotangent is zero, so the backward pass
gets nothing from them.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import jax
import jax.numpy as jnp

from pallas_kernels.chunked_attention.blocks import MIN_BLOCK, TPU_LANES, BlockSizes


def _cdiv(a: int, b: int) -> int:
  return -(-a // b)


def _round_up(a: int, b: int) -> int:
  return _cdiv(a, b) * b


def _next_pow2(n: int) -> int:
  return 1 << max(0, (n - 1).bit_length())


def _largest_pow2_dividing(n: int) -> int:
  return n & -n


@dataclasses.dataclass(frozen=True)
class Geometry:
  """Everything static about one kernel call (hashable: it parameterises jit and custom_vjp).

  Attributes:
    backend: "tpu" or "gpu".
    chunk: ck, chunk length in kernel rows (a multiple of every sequence tile).
    chunk_orig: c, chunk length in the caller's frame; hash positions are n·c + offset-in-chunk.
    heads, heads_total: heads in these arrays, and in the whole (unsharded) problem (hash coordinates).
    groups, bv: value groups per head and their width; v is (…, heads·groups·bv).
    dz: q/k head width in kernel layout (padded).
    q_rows, k_rows: rows of q and of k/v in kernel layout.
    block_q, block_k, block_q_bwd, block_k_bwd: sequence tiles (clipped to the problem).
    drop_threshold: DropKey threshold (0: no dropout).
    dynamic_offset: queries start at a traced frame position (decode); else at 0 and rows == key rows.
    num_warps, num_stages: Triton launch parameters.
    vmem_limit_bytes: BlockSizes.vmem_limit_bytes (TPU).
  """
  backend: str
  chunk: int
  chunk_orig: int
  heads: int
  heads_total: int
  groups: int
  bv: int
  dz: int
  q_rows: int
  k_rows: int
  block_q: int
  block_k: int
  block_q_bwd: int
  block_k_bwd: int
  drop_threshold: int
  dynamic_offset: bool
  num_warps: int
  num_stages: int
  vmem_limit_bytes: Optional[int] = None

  @property
  def value_heads(self) -> int:
    return self.heads * self.groups


@dataclasses.dataclass(frozen=True)
class HeadPlan:
  """Head-dim padding: dz -> dz_pad, dv -> groups × bv."""
  dz: int
  dv: int
  dz_pad: int
  groups: int
  bv: int

  @property
  def dv_pad(self) -> int:
    return self.groups * self.bv


def head_plan(dz: int, dv: int, backend: str, blocks: BlockSizes) -> HeadPlan:
  if backend == "tpu":
    dz_pad = _round_up(dz, TPU_LANES)
    groups = _cdiv(_round_up(dv, TPU_LANES), blocks.block_v)
    bv = _round_up(_cdiv(dv, groups), TPU_LANES)
  else:
    dz_pad = max(MIN_BLOCK, _next_pow2(dz))
    groups = _cdiv(max(MIN_BLOCK, _next_pow2(dv)), blocks.block_v)
    bv = max(MIN_BLOCK, _next_pow2(_cdiv(dv, groups)))
  return HeadPlan(dz, dv, dz_pad, groups, bv)


@dataclasses.dataclass(frozen=True)
class PrefillPlan:
  """How a (B, L, H, d) sequence maps onto kernel rows: nc chunks of c tokens, each padded to ck rows."""
  length: int
  chunk: int
  num_chunks: int
  chunk_k: int


def prefill_geometry(length: int, heads: int, heads_total: int, chunk_size: int, heads_plan: HeadPlan,
                     blocks: BlockSizes, backend: str, drop_threshold: int) -> tuple[PrefillPlan, Geometry]:
  c = min(chunk_size, length)
  nc = _cdiv(length, c)
  cap = max(MIN_BLOCK, _next_pow2(c))
  bq, bk = min(blocks.block_q, cap), min(blocks.block_k, cap)
  bqb, bkb = min(blocks.block_q_bwd, cap), min(blocks.block_k_bwd, cap)
  ck = _round_up(c, max(bq, bk, bqb, bkb))
  plan = PrefillPlan(length, c, nc, ck)
  geo = Geometry(backend=backend, chunk=ck, chunk_orig=c, heads=heads, heads_total=heads_total,
                 groups=heads_plan.groups, bv=heads_plan.bv, dz=heads_plan.dz_pad, q_rows=nc * ck, k_rows=nc * ck,
                 block_q=bq, block_k=bk, block_q_bwd=bqb, block_k_bwd=bkb, drop_threshold=drop_threshold,
                 dynamic_offset=False, num_warps=blocks.warps(max(heads_plan.dz_pad, heads_plan.bv)),
                 num_stages=blocks.num_stages, vmem_limit_bytes=blocks.vmem_limit_bytes)
  return plan, geo


def decode_supports_chunk_size(chunk_size: int) -> bool:
  """Whether the decode kernel can run chunks of `chunk_size`: its key tiles (powers of two ≥ MIN_BLOCK) must
  divide a chunk, so the chunk size must be a multiple of MIN_BLOCK. (The prefill kernel pads chunks instead; a
  decode frame cannot be padded that way, since its queries may straddle two chunks.)"""
  return chunk_size >= 1 and _largest_pow2_dividing(chunk_size) >= MIN_BLOCK


def decode_geometry(q_len: int, frame_len: int, heads: int, heads_total: int, chunk_size: int,
                    heads_plan: HeadPlan, blocks: BlockSizes, backend: str, drop_threshold: int) -> Geometry:
  if frame_len % chunk_size:
    raise ValueError(f"decode: the key frame length {frame_len} must be a multiple of chunk_size={chunk_size}")
  if not decode_supports_chunk_size(chunk_size):
    raise ValueError(f"decode with the Pallas kernel needs chunk_size to be a multiple of {MIN_BLOCK}; got "
                     f"{chunk_size} (use the XLA attention path for this chunk size)")
  bk = min(blocks.block_k, _largest_pow2_dividing(chunk_size))
  # bq ≤ the chunk keeps a query tile within two consecutive chunks (the kernels rely on it).
  bq = min(blocks.block_q, max(MIN_BLOCK, _next_pow2(q_len)), _largest_pow2_dividing(chunk_size))
  return Geometry(backend=backend, chunk=chunk_size, chunk_orig=chunk_size, heads=heads, heads_total=heads_total,
                  groups=heads_plan.groups, bv=heads_plan.bv, dz=heads_plan.dz_pad, q_rows=_round_up(q_len, bq),
                  k_rows=frame_len, block_q=bq, block_k=bk, block_q_bwd=bq, block_k_bwd=bk,
                  drop_threshold=drop_threshold, dynamic_offset=True,
                  num_warps=blocks.warps(max(heads_plan.dz_pad, heads_plan.bv)), num_stages=blocks.num_stages,
                  vmem_limit_bytes=blocks.vmem_limit_bytes)


def _pad_last(x: jax.Array, width: int) -> jax.Array:
  d = x.shape[-1]
  return x if d == width else jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, width - d)])


def prefill_to_kernel(x: jax.Array, plan: PrefillPlan, width: int) -> jax.Array:
  """(B, L, H, d) -> (B, nc·ck, H·width), zero padded."""
  b, l, h, _ = x.shape
  c, nc, ck = plan.chunk, plan.num_chunks, plan.chunk_k
  if nc * c != l or ck != c:
    x = jnp.pad(x, ((0, 0), (0, nc * c - l), (0, 0), (0, 0))).reshape(b, nc, c, h, -1)
    x = jnp.pad(x, ((0, 0), (0, 0), (0, ck - c), (0, 0), (0, 0)))
  x = _pad_last(x, width)
  return x.reshape(b, nc * ck, h * width)


def prefill_from_kernel(y: jax.Array, plan: PrefillPlan, heads: int, d: int) -> jax.Array:
  """(B, nc·ck, H·width) -> (B, L, H, d)."""
  b = y.shape[0]
  c, nc, ck = plan.chunk, plan.num_chunks, plan.chunk_k
  y = y.reshape(b, nc, ck, heads, -1)[:, :, :c, :, :d]
  return y.reshape(b, nc * c, heads, d)[:, :plan.length]


def rows_to_kernel(x: jax.Array, rows: int, width: int) -> jax.Array:
  """(B, T, H, d) -> (B, rows, H·width): pad rows at the end and the head dim."""
  b, t, h, _ = x.shape
  x = _pad_last(x, width)
  if rows != t:
    x = jnp.pad(x, ((0, 0), (0, rows - t), (0, 0), (0, 0)))
  return x.reshape(b, rows, h * width)


def rows_from_kernel(y: jax.Array, t: int, heads: int, d: int) -> jax.Array:
  """(B, rows, H·width) -> (B, t, H, d)."""
  b, rows = y.shape[:2]
  return y.reshape(b, rows, heads, -1)[:, :t, :, :d]


def prefill_ids_to_kernel(ids: jax.Array, plan: PrefillPlan) -> jax.Array:
  """(B, L) int32 segment ids -> (B, nc·ck), padded with 0: padded rows sit after every real query of their chunk
  (the causal mask hides them as keys) and their own outputs are cut off, so their ids do not matter."""
  b, l = ids.shape
  c, nc, ck = plan.chunk, plan.num_chunks, plan.chunk_k
  if nc * c != l or ck != c:
    ids = jnp.pad(ids, ((0, 0), (0, nc * c - l))).reshape(b, nc, c)
    ids = jnp.pad(ids, ((0, 0), (0, 0), (0, ck - c)))
  return ids.reshape(b, nc * ck)


def rows_ids_to_kernel(ids: jax.Array, rows: int) -> jax.Array:
  """(B, T) int32 segment ids -> (B, rows), padded with 0 at the end (padded query rows are cut off)."""
  t = ids.shape[1]
  return ids if rows == t else jnp.pad(ids, ((0, 0), (0, rows - t)))
