"""Document boundaries in the chunked attention (segment ids): a query sees only keys of its own document.

The reference is a float64 NumPy attention with the explicit mask (same chunk, key ≤ query, same segment), written
here; the DropKey masks come from the NumPy hash of tests/dropkey_reference.py. Checked: the XLA batched and
chunk-loop paths, the sequence-parallel path (8 simulated CPU devices), the Pallas kernels in interpret mode (the
GPU family through the op, the TPU family directly) with gradients, and the cached streaming paths.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, PartitionSpec as P

from megalodon_jax.ops.attention import attention_with_cache, chunked_causal_attention
from pallas_kernels.chunked_attention import chunked_attention, chunked_attention_decode
from tests.dropkey_reference import np_keep, np_seeds

B, L, H, DZ, DV, C = 2, 40, 2, 8, 12, 16
# Row 0: a document spanning chunks 0 and 1 (positions 0-20), 1-token documents (21, 22), boundaries inside
# chunks; row 1: a 1-token document at 0, a boundary right at a chunk start (16), a long tail.
SEGMENTS = np.array([[0] * 21 + [1, 2] + [3] * 9 + [4] * 8,
                     [7] + [8] * 10 + [9] * 5 + [10] * 3 + [11] * 21], np.int32)
assert SEGMENTS.shape == (B, L)


def _inputs(seed=0, b=B, l=L):
  rng = np.random.default_rng(seed)
  q, k = (jnp.asarray(rng.normal(size=(b, l, H, DZ)), jnp.float32) for _ in range(2))
  v = jnp.asarray(rng.normal(size=(b, l, H, DV)), jnp.float32)
  return q, k, v


def _mask(c, seg, lq=None):
  """(B, L, L) bool: same chunk, causal, same segment."""
  l = seg.shape[1]
  i, j = np.arange(l)[:, None], np.arange(l)[None, :]
  base = (i // c == j // c) & (j <= i)
  return base[None] & (seg[:, :, None] == seg[:, None, :])


def np_attention(q, k, v, c, seg, keep=None):
  """float64 reference; keep (B, H, L, L) DropKey keep mask or None (dropped logits -> -1e30 before the mask)."""
  q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
  s = np.einsum("bqhd,bkhd->bhqk", q, k)
  if keep is not None:
    s = np.where(keep, s, -1e30)
  s = np.where(_mask(c, seg)[:, None], s, -np.inf)
  p = np.exp(s - s.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  return np.einsum("bhqk,bkhd->bqhd", p, v)


def _np_keep(key, b, h, l, rate):
  s = np_seeds(key)
  bh = (np.arange(b)[:, None] * h + np.arange(h)[None, :])[:, :, None, None]
  pos = np.arange(l)
  return np_keep(s, bh, pos[:, None], pos[None, :], rate)


def _rel(got, want) -> float:
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  return float(np.max(np.abs(got - want)) / np.max(np.abs(want)))


def _jit(fn, *args):
  return jax.jit(fn)(*args)


# ------------------------------------------------------------------------------------- forward vs reference

@pytest.mark.parametrize("impl,chunk_loop", [("xla", False), ("xla", True), ("pallas", None)])
def test_forward_equals_the_explicit_mask_reference(impl, chunk_loop):
  q, k, v = _inputs()
  seg = jnp.asarray(SEGMENTS)
  got = _jit(lambda q, k, v, s: chunked_causal_attention(q, k, v, C, segment_ids=s, impl=impl,
                                                         chunk_loop=chunk_loop), q, k, v, seg)
  want = np_attention(q, k, v, C, SEGMENTS)
  assert _rel(got, want) <= 1e-5
  assert _rel(got, np_attention(q, k, v, C, np.zeros_like(SEGMENTS))) > 1e-2  # the documents did matter


def test_tpu_kernels_in_the_mosaic_interpreter_equal_the_reference_with_gradients():
  """The TPU (Mosaic) family, forward, dq and dk/dv, with tiles smaller than a chunk (several per chunk)."""
  from pallas_kernels.chunked_attention import BlockSizes  # pylint: disable=import-outside-toplevel
  q, k, v = _inputs(1)
  seg = jnp.asarray(SEGMENTS)
  blocks = BlockSizes(block_q=16, block_k=16, block_q_bwd=16, block_k_bwd=16, block_v=128)
  cot = jnp.asarray(np.random.default_rng(5).normal(size=v.shape), jnp.float32)

  def vg(fn):
    out, vjp = jax.vjp(fn, q, k, v)
    return out, vjp(cot)

  c = 32
  tpu = _jit(lambda: vg(lambda q, k, v: chunked_attention(q, k, v, c, segment_ids=seg, block_sizes=blocks,
                                                          backend="tpu", interpret=True)))
  xla = _jit(lambda: vg(lambda q, k, v: chunked_causal_attention(q, k, v, c, segment_ids=seg, chunk_loop=False)))
  assert _rel(tpu[0], np_attention(q, k, v, c, SEGMENTS)) <= 1e-5
  for got, want in zip(tpu[1], xla[1]):
    assert _rel(got, want) <= 1e-5


def test_packed_documents_aligned_to_chunks_equal_separate_runs():
  """Documents that start at chunk starts: the packed row is each document run on its own."""
  q, k, v = _inputs(2, b=1, l=48)
  lengths = [16, 8, 24]  # chunk 8: the documents start at 0, 16 and 24
  seg = np.repeat(np.arange(len(lengths)), lengths)[None].astype(np.int32)
  for impl in ("xla", "pallas"):
    packed = _jit(lambda q, k, v: chunked_causal_attention(q, k, v, 8, segment_ids=jnp.asarray(seg), impl=impl),
                  q, k, v)
    start = 0
    for n in lengths:
      part = (slice(None), slice(start, start + n))
      alone = chunked_causal_attention(q[part], k[part], v[part], 8, impl=impl)
      np.testing.assert_allclose(np.asarray(packed[part]), np.asarray(alone), rtol=1e-5, atol=1e-6)
      start += n


@pytest.mark.parametrize("impl", ["xla", "pallas"])
def test_one_segment_equals_no_segment_ids_bit_for_bit(impl):
  """A single document changes nothing: same values as segment_ids=None (which runs the code without masks)."""
  q, k, v = _inputs(3)
  plain = _jit(lambda q, k, v: chunked_causal_attention(q, k, v, C, impl=impl), q, k, v)
  same = _jit(lambda q, k, v: chunked_causal_attention(q, k, v, C, segment_ids=jnp.full((B, L), 5, jnp.int32),
                                                       impl=impl), q, k, v)
  np.testing.assert_array_equal(np.asarray(same), np.asarray(plain))


# ------------------------------------------------------------------------------------- paths agree, with grads

def _value_and_grads(fn, q, k, v, cot):
  def run(q, k, v):
    out, vjp = jax.vjp(fn, q, k, v)
    return out, vjp(cot)
  return _jit(run, q, k, v)


@pytest.mark.parametrize("rate", [0.0, 0.3])
def test_batched_loop_and_pallas_agree_values_and_gradients(rate):
  q, k, v = _inputs(4)
  seg = jnp.asarray(SEGMENTS)
  cot = jnp.asarray(np.random.default_rng(6).normal(size=v.shape), jnp.float32)
  key = jax.random.key(3)
  call = lambda **kw: functools.partial(chunked_causal_attention, chunk_size=C, segment_ids=seg, dropout_rate=rate,
                                        dropout_rng=key if rate else None, drop_key=True, **kw)
  want, want_grads = _value_and_grads(call(impl="xla", chunk_loop=False), q, k, v, cot)
  keep = _np_keep(key, B, H, L, rate) if rate else None
  assert _rel(want, np_attention(q, k, v, C, SEGMENTS, keep)) <= 1e-5
  for kw in (dict(impl="xla", chunk_loop=True), dict(impl="pallas")):
    out, grads = _value_and_grads(call(**kw), q, k, v, cot)
    assert _rel(out, want) <= 1e-5, kw
    for g, w in zip(grads, want_grads):
      assert _rel(g, w) <= 1e-5, kw


def test_gradients_equal_the_dense_masked_reference():
  """Gradients of the XLA path against a dense (L × L) masked attention differentiated by JAX."""
  q, k, v = _inputs(7)
  mask = jnp.asarray(_mask(C, SEGMENTS))[:, None]
  cot = jnp.asarray(np.random.default_rng(8).normal(size=v.shape), jnp.float32)

  def dense(q, k, v):
    s = jnp.where(mask, jnp.einsum("bqhd,bkhd->bhqk", q, k), -jnp.inf)
    return jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(s, -1), v)

  _, want = _value_and_grads(dense, q, k, v, cot)
  _, got = _value_and_grads(lambda q, k, v: chunked_causal_attention(q, k, v, C, segment_ids=jnp.asarray(SEGMENTS)),
                            q, k, v, cot)
  for g, w in zip(got, want):
    assert _rel(g, w) <= 1e-5


@pytest.mark.parametrize("rate", [0.0, 0.3])
def test_sequence_parallel_path_agrees_with_one_device(rate):
  """Length over `sequence` (2 slices of 2 chunks), batch over data, heads over tensor: XLA and Pallas under the
  mesh equal the unsharded XLA attention (without dropout) / each other (with dropout: per-slice streams)."""
  mesh = jax.make_mesh((2, 2, 2), ("data", "sequence", "tensor"), axis_types=(AxisType.Auto,) * 3)
  l, c = 32, 8
  q, k, v = _inputs(9, l=l)
  seg = jnp.asarray(np.stack([np.repeat([0, 1, 2, 3], [5, 12, 1, 14]), np.repeat([4, 5], [19, 13])]), jnp.int32)
  cot = jnp.asarray(np.random.default_rng(10).normal(size=v.shape), jnp.float32)
  key = jax.random.key(4)
  call = lambda impl: functools.partial(chunked_causal_attention, chunk_size=c, segment_ids=seg, dropout_rate=rate,
                                        dropout_rng=key if rate else None, drop_key=True, impl=impl)
  put = lambda x, spec: jax.device_put(x, jax.NamedSharding(mesh, spec))
  results = {}
  for impl in ("xla", "pallas"):
    with jax.set_mesh(mesh):
      qs, ks, vs, cs = (put(x, P("data", "sequence", "tensor")) for x in (q, k, v, cot))
      fn = call(impl)
      segment = put(seg, P("data", "sequence"))
      results[impl] = _value_and_grads(lambda q, k, v: fn(q, k, v, segment_ids=segment), qs, ks, vs, cs)
  if rate == 0.0:
    want = _value_and_grads(call("xla"), q, k, v, cot)
    assert _rel(want[0], np_attention(q, k, v, c, np.asarray(seg))) <= 1e-5
  else:
    want = results["xla"]
  for impl in ("xla", "pallas"):
    out, grads = results[impl]
    assert _rel(out, want[0]) <= 1e-5, impl
    for g, w in zip(grads, want[1]):
      assert _rel(g, w) <= 1e-5, impl


# ------------------------------------------------------------------------------------------------ streaming

def _stream(pieces, impl, c, q, k, v, seg):
  b = q.shape[0]
  cache_k = jnp.zeros((b, c, H, DZ), jnp.float32)
  cache_v = jnp.zeros((b, c, H, DV), jnp.float32)
  cache_seg = jnp.zeros((b, c), jnp.int32)
  count = jnp.int32(0)
  step = jax.jit(functools.partial(attention_with_cache, chunk_size=c, impl=impl))
  outs, start = [], 0
  for n in pieces:
    part = slice(start, start + n)
    out, cache_k, cache_v, count, cache_seg = step(q[:, part], k[:, part], v[:, part], cache_k, cache_v, count,
                                                   segment_ids=seg[:, part], cache_segment_ids=cache_seg)
    outs.append(out)
    start += n
  assert start == q.shape[1]
  return jnp.concatenate(outs, axis=1)


@pytest.mark.parametrize("impl", ["xla", "pallas"])
@pytest.mark.parametrize("pieces", [[1] * L, [3, 1, 14, 17, 5]])
def test_streaming_with_segment_ids_equals_the_full_forward(impl, pieces):
  """Token by token (the one-token step) and in uneven pieces (short pieces, a piece longer than a chunk)."""
  q, k, v = _inputs(11)
  seg = jnp.asarray(SEGMENTS)
  want = np_attention(q, k, v, C, SEGMENTS)
  got = _stream(pieces, impl, C, q, k, v, seg)
  assert _rel(got, want) <= 1e-5


def test_cache_segment_ids_follow_the_cache_slots():
  """The returned cache ids are the ids of the tokens in the returned cache slots (same layout as cache_k)."""
  q, k, v = _inputs(12, l=21)
  seg = jnp.asarray(SEGMENTS[:, :21])
  c = 16
  zeros = lambda d: jnp.zeros((B, c, H, d), jnp.float32)
  cache_seg = jnp.full((B, c), -1, jnp.int32)
  _, ck, _, count, cseg = attention_with_cache(q[:, :9], k[:, :9], v[:, :9], zeros(DZ), zeros(DV), 0, c,
                                               segment_ids=seg[:, :9], cache_segment_ids=cache_seg)
  np.testing.assert_array_equal(np.asarray(cseg[:, :9]), SEGMENTS[:, :9])
  _, ck, _, count, cseg = attention_with_cache(q[:, 9:], k[:, 9:], v[:, 9:], ck, zeros(DV), count, c,
                                               segment_ids=seg[:, 9:], cache_segment_ids=cseg)
  assert int(count) == 5
  np.testing.assert_array_equal(np.asarray(cseg[:, :5]), SEGMENTS[:, 16:21])
  np.testing.assert_array_equal(np.asarray(ck[:, :5]), np.asarray(k[:, 16:21]))


def test_pallas_decode_with_segment_ids_equals_its_reference():
  """The decode kernel (queries crossing into the next chunk) against the explicit float64 mask."""
  rng = np.random.default_rng(13)
  c, count, t = 16, 11, 9
  frame = 2 * c
  q = jnp.asarray(rng.normal(size=(B, t, H, DZ)), jnp.float32)
  kf = jnp.asarray(rng.normal(size=(B, frame, H, DZ)), jnp.float32)
  vf = jnp.asarray(rng.normal(size=(B, frame, H, DV)), jnp.float32)
  kv_ids = np.zeros((B, frame), np.int32)
  kv_ids[:, :count + t] = SEGMENTS[:, :count + t]
  q_ids = kv_ids[:, count:count + t]
  got = chunked_attention_decode(q, kf, vf, count, c, q_segment_ids=jnp.asarray(q_ids),
                                 kv_segment_ids=jnp.asarray(kv_ids))
  qpos, kpos = count + np.arange(t), np.arange(frame)
  allowed = ((kpos[None] <= qpos[:, None]) & (kpos[None] // c == qpos[:, None] // c))[None] & (
      q_ids[:, :, None] == kv_ids[:, None, :])
  s = np.einsum("bqhd,bkhd->bhqk", np.asarray(q, np.float64), np.asarray(kf, np.float64))
  s = np.where(allowed[:, None], s, -np.inf)
  p = np.exp(s - s.max(-1, keepdims=True))
  want = np.einsum("bhqk,bkhd->bqhd", p / p.sum(-1, keepdims=True), np.asarray(vf, np.float64))
  assert _rel(got, want) <= 1e-5


# ------------------------------------------------------------------------------------------------ the model

_TINY = dict(num_layers=2, model_dim=32, z_dim=16, value_dim=32, ffn_hidden_dim=64, vocab_size=64, norm_num_groups=4,
             cema_ndim=4, num_heads=2, chunk_size=16, dtype="float32")


def _positions(segments: np.ndarray) -> np.ndarray:
  """Each token's index in its document (what the data pipeline gives the model), from document ids."""
  pos = np.zeros_like(segments)
  for t in range(1, segments.shape[1]):
    pos[:, t] = np.where(segments[:, t] == segments[:, t - 1], pos[:, t - 1] + 1, 0)
  return pos


@pytest.mark.parametrize("impl,scan_layers", [("xla", False), ("xla", True), ("pallas", False)])
def test_model_streams_documents_through_its_cache(impl, scan_layers):
  """MegalodonLM with document positions: a stream in uneven pieces (the cache carries the slots' document ids)
  gives the logits of one full forward, which differ from the forward without boundaries."""
  from flax import nnx  # pylint: disable=import-outside-toplevel
  from megalodon_jax.config import MegalodonConfig  # pylint: disable=import-outside-toplevel
  from megalodon_jax.model import MegalodonLM  # pylint: disable=import-outside-toplevel
  model = MegalodonLM(MegalodonConfig(**_TINY, attention_impl=impl, scan_layers=scan_layers), rngs=nnx.Rngs(0))
  model.eval()
  ids = jnp.asarray(np.random.default_rng(14).integers(0, 64, size=(B, L)), jnp.int32)
  positions = jnp.asarray(_positions(SEGMENTS))
  graphdef, state = nnx.split(model)
  # jitted: op by op, every op of the model was dispatched again for each piece length
  run = jax.jit(lambda s, ids, cache, pos: nnx.merge(graphdef, s)(ids, cache=cache, positions=pos))
  full = run(state, ids, None, positions)
  assert _rel(full, run(state, ids, None, None)) > 1e-3
  cache = model.init_cache(B)
  np.testing.assert_array_equal(np.asarray(cache.segment_ids), np.zeros((B, 16), np.int32))
  outs, start = [], 0
  for n in (1, 4, 17, 2, 16):
    logits, cache = run(state, ids[:, start:start + n], cache, positions[:, start:start + n])
    outs.append(logits)
    start += n
  assert start == L
  assert _rel(jnp.concatenate(outs, axis=1), full) <= 1e-5
  # The cached slots (positions 32..39) group into documents exactly as SEGMENTS does.
  cached = np.asarray(cache.segment_ids[:, :int(cache.count)])
  want = SEGMENTS[:, 32:L]
  np.testing.assert_array_equal(cached[:, :, None] == cached[:, None, :], want[:, :, None] == want[:, None, :])
