"""The model against the official PyTorch Megalodon's own outputs (tests/fixtures/official)."""

from __future__ import annotations


import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import fixtures
from megalodon_jax import MegalodonConfig
from megalodon_jax.convert import from_official_state_dict

TOL = 2e-5  # max abs error on logits, float32 with matmul_precision="highest" (issue #2)
IMPLS = ("fft", "associative_scan", "sequential", "chunked")


def _model(fx, **execution):
  execution = {"matmul_precision": "highest", **execution}  # full float32 products (TPU: not bf16 passes)
  return from_official_state_dict(fx.state_dict, MegalodonConfig.from_official(fx.conf, **execution))


@nnx.jit
def _forward(model, ids):
  return model(ids)


@nnx.jit
def _stream_step(model, ids, cache):
  return model(ids, cache=cache)


def _max_err(a, b):
  return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("name", fixtures.CASES)
def test_full_forward_matches_official_logits(name, impl):
  fx = fixtures.cached(name)
  logits = _forward(_model(fx, cema_impl=impl), jnp.asarray(fx.input_ids))
  assert logits.dtype == jnp.float32 and logits.shape == fx.logits.shape
  err = _max_err(logits, fx.logits)
  assert err <= TOL, f"{name}/{impl}: max abs error {err:.3g} > {TOL}"


@pytest.mark.parametrize("name", fixtures.CASES)
def test_layer0_intermediates_match_official(name):
  fx = fixtures.cached(name)
  model = _model(fx)
  with jax.default_matmul_precision(model.config.matmul_precision):  # the layers are called outside the model
    x = model.embed(jnp.asarray(fx.input_ids))
    if model.config.scale_emb:
      x = x * np.sqrt(model.config.model_dim)
    layer = model.layers[0]
    xn, _ = layer.mega.timenorm(x)
    c, _ = layer.mega.cema(xn)
    y, _ = layer.mega(x, model.rope_freqs[...])
    out, _ = layer(x, model.rope_freqs[...])
  got = {"timenorm_out": xn, "cema_out": jnp.swapaxes(c, 1, 2), "attention_block_out": y, "block_out": out}
  for key, value in got.items():
    err = _max_err(value, fx.debug[key])
    assert err <= TOL, f"{name}: debug.layer0.{key} max abs error {err:.3g}"


def _stream(model, ids, pieces):
  cache = model.init_cache(ids.shape[0])
  outs, i = [], 0
  for n in pieces:
    if i >= ids.shape[1]:
      break
    logits, cache = _stream_step(model, ids[:, i:i + n], cache)
    outs.append(logits)
    i += n
  return np.concatenate(outs, axis=1), cache


@pytest.mark.parametrize("split", fixtures.STREAM_SPLITS)
@pytest.mark.parametrize("name", fixtures.CASES)
def test_streaming_in_any_split_matches_full_forward(name, split):
  fx = fixtures.cached(name)
  model = _model(fx)
  ids = jnp.asarray(fx.input_ids)
  logits, cache = _stream(model, ids, fixtures.stream_splits(ids.shape[1], model.config.chunk_size)[split])
  err = _max_err(logits, fx.logits)
  assert err <= TOL, f"{name}/{split}: streaming max abs error {err:.3g}"
  assert int(cache.count) == ids.shape[1] % model.config.chunk_size
  assert all(int(n) == ids.shape[1] for n in cache.final_norm.count)


@pytest.mark.parametrize("impl", IMPLS)
def test_streaming_with_every_cema_impl(impl):
  fx = fixtures.cached("tiny_swiglu")
  model = _model(fx, cema_impl=impl)
  ids = jnp.asarray(fx.input_ids)
  logits, _ = _stream(model, ids, fixtures.stream_splits(ids.shape[1], model.config.chunk_size)["odd_pieces"])
  err = _max_err(logits, fx.logits)
  assert err <= TOL, f"{impl}: streaming max abs error {err:.3g}"


def test_cache_size_is_constant_in_stream_length():
  fx = fixtures.cached("tiny_tied")
  model = _model(fx)
  ids = jnp.asarray(fx.input_ids)
  _, short = _stream(model, ids[:, :3], [3])
  _, long = _stream(model, ids, [5] * 8)
  def shapes(cache):
    return [np.shape(x) for x in jax.tree_util.tree_leaves(cache)]
  assert shapes(short) == shapes(long)


def test_bad_token_ids_are_rejected_before_compute():
  fx = fixtures.cached("tiny_short")
  model = _model(fx)
  vocab = model.config.vocab_size
  with pytest.raises(ValueError, match=rf"token id {vocab} at position \(0, 2\).*vocab_size={vocab}"):
    model(jnp.array([[0, 1, vocab, 3]]))
  with pytest.raises(ValueError, match="token id -1"):
    model(jnp.array([[0, -1]]))
  with pytest.raises(TypeError, match="integers"):
    model(jnp.zeros((1, 4), jnp.float32))
  with pytest.raises(ValueError, match=r"\(batch, length\)"):
    model(jnp.zeros((4,), jnp.int32))
  with pytest.raises(ValueError, match="batch size 2"):
    model(jnp.zeros((3, 4), jnp.int32), cache=model.init_cache(2))
