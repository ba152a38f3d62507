"""Per-tile math shared by the TPU and GPU kernels: scores with the chunk-causal and DropKey masks, the online
softmax update (FlashAttention-2, Dao 2023, Algorithm 1) and the gradient tiles (its Algorithm 2).

Everything here is plain jnp on one (block_q, block_k) tile, so the two backends differ only in how tiles are
fetched. Row statistics m (running max) and l (running sum) are (bq, 1) columns on TPU and (bq,) vectors on GPU;
`_col` makes either broadcast against a tile.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from pallas_kernels.chunked_attention import dropkey

# Masked (non-causal or other-chunk) logits: finite, so exp(MASK - m) underflows to 0 without inf arithmetic.
MASK_VALUE = -0.7 * float(np.finfo(np.float32).max)
# DropKey's penalty, the same as the model's (megalodon_jax/ops/attention_dropout.py): a row whose causal keys are
# all dropped becomes a uniform average over them instead of NaN. Far above MASK_VALUE, so masked keys still get
# exactly 0.
DROP_VALUE = -1e30


def _col(x: jax.Array) -> jax.Array:
  return x if x.ndim == 2 else x[:, None]


def matmul_nt(a: jax.Array, b: jax.Array, precision) -> jax.Array:
  """a (m, k) · b (n, k)ᵀ -> (m, n) float32."""
  return lax.dot_general(a, b, (((1,), (1,)), ((), ())), precision=precision, preferred_element_type=jnp.float32)


def matmul_nn(a: jax.Array, b: jax.Array, precision) -> jax.Array:
  """a (m, k) · b (k, n) -> (m, n) float32."""
  return lax.dot_general(a, b, (((1,), (0,)), ((), ())), precision=precision, preferred_element_type=jnp.float32)


def matmul_tn(a: jax.Array, b: jax.Array, precision) -> jax.Array:
  """a (k, m)ᵀ · b (k, n) -> (m, n) float32."""
  return lax.dot_general(a, b, (((0,), (0,)), ((), ())), precision=precision, preferred_element_type=jnp.float32)


def precision_for(dtype) -> Optional[lax.Precision]:
  # float32 inputs must not silently drop to bf16 passes (TPU) or TF32 (GPU): parity needs full f32 products.
  # 16-bit inputs get an explicit DEFAULT, not None: None defers to `jax_default_matmul_precision`, and with that
  # set to "highest" Mosaic is asked for an fp32 contraction of bf16 operands and rejects the kernel ("Bad lhs
  # type", libtpu 0.0.42.1).
  return lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else lax.Precision.DEFAULT


@dataclasses.dataclass(frozen=True)
class TileCoords:
  """Where a (bq, bk) tile sits. All fields are int32 scalars (traced) except the static ones.

  q0: kernel row of the tile's first query; k0: kernel row of its first key.
  q_chunk0: kernel row where the first query's chunk starts; a query tile spans at most two chunks.
  chunk: ck (static). hash_shift: kernel-row to frame-position correction for this tile's chunk, n·(ck - c)
  (0 when chunks are unpadded). bh: global b·H + h for the hash.
  """
  q0: jax.Array
  k0: jax.Array
  q_chunk0: jax.Array
  chunk: int
  hash_shift: jax.Array
  bh: jax.Array


def tile_positions(coords: TileCoords, bq: int, bk: int):
  """(bq, bk) int32 query and key kernel rows of a tile (2-D iotas: Mosaic has no 1-D iota)."""
  q_pos = coords.q0 + lax.broadcasted_iota(jnp.int32, (bq, bk), 0)
  k_pos = coords.k0 + lax.broadcasted_iota(jnp.int32, (bq, bk), 1)
  return q_pos, k_pos


def masked_scores(s: jax.Array, coords: TileCoords, seeds, drop_threshold: int, causal: bool = True,
                  segments=None):
  """Applies DropKey, (if `causal`) the chunk-causal mask and (if `segments`) the document mask to the float32
  score tile s (bq, bk).

  `causal=False` is for tiles that `needs_causal_mask` clears: every key of the chunk visible to every row.
  segments: None, or (query ids, key ids) int32 broadcasting to (bq, bk) (a column and a row): a key is visible
  only to queries of its own document. It applies to every tile, causal or not.
  Returns:
    (masked scores, keep) where keep is the DropKey keep mask (None without dropout).
  """
  bq, bk = s.shape
  q_pos, k_pos = tile_positions(coords, bq, bk)
  keep = None
  if drop_threshold:
    # Only prefill pads chunks (hash_shift != 0) and its tiles never straddle chunks, so one shift fits all rows.
    qh, kh = q_pos - coords.hash_shift, k_pos - coords.hash_shift
    keep = dropkey.keep_mask(seeds, coords.bh, qh, kh, drop_threshold)
    s = jnp.where(keep, s, DROP_VALUE)
  same = None if segments is None else segments[0] == segments[1]
  if not causal:
    return (s if same is None else jnp.where(same, s, MASK_VALUE)), keep
  # A query tile spans at most two chunks, so each row's chunk start is one of two values (no vector division).
  next_chunk = coords.q_chunk0 + coords.chunk
  row_chunk = jnp.where(q_pos >= next_chunk, next_chunk, coords.q_chunk0)
  valid = (k_pos <= q_pos) & (k_pos >= row_chunk)
  if same is not None:
    valid = valid & same
  return jnp.where(valid, s, MASK_VALUE), keep


def needs_causal_mask(q0, q_chunk0, k0, chunk: int, bq: int, bk: int):
  """Whether a tile has a key some row may not see: a key after the first query, or a query tile that straddles
  a chunk boundary (decode). Callers only visit key tiles at or after the first row's chunk start."""
  return (k0 + (bk - 1) > q0) | (q0 + (bq - 1) >= q_chunk0 + chunk)


def online_softmax_step(m, l, acc, s, v, precision):
  """One FlashAttention-2 update with a masked score tile s (bq, bk) and values v (bk, bv).

  Returns the new (m, l, acc); acc is unnormalised, divide by l at the end.
  """
  keepdims = m.ndim == 2
  m_new = jnp.maximum(m, jnp.max(s, axis=1, keepdims=keepdims))
  alpha = jnp.exp(m - m_new)
  p = jnp.exp(s - _col(m_new))
  l_new = alpha * l + jnp.sum(p, axis=1, keepdims=keepdims)
  acc_new = _col(alpha) * acc + matmul_nn(p.astype(v.dtype), v, precision)
  return m_new, l_new, acc_new


def grad_tiles(s, keep, do, v, m, l, delta, precision):
  """Recomputed probabilities and score gradients of one tile.

  p = exp(s - m) / l is kept in two steps rather than exp(s - logsumexp): when DropKey removed every causal key
  of a row, m ≈ -1e30 and m + log(l) rounds back to m, which would turn p = 1/l into 1.
  Args:
    s: (bq, bk) masked float32 scores; keep: DropKey keep mask or None.
    do: (bq, bv) output cotangent; v: (bk, bv); m, l, delta: row statistics (delta = rowsum(dO · O)).
  Returns:
    p (bq, bk) float32, ds (bq, bk) float32 (zero where DropKey removed the logit).
  """
  p = jnp.exp(s - _col(m)) / _col(l)
  dp = matmul_nt(do, v, precision)
  ds = p * (dp - _col(delta))
  if keep is not None:
    ds = jnp.where(keep, ds, 0.0)
  return p, ds


# ---- scalar index arithmetic (kernel bodies and TPU index maps; lax.div: every operand is non-negative) ----

def scalars_unpack(sc, dynamic_offset: bool):
  """(offset, seeds (seed0, seed1), b_off, h_off) from the int32 scalar vector [offset, s0, s1, b_off, h_off]."""
  offset = sc[0] if dynamic_offset else jnp.int32(0)
  return offset, (sc[1], sc[2]), sc[3], sc[4]


def q_tile_range(i, offset, geo, bq: int, bk: int):
  """For query tile i: (q0, chunk start of its first row, first and last key tile it needs)."""
  q0 = offset + i * bq
  q_chunk0 = lax.div(q0, jnp.int32(geo.chunk)) * geo.chunk
  lo = lax.div(q_chunk0, jnp.int32(bk))
  hi = jnp.minimum(lax.div(q0 + (bq - 1), jnp.int32(bk)), jnp.int32(geo.k_rows // bk - 1))
  return q0, q_chunk0, lo, hi


def k_tile_range(j, geo, bq: int, bk: int):
  """For key tile j (prefill, queries at rows 0…): (k0, its chunk start, first and last query tile that see it)."""
  k0 = j * bk
  chunk0 = lax.div(k0, jnp.int32(geo.chunk)) * geo.chunk
  lo = lax.div(k0, jnp.int32(bq))
  hi = lax.div(chunk0 + (geo.chunk - 1), jnp.int32(bq))
  return k0, chunk0, lo, hi


def first_masked_k_tile(q0, q_chunk0, lo, hi, chunk: int, bq: int, bk: int):
  """Key tiles [lo, result) of query tile q0 need no causal mask, [result, hi] do (`needs_causal_mask`)."""
  first = jnp.clip(lax.div(q0 + 1, jnp.int32(bk)), lo, hi + 1)
  return jnp.where(q0 + (bq - 1) >= q_chunk0 + chunk, lo, first)


def first_unmasked_q_tile(k0, lo, hi, bq: int, bk: int):
  """Query tiles [lo, result) of key tile k0 need the causal mask, [result, hi] do not (prefill)."""
  return jnp.clip(lax.div(k0 + (bk - 2), jnp.int32(bq)) + 1, lo, hi + 1)


def num_kv_steps(geo, bq: int, bk: int) -> int:
  """Most key tiles one query tile needs: its chunk up to its last row."""
  if geo.dynamic_offset:
    return min((geo.chunk + bq - 2) // bk + 1, geo.k_rows // bk)
  return geo.chunk // bk


def make_coords(q0, k0, q_chunk0, geo, b, hg, b_off, h_off) -> TileCoords:
  shift = jnp.int32(0)
  if geo.chunk != geo.chunk_orig:
    shift = lax.div(q_chunk0, jnp.int32(geo.chunk)) * (geo.chunk - geo.chunk_orig)
  bh = (b_off + b) * geo.heads_total + h_off + lax.div(hg, jnp.int32(geo.groups))
  return TileCoords(q0=q0, k0=k0, q_chunk0=q_chunk0, chunk=geo.chunk, hash_shift=shift, bh=bh)
