"""Full causal grouped-query attention and rotate-half RoPE, the Llama baseline's attention (pure jnp, no Flax).

Conventions are those of Hugging Face `transformers`' Llama, so a converted checkpoint gives its logits:
- RoPE (`rope_cos_sin`, `apply_rope`): inv_freq = 1 / base^(arange(0, hd, 2) / hd), angles = position * inv_freq,
  cos / sin of cat(angles, angles) in float32, x * cos + rotate_half(x) * sin with rotate_half(x) =
  cat(-x[..., hd/2:], x[..., :hd/2]).
- grouped-query heads: query head n reads key/value head n // (H / K) (HF `repeat_kv`).
- scores scaled by 1/sqrt(hd); the softmax runs in float32.

Shapes: q (B, T, H, hd), k and v (B, S, K, hd) with K dividing H. Query i sits at absolute position
`q_offset + i` and sees key slot j when j <= q_offset + i (causal); a streaming cache passes its slots (S = the
capacity) and `q_offset` = the tokens it held before these queries, so slots past the new tokens are never read.
Optional segment ids (documents packed in a row) restrict attention to equal ids.

Implementations (`full_attention(..., impl=...)`):
  xla     plain einsums; every path (cache, segments) and every platform.
  cudnn   `jax.nn.dot_product_attention(implementation="cudnn", is_causal=True)`: GPU, 16-bit inputs, the
          no-cache path without segment ids.
  splash  the TPU splash-attention Pallas kernel (`jax.experimental.pallas.ops.tpu.splash_attention`), causal mask
          and segment ids, vmapped over batch and key/value heads and run under `shard_map` over the ambient mesh's
          batch and head axes; the no-cache path with T = S a multiple of 128.
  auto    cudnn on GPU, splash on TPU, xla elsewhere (the platform being compiled for, `current_platform`).
A kernel is used only on the paths it covers; any other call (the cache path, segment ids for cudnn, float32
inputs for cudnn, lengths splash cannot tile) runs "xla", whatever was asked. Asking for a kernel by name on
another platform is a ValueError.
"""

from __future__ import annotations

import functools
import math
from typing import Optional

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from megalodon_jax import mesh_axes
from pallas_kernels.platform import current_platform

FULL_ATTENTION_IMPLS = ("xla", "cudnn", "splash")
AUTO_FULL_ATTENTION_IMPL = {"cpu": "xla", "gpu": "cudnn", "tpu": "splash"}
_KERNEL_PLATFORM = {"cudnn": "gpu", "splash": "tpu"}
_MASKED = -1e30  # finite: a fully masked row (never produced by causal attention) would not turn into NaN
_SPLASH_BLOCKS = (512, 256, 128)


# ---------------------------------------------------------------- RoPE (rotate-half, Hugging Face Llama)

def rope_inv_freq(head_dim: int, base: float) -> jax.Array:
  """(hd/2,) float32 inverse frequencies 1 / base^(arange(0, hd, 2) / hd)."""
  return 1.0 / (base ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))


def rope_cos_sin(positions: jax.Array, head_dim: int, base: float) -> tuple[jax.Array, jax.Array]:
  """(..., L) int positions -> (cos, sin), each (..., L, hd) float32 of cat(angles, angles)."""
  angles = positions.astype(jnp.float32)[..., None] * rope_inv_freq(head_dim, base)
  emb = jnp.concatenate([angles, angles], axis=-1)
  return jnp.cos(emb), jnp.sin(emb)


def rotate_half(x: jax.Array) -> jax.Array:
  half = x.shape[-1] // 2
  return jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
  """x (B, L, N, hd) rotated by cos / sin (B, L, hd) (or (L, hd)): x * cos + rotate_half(x) * sin, computed in
  float32, returned in x.dtype."""
  xf = x.astype(jnp.float32)
  cos, sin = cos[..., None, :], sin[..., None, :]  # broadcast over the heads
  return (xf * cos + rotate_half(xf) * sin).astype(x.dtype)


# ---------------------------------------------------------------- attention

def segment_ids_from_positions(positions: jax.Array) -> jax.Array:
  """(B, L) index of each token in its document -> (B, L) int32 document ids: cumsum(positions == 0)."""
  return jnp.cumsum((positions == 0).astype(jnp.int32), axis=-1)


def resolve_full_attention_impl(impl: str, platform: Optional[str] = None) -> str:
  """"xla" | "cudnn" | "splash" for a config's `full_attention_impl` on `platform` (default: the platform being
  compiled for)."""
  if impl == "auto":
    return AUTO_FULL_ATTENTION_IMPL.get(platform or current_platform(), "xla")
  if impl not in FULL_ATTENTION_IMPLS:
    raise ValueError(f"full_attention_impl={impl!r}: expected one of {('auto', *FULL_ATTENTION_IMPLS)}")
  return impl


def _check_shapes(q: jax.Array, k: jax.Array, v: jax.Array) -> None:
  if q.ndim != 4 or k.ndim != 4 or k.shape != v.shape:
    raise ValueError(f"expected q (B, T, H, hd) and k, v (B, S, K, hd); got {q.shape}, {k.shape}, {v.shape}")
  (b, _, h, d), (bk, _, kh, dk) = q.shape, k.shape
  if b != bk or d != dk or h % kh:
    raise ValueError(f"q {q.shape} and k {k.shape}: batch and head size must match and K must divide H")


def full_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, impl: str = "auto",
                   q_offset: Optional[jax.Array] = None, q_segment_ids: Optional[jax.Array] = None,
                   kv_segment_ids: Optional[jax.Array] = None) -> jax.Array:
  """Causal grouped-query attention (see the module docstring).

  Args:
    q: (B, T, H, hd) queries (RoPE applied).  k, v: (B, S, K, hd).
    impl: "auto" | "xla" | "cudnn" | "splash".
    q_offset: None (T = S, query i is key i), or a () int: the absolute position of query 0 (a cache's length);
      query i then sees slots j <= q_offset + i.
    q_segment_ids: optional (B, T) document ids of the queries; kv_segment_ids: (B, S) of the key slots (default:
      q_segment_ids, which needs T = S). Attention stays within equal ids.
  Returns:
    (B, T, H, hd) in q.dtype.
  """
  _check_shapes(q, k, v)
  if q_segment_ids is not None and kv_segment_ids is None:
    kv_segment_ids = q_segment_ids
  if (q_segment_ids is None) != (kv_segment_ids is None):
    raise ValueError("pass q_segment_ids with kv_segment_ids (or neither)")
  if q_offset is None and q.shape[1] != k.shape[1]:
    raise ValueError(f"without q_offset queries and keys must have the same length; got {q.shape[1]} and "
                     f"{k.shape[1]}")
  impl = resolve_full_attention_impl(impl)
  platform = current_platform()
  if impl != "xla" and platform != _KERNEL_PLATFORM[impl]:
    raise ValueError(f"full_attention_impl={impl!r} runs on {_KERNEL_PLATFORM[impl]} only (compiling for "
                     f"{platform}); use 'auto' or 'xla'")
  plain = q_offset is None
  if impl == "cudnn" and plain and q_segment_ids is None and q.dtype in (jnp.bfloat16, jnp.float16):
    return jax.nn.dot_product_attention(q, k.astype(q.dtype), v.astype(q.dtype), is_causal=True,
                                        implementation="cudnn")
  if impl == "splash" and plain and _splash_block(q.shape[1]) is not None:
    return splash_attention(q, k, v, q_segment_ids)
  return xla_attention(q, k, v, q_offset=q_offset, q_segment_ids=q_segment_ids, kv_segment_ids=kv_segment_ids)


# Longer query lengths are attended QUERY_BLOCK queries at a time (a rematerialised `lax.map`), so only one block's
# (QUERY_BLOCK, S) float32 scores exist at once, in the forward and the backward pass: at 32K tokens the whole
# (L, L) block is 4 GiB per head and layer.
QUERY_BLOCK = 1024


def xla_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, q_offset: Optional[jax.Array] = None,
                  q_segment_ids: Optional[jax.Array] = None,
                  kv_segment_ids: Optional[jax.Array] = None) -> jax.Array:
  """The einsum implementation of `full_attention` (every path); float32 scores and softmax. Queries longer than
  QUERY_BLOCK (a multiple of it) go a block at a time against all the keys."""
  b, t, h, d = q.shape
  if t <= QUERY_BLOCK or t % QUERY_BLOCK:
    return _xla_block(q, k, v, q_offset, q_segment_ids, kv_segment_ids)
  n = t // QUERY_BLOCK
  blocks = q.reshape(b, n, QUERY_BLOCK, h, d).swapaxes(0, 1)
  start = jnp.asarray(0 if q_offset is None else q_offset, jnp.int32)
  segments = (jnp.zeros((n, b, QUERY_BLOCK), jnp.int32) if q_segment_ids is None
              else q_segment_ids.reshape(b, n, QUERY_BLOCK).swapaxes(0, 1))

  @jax.checkpoint
  def one(args):
    i, q_block, seg = args
    return _xla_block(q_block, k, v, start + i * QUERY_BLOCK, None if q_segment_ids is None else seg,
                      kv_segment_ids)

  out = jax.lax.map(one, (jnp.arange(n, dtype=jnp.int32), blocks, segments))
  return out.swapaxes(0, 1).reshape(b, t, h, d)


def _xla_block(q: jax.Array, k: jax.Array, v: jax.Array, q_offset: Optional[jax.Array],
               q_segment_ids: Optional[jax.Array], kv_segment_ids: Optional[jax.Array]) -> jax.Array:
  """`xla_attention` of queries whose (T, S) scores are formed at once."""
  b, t, h, d = q.shape
  s, kh = k.shape[1], k.shape[2]
  g = h // kh
  qg = q.reshape(b, t, kh, g, d)  # query head n = kv head n // g, member n % g (HF repeat_kv)
  scores = jnp.einsum("btkgd,bskd->bkgts", qg, k.astype(q.dtype), preferred_element_type=jnp.float32)
  scores = scores * (1.0 / math.sqrt(d))
  q_pos = jnp.arange(t, dtype=jnp.int32) + (0 if q_offset is None else jnp.asarray(q_offset, jnp.int32))
  allowed = jnp.arange(s, dtype=jnp.int32)[None, :] <= q_pos[:, None]  # (T, S)
  allowed = allowed[None, None, None]
  if q_segment_ids is not None:
    same = q_segment_ids[:, :, None] == kv_segment_ids[:, None, :]  # (B, T, S)
    allowed = allowed & same[:, None, None]
  scores = jnp.where(allowed, scores, _MASKED)
  probs = jax.nn.softmax(scores, axis=-1)
  out = jnp.einsum("bkgts,bskd->btkgd", probs.astype(v.dtype), v, preferred_element_type=jnp.float32)
  return out.reshape(b, t, h, d).astype(q.dtype)


# ---------------------------------------------------------------- splash (TPU)

def _splash_block(length: int) -> Optional[int]:
  """The splash tile for a sequence of `length`, or None when no tile divides it (then xla runs)."""
  return next((blk for blk in _SPLASH_BLOCKS if length % blk == 0), None)


def splash_attention(q: jax.Array, k: jax.Array, v: jax.Array, segment_ids: Optional[jax.Array] = None, *,
                     interpret: bool = False) -> jax.Array:
  """Causal GQA through the splash MQA kernel: one kernel call per (batch row, key/value head), its G = H / K
  query heads sharing that head's keys; under `shard_map` over the ambient mesh's axes that split the batch and the
  key/value heads. q (B, T, H, hd), k, v (B, T, K, hd), segment_ids (B, T) or None -> (B, T, H, hd).
  `interpret`: run the kernel in Pallas interpret mode (any platform; for tests)."""
  # pylint: disable=import-outside-toplevel  (Pallas TPU modules, only when the kernel is used)
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm
  b, t, h, d = q.shape
  kh = k.shape[2]
  g = h // kh
  blk = _splash_block(t)
  if blk is None:
    raise ValueError(f"splash attention needs a length divisible by {_SPLASH_BLOCKS[-1]}; got {t}")
  mesh = jax.sharding.get_abstract_mesh()
  batch_axes = mesh_axes.split_axes(mesh, b, "batch") if not mesh.empty else ()
  head_axes = mesh_axes.split_axes(mesh, kh, "heads") if not mesh.empty else ()
  mask = sm.MultiHeadMask([sm.CausalMask((t, t)) for _ in range(g)])
  sizes = sk.BlockSizes(block_q=blk, block_kv=blk, block_kv_compute=blk, block_q_dkv=blk, block_kv_dkv=blk,
                        block_kv_dkv_compute=blk, block_q_dq=blk, block_kv_dq=blk)
  kernel = sk.make_splash_mqa_single_device(mask, block_sizes=sizes, interpret=interpret)
  scale = 1.0 / math.sqrt(d)

  def local(q, k, v, seg):
    # (b, t, kh*g, d) -> (b, kh, g, t, d); k, v (b, t, kh, d) -> (b, kh, t, d)
    lb, lkh = q.shape[0], k.shape[2]
    qh = (q * jnp.asarray(scale, q.dtype)).reshape(lb, t, lkh, g, d).transpose(0, 2, 3, 1, 4)
    kt, vt = k.astype(q.dtype).transpose(0, 2, 1, 3), v.astype(q.dtype).transpose(0, 2, 1, 3)
    if seg is None:
      per_head = lambda qq, kk, vv: kernel(qq, kk, vv)  # noqa: E731
      out = jax.vmap(jax.vmap(per_head))(qh, kt, vt)
    else:
      per_head = lambda qq, kk, vv, ids: kernel(qq, kk, vv, segment_ids=sk.SegmentIds(ids, ids))  # noqa: E731
      out = jax.vmap(jax.vmap(per_head, in_axes=(0, 0, 0, None)))(qh, kt, vt, seg)
    return out.transpose(0, 3, 1, 2, 4).reshape(lb, t, lkh * g, d).astype(q.dtype)

  if not batch_axes and not head_axes:
    return local(q, k, v, segment_ids)
  spec = P(batch_axes or None, None, head_axes or None, None)
  seg_spec = P(batch_axes or None, None)
  if segment_ids is None:
    fn = jax.shard_map(functools.partial(local, seg=None), mesh=mesh, in_specs=(spec, spec, spec), out_specs=spec,
                       check_vma=False)
    return fn(q, k, v)
  fn = jax.shard_map(local, mesh=mesh, in_specs=(spec, spec, spec, seg_spec), out_specs=spec, check_vma=False)
  return fn(q, k, v, segment_ids)
