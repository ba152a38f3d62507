"""Model-level behaviour on a small random model: gradients, remat, dropout modes, mixed precision."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from megalodon_jax import MegalodonConfig, MegalodonLM

SMALL = dict(vocab_size=64, model_dim=32, num_layers=2, num_heads=2, z_dim=16, value_dim=32, ffn_hidden_dim=48,
             cema_ndim=4, chunk_size=8, norm_num_groups=4, swiglu=True)


def _ids(batch=2, length=20, seed=0):
  return jax.random.randint(jax.random.key(seed), (batch, length), 0, SMALL["vocab_size"])


def _loss(model, ids):
  logits = model(ids[:, :-1])
  return optax.softmax_cross_entropy_with_integer_labels(logits, ids[:, 1:]).mean()


def _grads(config, ids):
  model = MegalodonLM(config, rngs=nnx.Rngs(0))
  return nnx.jit(nnx.grad(_loss))(model, ids)


def _flat(tree):
  return {jax.tree_util.keystr(k): np.asarray(v) for k, v in jax.tree_util.tree_leaves_with_path(tree)}


def test_gradients_reach_every_parameter_and_match_finite_differences():
  config = MegalodonConfig(**SMALL)
  ids = _ids()
  grads = _flat(_grads(config, ids))
  zero = [k for k, g in grads.items() if not np.any(g)]
  assert not zero, f"parameters with identically zero gradient: {zero}"
  # Directional finite difference of the loss along a random direction, in float32 with a moderate step.
  model = MegalodonLM(config, rngs=nnx.Rngs(0))
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  leaves, treedef = jax.tree_util.tree_flatten(params)
  keys = jax.random.split(jax.random.key(1), len(leaves))
  direction = jax.tree_util.tree_unflatten(treedef, [jax.random.normal(k, x.shape) for k, x in zip(keys, leaves)])

  @jax.jit
  def loss_at(t):
    p = jax.tree_util.tree_map(lambda x, d: x + t * d, params, direction)
    return _loss(nnx.merge(graphdef, p, rest), ids)

  # Central differences with Richardson extrapolation: the loss is strongly curved along a random direction
  # through every parameter, so plain central differences carry an O(h^2) bias above float32 round-off.
  def central(h):
    return (loss_at(h) - loss_at(-h)) / (2 * h)

  h = 2e-3
  fd = float((4 * central(h / 2) - central(h)) / 3)
  analytic = float(jax.grad(loss_at)(0.0))
  assert abs(fd - analytic) <= 1e-3 * abs(analytic), (fd, analytic)


@pytest.mark.parametrize("remat", ["full", "dots_saveable"])
def test_remat_gives_the_same_gradients(remat):
  ids = _ids()
  plain = _flat(_grads(MegalodonConfig(**SMALL), ids))
  rematted = _flat(_grads(MegalodonConfig(**SMALL, remat=remat), ids))
  assert plain.keys() == rematted.keys()
  for k in plain:
    np.testing.assert_allclose(rematted[k], plain[k], rtol=1e-5, atol=1e-6, err_msg=k)


def test_layerwise_ckpt_maps_to_full_remat():
  assert MegalodonConfig(**SMALL, layerwise_ckpt=True).remat_policy == "full"
  assert MegalodonConfig(**SMALL).remat_policy == "none"
  assert MegalodonConfig(**SMALL, layerwise_ckpt=True, remat="dots_saveable").remat_policy == "dots_saveable"


@pytest.mark.parametrize("efficient_attn", [None, "fused"])
def test_dropout_is_random_in_train_mode_and_off_in_eval_mode(efficient_attn):
  config = MegalodonConfig(**SMALL, dropout=0.1, hidden_dropout=0.1, attention_dropout=0.2,
                           efficient_attn=efficient_attn)
  model = MegalodonLM(config, rngs=nnx.Rngs(0))
  ids = _ids()
  a, b = model(ids), model(ids)
  assert np.all(np.isfinite(np.asarray(a))) and np.all(np.isfinite(np.asarray(b)))
  assert not np.allclose(a, b), "two training-mode calls should draw different dropout masks"
  model.eval()
  e1, e2 = model(ids), model(ids)
  np.testing.assert_array_equal(np.asarray(e1), np.asarray(e2))
  # Eval mode equals a model whose dropout rates are zero, with the same weights.
  no_drop = MegalodonLM(MegalodonConfig(**SMALL, efficient_attn=efficient_attn), rngs=nnx.Rngs(0))
  np.testing.assert_allclose(np.asarray(no_drop(ids)), np.asarray(e1), rtol=1e-6, atol=1e-6)


def test_bfloat16_compute_stays_close_to_float32_and_returns_float32_logits():
  ids = _ids()
  f32 = MegalodonLM(MegalodonConfig(**SMALL), rngs=nnx.Rngs(0))
  bf16 = MegalodonLM(MegalodonConfig(**SMALL, dtype="bfloat16"), rngs=nnx.Rngs(0))
  a, b = f32(ids), bf16(ids)
  assert b.dtype == jnp.float32
  rel = float(jnp.linalg.norm(a - b) / jnp.linalg.norm(a))
  assert rel < 0.05, f"bf16 compute deviates {rel:.3f} (relative L2) from float32"
  bf16_params = MegalodonLM(MegalodonConfig(**SMALL, dtype="bfloat16", param_dtype="bfloat16"), rngs=nnx.Rngs(0))
  assert all(p.dtype == jnp.bfloat16 for p in jax.tree_util.tree_leaves(nnx.state(bf16_params, nnx.Param)))
  c = bf16_params(ids)
  assert c.dtype == jnp.float32 and np.all(np.isfinite(np.asarray(c)))


def test_streaming_matches_full_forward_under_bfloat16():
  # The cache holds bf16 keys/values: streaming must still track the full forward closely.
  config = MegalodonConfig(**SMALL, dtype="bfloat16")
  model = MegalodonLM(config, rngs=nnx.Rngs(0))
  ids = _ids(length=19)
  full = model(ids)
  cache = model.init_cache(2)
  parts = []
  for lo, hi in ((0, 5), (5, 6), (6, 19)):
    out, cache = model(ids[:, lo:hi], cache=cache)
    parts.append(out)
  streamed = jnp.concatenate(parts, axis=1)
  rel = float(jnp.linalg.norm(full - streamed) / jnp.linalg.norm(full))
  assert rel < 0.03, rel
