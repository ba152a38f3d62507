"""The Pallas kernels compiled by the real TPU compiler (XLA:TPU + Mosaic from libtpu) on this CPU-only machine.

Deviceless: `jax.experimental.topologies` describes a 4-chip v5e slice, the programs are traced under
`target_platform("tpu")` (native Mosaic kernels, not interpret mode) and compiled, never run. One generation and
the largest shipped head shape (megalodon_7b: H = 4, dz = 256, dv = 2048, chunk 4096, CEMA width 4096), bfloat16,
L = 8192, batch 4 split over the 4 chips by `shard_map`; benchmarks/pallas_tpu_compile.py covers the full matrix
(4 generations x 3 configs x 2 dtypes x 6 programs). Also checked: oversized tiles fail with a ValueError that
names the BlockSizes field, before Mosaic is called.
"""

from __future__ import annotations

import os
import re
import time

import pytest

# libtpu refuses to load while another process holds its lockfile; a deviceless compile touches no TPU.
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

try:
  import libtpu  # noqa: F401  pylint: disable=unused-import
except ImportError:
  pytest.skip("libtpu is not installed: deviceless TPU compilation needs it (pip install libtpu)",
              allow_module_level=True)

import jax  # pylint: disable=wrong-import-position
import jax.numpy as jnp  # pylint: disable=wrong-import-position
from jax.experimental import topologies  # pylint: disable=wrong-import-position
from jax.sharding import NamedSharding, PartitionSpec as P  # pylint: disable=wrong-import-position

from pallas_kernels import cema  # pylint: disable=wrong-import-position
from pallas_kernels.chunked_attention import (  # pylint: disable=wrong-import-position
    BlockSizes, chunked_attention, chunked_attention_decode)
from pallas_kernels.platform import target_platform  # pylint: disable=wrong-import-position

MiB = 1 << 20
CHIPS, BATCH, LENGTH = 4, 4, 8192
HEADS, DZ, DV, CHUNK = 4, 256, 2048, 4096  # megalodon_7b per head
DIM, NSTATE = 4096, 16
BF16 = 2


@pytest.fixture(scope="module")
def mesh():
  topo = topologies.get_topology_desc(platform="tpu", topology_name="v5e:2x2")
  assert topo.devices[0].device_kind == "TPU v5 lite"
  return topologies.make_mesh(topo, (CHIPS,), ("data",))


def _arg(mesh, shape, dtype=jnp.bfloat16, spec=P("data")):
  return jax.ShapeDtypeStruct(shape, dtype, sharding=NamedSharding(mesh, spec))


def _compile(fn, *args):
  with target_platform("tpu"):
    return jax.jit(fn).trace(*args).lower(lowering_platforms=("tpu",)).compile()


def _score_shaped_f32(text: str, size: int) -> set[str]:
  """float32 array types in HLO text whose two minor dims are both ≥ size: what a (…, C, C) score tile would be."""
  found = set()
  for m in re.finditer(r"f32\[([\d,]+)\]", text):
    dims = [int(d) for d in m.group(1).split(",")]
    if len(dims) >= 2 and min(dims[-2:]) >= size:
      found.add(m.group(0))
  return found


def test_attention_forward_backward_compiles_for_v5e_under_shard_map(mesh):
  """jax.grad through chunked_attention (forward with statistics, delta, dq, dk/dv kernels), batch over 4 chips.

  HBM temporaries per chip stay within the kernel path's own residuals and gradient buffers, all linear in L:
  o and do (B·L·H·dv bf16 each), dv, q/k copies, the lane-replicated statistics m, l, delta (B·H·G·L·128 f32,
  G = 2 value groups of 1024) and the per-group dq/dk partials (float32). One chunk's float32 scores for this chip,
  B·H·C·C·4 = 256 MiB, on top of those would not fit, and no (…, C, C) float32 array may appear at all.
  """
  b = BATCH // CHIPS
  groups = 2  # dv = 2048 over the default block_v = 1024
  linear = (3 * b * LENGTH * HEADS * DV * BF16  # o, do, dv
            + 2 * b * LENGTH * HEADS * DZ * BF16  # q, k
            + 3 * b * HEADS * groups * LENGTH * 128 * 4  # m, l, delta
            + 2 * b * LENGTH * HEADS * groups * DZ * 4)  # dq, dk partials
  assert linear == 640 * MiB

  def loss(q, k, v):
    out = chunked_attention(q, k, v, CHUNK, mesh=mesh, batch_axes="data")
    return jnp.sum(out.astype(jnp.float32))

  compiled = _compile(jax.grad(loss, argnums=(0, 1, 2)), _arg(mesh, (BATCH, LENGTH, HEADS, DZ)),
                      _arg(mesh, (BATCH, LENGTH, HEADS, DZ)), _arg(mesh, (BATCH, LENGTH, HEADS, DV)))
  text = compiled.as_text()
  assert text.count('custom_call_target="tpu_custom_call"') == 4  # forward, delta, dq, dk/dv
  temp = compiled.memory_analysis().temp_size_in_bytes
  assert temp <= linear, f"temp {temp / MiB:.0f} MiB > {linear / MiB:.0f} MiB"
  assert not _score_shaped_f32(text, CHUNK)


@pytest.mark.parametrize("chunk,length", [(CHUNK, LENGTH), (64, 256)])
def test_attention_with_segment_ids_compiles_for_v5e_under_shard_map(mesh, chunk, length):
  """Document masks (segment ids split like the batch): forward, delta, dq, dk/dv and the decode kernel compile
  with Mosaic, with key tiles wider than a vreg's 128 lanes (chunk 4096: 256-row tiles) and narrower (chunk 64)."""

  def loss(q, k, v, ids):
    out = chunked_attention(q, k, v, chunk, segment_ids=ids, mesh=mesh, batch_axes="data")
    return jnp.sum(out.astype(jnp.float32))

  qkv = (_arg(mesh, (BATCH, length, HEADS, DZ)), _arg(mesh, (BATCH, length, HEADS, DZ)),
         _arg(mesh, (BATCH, length, HEADS, DV)))
  ids = _arg(mesh, (BATCH, length), jnp.int32)
  text = _compile(jax.grad(loss, argnums=(0, 1, 2)), *qkv, ids).as_text()
  assert text.count('custom_call_target="tpu_custom_call"') == 4  # forward, delta, dq, dk/dv

  def decode(q, kf, vf, q_ids, kv_ids):
    return chunked_attention_decode(q, kf, vf, jnp.int32(3), chunk, q_segment_ids=q_ids, kv_segment_ids=kv_ids,
                                    mesh=mesh, batch_axes="data")

  frame = 2 * chunk
  text = _compile(decode, _arg(mesh, (BATCH, 16, HEADS, DZ)), _arg(mesh, (BATCH, frame, HEADS, DZ)),
                  _arg(mesh, (BATCH, frame, HEADS, DV)), _arg(mesh, (BATCH, 16), jnp.int32),
                  _arg(mesh, (BATCH, frame), jnp.int32)).as_text()
  assert text.count('custom_call_target="tpu_custom_call"') == 1


def test_cema_forward_backward_compiles_for_v5e_under_shard_map(mesh):
  """jax.grad of cema_scan w.r.t. x, the five coefficient planes and omega, batch over 4 chips.

  HBM temporaries per chip: at most two float32 (B, L, D) sequences (the output cotangent and y); the states are
  never stored per step ((B, L, D, N) complex would be 8 GiB per chip here).
  """
  b = BATCH // CHIPS
  bound = 2 * b * LENGTH * DIM * 4

  def loss(x, *coefs):
    y, _ = cema.cema_scan(x, *coefs, mesh=mesh, batch_axes="data")
    return jnp.sum(y)

  coef = _arg(mesh, (DIM, NSTATE), jnp.float32, P())
  compiled = _compile(jax.grad(loss, argnums=tuple(range(7))), _arg(mesh, (BATCH, LENGTH, DIM)), *[coef] * 5,
                      _arg(mesh, (DIM,), jnp.float32, P()))
  text = compiled.as_text()
  assert 'custom_call_target="tpu_custom_call"' in text
  temp = compiled.memory_analysis().temp_size_in_bytes
  assert temp <= bound, f"temp {temp / MiB:.0f} MiB > {bound / MiB:.0f} MiB"


def test_cema_with_document_resets_compiles_for_v5e_under_shard_map(mesh):
  """The same gradient with packed-document resets, (B, L) bool split over the batch like x: both kernels take the
  (seq_tile, 1) keep blocks, Mosaic accepts the (1, 1) → (N, Dt) broadcasts, and the temporaries stay within the
  same two (B, L, D) float32 sequences plus the (B, L) keep factors and the loss."""
  b = BATCH // CHIPS
  bound = 2 * b * LENGTH * DIM * 4 + 2 * b * LENGTH * 4

  def loss(x, resets, *coefs):
    y, _ = cema.cema_scan(x, *coefs, mesh=mesh, batch_axes="data", resets=resets)
    return jnp.sum(y)

  coef = _arg(mesh, (DIM, NSTATE), jnp.float32, P())
  # value_and_grad: the loss keeps the forward kernel alive next to the backward one.
  compiled = _compile(jax.value_and_grad(loss, argnums=(0, *range(2, 8))), _arg(mesh, (BATCH, LENGTH, DIM)),
                      _arg(mesh, (BATCH, LENGTH), jnp.bool_), *[coef] * 5, _arg(mesh, (DIM,), jnp.float32, P()))
  text = compiled.as_text()
  assert text.count('custom_call_target="tpu_custom_call"') == 2  # forward and backward kernels
  temp = compiled.memory_analysis().temp_size_in_bytes
  assert temp <= bound, f"temp {temp / MiB:.0f} MiB > {bound / MiB:.0f} MiB"


def test_oversized_tiles_are_a_clear_error_before_mosaic(mesh):
  """Tiles that cannot fit VMEM raise a ValueError naming the BlockSizes field and the estimate vs the limit, at
  trace time (Mosaic would take up to a minute to report "CompileTimeScopedVmemOom")."""
  q = _arg(mesh, (BATCH, LENGTH, HEADS, DZ))
  v = _arg(mesh, (BATCH, LENGTH, HEADS, DV))
  huge = BlockSizes(block_q=4096, block_k=4096, block_v=2048)
  start = time.perf_counter()
  with pytest.raises(ValueError, match=r"chunked_attention_fwd: the tiles need about [\d.]+ MiB of VMEM, over the "
                     r"96\.0 MiB limit on v5e \(TPU v5 lite\)\. Reduce BlockSizes\.block_(q|k)\b"):
    _compile(lambda q, k, v: chunked_attention(q, k, v, CHUNK, block_sizes=huge, mesh=mesh, batch_axes="data"),
             q, q, v)
  x = _arg(mesh, (BATCH, LENGTH, DIM))
  coefs = [_arg(mesh, (DIM, NSTATE), jnp.float32, P())] * 5 + [_arg(mesh, (DIM,), jnp.float32, P())]
  with pytest.raises(ValueError, match=r"cema_scan_fwd: .* MiB of VMEM, over the .* Reduce BlockSizes\.(seq_tile|channel_tile) "):
    _compile(lambda x, *c: cema.cema_scan(x, *c, block_sizes=cema.BlockSizes(seq_tile=8192, channel_tile=4096),
                                          mesh=mesh, batch_axes="data")[0], x, *coefs)
  # An explicit limit replaces the generation's: the default tiles do not fit 1 MiB.
  with pytest.raises(ValueError, match=r"over the 1\.0 MiB limit"):
    _compile(lambda q, k, v: chunked_attention(q, k, v, CHUNK, block_sizes=BlockSizes(vmem_limit_bytes=MiB),
                                               mesh=mesh, batch_axes="data"), q, q, v)
  assert time.perf_counter() - start < 20
