"""Pure-JAX references for the kernels: dense per-chunk attention with the same DropKey hash (dropkey.py).

Semantics (the model's, docs/model.md#attention): q and k are already rotated and carry the softmax temperature
(logits are not scaled); the softmax runs in float32; attention is causal and never crosses a chunk of
`chunk_size` tokens; the last chunk may be partial. DropKey replaces a dropped logit by -1e30 before the causal
mask, so a row whose causal keys are all dropped averages them uniformly. These functions materialise every
chunk's score matrix: they are for testing and for the decode backward pass, not for long chunks.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

from pallas_kernels.chunked_attention import dropkey
from pallas_kernels.chunked_attention.tile import DROP_VALUE


def _bh(batch: int, heads: int, batch_offset, head_offset, heads_total: Optional[int]) -> jax.Array:
  """(B, H) int32 global b·H_total + h."""
  total = heads if heads_total is None else heads_total
  b = jnp.arange(batch, dtype=jnp.int32) + jnp.asarray(batch_offset, jnp.int32)
  h = jnp.arange(heads, dtype=jnp.int32) + jnp.asarray(head_offset, jnp.int32)
  return b[:, None] * total + h[None, :]


def _attend(scores, allowed, v, einsum_pv, keep):
  scores = scores.astype(jnp.float32)
  if keep is not None:
    scores = jnp.where(keep, scores, DROP_VALUE)
  probs = jax.nn.softmax(jnp.where(allowed, scores, -jnp.inf), axis=-1)
  return jnp.einsum(einsum_pv, probs.astype(v.dtype), v, preferred_element_type=jnp.float32)


def chunked_attention_reference(q: jax.Array, k: jax.Array, v: jax.Array, chunk_size: int, *,
                                segment_ids: Optional[jax.Array] = None, dropout_rate: float = 0.0, seeds: Optional[jax.Array] = None,
                                batch_offset=0, head_offset=0, heads_total: Optional[int] = None) -> jax.Array:
  """Block-diagonal causal attention over chunks of min(chunk_size, L).

  Args:
    q, k: (B, L, H, dz); v: (B, L, H, dv); one float dtype.
    chunk_size: C.
    segment_ids: optional (B, L) int32 document ids; a query sees only keys with its own id.
    dropout_rate: DropKey rate; seeds: (2,) int32 (`dropkey.seeds_from_key`), required when the rate is > 0.
    batch_offset, head_offset, heads_total: global coordinates of this shard for the hash (defaults: unsharded).
  Returns:
    (B, L, H, dv) in v.dtype.
  """
  b, l, h, dz = q.shape
  c = min(chunk_size, l)
  nc = -(-l // c)
  pad = nc * c - l
  if pad:
    q, k, v = (jnp.pad(t, ((0, 0), (0, pad), (0, 0), (0, 0))) for t in (q, k, v))
  qc, kc = q.reshape(b, nc, c, h, dz), k.reshape(b, nc, c, h, dz)
  vc = v.reshape(b, nc, c, h, -1)
  scores = jnp.einsum("bnqhd,bnkhd->bnhqk", qc, kc, preferred_element_type=jnp.float32)
  pos = jnp.arange(c, dtype=jnp.int32)
  causal = pos[None, :] <= pos[:, None]
  if segment_ids is not None:
    seg = jnp.pad(jnp.asarray(segment_ids, jnp.int32), ((0, 0), (0, pad))).reshape(b, nc, 1, c)
    causal = causal & (seg[..., :, None] == seg[..., None, :])  # (B, M, 1, C, C)
  keep = None
  if dropout_rate > 0.0:
    start = (jnp.arange(nc, dtype=jnp.int32) * c)[None, :, None, None, None]
    bh = _bh(b, h, batch_offset, head_offset, heads_total)[:, None, :, None, None]
    keep = dropkey.keep_mask(seeds, bh, start + pos[:, None], start + pos[None, :], dropkey.threshold(dropout_rate))
  out = _attend(scores, causal, vc, "bnhqk,bnkhd->bnqhd", keep)
  return out.reshape(b, nc * c, h, -1)[:, :l].astype(v.dtype)


def decode_attention_reference(q: jax.Array, k_frame: jax.Array, v_frame: jax.Array, offset, chunk_size: int, *,
                               dropout_rate: float = 0.0, seeds: Optional[jax.Array] = None,
                               batch_offset=0, head_offset=0, heads_total: Optional[int] = None,
                               q_segment_ids: Optional[jax.Array] = None,
                               kv_segment_ids: Optional[jax.Array] = None) -> jax.Array:
  """Queries at frame positions offset…offset+T-1 against a key frame that starts on a chunk boundary.

  Query t sees the frame keys of its own chunk up to its own position. This is the short-input case of the
  model's `attention_with_cache` (the frame holds the cached chunk, then the new tokens).
  Args:
    q: (B, T, H, dz); k_frame: (B, F, H, dz); v_frame: (B, F, H, dv); F a multiple of chunk_size.
    offset: () int32, frame position of q[:, 0]; may be traced.
    other arguments: as `chunked_attention_reference`, with frame positions in the hash.
    q_segment_ids (B, T), kv_segment_ids (B, F): optional int32 document ids (both or neither).
  Returns:
    (B, T, H, dv) in v.dtype.
  """
  b, t, h, _ = q.shape
  frame = k_frame.shape[1]
  qpos = jnp.asarray(offset, jnp.int32) + jnp.arange(t, dtype=jnp.int32)
  kpos = jnp.arange(frame, dtype=jnp.int32)
  allowed = (kpos[None, :] <= qpos[:, None]) & (kpos[None, :] // chunk_size == qpos[:, None] // chunk_size)
  if q_segment_ids is not None:
    q_ids, k_ids = jnp.asarray(q_segment_ids, jnp.int32), jnp.asarray(kv_segment_ids, jnp.int32)
    allowed = allowed & (q_ids[:, None, :, None] == k_ids[:, None, None, :])  # (B, 1, T, F)
  scores = jnp.einsum("bqhd,bkhd->bhqk", q, k_frame, preferred_element_type=jnp.float32)
  keep = None
  if dropout_rate > 0.0:
    bh = _bh(b, h, batch_offset, head_offset, heads_total)[:, :, None, None]
    keep = dropkey.keep_mask(seeds, bh, qpos[:, None], kpos[None, :], dropkey.threshold(dropout_rate))
  return _attend(scores, allowed, v_frame, "bhqk,bkhd->bqhd", keep).astype(v_frame.dtype)
