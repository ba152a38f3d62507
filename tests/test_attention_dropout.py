"""Attention dropout is the same whatever the kernel (ops/attention_dropout.py), and the Pallas attention takes any
chunk size when continuing a stream.

The XLA attention's DropKey masks are read back from its output and checked against the counter hash in NumPy
(tests/dropkey_reference.py) for the batched and the chunk-loop paths, the sequence-parallel path and the cached
paths; the XLA and Pallas (interpret mode) attentions then agree op by op and on a training loss of the model,
forward and gradient. Last, a model with attention_impl="pallas" and chunk sizes the decode kernel cannot tile
(8, 24) streams token by token like its full forward and generates like the XLA model.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import AxisType, PartitionSpec as P

from dropkey_reference import np_keep, np_seeds
from megalodon_jax.config import MegalodonConfig
from megalodon_jax.inference.generation import Generator
from megalodon_jax.inference.sampling import Sampler
from megalodon_jax.model import MegalodonLM
from megalodon_jax.ops.attention import attention_with_cache, chunked_causal_attention
from pallas_kernels.chunked_attention import decode_attention_reference, decode_supports_chunk_size

# XLA CPU backend optimisation level 0: the interpreted kernels compile twice as fast, same float32 numerics.
_FAST = {"xla_backend_optimization_level": 0}


def _run(fn, *args):
  return jax.jit(fn).lower(*args).compile(compiler_options=_FAST)(*args)


def _rel_err(got, want) -> float:
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  return float(np.max(np.abs(got - want)) / max(1.0, np.max(np.abs(want))))


# ------------------------------------------------------------------------------------------- masks read back

def _probe(b, l, h, c):
  """q = k = 0 (every logit equal) and v[j] = e_{j mod c}: DropKey output row i is then the uniform distribution
  over the kept keys of its chunk up to i, or over all of them when every one was dropped."""
  q = jnp.zeros((b, l, h, 4), jnp.float32)
  v = np.broadcast_to(np.eye(c, dtype=np.float32)[np.arange(l) % c][None, :, None, :], (b, l, h, c))
  return q, q, jnp.asarray(v)


def _expected_probe(keep_fn, b, l, h, c):
  """The probe's output (B, L, H, C) for keep_fn(b, h, i, js) -> kept flags of query i's causal keys js."""
  out = np.zeros((b, l, h, c))
  for bi in range(b):
    for hi in range(h):
      for i in range(l):
        start = (i // c) * c
        kept = keep_fn(bi, hi, i, np.arange(start, i + 1))
        row = kept if kept.any() else np.ones_like(kept)
        out[bi, i, hi, :i + 1 - start] = row / row.sum()
  return out


@pytest.mark.parametrize("chunk_loop", [False, True])
def test_xla_dropkey_masks_are_the_counter_hash(chunk_loop):
  """Batched and chunk-loop XLA paths: the mask of (b, h, query i, key j) is the hash of b·H + h, i and j (sequence
  positions), with the seeds drawn from the key; partial last chunk."""
  b, l, h, c, rate = 2, 20, 3, 8, 0.4
  key = jax.random.key(7)
  s0, s1 = np_seeds(key)
  fn = functools.partial(chunked_causal_attention, chunk_size=c, dropout_rate=rate, dropout_rng=key, drop_key=True,
                         chunk_loop=chunk_loop)
  got = np.asarray(_run(fn, *_probe(b, l, h, c)))
  want = _expected_probe(lambda bi, hi, i, js: np_keep((s0, s1), bi * h + hi, i, js, rate), b, l, h, c)
  np.testing.assert_allclose(got, want, atol=1e-6)


def test_sequence_parallel_xla_masks_are_the_kernels():
  """Length split over `sequence` (and batch, heads over data, tensor): each slice hashes its local positions with
  its index mixed into seed1, the global batch and head; the Pallas kernel under the same mesh agrees."""
  mesh = jax.make_mesh((2, 2, 2), ("data", "sequence", "tensor"), axis_types=(AxisType.Auto,) * 3)
  b, l, h, c, rate = 2, 32, 2, 8, 0.4
  key = jax.random.key(11)
  s0, s1 = np_seeds(key)
  half = l // 2

  def keep(bi, hi, i, js):
    seeds = (s0, (s1 + (i // half) * 0x9E3779B1) & 0xFFFFFFFF)
    return np_keep(seeds, bi * h + hi, i % half, js % half, rate)

  want = _expected_probe(keep, b, l, h, c)
  sharding = jax.NamedSharding(mesh, P("data", "sequence", "tensor"))
  outs = {}
  for impl in ("xla", "pallas"):
    fn = functools.partial(chunked_causal_attention, chunk_size=c, dropout_rate=rate, dropout_rng=key,
                           drop_key=True, impl=impl)
    with jax.set_mesh(mesh):
      outs[impl] = np.asarray(_run(fn, *(jax.device_put(x, sharding) for x in _probe(b, l, h, c))))
  np.testing.assert_allclose(outs["xla"], want, atol=1e-6)
  np.testing.assert_allclose(outs["pallas"], want, atol=1e-6)


@pytest.mark.parametrize("new", [1, 5])
def test_cached_xla_masks_hash_frame_positions(new):
  """Continuing a chunk of 16 that holds 13 tokens (5 new ones cross into the next chunk): the one-token step and
  the short path equal the kernel's decode reference, which hashes cache-frame positions."""
  rng = np.random.default_rng(new)
  b, h, d, c, count, rate = 2, 2, 8, 16, 13, 0.5
  cache_k, cache_v = (jnp.asarray(rng.normal(size=(b, c, h, d)), jnp.float32) for _ in range(2))
  q, k, v = (jnp.asarray(rng.normal(size=(b, new, h, d)), jnp.float32) for _ in range(3))
  key = jax.random.key(5)
  got = _run(lambda q, k, v: attention_with_cache(q, k, v, cache_k, cache_v, jnp.int32(count), c, dropout_rate=rate,
                                                  dropout_rng=key, drop_key=True)[0], q, k, v)
  frame = lambda cache, x: jnp.concatenate([cache, jnp.zeros_like(cache)], 1).at[:, count:count + new].set(x)
  seeds = jnp.asarray(np.asarray(np_seeds(key), np.uint32).view(np.int32))
  want = decode_attention_reference(q, frame(cache_k, k), frame(cache_v, v), count, c, dropout_rate=rate,
                                    seeds=seeds)
  plain = decode_attention_reference(q, frame(cache_k, k), frame(cache_v, v), count, c)
  assert _rel_err(got, want) <= 1e-6
  assert _rel_err(got, plain) > 1e-2  # the mask did drop something


# ------------------------------------------------------------------------------------------- XLA vs Pallas

def _value_and_grads(attend, cot, *args):
  def fn(*args):
    out, vjp = jax.vjp(attend, *args)
    return out, vjp(cot)
  return _run(fn, *args)


@pytest.mark.parametrize("chunk_loop", [False, True])
def test_xla_and_pallas_dropkey_agree_values_and_grads(chunk_loop):
  rng = np.random.default_rng(3)
  b, l, h, dz, dv, c = 2, 40, 2, 16, 24, 16
  q, k = (jnp.asarray(rng.normal(size=(b, l, h, dz)), jnp.float32) for _ in range(2))
  v = jnp.asarray(rng.normal(size=(b, l, h, dv)), jnp.float32)
  cot = jnp.asarray(rng.normal(size=v.shape), jnp.float32)
  key = jax.random.key(9)
  call = lambda impl, **kw: functools.partial(chunked_causal_attention, chunk_size=c, dropout_rate=0.3,
                                              dropout_rng=key, drop_key=True, impl=impl, **kw)
  out, grads = _value_and_grads(call("xla", chunk_loop=chunk_loop), cot, q, k, v)
  want, want_grads = _value_and_grads(call("pallas"), cot, q, k, v)
  assert _rel_err(out, want) <= 1e-5
  for g, w in zip(grads, want_grads):
    assert _rel_err(g, w) <= 1e-5
  plain = _run(functools.partial(chunked_causal_attention, chunk_size=c), q, k, v)
  assert _rel_err(out, plain) > 1e-2


@pytest.mark.parametrize("chunk_size", [8, 16])
def test_cached_xla_and_pallas_agree_with_dropout(chunk_size):
  """attention_with_cache: the kernel's decode (chunk 16) or its XLA stand-in (chunk 8) against the XLA path, for
  one token, a short piece and a piece longer than a chunk."""
  assert decode_supports_chunk_size(16) and not decode_supports_chunk_size(8)
  rng = np.random.default_rng(chunk_size)
  b, h, d, c, count = 1, 2, 8, chunk_size, chunk_size - 3
  cache_k, cache_v = (jnp.asarray(rng.normal(size=(b, c, h, d)), jnp.float32) for _ in range(2))
  key = jax.random.key(2)
  for new in (1, 5, c + 3):
    q, k, v = (jnp.asarray(rng.normal(size=(b, new, h, d)), jnp.float32) for _ in range(3))
    outs = [_run(lambda q, k, v, impl=impl: attention_with_cache(
        q, k, v, cache_k, cache_v, jnp.int32(count), c, dropout_rate=0.4, dropout_rng=key, drop_key=True,
        impl=impl), q, k, v) for impl in ("xla", "pallas")]
    for got, want in zip(outs[1], outs[0]):
      assert _rel_err(got, want) <= 1e-5, new


# ------------------------------------------------------------------------------------------- the model

_TINY = dict(num_layers=2, model_dim=32, z_dim=16, value_dim=32, ffn_hidden_dim=64, vocab_size=64, norm_num_groups=4,
             cema_ndim=4, num_heads=2, dtype="float32")


def _model(impl, **overrides):
  return MegalodonLM(MegalodonConfig(**{**_TINY, **overrides}, attention_impl=impl), rngs=nnx.Rngs(0))


def test_training_loss_and_grads_do_not_depend_on_attention_impl():
  """DropKey at rate 0.3, chunks of 16 (and a partial one): the same loss and gradients with "xla" and "pallas"."""
  ids = jnp.asarray(np.random.default_rng(0).integers(0, 64, (2, 41)), jnp.int32)

  def loss_and_grads(impl, train=True):
    model = _model(impl, chunk_size=16, efficient_attn="swift", attention_dropout=0.3)
    model.train() if train else model.eval()
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def loss_fn(p, rest):
      fresh = lambda tree: jax.tree.map(lambda x: x, tree)  # Variables of this trace level, which NNX may mutate
      logits = nnx.merge(graphdef, fresh(p), fresh(rest))(ids[:, :-1])
      return optax.softmax_cross_entropy_with_integer_labels(logits, ids[:, 1:]).mean()

    return _run(jax.value_and_grad(loss_fn), params, rest)

  loss, grads = loss_and_grads("xla")
  want_loss, want_grads = loss_and_grads("pallas")
  np.testing.assert_allclose(float(loss), float(want_loss), rtol=1e-5)
  for g, w in zip(jax.tree.leaves(grads), jax.tree.leaves(want_grads)):
    assert _rel_err(g, w) <= 1e-4
  assert abs(float(loss) - float(loss_and_grads("xla", train=False)[0])) > 1e-4  # dropout was on


@pytest.mark.parametrize("chunk_size", [8, 24])
def test_pallas_model_streams_and_generates_with_any_chunk_size(chunk_size):
  """Chunk sizes that are not multiples of 16: token-by-token streaming equals the full forward, and generation
  equals the XLA model's."""
  model = _model("pallas", chunk_size=chunk_size)
  model.eval()
  ids = jnp.asarray(np.random.default_rng(1).integers(0, 64, (2, 2 * chunk_size + 5)), jnp.int32)
  graphdef, state = nnx.split(model)
  full = _run(lambda st, x: nnx.merge(graphdef, st)(x), state, ids)
  step = jax.jit(lambda st, x, cache: nnx.merge(graphdef, st)(x, cache=cache))
  cache, outs = model.init_cache(ids.shape[0]), []
  for i in range(ids.shape[1]):
    logits, cache = step(state, ids[:, i:i + 1], cache)
    outs.append(logits)
  assert _rel_err(jnp.concatenate(outs, axis=1), full) <= 2e-5
  prompts = [[3, 1, 4, 1, 5], list(range(chunk_size + 3))]

  def generate(m):
    gen = Generator(m, prefill_piece=2 * chunk_size, block_size=4)
    return [c.tokens for c in gen.generate(prompts, max_new_tokens=6, sampler=Sampler(temperature=0.0))]

  xla = _model("xla", chunk_size=chunk_size)
  xla.eval()
  assert generate(model) == generate(xla)
