"""`scan_layers`: the blocks as one lax.scan give the unrolled model's logits, gradients and dropout masks, and the
traced program does not grow with depth (what keeps compile time flat)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from megalodon_jax import MegalodonConfig, MegalodonLM
from megalodon_jax.model_state import merge_model, split_model
from megalodon_jax.training import train_step as ts

BASE = dict(num_layers=3, model_dim=32, z_dim=16, value_dim=48, num_heads=2, ffn_hidden_dim=64, cema_ndim=4,
            chunk_size=8, vocab_size=50, norm_num_groups=4, rescale_nffn=True, swiglu=True)


def _ids(shape=(2, 20), seed=0):
  return jnp.asarray(np.random.default_rng(seed).integers(0, 50, shape), jnp.int32)


def _pair(**overrides):
  cfg = MegalodonConfig(**{**BASE, **overrides})
  return (MegalodonLM(cfg, rngs=nnx.Rngs(0)), MegalodonLM(cfg.replace(scan_layers=True), rngs=nnx.Rngs(0)))


def _loss_and_grads(model, ids):
  graphdef, params, buffers, rng_vars = split_model(model)

  def loss(p):
    m = merge_model(graphdef, p, buffers, rng_vars)
    total, count = ts.cross_entropy(m(ids[:, :-1]), ids[:, 1:])
    return total / count

  return jax.value_and_grad(loss)(params)


@pytest.mark.parametrize("remat", ["none", "dots_saveable"])
def test_logits_and_gradients_match_unrolled(remat):
  plain, scanned = _pair(remat=remat)
  ids = _ids()
  np.testing.assert_allclose(np.asarray(scanned(ids)), np.asarray(plain(ids)), rtol=0, atol=2e-5)
  loss_p, grads_p = _loss_and_grads(plain, ids)
  loss_s, grads_s = _loss_and_grads(scanned, ids)
  np.testing.assert_allclose(float(loss_s), float(loss_p), rtol=1e-6)
  flat_p, flat_s = dict(nnx.to_flat_state(grads_p)), dict(nnx.to_flat_state(grads_s))
  assert flat_p.keys() == flat_s.keys()
  for k in flat_p:
    gp, gs = np.asarray(flat_p[k][...]), np.asarray(flat_s[k][...])
    assert np.linalg.norm(gs - gp) <= 1e-4 * max(np.linalg.norm(gp), 1e-8), k


def test_dropout_masks_and_rng_counters_match_unrolled():
  plain, scanned = _pair(dropout=0.1, hidden_dropout=0.1, attention_dropout=0.1)
  plain.train()
  scanned.train()
  ids = _ids()
  for _ in range(2):  # the second call needs the per-block RNG counters written back after the scan
    np.testing.assert_allclose(np.asarray(scanned(ids)), np.asarray(plain(ids)), rtol=0, atol=2e-5)
  plain.eval()
  assert not np.allclose(np.asarray(plain(ids)), np.asarray(scanned(ids)), atol=1e-3)  # dropout was really on


def test_parameter_layout_is_unchanged():
  plain, scanned = _pair()
  a, b = nnx.state(plain, nnx.Param), nnx.state(scanned, nnx.Param)
  assert jax.tree.map(jnp.shape, a) == jax.tree.map(jnp.shape, b)


def _forward_equations(num_layers: int, scan: bool) -> int:
  cfg = MegalodonConfig(**{**BASE, "num_layers": num_layers, "scan_layers": scan})
  graphdef, state = nnx.split(nnx.eval_shape(lambda: MegalodonLM(cfg, rngs=nnx.Rngs(0))))
  jaxpr = jax.make_jaxpr(lambda s, ids: nnx.merge(graphdef, s)(ids))(state, jax.ShapeDtypeStruct((1, 16), jnp.int32))
  return len(jaxpr.jaxpr.eqns)


def test_traced_program_is_flat_in_depth():
  scanned = [_forward_equations(n, True) for n in (2, 8)]
  unrolled = [_forward_equations(n, False) for n in (2, 8)]
  # Stacking adds one small op per parameter per layer; the block itself is traced once.
  assert scanned[1] - scanned[0] < 0.2 * (unrolled[1] - unrolled[0])
  assert unrolled[1] > 3 * unrolled[0] * 0.8


def _stream(model, ids, pieces, positions=None):
  """Logits of `ids` fed through the cache in pieces of the given lengths, and the last cache."""
  graphdef, state = nnx.split(model)
  step = jax.jit(lambda s, x, c, p: nnx.merge(graphdef, s)(x, cache=c, positions=p))
  cache, out, start = model.init_cache(ids.shape[0]), [], 0
  for n in pieces:
    logits, cache = step(state, ids[:, start:start + n], cache,
                         None if positions is None else positions[:, start:start + n])
    out.append(logits)
    start += n
  return jnp.concatenate(out, axis=1), cache


@pytest.mark.parametrize("with_positions", [False, True])
def test_streaming_through_the_cache_matches_unrolled(with_positions):
  """The cache path scans the blocks too: pieces crossing chunk boundaries give the unrolled model's logits and
  the same caches (one stacked LayerCache, blocks on axis 1)."""
  plain, scanned = _pair()
  ids = _ids((2, 23), seed=3)
  positions = None
  if with_positions:  # a document starts at token 9 of row 0 and token 14 of row 1
    starts = np.array([[0, 9], [0, 14]])
    positions = jnp.asarray(np.stack([np.arange(23) - np.where(np.arange(23) >= s[1], s[1], 0) for s in starts]),
                            jnp.int32)
  pieces = (11, 1, 11)  # across the chunk boundaries at 8 and 16, and one decode step
  logits_p, cache_p = _stream(plain, ids, pieces, positions)
  logits_s, cache_s = _stream(scanned, ids, pieces, positions)
  np.testing.assert_allclose(np.asarray(logits_s), np.asarray(logits_p), rtol=0, atol=2e-5)
  assert cache_s.num_layers == cache_p.num_layers == 3
  for a, b in zip(jax.tree.leaves(cache_s), jax.tree.leaves(cache_p)):
    assert a.shape == b.shape and a.dtype == b.dtype
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0, atol=2e-5)


def _cache_equations(num_layers: int, scan: bool) -> int:
  cfg = MegalodonConfig(**{**BASE, "num_layers": num_layers, "scan_layers": scan})
  model = MegalodonLM(cfg, rngs=nnx.Rngs(0))
  graphdef, state = nnx.split(model)
  cache = model.init_cache(1)
  jaxpr = jax.make_jaxpr(lambda s, ids, c: nnx.merge(graphdef, s)(ids, cache=c))(
      state, jax.ShapeDtypeStruct((1, 4), jnp.int32), cache)
  return len(jaxpr.jaxpr.eqns)


def test_traced_cache_program_is_flat_in_depth():
  scanned = [_cache_equations(n, True) for n in (2, 8)]
  unrolled = [_cache_equations(n, False) for n in (2, 8)]
  assert scanned[1] - scanned[0] < 0.2 * (unrolled[1] - unrolled[0]), (scanned, unrolled)
