"""Pallas chunked-attention kernels (TPU Mosaic and GPU Triton families, interpret mode on CPU) against the
model's XLA attention (megalodon_jax/ops/attention.py) and the kernels' pure-JAX reference: values and gradients,
partial chunks, value-head groups, the decode case, fully written outputs, the DropKey hash (against NumPy uint32
arithmetic), shard_map, lowering to Mosaic / Triton IR, and the model with attention_impl="pallas" against the
official fixtures."""

from __future__ import annotations

import functools
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.sharding import AxisType, PartitionSpec as P

import fixtures
from dropkey_reference import np_keep
from megalodon_jax import MegalodonConfig
from megalodon_jax.convert import from_official_state_dict
from megalodon_jax.ops import attention as attn_ops
from pallas_kernels.chunked_attention import (BlockSizes, chunked_attention, chunked_attention_decode,
                                              chunked_attention_reference, decode_attention_reference, dropkey,
                                              gpu, layout, tpu)
from pallas_kernels.chunked_attention.blocks import TPU_LANES

BACKENDS = ("tpu", "gpu")
# Small tiles so that a chunk spans several tiles and the online softmax, the diagonal tiles and the value groups
# are all exercised at CPU-sized shapes.
SMALL = {"tpu": BlockSizes(block_q=32, block_k=32, block_q_bwd=32, block_k_bwd=16, block_v=128),
         "gpu": BlockSizes(block_q=32, block_k=16, block_q_bwd=16, block_k_bwd=32, block_v=32)}


@pytest.fixture
def rng(request):
  """Fresh draws per test, reproducible from the test's name."""
  return np.random.default_rng(zlib.crc32(request.node.name.encode()))


def _qkv(rng, b, l, h, dz, dv, dtype=jnp.float32):
  q, k = (rng.normal(size=(b, l, h, dz)) for _ in range(2))
  v = rng.normal(size=(b, l, h, dv))
  return tuple(jnp.asarray(x, dtype) for x in (q, k, v))


def _rel_err(got, want) -> float:
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  return float(np.max(np.abs(got - want)) / max(1.0, np.max(np.abs(want))))


# XLA CPU backend optimisation level 0 halves the compile time of the interpreted kernels (compiling, not
# running, is what these tests spend their time on); the numerics are the same IEEE float32.
_FAST = {"xla_backend_optimization_level": 0}


def _run(fn, *args):
  """fn(*args) jitted and compiled with _FAST."""
  return jax.jit(fn).lower(*args).compile(compiler_options=_FAST)(*args)


def _value_and_grads(attend, cot, q, k, v):
  """(output, (dq, dk, dv)) of sum(attend(q, k, v) * cot), in one compiled program."""
  def fn(q, k, v):
    out, vjp = jax.vjp(attend, q, k, v)
    return out, vjp(cot.astype(out.dtype))
  return _run(fn, q, k, v)


# ------------------------------------------------------------------------------------------- kernel vs model op

# (B, L, H, dz, dv, C) per backend, each with several tiles per chunk, a partial last chunk and value heads split
# into groups (TPU: dv 192 -> 2 groups of 128; GPU: dv 96 -> 4 groups of 32); the GPU case also pads its chunks of
# 100 to 128 rows. The fixtures' shape family (L < C, head dims 12 and 48) runs in the model tests below.
F32_CASES = {"tpu": (1, 200, 2, 64, 192, 128), "gpu": (2, 150, 2, 128, 96, 100)}


@pytest.mark.parametrize("backend", BACKENDS)
def test_float32_values_and_grads_match_xla_attention(backend, rng):
  b, l, h, dz, dv, c = F32_CASES[backend]
  q, k, v = _qkv(rng, b, l, h, dz, dv)
  cot = jnp.asarray(rng.normal(size=(b, l, h, dv)), jnp.float32)
  kernel = functools.partial(chunked_attention, chunk_size=c, backend=backend, block_sizes=SMALL[backend])
  xla = functools.partial(attn_ops.chunked_causal_attention, chunk_size=c)
  out, grads = _value_and_grads(kernel, cot, q, k, v)
  want, want_grads = _value_and_grads(xla, cot, q, k, v)
  assert out.shape == want.shape and out.dtype == jnp.float32
  assert _rel_err(out, want) <= 1e-5, _rel_err(out, want)
  for name, g, w in zip("qkv", grads, want_grads):
    assert _rel_err(g, w) <= 1e-5, f"d{name}: {_rel_err(g, w):.3g}"


BF16_CASES = {"tpu": (1, 160, 2, 128, 64, 64), "gpu": (1, 160, 2, 64, 128, 64)}


@pytest.mark.parametrize("backend", BACKENDS)
def test_bfloat16_values_and_grads_within_2e_2(backend, rng):
  b, l, h, dz, dv, c = BF16_CASES[backend]
  q, k, v = _qkv(rng, b, l, h, dz, dv, jnp.bfloat16)
  cot = jnp.asarray(rng.normal(size=(b, l, h, dv)), jnp.float32)
  kernel = functools.partial(chunked_attention, chunk_size=c, backend=backend, block_sizes=SMALL[backend])
  # Truth: the float32 op on the same (bf16-rounded) inputs.
  up = lambda x: x.astype(jnp.float32)
  xla = lambda q, k, v: attn_ops.chunked_causal_attention(up(q), up(k), up(v), c)
  out, grads = _value_and_grads(kernel, cot, q, k, v)
  want, want_grads = _value_and_grads(xla, cot, q, k, v)
  assert out.dtype == jnp.bfloat16 and all(g.dtype == jnp.bfloat16 for g in grads)
  assert _rel_err(out, want) <= 2e-2, _rel_err(out, want)
  for name, g, w in zip("qkv", grads, want_grads):
    assert _rel_err(g, w) <= 2e-2, f"d{name}: {_rel_err(g, w):.3g}"


def _decode_case(rng, b=2, h=2, dz=64, dv=64, c=32, t=9):
  cache_k, cache_v = (jnp.asarray(rng.normal(size=(b, c, h, d)), jnp.float32) for d in (dz, dv))
  q, k, v = _qkv(rng, b, t, h, dz, dv)
  return cache_k, cache_v, q, k, v


def _frame(cache, new, count):
  """The cached chunk, then the new tokens from slot `count` on: the key frame attention_with_cache builds."""
  frame = jnp.concatenate([cache, jnp.zeros_like(cache)], axis=1)
  return frame.at[:, count:count + new.shape[1]].set(new)


@pytest.mark.parametrize("backend", BACKENDS)
def test_decode_kernel_matches_attention_with_cache(backend, rng):
  """9 new tokens continuing a chunk of 32 that already holds 27: the last 4 cross into the next chunk."""
  cache_k, cache_v, q, k, v = _decode_case(rng)
  count, c = 27, 32
  want = _run(lambda q, k, v: attn_ops.attention_with_cache(q, k, v, cache_k, cache_v, jnp.int32(count), c)[0],
              q, k, v)
  got = _run(lambda q, kf, vf, n: chunked_attention_decode(q, kf, vf, n, c, backend=backend,
                                                           block_sizes=SMALL[backend]),
             q, _frame(cache_k, k, count), _frame(cache_v, v, count), jnp.int32(count))
  assert _rel_err(got, want) <= 1e-5


def test_attention_with_cache_dispatches_to_the_decode_kernel_with_grads(rng):
  cache_k, cache_v, q, k, v = _decode_case(rng)
  cot = jnp.asarray(rng.normal(size=v.shape), jnp.float32)

  def run(impl):
    return lambda q, k, v: attn_ops.attention_with_cache(q, k, v, cache_k, cache_v, jnp.int32(20), 32, impl=impl)[0]

  out, grads = _value_and_grads(run("pallas"), cot, q, k, v)
  want, want_grads = _value_and_grads(run("xla"), cot, q, k, v)
  assert _rel_err(out, want) <= 1e-5
  for g, w in zip(grads, want_grads):
    assert _rel_err(g, w) <= 1e-5


# ------------------------------------------------------------------------------------------- fully written

def test_interpreter_marks_unwritten_output_with_nan():
  """The premise of the next test: interpret mode starts outputs as NaN, so a block never stored stays NaN."""
  def half(x_ref, o_ref):
    @pl.when(pl.program_id(0) == 0)
    def _():
      o_ref[...] = x_ref[...]

  out = pl.pallas_call(half, out_shape=jax.ShapeDtypeStruct((32, 128), jnp.float32), grid=(2,),
                       in_specs=[pl.BlockSpec((16, 128), lambda i: (i, 0))],
                       out_specs=pl.BlockSpec((16, 128), lambda i: (i, 0)), interpret=True)(jnp.ones((32, 128)))
  assert np.isfinite(out[:16]).all() and np.isnan(out[16:]).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_every_output_element_is_written(backend, rng):
  """Raw kernel buffers (padded rows, padded head columns, row statistics, all gradients) hold no NaN."""
  mod = {"tpu": tpu, "gpu": gpu}[backend]
  blocks = SMALL[backend]
  heads_plan = layout.head_plan(40, 72, backend, blocks)
  _, geo = layout.prefill_geometry(90, 2, 2, 48, heads_plan, blocks, backend, dropkey.threshold(0.2))
  b, hg = 2, geo.value_heads
  sc = jnp.asarray([0, 11, 22, 0, 0], jnp.int32)
  rnd = lambda *s: jnp.asarray(rng.normal(size=s), jnp.float32)
  q, k = rnd(b, geo.q_rows, 2 * geo.dz), rnd(b, geo.k_rows, 2 * geo.dz)
  v, do = rnd(b, geo.k_rows, hg * geo.bv), rnd(b, geo.q_rows, hg * geo.bv)
  dgeo = layout.decode_geometry(5, 96, 2, 2, 32, heads_plan, blocks, backend, 0)
  qd = rnd(b, dgeo.q_rows, 2 * geo.dz)

  def all_kernels(sc, q, k, v, do, qd):
    o, m, l = mod.forward(sc, q, k, v, geo=geo, save_stats=True, interpret=True)
    grads = mod.backward(sc, q, k, v, do, m, l, jnp.ones_like(m), geo=geo, interpret=True)
    od = mod.forward(sc.at[0].set(30), qd, k[:, :96], v[:, :96], geo=dgeo, save_stats=False, interpret=True)
    return dict(o=o, m=m, l=l, dq=grads[0], dk=grads[1], dv=grads[2], decode_o=od)

  for name, x in _run(all_kernels, sc, q, k, v, do, qd).items():
    assert np.isfinite(np.asarray(x)).all(), f"{backend}: {name} has unwritten (NaN) elements"


def test_tpu_kernels_under_the_mosaic_tpu_interpreter(rng):
  """pltpu.InterpretParams simulates the TPU: HBM<->VMEM copies that follow the index maps, scratch that persists
  across grid steps, outputs written back when their block index changes, NaN-filled fresh memory and an error
  on out-of-bounds reads. Gradients (forward, dq, dk/dv kernels) against the reference."""
  b, l, h, d, c = 1, 80, 1, 32, 48
  q, k, v = _qkv(rng, b, l, h, d, d)
  blocks = BlockSizes(block_q=16, block_k=16, block_q_bwd=16, block_k_bwd=16, block_v=128)
  kernel = functools.partial(chunked_attention, chunk_size=c, backend="tpu", block_sizes=blocks,
                             interpret=pltpu.InterpretParams())
  got = _value_and_grads(kernel, v, q, k, v)
  want = _value_and_grads(functools.partial(chunked_attention_reference, chunk_size=c), v, q, k, v)
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    assert _rel_err(g, w) <= 1e-5


# ------------------------------------------------------------------------------------------- DropKey

def test_dropkey_hash_matches_numpy_and_has_the_right_rate(rng):
  seeds = np.asarray(rng.integers(-2 ** 31, 2 ** 31, 2), np.int32)
  bh, q, k = (rng.integers(0, 2 ** 20, 200_000) for _ in range(3))
  mask = lambda s, bh, q, k: dropkey.keep_mask(s, bh, q, k, dropkey.threshold(0.3))
  got = _run(mask, jnp.asarray(seeds), *(jnp.asarray(x, jnp.int32) for x in (bh, q, k)))
  np.testing.assert_array_equal(np.asarray(got), np_keep(seeds, bh, q, k, 0.3))
  # Rate, and no bias along any coordinate: the keep rate of a whole (query, key) grid and of its first row,
  # first column and diagonal, each within 5 binomial standard deviations.
  qq, kk = np.meshgrid(np.arange(1024), np.arange(1024), indexing="ij")
  grid = np.asarray(_run(mask, jnp.asarray(seeds), jnp.int32(3), jnp.asarray(qq), jnp.asarray(kk)))
  for part in (grid, grid[0], grid[:, 0], np.diagonal(grid)):
    assert abs(part.mean() - 0.7) <= 5 * np.sqrt(0.21 / part.size), part.mean()
  other = np.asarray(_run(mask, jnp.asarray(seeds), jnp.int32(4), jnp.asarray(qq), jnp.asarray(kk)))
  assert abs((grid == other).mean() - 0.58) < 0.01  # another head: independent masks agree on 0.7² + 0.3²


@pytest.mark.parametrize("backend", BACKENDS)
def test_dropkey_kernel_equals_reference_values_and_grads(backend, rng):
  b, l, h, dz, dv, c = 2, 72, 2, 32, 40, 48  # chunks of 48 padded to 64 rows: the hash uses unpadded positions
  q, k, v = _qkv(rng, b, l, h, dz, dv)
  cot = jnp.asarray(rng.normal(size=(b, l, h, dv)), jnp.float32)
  key = jax.random.key(int(rng.integers(2 ** 31)))
  kernel = functools.partial(chunked_attention, chunk_size=c, backend=backend, block_sizes=SMALL[backend],
                             dropout_rate=0.25, dropout_rng=key)
  ref = functools.partial(chunked_attention_reference, chunk_size=c, dropout_rate=0.25,
                          seeds=dropkey.seeds_from_key(key))
  out, grads = _value_and_grads(kernel, cot, q, k, v)
  want, want_grads = _value_and_grads(ref, cot, q, k, v)
  assert _rel_err(out, want) <= 1e-5
  for g, w in zip(grads, want_grads):
    assert _rel_err(g, w) <= 1e-5
  no_drop = _run(functools.partial(chunked_attention_reference, chunk_size=c), q, k, v)
  assert _rel_err(out, no_drop) > 1e-2  # the mask does change the result


def test_dropkey_mask_depends_on_key_and_coordinates_only(rng):
  """Same key, other tiles (the default ones) and the decode call (hashing frame positions): the same result as
  the reference."""
  b, l, h, dz, dv, c = 1, 64, 2, 32, 32, 32
  q, k, v = _qkv(rng, b, l, h, dz, dv)
  key = jax.random.key(int(rng.integers(2 ** 31)))
  seeds = dropkey.seeds_from_key(key)
  want = _run(lambda q, k, v: chunked_attention_reference(q, k, v, c, dropout_rate=0.4, seeds=seeds), q, k, v)
  got = _run(lambda q, k, v: chunked_attention(q, k, v, c, backend="gpu", dropout_rate=0.4, dropout_rng=key),
             q, k, v)
  assert _rel_err(got, want) <= 1e-5
  frame_k, frame_v = _frame(k[:, :c], k[:, 20:30], 20), _frame(v[:, :c], v[:, 20:30], 20)
  dec = _run(lambda q, kf, vf: chunked_attention_decode(q, kf, vf, 20, c, backend="gpu", dropout_rate=0.4,
                                                        dropout_rng=key), q[:, 20:30], frame_k, frame_v)
  dec_ref = _run(lambda q, kf, vf: decode_attention_reference(q, kf, vf, 20, c, dropout_rate=0.4, seeds=seeds),
                 q[:, 20:30], frame_k, frame_v)
  assert _rel_err(dec, dec_ref) <= 1e-5
  assert _rel_err(dec, want[:, 20:30]) <= 1e-5  # frame positions 20..29 are sequence positions 20..29 here


@pytest.mark.parametrize("backend", BACKENDS)
def test_rows_with_every_key_dropped_average_their_causal_keys(backend, rng):
  """Rate 1 - 2^-24: (almost surely) every key dropped, so row i is the mean of v over its chunk's keys ≤ i,
  and the gradient stays exact there (the case that forbids storing only logsumexp)."""
  b, l, h, d, c = 1, 48, 1, 16, 32
  q, k, v = _qkv(rng, b, l, h, d, d)
  rate, key = 1.0 - 2.0 ** -24, jax.random.key(1)
  ref = functools.partial(chunked_attention_reference, chunk_size=c, dropout_rate=rate,
                          seeds=dropkey.seeds_from_key(key))
  kern = functools.partial(chunked_attention, chunk_size=c, backend=backend, block_sizes=SMALL[backend],
                           dropout_rate=rate, dropout_rng=key)
  cot = jnp.asarray(rng.normal(size=v.shape), jnp.float32)
  out, grads = _value_and_grads(kern, cot, q, k, v)
  vv = np.asarray(v, np.float64)[0, :, 0]
  want = np.concatenate([np.cumsum(vv[s:s + c], 0) / np.arange(1, min(c, l - s) + 1)[:, None]
                         for s in range(0, l, c)])
  np.testing.assert_allclose(np.asarray(out)[0, :, 0], want, atol=1e-5)
  for g, w in zip(grads, _value_and_grads(ref, cot, q, k, v)[1]):
    assert _rel_err(g, w) <= 1e-5


def test_sharded_call_equals_unsharded_with_dropout(rng):
  """shard_map over batch and head axes of an 8-device mesh: the global-coordinate hash gives the same result."""
  mesh = jax.make_mesh((2, 2, 2), ("data", "fsdp", "tensor"), axis_types=(AxisType.Auto,) * 3)
  b, l, h, d, c = 4, 40, 2, 16, 16
  q, k, v = _qkv(rng, b, l, h, d, d)
  key = jax.random.key(3)
  call = functools.partial(chunked_attention, chunk_size=c, backend="gpu", dropout_rate=0.3, dropout_rng=key)
  want = _run(lambda q, k, v: chunked_attention_reference(q, k, v, c, dropout_rate=0.3,
                                                          seeds=dropkey.seeds_from_key(key)), q, k, v)
  sharded = functools.partial(call, mesh=mesh, batch_axes=("data", "fsdp"), head_axes="tensor")
  with jax.set_mesh(mesh):
    got = _run(sharded, *(jax.device_put(x, jax.NamedSharding(mesh, P(("data", "fsdp"), None, "tensor")))
                          for x in (q, k, v)))
  assert _rel_err(got, want) <= 1e-6
  with pytest.raises(ValueError, match="not axes of the mesh"):
    chunked_attention(q, k, v, c, mesh=mesh, batch_axes="batch")


# ------------------------------------------------------------------------------------------- lowering

@pytest.mark.parametrize("backend", BACKENDS)
def test_kernels_lower_for_their_hardware(backend):
  """Lowering to Mosaic (TPU) / Triton IR (GPU) checks each backend's block-shape and op rules on CPU (bf16,
  default tiles, DropKey on; head dims 128/256 and the 7B model's 256/2048). It does not compile the IR: that
  needs the hardware."""
  mod, platform = {"tpu": (tpu, "tpu"), "gpu": (gpu, "cuda")}[backend]
  blocks = BlockSizes.get_default(backend)
  sc = jax.ShapeDtypeStruct((5,), jnp.int32)
  for dz, dv, chunk, decode in ((128, 256, 512, False), (256, 2048, 1024, False), (256, 2048, 256, True)):
    hp = layout.head_plan(dz, dv, backend, blocks)
    if decode:
      geo = layout.decode_geometry(1, 2 * chunk, 2, 2, chunk, hp, blocks, backend, dropkey.threshold(0.1))
    else:
      geo = layout.prefill_geometry(1024, 2, 2, chunk, hp, blocks, backend, dropkey.threshold(0.1))[1]
    arr = lambda rows, width: jax.ShapeDtypeStruct((1, rows, width), jnp.bfloat16)
    q, k, v = arr(geo.q_rows, 2 * geo.dz), arr(geo.k_rows, 2 * geo.dz), arr(geo.k_rows, geo.value_heads * geo.bv)
    fwd = functools.partial(mod.forward, geo=geo, save_stats=not decode)
    assert "custom_call" in jax.jit(fwd).trace(sc, q, k, v).lower(lowering_platforms=(platform,)).as_text()
    if not decode:
      stat_shape = (1, geo.value_heads, geo.q_rows) + ((TPU_LANES,) if backend == "tpu" else ())
      st = jax.ShapeDtypeStruct(stat_shape, jnp.float32)
      jax.jit(functools.partial(mod.backward, geo=geo)).trace(sc, q, k, v, v, st, st, st).lower(
          lowering_platforms=(platform,))


# ------------------------------------------------------------------------------------------- errors, dispatch

def test_bad_inputs_are_rejected_with_clear_errors(rng):
  q, k, v = _qkv(rng, 1, 8, 1, 8, 8)
  with pytest.raises(ValueError, match="needs a dropout_rng"):
    chunked_attention(q, k, v, 4, dropout_rate=0.1)
  with pytest.raises(ValueError, match=r"dropout_rate must be in \[0, 1\)"):
    chunked_attention(q, k, v, 4, dropout_rate=1.0, dropout_rng=jax.random.key(0))
  with pytest.raises(ValueError, match="share a dtype"):
    chunked_attention(q, k, v.astype(jnp.bfloat16), 4)
  with pytest.raises(ValueError, match=r"\(batch, length, heads, head_dim\)"):
    chunked_attention(q[0], k[0], v[0], 4)
  with pytest.raises(ValueError, match="chunk_size must be an int >= 1"):
    chunked_attention(q, k, v, 0)
  with pytest.raises(ValueError, match="cannot be compiled on platform 'cpu'"):
    chunked_attention(q, k, v, 4, backend="tpu", interpret=False)
  with pytest.raises(ValueError, match="multiple of 16"):
    chunked_attention_decode(q[:, :1], k, v, 3, 8)
  with pytest.raises(ValueError, match="block_v=64: on TPU it must be a multiple of 128"):
    chunked_attention(q, k, v, 4, backend="tpu", block_sizes=BlockSizes(block_v=64))
  with pytest.raises(ValueError, match="power of two"):
    BlockSizes(block_q=48)


def test_auto_resolves_to_xla_until_measured_and_pallas_rejects_softmax_dropout():
  assert attn_ops.resolve_attention_impl("auto", "cpu") == "xla"
  assert attn_ops.resolve_attention_impl("auto", "tpu") == "xla"
  assert attn_ops.resolve_attention_impl("pallas", "cpu") == "pallas"
  kwargs = dict(num_layers=1, model_dim=16, z_dim=8, value_dim=16, ffn_hidden_dim=16, chunk_size=8, vocab_size=10,
                norm_num_groups=4, cema_ndim=2, attention_dropout=0.1)
  with pytest.raises(ValueError, match="DropKey attention dropout only"):  # at config time, before any compile
    MegalodonConfig(**kwargs, attention_impl="pallas")
  MegalodonConfig(**kwargs, attention_impl="pallas", efficient_attn="swift")


# ------------------------------------------------------------------------------------------- the model

@functools.cache
def _fixture(name):
  return fixtures.load(name)


def _pallas_model(name):
  fx = _fixture(name)
  return fx, from_official_state_dict(fx.state_dict, MegalodonConfig.from_official(fx.conf, attention_impl="pallas"))


# tiny_short: 11 tokens in one chunk of 16; tiny_tied: two layers, 40 tokens in chunks of 8, each padded to 16 kernel
# rows. tiny_swiglu (48 tokens, chunks of 16) runs through the decode kernel in the streaming test.
@pytest.mark.parametrize("name", ["tiny_short", "tiny_tied"])
def test_model_with_pallas_attention_reproduces_official_logits(name):
  fx, model = _pallas_model(name)
  graphdef, state = nnx.split(model)
  logits = _run(lambda st, ids: nnx.merge(graphdef, st)(ids), state, jnp.asarray(fx.input_ids))
  err = float(np.max(np.abs(np.asarray(logits, np.float64) - fx.logits)))
  assert err <= 2e-5, f"{name}: max abs error {err:.3g}"


def test_model_streaming_with_pallas_decode_reproduces_official_logits():
  fx, model = _pallas_model("tiny_swiglu")  # chunks of 16: pieces of 6 cross chunk boundaries mid-piece
  graphdef, state = nnx.split(model)
  ids = jnp.asarray(fx.input_ids)
  cache, outs = model.init_cache(ids.shape[0]), []
  step = jax.jit(lambda st, x, cache: nnx.merge(graphdef, st)(x, cache=cache))
  step = step.lower(state, ids[:, :6], cache).compile(compiler_options=_FAST)
  for i in range(0, ids.shape[1], 6):
    logits, cache = step(state, ids[:, i:i + 6], cache)
    outs.append(logits)
  err = float(np.max(np.abs(np.concatenate(outs, axis=1).astype(np.float64) - fx.logits)))
  assert err <= 2e-5, f"streaming max abs error {err:.3g}"


def test_model_with_pallas_dropkey_trains():
  """The fixture model (chunks of 16, 11 tokens) with attention_impl='pallas' and DropKey at rate 0.3: SGD on its
  own inputs gives finite gradients, draws a fresh mask every step, and lowers the loss. (Its masks are the XLA
  path's: tests/test_attention_dropout.py.)"""
  import optax  # pylint: disable=import-outside-toplevel
  fx = _fixture("tiny_short")
  conf = dict(fx.conf, efficient_attn="swift", attention_dropout=0.3)
  model = from_official_state_dict(fx.state_dict, MegalodonConfig.from_official(conf, attention_impl="pallas"))
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  ids = jnp.asarray(fx.input_ids, jnp.int32)
  fresh = lambda tree: jax.tree.map(lambda x: x, tree)  # Variables of this trace level, which NNX may mutate

  def step(params, rest):
    def loss_fn(p):
      m = nnx.merge(graphdef, fresh(p), fresh(rest))
      m.train()
      loss = optax.softmax_cross_entropy_with_integer_labels(m(ids[:, :-1]), ids[:, 1:]).mean()
      return loss, nnx.split(m, nnx.Param, ...)[2]  # with the dropout RNG counter advanced

    (loss, rest), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    return jax.tree.map(lambda p, g: p - 0.1 * g, params, grads), rest, loss, optax.tree.norm(grads)

  step = jax.jit(step).lower(params, rest).compile(compiler_options=_FAST)
  losses = []
  for _ in range(6):
    params, rest, loss, gnorm = step(params, rest)
    assert np.isfinite(float(gnorm)) and float(gnorm) > 0
    losses.append(float(loss))
  assert losses[-1] < losses[0] - 0.1, losses
  # Same parameters, next step's RNG state: another mask, another loss.
  _, _, loss_a, _ = step(params, rest)
  _, _, loss_b, _ = step(params, step(params, rest)[1])
  assert float(loss_a) != float(loss_b)
