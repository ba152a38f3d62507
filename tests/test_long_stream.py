"""Constant memory over a million-token stream, and step counters that do not wrap (issue 5, "constant memory")."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from megalodon_jax.config import MegalodonConfig
from megalodon_jax.model import MegalodonLM
from megalodon_jax.ops.timestep_norm import NormState, split_count, total_count

# A really tiny model: the point is the stream length, not the model.
CFG = MegalodonConfig(num_layers=1, model_dim=16, z_dim=8, value_dim=16, ffn_hidden_dim=32, num_heads=1,
                      chunk_size=64, vocab_size=256, norm_num_groups=4, cema_ndim=2, dtype="float32")
PIECE = 1024  # tokens per model call
PIECES_PER_CALL = 64  # model calls per jitted call (a lax.scan): 65,536 tokens
CALLS = 16
TOTAL = PIECE * (1 + PIECES_PER_CALL * CALLS)  # 1,049,600 tokens


def _cache_bytes(cache) -> int:
  return sum(int(np.asarray(leaf).nbytes) for leaf in jax.tree.leaves(cache))


def _expected_cache_bytes(c: MegalodonConfig, batch: int) -> int:
  """Bytes of the cache by its definition (docs/streaming.md#unlimited-context): one chunk of K and V, the CEMA
  state, norm statistics; once for the model: the chunk's document ids."""
  kv = batch * c.chunk_size * c.num_heads * (c.z_head_dim + c.v_head_dim) * 4
  cema = batch * c.model_dim * c.cema_ndim * 2 * 4
  norm = batch * (2 * c.norm_num_groups * 4 + 2 * 4)  # mean, var float32; the count's two int32 words
  segment_ids = batch * c.chunk_size * 4  # int32, shared by every layer
  # + the final norm, the chunk position and the cached slots' document ids
  return c.num_layers * (kv + cema + norm) + norm + 4 + segment_ids


def _nll(logits, ids):
  """Summed NLL of the next-token predictions inside a piece: logits (B, P, V), ids (B, P)."""
  picked = jnp.take_along_axis(logits[:, :-1], ids[:, 1:, None], -1)[..., 0]
  return jnp.sum(jax.nn.logsumexp(logits[:, :-1], -1) - picked)


# Module-level and keyed on the (hashable) graphdef, so both tests share the compiled programs.
@functools.partial(jax.jit, static_argnums=0)
def _step(graphdef, state, cache, ids):
  """ids: (1, PIECE) -> (summed NLL, all logits finite, cache)."""
  logits, cache = nnx.merge(graphdef, state)(ids, cache=cache)
  return _nll(logits, ids), jnp.all(jnp.isfinite(logits)), cache


@functools.partial(jax.jit, static_argnums=0)
def _scan(graphdef, state, cache, pieces):
  """pieces: (K, 1, PIECE), fed in order in one call -> ((K,) NLL sums, all finite, cache)."""
  model = nnx.merge(graphdef, state)

  def body(c, ids):
    logits, c = model(ids, cache=c)
    return c, (_nll(logits, ids), jnp.all(jnp.isfinite(logits)))

  cache, (nll, finite) = jax.lax.scan(body, cache, pieces)
  return nll, jnp.all(finite), cache


def _stream_tokens(rng, start, size):
  """A byte stream with structure (repeated text, 5% noise)."""
  text = np.frombuffer(b"Megalodon streams without a context limit at constant memory. " * 64, np.uint8)
  ids = text[(start + np.arange(size)) % text.size].astype(np.int32)
  return np.where(rng.uniform(size=size) < 0.05, rng.integers(0, 256, size), ids).astype(np.int32)


def test_million_token_stream_has_constant_cache_and_finite_outputs():
  model = MegalodonLM(CFG, rngs=nnx.Rngs(0))
  graphdef, state = nnx.split(model)
  rng = np.random.default_rng(0)
  cache = model.init_cache(1)
  start_bytes = _cache_bytes(cache)
  assert start_bytes == _expected_cache_bytes(CFG, 1)
  nll, finite, cache = _step(graphdef, state, cache, jnp.asarray(_stream_tokens(rng, 0, PIECE)[None]))
  assert bool(finite)
  consumed, losses = PIECE, [float(nll) / (PIECE - 1)]
  bytes_at_1k = _cache_bytes(cache)
  for _ in range(CALLS):
    pieces = _stream_tokens(rng, consumed, PIECES_PER_CALL * PIECE).reshape(PIECES_PER_CALL, 1, PIECE)
    nll, finite, cache = _scan(graphdef, state, cache, jnp.asarray(pieces))
    consumed += PIECES_PER_CALL * PIECE
    assert bool(finite), f"non-finite logits before {consumed} tokens"
    losses.extend(np.asarray(nll) / (PIECE - 1))
  assert consumed == TOTAL >= 10**6
  assert bytes_at_1k == _cache_bytes(cache) == start_bytes
  # An untrained model: per-token losses near log(256), finite everywhere.
  assert np.all(np.isfinite(losses)) and 0.5 * np.log(256) < np.mean(losses) < 2 * np.log(256), np.mean(losses)
  for norm in [cache.layer(i).norm for i in range(cache.num_layers)] + [cache.final_norm]:
    assert int(total_count(norm)[0]) == TOTAL
    assert np.all(np.isfinite(np.asarray(norm.mean))) and np.all(np.asarray(norm.var) > 0)
  assert int(cache.count) == TOTAL % CFG.chunk_size
  assert np.all(np.isfinite(np.asarray(cache.layer(0).cema)))


def test_norm_counts_continue_past_int32_inside_the_model():
  """A stream that has already seen 2^31 - 3 steps (a plain int32 would wrap in the next call) keeps exact counts."""
  model = MegalodonLM(CFG, rngs=nnx.Rngs(0))
  graphdef, state = nnx.split(model)
  ids = _stream_tokens(np.random.default_rng(1), 0, 2 * PIECE).reshape(2, 1, PIECE)
  _, _, fresh = _step(graphdef, state, model.init_cache(1), jnp.asarray(ids[0]))
  lo, hi = split_count(2**31 - 3, 1)

  def far(norm: NormState) -> NormState:  # the same statistics, as if after 2^31 - 3 steps
    return norm._replace(count=jnp.full_like(norm.count, lo[0]), count_hi=jnp.full_like(norm.count_hi, hi[0]))

  cache = fresh._replace(layers=fresh.layers._replace(norm=far(fresh.layers.norm)),
                         final_norm=far(fresh.final_norm))
  _, finite, cache = _step(graphdef, state, cache, jnp.asarray(ids[1]))
  assert bool(finite)
  for norm in [cache.layer(i).norm for i in range(cache.num_layers)] + [cache.final_norm]:
    assert int(total_count(norm)[0]) == 2**31 - 3 + PIECE
