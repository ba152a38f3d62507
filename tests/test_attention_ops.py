"""Attention ops (docs/model.md#attention) against independent float64 NumPy references: q/k normalisation,
interleaved RoPE, block-diagonal causal softmax attention, streaming with a KV cache, attention dropout and
gradients."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from megalodon_jax.ops.attention import attention_with_cache, chunked_causal_attention, normalized_qk, rope

EPS = 1e-5


# ---------------------------------------------------------------------------------------------------------------
# Independent references (float64 NumPy, from docs/model.md#attention).


def ref_normalized_qk(z, gamma, beta, num_heads, eps=EPS):
  """docs/model.md#attention step 5 via the identity RMSNorm(z)/√dz = z / sqrt(‖z‖² + dz·eps), per head."""
  z = np.asarray(z, np.float64)
  b, l, zdim = z.shape
  dz = zdim // num_heads
  zh = z.reshape(b, l, num_heads, dz)
  zn = zh / np.sqrt(np.sum(np.square(zh), -1, keepdims=True) + dz * eps)
  g = np.asarray(gamma, np.float64).reshape(2, num_heads, dz)
  bt = np.asarray(beta, np.float64).reshape(2, num_heads, dz)
  return zn * (1.0 + g[0]) + bt[0], zn * (1.0 + g[1]) + bt[1]


def ref_rope(x, inv_freq, positions):
  """Interleaved pairs (2i, 2i+1) rotated by the 2×2 rotation matrix of angle pos·inv_freq_i."""
  x = np.asarray(x, np.float64)
  ang = np.asarray(positions, np.float64)[:, None] * np.asarray(inv_freq, np.float64)[None, :]  # (T, d/2)
  c = np.cos(ang)[None, :, None, :]
  s = np.sin(ang)[None, :, None, :]
  out = np.empty_like(x)
  out[..., 0::2] = c * x[..., 0::2] - s * x[..., 1::2]
  out[..., 1::2] = s * x[..., 0::2] + c * x[..., 1::2]
  return out


def ref_rope_complex(x, inv_freq, positions):
  """The same rotation as complex multiplication: (x_{2i} + i·x_{2i+1}) · exp(i·pos·inv_freq_i)."""
  x = np.asarray(x, np.float64)
  xc = x[..., 0::2] + 1j * x[..., 1::2]
  ang = np.asarray(positions, np.float64)[:, None] * np.asarray(inv_freq, np.float64)[None, :]
  rc = xc * np.exp(1j * ang)[None, :, None, :]
  return np.stack([rc.real, rc.imag], -1).reshape(x.shape)


def ref_allowed(l, c):
  """(L, L) bool: key j visible to query i iff same chunk of C and j ≤ i."""
  i = np.arange(l)[:, None]
  j = np.arange(l)[None, :]
  return (j <= i) & (i // c == j // c)


def ref_probs(q, k, c):
  """(B, H, L, L) softmax probabilities of unscaled logits under the block-diagonal causal mask."""
  q = np.asarray(q, np.float64)
  k = np.asarray(k, np.float64)
  s = np.einsum("bqhd,bkhd->bhqk", q, k)
  allowed = ref_allowed(q.shape[1], c)
  s = np.where(allowed, s, -np.inf)
  s = s - s.max(-1, keepdims=True)
  p = np.exp(s)
  return p / p.sum(-1, keepdims=True)


def ref_attention(q, k, v, c):
  return np.einsum("bhqk,bkhd->bqhd", ref_probs(q, k, c), np.asarray(v, np.float64))


def inv_freq_for(dz, base=10000.0):
  return (base ** (-np.arange(0, dz, 2, dtype=np.float64) / dz)).astype(np.float32)


def _rand(rng, *shape, scale=1.0):
  return (rng.normal(size=shape) * scale).astype(np.float32)


# ---------------------------------------------------------------------------------------------------------------
# normalized_qk


@pytest.mark.parametrize("b,l,h,dz", [(1, 1, 1, 4), (2, 5, 2, 8), (1, 7, 4, 16)])
def test_normalized_qk(b, l, h, dz):
  rng = np.random.default_rng(b + l + h + dz)
  z = _rand(rng, b, l, h * dz, scale=3.0)
  gamma = _rand(rng, 2, h * dz, scale=0.5)
  beta = _rand(rng, 2, h * dz, scale=0.5)
  q, k = jax.jit(normalized_qk, static_argnums=(3, 4))(jnp.asarray(z), jnp.asarray(gamma), jnp.asarray(beta), h, EPS)
  assert q.shape == k.shape == (b, l, h, dz) and q.dtype == k.dtype == jnp.float32
  rq, rk = ref_normalized_qk(z, gamma, beta, h)
  np.testing.assert_allclose(np.asarray(q), rq, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(np.asarray(k), rk, rtol=1e-5, atol=1e-6)


def test_normalized_qk_default_params_are_unit_vectors_over_sqrt_dz():
  """gamma = beta = 0: q = k = z_head / ‖z_head‖ per head (up to eps), i.e. RMS 1/√dz."""
  rng = np.random.default_rng(1)
  h, dz = 3, 8
  z = _rand(rng, 2, 4, h * dz, scale=10.0)
  zeros = jnp.zeros((2, h * dz))
  q, k = normalized_qk(jnp.asarray(z), zeros, zeros, h, EPS)
  norms = np.linalg.norm(np.asarray(q, np.float64), axis=-1)
  np.testing.assert_allclose(norms, 1.0, rtol=1e-5)
  np.testing.assert_array_equal(np.asarray(q), np.asarray(k))
  zh = z.reshape(2, 4, h, dz).astype(np.float64)
  np.testing.assert_allclose(np.asarray(q), zh / np.linalg.norm(zh, axis=-1, keepdims=True), rtol=1e-5, atol=1e-7)


# ---------------------------------------------------------------------------------------------------------------
# rope


def test_rope_references_agree():
  rng = np.random.default_rng(2)
  x = rng.normal(size=(2, 6, 3, 8))
  f = inv_freq_for(8)
  pos = np.array([0, 1, 5, 17, 100, 3])
  np.testing.assert_allclose(ref_rope(x, f, pos), ref_rope_complex(x, f, pos), rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize("max_pos", [16, 4096])
def test_rope(max_pos):
  rng = np.random.default_rng(max_pos)
  b, t, h, d = 2, 9, 3, 16
  x = _rand(rng, b, t, h, d)
  f = inv_freq_for(d)
  pos = np.sort(rng.integers(0, max_pos, size=t)).astype(np.int32)
  pos[0] = 0
  out = np.asarray(jax.jit(rope)(jnp.asarray(x), jnp.asarray(f), jnp.asarray(pos)))
  assert out.shape == x.shape
  # The angle pos·f is formed in float32: its rounding (≈ pos·2⁻²⁴ rad) bounds the agreement.
  tol = 2e-6 + 4 * max_pos * 2.0**-24
  np.testing.assert_allclose(out, ref_rope(x, f, pos), rtol=0, atol=tol * np.abs(x).max())
  np.testing.assert_allclose(out, ref_rope_complex(x, f, pos), rtol=0, atol=tol * np.abs(x).max())
  # Position 0 is the identity; rotations preserve each pair's norm.
  np.testing.assert_allclose(out[:, 0], x[:, 0], rtol=1e-6, atol=1e-7)
  pair_norm = lambda a: np.hypot(a[..., 0::2].astype(np.float64), a[..., 1::2].astype(np.float64))
  np.testing.assert_allclose(pair_norm(out), pair_norm(x), rtol=1e-5)


def test_rope_bf16_rotates_in_float32():
  rng = np.random.default_rng(4)
  x = jnp.asarray(_rand(rng, 1, 5, 2, 8)).astype(jnp.bfloat16)
  f = inv_freq_for(8)
  pos = np.arange(5, dtype=np.int32)
  out = rope(x, jnp.asarray(f), jnp.asarray(pos))
  assert out.dtype == jnp.bfloat16
  want = ref_rope(np.asarray(x.astype(jnp.float32)), f, pos)
  # Only the final cast to bf16 rounds: within half a bf16 ulp (2⁻⁹ relative) plus float32 noise.
  np.testing.assert_allclose(np.asarray(out.astype(jnp.float32)), want, rtol=2.0**-8, atol=1e-6)


# ---------------------------------------------------------------------------------------------------------------
# chunked_causal_attention


@pytest.mark.parametrize("chunk_loop", [False, True])
@pytest.mark.parametrize("l,c", [(12, 4), (13, 4), (3, 8), (8, 8), (1, 4), (10, 3), (17, 16)])
def test_chunked_causal_attention(l, c, chunk_loop):
  """Both XLA layouts, all chunks in one einsum and one chunk at a time (the TPU/GPU default)."""
  rng = np.random.default_rng(l * 31 + c)
  b, h, dz, dv = 2, 3, 8, 5
  q = _rand(rng, b, l, h, dz)
  k = _rand(rng, b, l, h, dz)
  v = _rand(rng, b, l, h, dv)
  f = jax.jit(functools.partial(chunked_causal_attention, chunk_loop=chunk_loop), static_argnums=3)
  out = np.asarray(f(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), c))
  assert out.shape == (b, l, h, dv)
  np.testing.assert_allclose(out, ref_attention(q, k, v, c), rtol=1e-5, atol=1e-5)


def test_chunk_loop_gradients_equal_batched():
  """The rematerialised chunk loop differentiates to the batched einsum's gradients (float32)."""
  rng = np.random.default_rng(7)
  b, l, h, dz, dv, c = 2, 20, 2, 8, 6, 4
  q, k, v = (jnp.asarray(_rand(rng, b, l, h, d)) for d in (dz, dz, dv))
  w = jnp.asarray(_rand(rng, b, l, h, dv))

  def loss(loop, q, k, v):
    return jnp.sum(chunked_causal_attention(q, k, v, c, chunk_loop=loop) * w)

  g_loop = jax.grad(functools.partial(loss, True), argnums=(0, 1, 2))(q, k, v)
  g_batch = jax.grad(functools.partial(loss, False), argnums=(0, 1, 2))(q, k, v)
  for a, e in zip(g_loop, g_batch):
    np.testing.assert_allclose(np.asarray(a), np.asarray(e), rtol=1e-5, atol=1e-6)


def test_chunked_attention_logits_are_unscaled():
  """With one query and two keys, the weight ratio is exp(q·k1 − q·k2) exactly (no 1/√d temperature)."""
  q = np.zeros((1, 2, 1, 4), np.float32)
  k = np.zeros((1, 2, 1, 4), np.float32)
  v = np.array([1.0, 0.0], np.float32).reshape(1, 2, 1, 1)
  q[0, 1, 0] = [1.0, 0.0, 0.0, 0.0]
  k[0, 0, 0] = [2.0, 0.0, 0.0, 0.0]  # logit 2 vs 0 for key 1
  out = np.asarray(chunked_causal_attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), 4))
  np.testing.assert_allclose(out[0, 1, 0, 0], np.exp(2.0) / (np.exp(2.0) + 1.0), rtol=1e-6)
  np.testing.assert_allclose(out[0, 0, 0, 0], 1.0, rtol=1e-6)  # first token sees only itself


@pytest.mark.parametrize("l,c", [(24, 8), (21, 8), (6, 8)])
def test_pipeline_with_chunk_local_rope(l, c):
  """normalized_qk → RoPE with positions i mod C → chunked attention vs the float64 pipeline run chunk by chunk
  with positions 0..C−1. Attention never crosses a chunk, so absolute positions give the same result up to the
  float32 rounding of larger angles."""
  rng = np.random.default_rng(l + c)
  b, h, dz, dv = 2, 2, 8, 4
  z = _rand(rng, b, l, h * dz, scale=2.0)
  gamma = _rand(rng, 2, h * dz, scale=0.5)
  beta = _rand(rng, 2, h * dz, scale=0.3)
  v = _rand(rng, b, l, h, dv)
  f = inv_freq_for(dz)

  @functools.partial(jax.jit, static_argnames="absolute")
  def run(z, gamma, beta, v, absolute=False):
    q, k = normalized_qk(z, gamma, beta, h, EPS)
    pos = jnp.arange(l) if absolute else jnp.arange(l) % c
    q, k = rope(q, jnp.asarray(f), pos), rope(k, jnp.asarray(f), pos)
    return chunked_causal_attention(q, k, v, c)

  args = [jnp.asarray(a) for a in (z, gamma, beta, v)]
  out = np.asarray(run(*args))
  rq, rk = ref_normalized_qk(z, gamma, beta, h)
  want = np.zeros((b, l, h, dv))
  for s in range(0, l, c):
    e = min(s + c, l)
    pos = np.arange(e - s)
    want[:, s:e] = ref_attention(ref_rope(rq[:, s:e], f, pos), ref_rope(rk[:, s:e], f, pos), v[:, s:e], c)
  np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(np.asarray(run(*args, absolute=True)), want, rtol=1e-4, atol=1e-4)


def test_chunked_attention_gradients_match_finite_differences():
  rng = np.random.default_rng(9)
  b, l, h, dz, dv, c = 1, 5, 2, 4, 3, 2  # two full chunks and a partial one
  q, k, v = rng.normal(size=(b, l, h, dz)), rng.normal(size=(b, l, h, dz)), rng.normal(size=(b, l, h, dv))
  cot = rng.normal(size=(b, l, h, dv))

  def jax_loss(q, k, v):
    return jnp.sum(cot.astype(np.float32) * chunked_causal_attention(q, k, v, c))

  grads = jax.jit(jax.grad(jax_loss, argnums=(0, 1, 2)))(*(jnp.asarray(a, jnp.float32) for a in (q, k, v)))
  hstep = 1e-6
  for idx, (name, arr) in enumerate(zip("qkv", (q, k, v))):
    fd = np.zeros_like(arr)
    for pos in np.ndindex(arr.shape):
      args = [q, k, v]
      plus, minus = arr.copy(), arr.copy()
      plus[pos] += hstep
      minus[pos] -= hstep
      args[idx] = plus
      lp = np.sum(cot * ref_attention(*args, c))
      args[idx] = minus
      lm = np.sum(cot * ref_attention(*args, c))
      fd[pos] = (lp - lm) / (2 * hstep)
    got = np.asarray(grads[idx], np.float64)
    scale = np.abs(fd).max()
    np.testing.assert_allclose(got, fd, rtol=1e-4, atol=1e-4 * scale, err_msg=f"grad wrt {name}")
  # The first query of every chunk sees only itself, so its q gets no gradient; a key is invisible to other chunks.
  np.testing.assert_allclose(np.asarray(grads[0])[:, [0, 2, 4]], 0.0, atol=1e-7)


# ---------------------------------------------------------------------------------------------------------------
# attention_with_cache: streaming in pieces equals the full-sequence reference.

C = 8
L_STREAM = 40  # five chunks
SCHEDULES = {
    "one_token": [1] * L_STREAM,
    "odd": [3, 5, 7, 9, 11, 5],
    "whole_chunks": [C] * (L_STREAM // C),
    "long_mid_chunk": [3, 19, 1, 17],  # a 19-token piece from offset 3 spans > 2 chunks; 17 starts at count 7
    "chunk_sized_mid_chunk": [5, 8, 8, 6, 13],
}


def _stream_data(seed):
  rng = np.random.default_rng(seed)
  b, h, dz, dv = 2, 2, 8, 3
  f = inv_freq_for(dz)
  pos = np.arange(L_STREAM) % C
  q = ref_rope(rng.normal(size=(b, L_STREAM, h, dz)), f, pos).astype(np.float32)
  k = ref_rope(rng.normal(size=(b, L_STREAM, h, dz)), f, pos).astype(np.float32)
  v = _rand(rng, b, L_STREAM, h, dv)
  return q, k, v


def _stream(fn, q, k, v, schedule):
  b, _, h, dz = q.shape
  cache_k = jnp.zeros((b, C, h, dz), jnp.float32)
  cache_v = jnp.zeros((b, C, h, v.shape[-1]), jnp.float32)
  count = jnp.asarray(0, jnp.int32)
  outs, s = [], 0
  for n in schedule:
    out, cache_k, cache_v, count = fn(jnp.asarray(q[:, s:s + n]), jnp.asarray(k[:, s:s + n]),
                                      jnp.asarray(v[:, s:s + n]), cache_k, cache_v, count)
    s += n
    assert int(count) == s % C
    # The cache holds exactly the current chunk's tokens so far.
    np.testing.assert_array_equal(np.asarray(cache_k)[:, :s % C], k[:, s - s % C:s])
    np.testing.assert_array_equal(np.asarray(cache_v)[:, :s % C], v[:, s - s % C:s])
    outs.append(np.asarray(out))
  assert s == q.shape[1]
  return np.concatenate(outs, 1)


_cached_jit = jax.jit(attention_with_cache, static_argnames=("chunk_size", "dropout_rate", "drop_key"))


@pytest.mark.parametrize("name", ["one_token", "odd", "whole_chunks", "long_mid_chunk", "chunk_sized_mid_chunk"])
def test_attention_with_cache_streaming_jit(name):
  """Under jit with count traced: one compilation per piece length, whatever the count."""
  q, k, v = _stream_data(0)
  fn = lambda *a: _cached_jit(*a, chunk_size=C)
  out = _stream(fn, q, k, v, SCHEDULES[name])
  np.testing.assert_allclose(out, ref_attention(q, k, v, C), rtol=1e-5, atol=1e-5)


def test_attention_with_cache_streaming_eager():
  """Eager (count concrete); this schedule takes both the short-piece and the long-piece branch."""
  q, k, v = _stream_data(1)
  fn = lambda *a: attention_with_cache(*a, C)
  out = _stream(fn, q, k, v, SCHEDULES["long_mid_chunk"])
  np.testing.assert_allclose(out, ref_attention(q, k, v, C), rtol=1e-5, atol=1e-5)


def test_attention_with_cache_matches_chunked_attention_from_empty_cache():
  q, k, v = _stream_data(2)
  b, _, h, dz = q.shape
  out, _, _, count = _cached_jit(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), jnp.zeros((b, C, h, dz)),
                                 jnp.zeros((b, C, h, v.shape[-1])), 0, chunk_size=C)
  assert int(count) == 0
  full = chunked_causal_attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), C)
  np.testing.assert_allclose(np.asarray(out), np.asarray(full), rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------------------------------------------------------
# Attention dropout.


def _one_hot_values(b, l, h, c):
  """v[j] = e_{j mod C}: the output row of query i is then its probability row over its own chunk."""
  eye = np.eye(c, dtype=np.float32)[np.arange(l) % c]  # (L, C)
  return np.broadcast_to(eye[None, :, None, :], (b, l, h, c)).copy()


def _probs_from_output(out, l, c):
  """(B, H, L, L) probabilities recovered from the one-hot-value output (zero outside a query's chunk)."""
  b, _, h, _ = out.shape
  p = np.zeros((b, h, l, l))
  for i in range(l):
    s = (i // c) * c
    e = min(s + c, l)
    p[:, :, i, s:e] = np.asarray(out[:, i, :, :e - s], np.float64)
  return p


@pytest.mark.parametrize("drop_key", [False, True])
def test_dropout_rate_zero_is_exact_noop(drop_key):
  q, k, v = _stream_data(3)
  rng = jax.random.PRNGKey(0)
  base = chunked_causal_attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), C)
  got = chunked_causal_attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), C, dropout_rate=0.0,
                                 dropout_rng=rng, drop_key=drop_key)
  np.testing.assert_array_equal(np.asarray(got), np.asarray(base))
  b, _, h, dz = q.shape
  args = (jnp.asarray(q[:, :5]), jnp.asarray(k[:, :5]), jnp.asarray(v[:, :5]), jnp.zeros((b, C, h, dz)),
          jnp.zeros((b, C, h, v.shape[-1])), 3)
  base_c = attention_with_cache(*args, C)[0]
  got_c = attention_with_cache(*args, C, dropout_rate=0.0, dropout_rng=rng, drop_key=drop_key)[0]
  np.testing.assert_array_equal(np.asarray(got_c), np.asarray(base_c))


def test_dropkey_high_rate_is_finite_convex_combination():
  rng = np.random.default_rng(4)
  b, l, h, dz, dv, c = 2, 37, 3, 8, 6, 16
  q = _rand(rng, b, l, h, dz, scale=2.0)
  k = _rand(rng, b, l, h, dz, scale=2.0)
  v = _rand(rng, b, l, h, dv)
  allowed = ref_allowed(l, c)  # (Lq, Lk)
  vv = np.moveaxis(v, 1, 0)[None]  # (1, Lk, B, H, dv)
  masked = np.where(allowed[:, :, None, None, None], vv, np.nan)
  lo = np.moveaxis(np.nanmin(masked, axis=1), 0, 1)  # (B, Lq, H, dv)
  hi = np.moveaxis(np.nanmax(masked, axis=1), 0, 1)
  f = jax.jit(chunked_causal_attention, static_argnames=("chunk_size", "dropout_rate", "drop_key"))
  for seed in range(3):
    out = np.asarray(f(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), chunk_size=c, dropout_rate=0.9,
                       dropout_rng=jax.random.PRNGKey(seed), drop_key=True))
    assert np.isfinite(out).all()
    assert np.all(out >= lo - 1e-5) and np.all(out <= hi + 1e-5)
  # Same through the cached path (frame keys beyond the real ones must never leak in).
  cache_k = jnp.asarray(_rand(rng, b, c, h, dz))
  cache_v = jnp.asarray(_rand(rng, b, c, h, dv))
  for n in (1, 20):
    out, *_ = _cached_jit(jnp.asarray(q[:, :n]), jnp.asarray(k[:, :n]), jnp.asarray(v[:, :n]), cache_k, cache_v, 4,
                          chunk_size=c, dropout_rate=0.9, dropout_rng=jax.random.PRNGKey(n), drop_key=True)
    assert np.isfinite(np.asarray(out)).all()


def test_dropkey_renormalises_over_kept_keys():
  """DropKey: each row is the softmax over the keys that survived (no 1/(1−p) rescale); a fraction ≈ p dropped."""
  rng = np.random.default_rng(5)
  b, l, h, dz, c, p = 2, 64, 4, 8, 32, 0.5
  q = _rand(rng, b, l, h, dz, scale=0.5)  # small logits: no surviving probability underflows to 0
  k = _rand(rng, b, l, h, dz, scale=0.5)
  v = _one_hot_values(b, l, h, c)
  out = np.asarray(chunked_causal_attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), c, dropout_rate=p,
                                            dropout_rng=jax.random.PRNGKey(1), drop_key=True))
  got = _probs_from_output(out, l, c)
  allowed = ref_allowed(l, c)
  s = np.einsum("bqhd,bkhd->bhqk", q.astype(np.float64), k.astype(np.float64))
  kept = (got > 0) & allowed
  all_dropped_or_kept = kept.sum(-1) == allowed.sum(-1)
  want = np.where(kept, np.exp(s), 0.0)
  want = want / want.sum(-1, keepdims=True)
  uniform = np.where(allowed, 1.0 / allowed.sum(-1, keepdims=True), 0.0)
  row_ok = np.all(np.abs(got - want) < 1e-5, -1)
  # A row that looks fully kept may instead have had every key dropped: then it is uniform over its keys.
  row_ok |= all_dropped_or_kept & np.all(np.abs(got - uniform) < 1e-5, -1)
  assert row_ok.all()
  frac = 1.0 - kept.sum() / (allowed.sum() * b * h)
  assert abs(frac - p) < 0.05, frac  # slightly below p: rows that lost every key fall back to uniform


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_standard_dropout_drops_probabilities(p):
  """Post-softmax dropout: each probability is either 0 or P/(1−p), with ≈ a fraction p zeroed."""
  rng = np.random.default_rng(6)
  b, l, h, dz, c = 4, 128, 4, 8, 64
  q = _rand(rng, b, l, h, dz, scale=0.7)
  k = _rand(rng, b, l, h, dz, scale=0.7)
  v = _one_hot_values(b, l, h, c)
  out = np.asarray(chunked_causal_attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), c, dropout_rate=p,
                                            dropout_rng=jax.random.PRNGKey(2), drop_key=False))
  got = _probs_from_output(out, l, c)
  ref = ref_probs(q, k, c)
  allowed = np.broadcast_to(ref_allowed(l, c), got.shape)
  zero = (got == 0) & allowed
  np.testing.assert_allclose(got[allowed & ~zero], ref[allowed & ~zero] / (1 - p), rtol=1e-5, atol=1e-7)
  frac = zero.sum() / allowed.sum()
  n = allowed.sum()
  assert abs(frac - p) < 6 * np.sqrt(p * (1 - p) / n) + 1e-3, (frac, n)
  assert not np.any(got[~allowed])
