"""Normalised chunk-wise attention: shared-z q/k, interleaved RoPE, block-diagonal causal softmax
(docs/model.md#attention).

Attention never crosses a chunk of `chunk_size` tokens. Positions are chunk-local, so the rotation a token gets
depends only on its offset inside its chunk. Logits are unscaled (the 1/√dz temperature sits in the q/k affine)
and the softmax runs in float32. A sequence whose length is not a multiple of the chunk size simply ends with a
partial chunk (the official code rejects such lengths). Attention dropout draws its masks from the counter hash of
the Pallas kernels (ops/attention_dropout.py), so "xla" and "pallas" train identically.
"""

from __future__ import annotations

import math
from typing import Optional

import jax
import jax.numpy as jnp

from jax.sharding import PartitionSpec as P

from megalodon_jax import mesh_axes
from megalodon_jax.mesh_axes import SEQUENCE_AXIS
from megalodon_jax.ops import attention_dropout, impl_table
from megalodon_jax.ops.attention_dropout import AttentionDropout
from megalodon_jax.ops.impl_names import ATTENTION_IMPLEMENTATIONS, pallas_dropout_problem
from megalodon_jax.ops.norms import rms_norm
from pallas_kernels.platform import current_platform

# `attention_impl` "auto" resolves to "xla" on every platform unless the measured table (ops/impl_table.py, written
# by benchmarks/device_check.py) has an entry for the platform and head shape: the Pallas kernels (pallas_kernels/
# chunked_attention) are verified in interpret mode and by lowering only, and have not been timed on TPU or GPU
# (benchmarks/RESULTS.md#pallas-kernels-benchmarkskernelspy).
AUTO_ATTENTION_IMPL = {"cpu": "xla", "gpu": "xla", "cuda": "xla", "rocm": "xla", "tpu": "xla"}


def resolve_attention_impl(impl: str, platform: Optional[str] = None, *, chunk_size: Optional[int] = None,
                           z_head_dim: Optional[int] = None, v_head_dim: Optional[int] = None,
                           pallas_ok: bool = True) -> str:
  """"xla" or "pallas" for a config's `attention_impl` ("auto" | "xla" | "pallas") on `platform` (default: the
  platform being compiled for: the default backend, or an ahead-of-time target).

  "auto" takes the measured table's entry for (platform, chunk_size, z_head_dim, v_head_dim) where there is one,
  else `AUTO_ATTENTION_IMPL`. pallas_ok=False (the kernel cannot run this dropout: impl_names.pallas_dropout_problem)
  keeps "auto" on "xla" whatever the table says."""
  if impl != "auto" and impl not in ATTENTION_IMPLEMENTATIONS:
    raise ValueError(f"attention_impl={impl!r}: expected one of {('auto', *ATTENTION_IMPLEMENTATIONS)}")
  if impl != "auto":
    return impl
  platform = platform or current_platform()
  measured = impl_table.measured_impl("attention", {"cuda": "gpu", "rocm": "gpu"}.get(platform, platform),
                                      chunk_size=chunk_size, z_head_dim=z_head_dim, v_head_dim=v_head_dim)
  if measured is not None and (measured != "pallas" or pallas_ok):
    return measured
  return AUTO_ATTENTION_IMPL.get(platform, "xla")


def _check_pallas_dropout(dropout_rate: float, drop_key: bool) -> None:
  problem = pallas_dropout_problem(dropout_rate, drop_key)
  if problem:
    raise ValueError(f"attention_impl='pallas' {problem}")


def _pallas_options(dropout_rate: float, dropout_rng, drop_key: bool, batch: int, heads: int) -> dict:
  """Keyword arguments for the Pallas kernels: DropKey only, shard_map over the ambient mesh's axes that split the
  `batch` rows and the `heads` (`mesh_axes.split_axes`; an enclosing shard_map's manual axes are split already)."""
  _check_pallas_dropout(dropout_rate, drop_key)
  mesh = jax.sharding.get_abstract_mesh()
  return dict(dropout_rate=dropout_rate, dropout_rng=dropout_rng if dropout_rate > 0.0 else None,
              batch_axes=mesh_axes.split_axes(mesh, batch, "batch"),
              head_axes=mesh_axes.split_axes(mesh, heads, "heads"))


def normalized_qk(z: jax.Array, gamma: jax.Array, beta: jax.Array, num_heads: int, eps: float):
  """Queries and keys from the shared projection z (docs/model.md#attention).

  Args:
    z: (B, L, Z) output of wz.
    gamma, beta: (2, Z); row 0 for q, row 1 for k. Effective scale (1 + gamma) / √dz.
    num_heads: H; z is RMS-normalised per head (no affine).
    eps: RMSNorm epsilon.
  Returns:
    q, k: (B, L, H, dz) in z.dtype.
  """
  b, l, zdim = z.shape
  dz = zdim // num_heads
  zn = rms_norm(z.reshape(b, l, num_heads, dz), None, eps).reshape(b, l, zdim)
  scale = (gamma + 1.0) / math.sqrt(dz)
  q = zn * scale[0] + beta[0]
  k = zn * scale[1] + beta[1]
  return q.reshape(b, l, num_heads, dz).astype(z.dtype), k.reshape(b, l, num_heads, dz).astype(z.dtype)


def rope(x: jax.Array, inv_freq: jax.Array, positions: jax.Array) -> jax.Array:
  """Rotates interleaved feature pairs (2i, 2i+1) by positions × inv_freq_i, in float32.

  Args:
    x: (B, T, H, d) any float dtype.
    inv_freq: (d/2,) float32 (the `rope.freqs` buffer).
    positions: (T,) integer positions (chunk-local).
  Returns:
    (B, T, H, d) in x.dtype.
  """
  angle = positions.astype(jnp.float32)[:, None] * inv_freq.astype(jnp.float32)[None, :]  # (T, d/2)
  cos = jnp.cos(angle)[None, :, None, :]
  sin = jnp.sin(angle)[None, :, None, :]
  xf = x.astype(jnp.float32).reshape(*x.shape[:-1], -1, 2)
  re, im = xf[..., 0], xf[..., 1]
  out = jnp.stack([re * cos - im * sin, re * sin + im * cos], axis=-1)
  return out.reshape(x.shape).astype(x.dtype)


def _softmax_attend(scores: jax.Array, allowed: jax.Array, v: jax.Array, einsum_pv: str,
                    drop: Optional[AttentionDropout], keep: Optional[jax.Array]) -> jax.Array:
  """Masked float32 softmax over the last axis of `scores`, optional dropout, then P·v.

  keep: the dropout keep mask (broadcasting against `scores`), given exactly when `drop` is.
  """
  scores = scores.astype(jnp.float32)
  if drop is not None and drop.drop_key:
    scores = jnp.where(keep, scores, attention_dropout.DROPKEY_PENALTY)
  scores = jnp.where(allowed, scores, -jnp.inf)
  probs = jax.nn.softmax(scores, axis=-1)
  if drop is not None and not drop.drop_key:
    probs = jnp.where(keep, probs / (1.0 - drop.rate), 0.0)
  return jnp.einsum(einsum_pv, probs.astype(v.dtype), v, preferred_element_type=jnp.float32)


def chunked_causal_attention(q: jax.Array, k: jax.Array, v: jax.Array, chunk_size: int, *,
                             segment_ids: Optional[jax.Array] = None, dropout_rate: float = 0.0,
                             dropout_rng: Optional[jax.Array] = None, drop_key: bool = False, impl: str = "xla",
                             chunk_loop: Optional[bool] = None) -> jax.Array:
  """Block-diagonal causal attention over chunks of `chunk_size` (the last one may be partial).

  Args:
    q, k: (B, L, H, dz) already rotated with chunk-local positions.
    v: (B, L, H, dv).
    chunk_size: C. A sequence with L ≤ C is one chunk.
    segment_ids: optional (B, L) int32 document ids of packed rows: query i then sees key j only when
      segment_ids[b, i] == segment_ids[b, j] (besides same chunk and j ≤ i), so attention never crosses a document
      boundary. A query always sees itself, so no row is empty. None: no document mask (exactly the code without
      this argument).
    dropout_rate, dropout_rng, drop_key: attention dropout; DropKey masks logits before the softmax,
      otherwise probabilities are dropped and rescaled after it.
    impl: "xla" (this function) or "pallas" (the kernel; interpret mode on CPU). Both draw the same dropout
      masks for the same key (ops/attention_dropout.py), by sequence position.
    chunk_loop: XLA path only. True: one chunk at a time in a `lax.scan` whose body is rematerialised, so one
      chunk's (B, H, C, C) scores are live at a time, forward and backward; False: all chunks in one batched
      einsum, which holds (B, L/C, H, C, C) float32 scores (and their gradient) at once. None: the loop on TPU and
      GPU (at 32K tokens and C = 4096 the batched scores of one 4-head sequence are 2 GiB per layer), batched on
      CPU, where it is faster. Both give the same values, with or without dropout.
  Returns:
    (B, L, H, dv) in v.dtype.
  """
  if impl == "pallas":
    from pallas_kernels.chunked_attention import chunked_attention  # pylint: disable=import-outside-toplevel
    # Chunk parallelism: the kernel also splits the length over `sequence` when every shard holds whole chunks.
    length_axis = mesh_axes.sequence_axis(jax.sharding.get_abstract_mesh(), q.shape[1], chunk_size)
    return chunked_attention(q, k, v, chunk_size, segment_ids=segment_ids, length_axes=length_axis,
                             **_pallas_options(dropout_rate, dropout_rng, drop_key, q.shape[0], q.shape[2]))
  if segment_ids is not None:
    segment_ids = _check_segment_ids(segment_ids, q.shape[:2], "segment_ids")
  drop = attention_dropout.make(dropout_rate, dropout_rng, drop_key, q.shape[0], q.shape[2])
  split = _sequence_split(q.shape, chunk_size)
  if split is not None:
    return _xla_over_slices(q, k, v, chunk_size, split, drop, chunk_loop, segment_ids)
  return _xla_chunked(q, k, v, chunk_size, drop, chunk_loop, segment_ids)


def _check_segment_ids(ids: jax.Array, shape, name: str) -> jax.Array:
  """ids as int32, after checking they are (B, L) for q's (B, L)."""
  if tuple(ids.shape) != tuple(shape):
    raise ValueError(f"{name} must be (batch, length) = {tuple(shape)}; got shape {tuple(ids.shape)}")
  if not jnp.issubdtype(ids.dtype, jnp.integer):
    raise TypeError(f"{name} must be integers; got dtype {ids.dtype}")
  return ids.astype(jnp.int32)


def _same_segment(q_ids: jax.Array, k_ids: jax.Array) -> jax.Array:
  """(…, Tq, 1) == (…, 1, Tk): which keys share the query's document."""
  return q_ids[..., :, None] == k_ids[..., None, :]


def _xla_chunked(q: jax.Array, k: jax.Array, v: jax.Array, chunk_size: int, drop: Optional[AttentionDropout],
                 chunk_loop: Optional[bool], segment_ids: Optional[jax.Array] = None) -> jax.Array:
  """`chunked_causal_attention` in XLA on whole (or slice-local) arrays; dropout hashes positions 0…L-1."""
  b, l, h, dz = q.shape
  dv = v.shape[-1]
  c = min(chunk_size, l)
  nc = -(-l // c)
  pad = nc * c - l
  if pad:
    # Padded keys sit after every real query of the last chunk, so the causal mask already hides them.
    q, k, v = (jnp.pad(t, ((0, 0), (0, pad), (0, 0), (0, 0))) for t in (q, k, v))
  qc = q.reshape(b, nc, c, h, dz)
  kc = k.reshape(b, nc, c, h, dz)
  vc = v.reshape(b, nc, c, h, dv)
  causal = jnp.tril(jnp.ones((c, c), dtype=bool))
  segc = None
  if segment_ids is not None:  # padded ids (0) belong to padded rows only, which the causal mask already hides
    segc = jnp.pad(segment_ids, ((0, 0), (0, pad))).reshape(b, nc, c)
  if chunk_loop is None:
    chunk_loop = current_platform() != "cpu"
  if chunk_loop and nc > 1:
    out = _chunk_loop(qc, kc, vc, causal, drop, segc)
  else:
    scores = jnp.einsum("bnqhd,bnkhd->bnhqk", qc, kc, preferred_element_type=jnp.float32)
    keep = None
    if drop is not None:
      pos = (jnp.arange(nc) * c)[:, None] + jnp.arange(c)[None, :]  # (M, C) sequence positions
      keep = attention_dropout.keep_mask(drop, drop.bh[:, None, :, None, None], pos[None, :, None, :, None],
                                         pos[None, :, None, None, :])
    allowed = causal if segc is None else causal & _same_segment(segc, segc)[:, :, None]  # (B, M, 1, C, C)
    out = _softmax_attend(scores, allowed, vc, "bnhqk,bnkhd->bnqhd", drop, keep)
  return out.reshape(b, nc * c, h, dv)[:, :l].astype(v.dtype)


def _sequence_split(shape, chunk_size: int):
  """(mesh, batch axes, head axes) when the ambient mesh's `sequence` axis splits L into whole chunks, else None."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh_axes.sequence_axis(mesh, shape[1], chunk_size) is None:
    return None
  return mesh, mesh_axes.split_axes(mesh, shape[0], "batch"), mesh_axes.split_axes(mesh, shape[2], "heads")


def _xla_over_slices(q, k, v, chunk_size, split, drop: Optional[AttentionDropout], chunk_loop, segment_ids=None):
  """The XLA attention on each length slice under `shard_map`: chunks never cross a slice, so nothing moves.

  Without it XLA would gather the whole length for the chunk loop's scan. Dropout hashes the global batch and
  head coordinates and each slice's local positions, with the slice index mixed into the seeds, as the kernel's
  own `shard_map` does (ops/attention_dropout.py): the same masks as attention_impl="pallas".
  """
  mesh, bax, hax = split
  spec = P(bax or None, SEQUENCE_AXIS, hax or None, None)
  id_args = () if segment_ids is None else (segment_ids,)  # split like q's batch and length
  heads_total = q.shape[2]

  def body(q, k, v, *rest):
    ids, seeds = rest[:len(id_args)], rest[len(id_args):]
    local = None
    if seeds:
      mix = jax.lax.axis_index(SEQUENCE_AXIS).astype(jnp.int32) * jnp.int32(attention_dropout.SLICE_SEED_STEP)
      b_off = jax.lax.axis_index(bax) * q.shape[0] if bax else 0
      h_off = jax.lax.axis_index(hax) * q.shape[2] if hax else 0
      bh = attention_dropout.head_coordinates(q.shape[0], q.shape[2], b_off, h_off, heads_total)
      local = AttentionDropout(drop.rate, drop.drop_key, seeds[0] + jnp.stack([jnp.int32(0), mix]), bh)
    return _xla_chunked(q, k, v, chunk_size, local, chunk_loop, ids[0] if ids else None)

  seeds = () if drop is None else (drop.seeds,)
  in_specs = (spec, spec, spec) + (P(bax or None, SEQUENCE_AXIS),) * len(id_args) + (P(),) * len(seeds)
  return jax.shard_map(body, mesh=mesh, in_specs=in_specs, out_specs=spec,
                       check_vma=False)(q, k, v, *id_args, *seeds)


def _chunk_loop(qc: jax.Array, kc: jax.Array, vc: jax.Array, causal: jax.Array,
                drop: Optional[AttentionDropout], segc: Optional[jax.Array] = None) -> jax.Array:
  """Attention of each chunk in turn: qc, kc (B, M, C, H, dz), vc (B, M, C, H, dv) -> (B, M, C, H, dv) float32.

  segc: optional (B, M, C) int32 document ids (`chunked_causal_attention`'s segment_ids by chunk).

  The body is rematerialised (`jax.checkpoint`), so the backward pass saves only each chunk's q, k, v (which
  exist anyway) and recomputes its scores, instead of stacking every chunk's scores and probabilities. The dropout
  mask of chunk m hashes positions m·C…m·C+C-1, so it is the batched path's mask.
  """
  c = qc.shape[2]

  @jax.checkpoint
  def one(q, k, v, index, *seg):
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32)
    keep = None
    if drop is not None:
      pos = index * c + jnp.arange(c)
      keep = attention_dropout.keep_mask(drop, drop.bh[:, :, None, None], pos[:, None], pos[None, :])
    allowed = causal if not seg else causal & _same_segment(seg[0], seg[0])[:, None]  # (B, 1, C, C)
    return _softmax_attend(scores, allowed, v, "bhqk,bkhd->bqhd", drop, keep)

  def body(_, xs):
    return None, one(*xs)

  moved = [jnp.moveaxis(t, 1, 0) for t in (qc, kc, vc)]
  seg = () if segc is None else (jnp.moveaxis(segc, 1, 0),)
  _, out = jax.lax.scan(body, None, (*moved, jnp.arange(qc.shape[1]), *seg))
  return jnp.moveaxis(out, 0, 1)


def _decode_kernel_takes(chunk_size: int) -> bool:
  """Whether the Pallas decode kernel can run chunks of `chunk_size` (its key tiles divide a chunk)."""
  from pallas_kernels.chunked_attention import decode_supports_chunk_size  # pylint: disable=import-outside-toplevel
  return decode_supports_chunk_size(chunk_size)


def attention_with_cache(q: jax.Array, k: jax.Array, v: jax.Array, cache_k: jax.Array, cache_v: jax.Array,
                         count: jax.Array, chunk_size: int, *, segment_ids: Optional[jax.Array] = None,
                         cache_segment_ids: Optional[jax.Array] = None, dropout_rate: float = 0.0,
                         dropout_rng: Optional[jax.Array] = None, drop_key: bool = False, impl: str = "xla"):
  """Chunked causal attention continuing a stream whose current chunk already holds `count` tokens.

  New tokens may cross any number of chunk boundaries. The tokens of the current chunk (cached, then new) are
  laid out in one frame that starts at the chunk's first position, so chunk membership and causality are
  plain index comparisons and `count` may be a traced value under jit. Dropout masks hash frame positions.

  Args:
    q, k: (B, L, H, dz) new queries/keys, rotated with positions (count + i) mod C.
    v: (B, L, H, dv) new values.
    cache_k: (B, C, H, dz), cache_v: (B, C, H, dv): slots [0, count) hold the current chunk's earlier tokens.
    count: () int32, 0 ≤ count < C.
    chunk_size: C.
    segment_ids: optional (B, L) int32 document ids of the new tokens (as `chunked_causal_attention`); a query sees
      only cached and new keys of its own document. Ids live in one space along the whole stream (e.g. a running
      document counter), so a cached token of an earlier document never matches a later one.
    cache_segment_ids: (B, C) int32 ids of the cache slots (slots [0, count) matter), required with segment_ids.
    impl: "xla" or "pallas" (the kernel's decode call for L ≤ C, its prefill call on the frame otherwise). A
      chunk size the decode kernel cannot tile (not a multiple of 16) takes the XLA path for L ≤ C, chosen at
      trace time; it computes the same attention with the same dropout masks.
  Returns:
    out: (B, L, H, dv) in v.dtype; new cache_k, cache_v (same shapes) and new count = (count + L) mod C; with
    segment_ids, a fifth value: the new cache_segment_ids (B, C) int32, slot for slot like the new cache_k.
  """
  b, l, h, _ = q.shape
  c = chunk_size
  count = jnp.asarray(count, jnp.int32)
  seg = cache_seg = None
  if segment_ids is not None:
    if cache_segment_ids is None:
      raise ValueError("attention_with_cache: segment_ids needs cache_segment_ids (the cache slots' ids)")
    seg = _check_segment_ids(segment_ids, (b, l), "segment_ids")
    cache_seg = _check_segment_ids(cache_segment_ids, (b, c), "cache_segment_ids")
  if impl == "pallas":
    _check_pallas_dropout(dropout_rate, drop_key)
    if l <= c and not _decode_kernel_takes(c):
      impl = "xla"
  if l == 1 and impl != "pallas":
    drop = attention_dropout.make(dropout_rate, dropout_rng, drop_key, b, h)
    return _decode_step(q, k, v, cache_k, cache_v, count, c, drop,
                        None if seg is None else (seg, cache_seg))
  if l > c:
    return _long_input(q, k, v, cache_k, cache_v, count, c, seg, cache_seg,
                       dict(dropout_rate=dropout_rate, dropout_rng=dropout_rng, drop_key=drop_key, impl=impl))
  frame = _frame_length(l, c)
  kf, vf = _place(cache_k, k, count, frame), _place(cache_v, v, count, frame)
  # Frame ids: zeros past the new tokens, where only keys after every query lie.
  segf = None if seg is None else _place(cache_seg, seg, count, frame)
  if impl == "pallas":
    from pallas_kernels.chunked_attention import chunked_attention_decode  # pylint: disable=import-outside-toplevel
    out = chunked_attention_decode(q, kf, vf, count, c, q_segment_ids=seg, kv_segment_ids=segf,
                                   **_pallas_options(dropout_rate, dropout_rng, drop_key, b, h))
  else:
    # Short input: only the L real query rows, against the whole frame; cost O(L·(C + L)).
    qpos = count + jnp.arange(l)
    kpos = jnp.arange(frame)
    allowed = (kpos[None, :] <= qpos[:, None]) & (kpos[None, :] // c == qpos[:, None] // c)
    if seg is not None:
      allowed = allowed & _same_segment(seg, segf)[:, None]  # (B, 1, L, F)
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, kf, preferred_element_type=jnp.float32)
    drop = attention_dropout.make(dropout_rate, dropout_rng, drop_key, b, h)
    keep = None
    if drop is not None:
      keep = attention_dropout.keep_mask(drop, drop.bh[:, :, None, None], qpos[:, None], kpos[None, :])
    out = _softmax_attend(scores, allowed, vf, "bhqk,bkhd->bqhd", drop, keep)
    out = out.astype(v.dtype)
  new = _next_caches(kf, vf, segf, ((count + l) // c) * c, c, cache_k.dtype, cache_v.dtype)
  return (out, *new[:2], (count + l) % c, *new[2:])


def _frame_length(l: int, c: int) -> int:
  """Slots of the frame for L new tokens: the cached chunk and the new tokens, plus one chunk so that the slice
  that becomes the next cache (starting at the last chunk boundary) never runs off the end."""
  return (-(-l // c) + 1) * c


def _place(cache: jax.Array, new: jax.Array, count: jax.Array, frame: int) -> jax.Array:
  """The frame (B, frame, ...) in new.dtype: the cached chunk's slots, then `new` from slot `count`, zeros after."""
  buf = jnp.zeros((new.shape[0], frame) + cache.shape[2:], new.dtype)
  buf = jax.lax.dynamic_update_slice_in_dim(buf, cache.astype(new.dtype), 0, axis=1)
  return jax.lax.dynamic_update_slice_in_dim(buf, new, count, axis=1)


def _next_caches(kf: jax.Array, vf: jax.Array, segf: Optional[jax.Array], start, c: int, k_dtype, v_dtype) -> list:
  """The chunk of the frames that starts at `start` (the last chunk boundary): [new cache_k, new cache_v] and,
  with segment ids, the new cache_segment_ids."""
  new = [jax.lax.dynamic_slice_in_dim(kf, start, c, axis=1).astype(k_dtype),
         jax.lax.dynamic_slice_in_dim(vf, start, c, axis=1).astype(v_dtype)]
  if segf is not None:
    new.append(jax.lax.dynamic_slice_in_dim(segf, start, c, axis=1))
  return new


def _long_input(q, k, v, cache_k, cache_v, count, c: int, seg, cache_seg, options: dict):
  """`attention_with_cache` for L > C new tokens: chunked attention over the frame (queries placed like keys),
  then the rows cut out; or, when the cache's chunk is empty (count 0: a prefill's pieces of whole chunks), over
  the new tokens alone, which are then the frame. The second branch skips placing q, k, v into a frame and the
  frame's spare chunk of attention; both give the same values and caches."""
  l = q.shape[1]
  frame = _frame_length(l, c)
  end_slot = (l // c) * c  # with count 0, where the next cache's chunk starts

  def finish(out, kf, vf, segf, start):
    return (out.astype(v.dtype), *_next_caches(kf, vf, segf, start, c, cache_k.dtype, cache_v.dtype))

  def framed(q, k, v, seg):
    place = lambda cache, new: _place(cache, new, count, frame)
    kf, vf = place(cache_k, k), place(cache_v, v)
    segf = None if seg is None else place(cache_seg, seg)  # zeros past the new tokens, after every query
    qf = place(jnp.zeros_like(cache_k, dtype=q.dtype), q)
    out = chunked_causal_attention(qf, kf, vf, c, segment_ids=segf, **options)
    return finish(jax.lax.dynamic_slice_in_dim(out, count, l, axis=1), kf, vf, segf, ((count + l) // c) * c)

  def aligned(q, k, v, seg):
    out = chunked_causal_attention(q, k, v, c, segment_ids=seg, **options)
    spare = lambda t: jnp.pad(t, ((0, 0), (0, c)) + ((0, 0),) * (t.ndim - 2))  # the frame's zeros after the tokens
    return finish(out, spare(k), spare(v), None if seg is None else spare(seg), end_slot)

  outs = jax.lax.cond(count == 0, aligned, framed, q, k, v, seg)
  return (*outs[:3], (count + l) % c, *outs[3:])


def next_cache_segment_ids(cache_segment_ids: jax.Array, segment_ids: jax.Array, count: jax.Array,
                           chunk_size: int) -> jax.Array:
  """The cache slots' ids after `attention_with_cache` appends segment_ids (B, L) to a chunk holding `count`
  tokens whose ids are cache_segment_ids (B, C): (B, C) int32, slot for slot like its new cache_k (for a model
  whose layers share one set of ids)."""
  l = segment_ids.shape[1]
  c = chunk_size
  buf = _place(cache_segment_ids, segment_ids.astype(jnp.int32), count, _frame_length(l, c))
  return jax.lax.dynamic_slice_in_dim(buf, ((count + l) // c) * c, c, axis=1)


def _decode_step(q: jax.Array, k: jax.Array, v: jax.Array, cache_k: jax.Array, cache_v: jax.Array,
                 count: jax.Array, chunk_size: int, drop: Optional[AttentionDropout], segments=None):
  """`attention_with_cache` for one new token (L = 1), the decoding step.

  One token never crosses a chunk boundary (count < C), so its key and value are written into the cache in place
  and the query attends over the C cache slots; this avoids building and zero-filling the (B, 2C) frame of the
  general path on every generated token. Cache slots are frame positions, so dropout draws the frame path's mask.
  segments: None, or (segment_ids (B, 1), cache_segment_ids (B, C)) int32; the token's id is written in place too.
  """
  new_k = jax.lax.dynamic_update_slice_in_dim(cache_k, k.astype(cache_k.dtype), count, axis=1)
  new_v = jax.lax.dynamic_update_slice_in_dim(cache_v, v.astype(cache_v.dtype), count, axis=1)
  if drop is None and segments is None:
    out = _attend_cache_then_token(q, k, v, cache_k, cache_v, count)
    return out.astype(v.dtype), new_k, new_v, (count + 1) % chunk_size
  kpos = jnp.arange(chunk_size)
  allowed = (kpos <= count)[None, :]  # (1, C): the chunk's tokens so far, this one included
  if segments is not None:
    new_seg = jax.lax.dynamic_update_slice_in_dim(segments[1], segments[0], count, axis=1)
    allowed = allowed & _same_segment(segments[0], new_seg)[:, None]  # (B, 1, 1, C)
  scores = jnp.einsum("bqhd,bkhd->bhqk", q, new_k.astype(q.dtype), preferred_element_type=jnp.float32)
  keep = None
  if drop is not None:
    keep = attention_dropout.keep_mask(drop, drop.bh[:, :, None, None], count[None, None], kpos[None, :])
  out = _softmax_attend(scores, allowed, new_v.astype(v.dtype), "bhqk,bkhd->bqhd", drop, keep)
  if segments is None:
    return out.astype(v.dtype), new_k, new_v, (count + 1) % chunk_size
  return out.astype(v.dtype), new_k, new_v, (count + 1) % chunk_size, new_seg


def _attend_cache_then_token(q: jax.Array, k: jax.Array, v: jax.Array, cache_k: jax.Array, cache_v: jax.Array,
                             count: jax.Array) -> jax.Array:
  """One query over the cache's first `count` slots and its own key, without dropout or documents.

  q, k: (B, 1, H, dz); v: (B, 1, H, dv); cache_k: (B, C, H, dz), cache_v: (B, C, H, dv) before this token's write.
  Returns (B, 1, H, dv) float32. Same softmax as `_softmax_attend`, with the token's own score kept apart, so the
  cache is read as it is rather than through its updated copy.

  Why the odd dots: a per-head dot over the cache wants its C axis next to the contracted one, and XLA:CPU then
  transposes (copies) every layer's whole cache on every step; a multiply-and-reduce over C is slower still. So the
  heads are folded into the contracted / output axis and contract against all H heads at once, (B, C, H*d) being
  the cache's own layout: H times the flops of a (tiny) product, and the cross-head terms are masked or dropped.
  """
  b, c, h, dz = cache_k.shape
  dv = cache_v.shape[-1]
  eye = jnp.eye(h, dtype=jnp.float32)
  qf = q[:, 0].astype(jnp.float32)  # (B, H, dz)
  q_heads = (qf[:, :, :, None] * eye[:, None, :]).reshape(b, h * dz, h)  # row (h, d), column h': q[h, d] [h == h']
  s_cache = jnp.einsum("bcx,bxh->bch", cache_k.reshape(b, c, h * dz), q_heads.astype(cache_k.dtype),
                       preferred_element_type=jnp.float32)  # (B, C, H)
  s_self = jnp.sum(qf * k[:, 0].astype(jnp.float32), axis=-1)  # (B, H)
  s_cache = jnp.where((jnp.arange(c) < count)[None, :, None], s_cache, -jnp.inf)
  top = jnp.maximum(jnp.max(s_cache, axis=1), s_self)  # finite: the token's own score is
  p_cache = jnp.exp(s_cache - top[:, None])
  p_self = jnp.exp(s_self - top)
  total = jnp.sum(p_cache, axis=1) + p_self
  every = jnp.einsum("bch,bcx->bhx", p_cache.astype(cache_v.dtype), cache_v.reshape(b, c, h * dv),
                     preferred_element_type=jnp.float32).reshape(b, h, h, dv)  # head h's weights on head h''s values
  mixed = jnp.sum(every * eye[None, :, :, None], axis=2) + p_self[..., None] * v[:, 0].astype(jnp.float32)
  return (mixed / total[..., None])[:, None]
