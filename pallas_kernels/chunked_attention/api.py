"""Public entry points: chunked causal attention (differentiable) and its decode case, on TPU, GPU or CPU.

`chunked_attention` pads (B, L, H, d) inputs into kernel layout, runs the forward kernel and, under autodiff, the
dq and dk/dv kernels through `jax.custom_vjp`. `chunked_attention_decode` runs the forward kernel with the
queries at a traced offset inside a key frame; its backward pass is the autodiff of the pure-JAX reference
(exact; decoding is not a training path). Backend: "tpu" (Mosaic) or "gpu" (Triton), picked from the default
JAX platform; on CPU the kernels run in interpret mode. Mosaic kernels cannot be partitioned by XLA, so with a
mesh the call goes through `jax.shard_map` over the batch and head axes the caller names, each shard hashing
its DropKey mask with global coordinates, so the result does not depend on the sharding. `chunked_attention` may
also split the length (chunk parallelism) over `length_axes` when every shard holds whole chunks: attention never
crosses a chunk, so the shards need no communication (their DropKey streams are decorrelated by the slice index:
same distribution, different draws from an unsplit call). Optional segment ids (document ids of packed rows)
restrict every query to the keys of its own document; they are split like the batch and length of q.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable, Optional, Sequence

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from pallas_kernels.chunked_attention import dropkey, gpu, layout, reference, tpu
from pallas_kernels.chunked_attention.blocks import BACKENDS, BlockSizes
from pallas_kernels.platform import current_platform
from pallas_kernels.sharding import axes as _axes, shard_plan

_KERNELS = {"tpu": tpu, "gpu": gpu}
# On CPU both kernel families run in the interpreter. They compile equally fast there, and the GPU one (loops
# inside a program, a small grid) runs several times faster than the TPU one (one interpreter step per grid cell;
# measured: benchmarks/RESULTS.md#figures-moved-from-code-comments-issue-21).
CPU_INTERPRET_BACKEND = "gpu"
_FLOAT_DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)


def resolve_backend(backend: Optional[str] = None, interpret: Any = None) -> tuple[str, Any]:
  """(kernel family, interpret argument) for the platform being compiled for (`platform.current_platform()`)."""
  platform = current_platform()
  native = {"tpu": "tpu", "gpu": "gpu"}.get(platform)
  if backend is None:
    backend = native or CPU_INTERPRET_BACKEND
  if backend not in BACKENDS:
    raise ValueError(f"backend={backend!r}: expected one of {BACKENDS} or None")
  if interpret is None:
    interpret = native != backend
  elif not interpret and native != backend:
    raise ValueError(f"the {backend} kernels cannot be compiled on platform {platform!r}; pass interpret=True")
  return backend, interpret


def _check_qkv(q, k, v, what: str) -> None:
  for name, x in (("q", q), ("k", k), ("v", v)):
    if x.ndim != 4:
      raise ValueError(f"{what}: {name} must be (batch, length, heads, head_dim); got shape {x.shape}")
    if x.dtype not in _FLOAT_DTYPES:
      raise ValueError(f"{what}: {name} must be float32, bfloat16 or float16; got {x.dtype}")
  if not q.dtype == k.dtype == v.dtype:
    raise ValueError(f"{what}: q, k, v must share a dtype; got {q.dtype}, {k.dtype}, {v.dtype}")
  if q.shape[-1] != k.shape[-1]:
    raise ValueError(f"{what}: q and k head dims differ: {q.shape} vs {k.shape}")
  if k.shape[:3] != v.shape[:3] or q.shape[0] != k.shape[0] or q.shape[2] != k.shape[2]:
    raise ValueError(f"{what}: shapes q {q.shape}, k {k.shape}, v {v.shape} disagree on batch / length / heads")


def _seeds(dropout_rate: float, dropout_rng) -> jax.Array:
  dropkey.threshold(dropout_rate)  # validates the rate
  if dropout_rate > 0.0:
    if dropout_rng is None:
      raise ValueError("dropout_rate > 0 needs a dropout_rng")
    return dropkey.seeds_from_key(dropout_rng)
  return jnp.zeros((2,), jnp.int32)


# ---------------------------------------------------------------------------------------------- custom VJP

def _pair(ids):
  """Prefill: queries and keys share rows, so both sides of the document mask read the same ids."""
  return None if ids is None else (ids, ids)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _attend(geo, interpret, scalars, q, k, v, ids):
  return _KERNELS[geo.backend].forward(scalars, q, k, v, geo=geo, save_stats=False, interpret=interpret,
                                       segment_ids=_pair(ids))


def _attend_fwd(geo, interpret, scalars, q, k, v, ids):
  o, m, l = _KERNELS[geo.backend].forward(scalars, q, k, v, geo=geo, save_stats=True, interpret=interpret,
                                          segment_ids=_pair(ids))
  return o, (scalars, q, k, v, ids, o, m, l)


def _attend_bwd(geo, interpret, res, do):
  scalars, q, k, v, ids, o, m, l = res
  bsz, rows = o.shape[:2]
  hg, h, g = geo.value_heads, geo.heads, geo.groups
  if geo.backend == "tpu":
    delta = tpu.delta(do, o, geo=geo, interpret=interpret)  # (B, H·G, rows, 128)
  else:
    delta = jnp.sum(do.astype(jnp.float32).reshape(bsz, rows, hg, -1) * o.astype(jnp.float32).reshape(
        bsz, rows, hg, -1), axis=-1).transpose(0, 2, 1)  # (B, H·G, rows)
  dq, dk, dv = _KERNELS[geo.backend].backward(scalars, q, k, v, do.astype(v.dtype), m, l, delta, geo=geo,
                                              interpret=interpret, segment_ids=_pair(ids))
  if g > 1:  # value groups of a head each contributed a partial dq / dk
    dq = dq.reshape(bsz, rows, h, g, -1).sum(axis=3).reshape(bsz, rows, -1)
    dk = dk.reshape(bsz, rows, h, g, -1).sum(axis=3).reshape(bsz, rows, -1)
  return None, dq.astype(q.dtype), dk.astype(k.dtype), dv, None


_attend.defvjp(_attend_fwd, _attend_bwd)


def _prefill_local(q, k, v, *rest, chunk_size, rate, blocks, backend, interpret, heads_total):
  """rest: [segment ids (B, L)], seeds, b_off, h_off."""
  ids, (seeds, b_off, h_off) = (rest[0], rest[1:]) if len(rest) == 4 else (None, rest)
  b, l, h, dz = q.shape
  dv = v.shape[-1]
  heads_plan = layout.head_plan(dz, dv, backend, blocks)
  plan, geo = layout.prefill_geometry(l, h, heads_total, chunk_size, heads_plan, blocks, backend,
                                      dropkey.threshold(rate))
  scalars = jnp.stack([jnp.int32(0), seeds[0], seeds[1], b_off, h_off]).astype(jnp.int32)
  out = _attend(geo, interpret, scalars, layout.prefill_to_kernel(q, plan, heads_plan.dz_pad),
                layout.prefill_to_kernel(k, plan, heads_plan.dz_pad),
                layout.prefill_to_kernel(v, plan, heads_plan.dv_pad),
                None if ids is None else layout.prefill_ids_to_kernel(ids, plan))
  return layout.prefill_from_kernel(out, plan, h, dv)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def _decode(geo, interpret, heads_plan, scalars, q, kf, vf, ids):
  t, h = q.shape[1], q.shape[2]
  kernel_ids = None
  if ids is not None:
    kernel_ids = (layout.rows_ids_to_kernel(ids[0], geo.q_rows), layout.rows_ids_to_kernel(ids[1], geo.k_rows))
  out = _KERNELS[geo.backend].forward(
      scalars, layout.rows_to_kernel(q, geo.q_rows, heads_plan.dz_pad),
      layout.rows_to_kernel(kf, geo.k_rows, heads_plan.dz_pad),
      layout.rows_to_kernel(vf, geo.k_rows, heads_plan.dv_pad), geo=geo, save_stats=False, interpret=interpret,
      segment_ids=kernel_ids)
  return layout.rows_from_kernel(out, t, h, heads_plan.dv)


def _decode_reference(geo, scalars, ids, q, kf, vf):
  rate = geo.drop_threshold / (1 << dropkey.THRESHOLD_BITS)
  q_ids, kv_ids = (None, None) if ids is None else ids
  return reference.decode_attention_reference(q, kf, vf, scalars[0], geo.chunk, dropout_rate=rate,
                                              seeds=scalars[1:3], batch_offset=scalars[3],
                                              head_offset=scalars[4], heads_total=geo.heads_total,
                                              q_segment_ids=q_ids, kv_segment_ids=kv_ids)


def _decode_fwd(geo, interpret, heads_plan, scalars, q, kf, vf, ids):
  return _decode(geo, interpret, heads_plan, scalars, q, kf, vf, ids), (scalars, q, kf, vf, ids)


def _decode_bwd(geo, interpret, heads_plan, res, do):
  scalars, q, kf, vf, ids = res
  _, vjp = jax.vjp(lambda *a: _decode_reference(geo, scalars, ids, *a), q, kf, vf)
  return (None, *vjp(do), None)


_decode.defvjp(_decode_fwd, _decode_bwd)


def _decode_local(q, kf, vf, *rest, chunk_size, rate, blocks, backend, interpret, heads_total):
  """rest: [query ids (B, T), key frame ids (B, F)], offset, seeds, b_off, h_off."""
  ids, (offset, seeds, b_off, h_off) = (rest[:2], rest[2:]) if len(rest) == 6 else (None, rest)
  _, t, h, dz = q.shape
  heads_plan = layout.head_plan(dz, vf.shape[-1], backend, blocks)
  geo = layout.decode_geometry(t, kf.shape[1], h, heads_total, chunk_size, heads_plan, blocks, backend,
                               dropkey.threshold(rate))
  scalars = jnp.stack([jnp.asarray(offset, jnp.int32), seeds[0], seeds[1], b_off, h_off]).astype(jnp.int32)
  return _decode(geo, interpret, heads_plan, scalars, q, kf, vf, ids)


# ---------------------------------------------------------------------------------------------- sharding

def _length_axes(mesh, length: int, chunk_size: int, length_axes, used) -> tuple[str, ...]:
  """The length axes actually used: present in `mesh`, not in `used`, and leaving whole chunks on every shard."""
  axes = tuple(a for a in _axes(length_axes) if mesh is not None and not mesh.empty and a in mesh.axis_names
               and a not in used and a not in mesh.manual_axes)
  shards = math.prod(mesh.shape[a] for a in axes) if axes else 1
  return axes if shards > 1 and length % (shards * chunk_size) == 0 else ()


def _run_sharded(local: Callable, arrays: Sequence[jax.Array], replicated: Sequence[jax.Array], mesh, batch_axes,
                 head_axes, heads_total: int, length_axes: tuple[str, ...] = (), ids: Sequence[jax.Array] = ()):
  """Calls local(*arrays, *ids, *replicated, b_off, h_off, heads_total=...) per shard; arrays are (B, T, H, d),
  ids (B, T) segment ids (split like the arrays' batch and length).

  With `length_axes` the last replicated array must be the (2,) DropKey seeds: each length slice mixes its index
  into them.
  """
  if mesh is None:
    return local(*arrays, *ids, *replicated, jnp.int32(0), jnp.int32(0), heads_total=heads_total)
  spec = P(batch_axes or None, length_axes or None, head_axes or None, None)
  id_spec = P(batch_axes or None, length_axes or None)

  def body(*xs):
    if length_axes:  # a different DropKey stream per slice (odd multiplier: distinct for every slice index)
      mix = jax.lax.axis_index(length_axes).astype(jnp.int32) * jnp.int32(-1640531535)
      xs = (*xs[:-1], xs[-1] + jnp.stack([jnp.int32(0), mix]))
    b_local, h_local = xs[0].shape[0], xs[0].shape[2]
    b_off = jax.lax.axis_index(batch_axes) * b_local if batch_axes else jnp.int32(0)
    h_off = jax.lax.axis_index(head_axes) * h_local if head_axes else jnp.int32(0)
    return local(*xs, b_off.astype(jnp.int32), h_off.astype(jnp.int32), heads_total=heads_total)

  in_specs = (spec,) * len(arrays) + (id_spec,) * len(ids) + (P(),) * len(replicated)
  # check_vma=False: pallas_call carries no varying-manual-axes typing for its outputs.
  return jax.shard_map(body, mesh=mesh, in_specs=in_specs, out_specs=spec, check_vma=False)(*arrays, *ids,
                                                                                             *replicated)


# ---------------------------------------------------------------------------------------------- public API

def _check_ids(ids, shape, what: str, name: str):
  """ids as int32 after checking they are (B, T) integers; None stays None."""
  if ids is None:
    return None
  if tuple(ids.shape) != tuple(shape):
    raise ValueError(f"{what}: {name} must be (batch, length) = {tuple(shape)}; got shape {tuple(ids.shape)}")
  if not jnp.issubdtype(ids.dtype, jnp.integer):
    raise ValueError(f"{what}: {name} must be integers; got {ids.dtype}")
  return ids.astype(jnp.int32)


def chunked_attention(q: jax.Array, k: jax.Array, v: jax.Array, chunk_size: int, *,
                      segment_ids: Optional[jax.Array] = None, dropout_rate: float = 0.0,
                      dropout_rng: Optional[jax.Array] = None, block_sizes: Optional[BlockSizes] = None,
                      backend: Optional[str] = None, interpret: Any = None, mesh=None,
                      batch_axes: Optional[Sequence[str] | str] = None,
                      head_axes: Optional[Sequence[str] | str] = None,
                      length_axes: Optional[Sequence[str] | str] = None) -> jax.Array:
  """Block-diagonal causal attention over chunks of min(chunk_size, L) tokens, as a Pallas kernel.

  Args:
    q, k: (B, L, H, dz), already rotated, logits unscaled; v: (B, L, H, dv). One dtype (float32, bfloat16 or
      float16); the softmax runs in float32.
    chunk_size: C ≥ 1; the last chunk may be partial.
    segment_ids: optional (B, L) int32 document ids: query i sees key j only when their ids are equal (besides
      same chunk and j ≤ i); a query always sees itself. Split like q's batch and length under shard_map.
    dropout_rate, dropout_rng: DropKey (dropped logits -> -1e30 before the softmax), mask from dropkey.py.
    block_sizes: tiles; default `BlockSizes.get_default(backend)`.
    backend: "tpu" | "gpu" | None (from the default platform; "gpu" in interpret mode on CPU).
    interpret: None (True off the kernel's own platform), True, or a `pltpu.InterpretParams`.
    mesh, batch_axes, head_axes: run under `jax.shard_map` over these mesh axes (default mesh: the abstract
      mesh in context). Without axes the kernel sees the whole arrays.
    length_axes: also split the length over these mesh axes when L is a multiple of their size x chunk_size
      (whole chunks per shard); otherwise the length stays whole.
  Returns:
    (B, L, H, dv) in v.dtype.
  """
  _check_qkv(q, k, v, "chunked_attention")
  if q.shape[1] != k.shape[1]:
    raise ValueError(f"chunked_attention: q and k lengths differ: {q.shape} vs {k.shape}")
  if not isinstance(chunk_size, int) or chunk_size < 1:
    raise ValueError(f"chunked_attention: chunk_size must be an int >= 1; got {chunk_size!r}")
  backend, interpret = resolve_backend(backend, interpret)
  blocks = block_sizes or BlockSizes.get_default(backend)
  blocks.check_for(backend)
  seeds = _seeds(dropout_rate, dropout_rng)
  given_mesh = mesh if mesh is not None else jax.sharding.get_abstract_mesh()
  mesh, batch_axes, head_axes = shard_plan(mesh, q.shape[0], q.shape[2], batch_axes, head_axes, "head_axes")
  length_axes = _length_axes(given_mesh, q.shape[1], chunk_size, length_axes, batch_axes + head_axes)
  if length_axes and mesh is None:
    mesh = given_mesh
  ids = _check_ids(segment_ids, q.shape[:2], "chunked_attention", "segment_ids")
  local = functools.partial(_prefill_local, chunk_size=chunk_size, rate=dropout_rate, blocks=blocks,
                            backend=backend, interpret=interpret)
  return _run_sharded(local, (q, k, v), (seeds,), mesh, batch_axes, head_axes, q.shape[2], length_axes,
                      () if ids is None else (ids,))


def chunked_attention_decode(q: jax.Array, k_frame: jax.Array, v_frame: jax.Array, offset, chunk_size: int, *,
                             q_segment_ids: Optional[jax.Array] = None,
                             kv_segment_ids: Optional[jax.Array] = None, dropout_rate: float = 0.0, dropout_rng: Optional[jax.Array] = None,
                             block_sizes: Optional[BlockSizes] = None, backend: Optional[str] = None,
                             interpret: Any = None, mesh=None, batch_axes: Optional[Sequence[str] | str] = None,
                             head_axes: Optional[Sequence[str] | str] = None) -> jax.Array:
  """Queries continuing a chunk: q at frame positions offset…offset+T-1 against a chunk-aligned key frame.

  Query t sees the keys of its own chunk up to its own position (the cached tokens of the current chunk, then the
  new ones); queries may cross into the next chunk. Cost O(T · frame), not O(frame²).
  Args:
    q: (B, T, H, dz) with T ≤ chunk_size; k_frame: (B, F, H, dz); v_frame: (B, F, H, dv); F a multiple of
      chunk_size, which must be a multiple of 16 (`decode_supports_chunk_size`).
    offset: () int32, may be traced; 0 ≤ offset and offset + T ≤ F.
    q_segment_ids, kv_segment_ids: optional (B, T) and (B, F) int32 document ids of the queries and of the frame
      (both or neither): query t sees frame key j only when their ids are equal. The frame ids at the queries'
      own positions must be the queries' ids (a query always sees itself).
    other arguments: as `chunked_attention` (DropKey hashes frame positions).
  Returns:
    (B, T, H, dv) in v.dtype. Differentiable (the backward pass is the reference's).
  """
  _check_qkv(q, k_frame, v_frame, "chunked_attention_decode")
  if not isinstance(chunk_size, int) or chunk_size < 1:
    raise ValueError(f"chunked_attention_decode: chunk_size must be an int >= 1; got {chunk_size!r}")
  if q.shape[1] > chunk_size:
    raise ValueError(f"chunked_attention_decode: {q.shape[1]} queries exceed chunk_size={chunk_size}; use "
                     f"chunked_attention on the frame for longer inputs")
  backend, interpret = resolve_backend(backend, interpret)
  blocks = block_sizes or BlockSizes.get_default(backend)
  blocks.check_for(backend)
  seeds = _seeds(dropout_rate, dropout_rng)
  mesh, batch_axes, head_axes = shard_plan(mesh, q.shape[0], q.shape[2], batch_axes, head_axes, "head_axes")

  if (q_segment_ids is None) != (kv_segment_ids is None):
    raise ValueError("chunked_attention_decode: pass both q_segment_ids and kv_segment_ids, or neither")
  ids = ()
  if q_segment_ids is not None:
    ids = (_check_ids(q_segment_ids, q.shape[:2], "chunked_attention_decode", "q_segment_ids"),
           _check_ids(kv_segment_ids, k_frame.shape[:2], "chunked_attention_decode", "kv_segment_ids"))

  def local(q_, kf_, vf_, *rest, heads_total):
    return _decode_local(q_, kf_, vf_, *rest, chunk_size=chunk_size, rate=dropout_rate,
                         blocks=blocks, backend=backend, interpret=interpret, heads_total=heads_total)

  offset = jnp.asarray(offset, jnp.int32)
  return _run_sharded(local, (q, k_frame, v_frame), (offset, seeds), mesh, batch_axes, head_axes, q.shape[2],
                      ids=ids)
