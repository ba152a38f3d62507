"""Sampling with the streaming cache against a reference that re-runs the full forward for every token."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from megalodon_jax.config import MegalodonConfig
from megalodon_jax.inference.sampling import generate
from megalodon_jax.model import MegalodonLM

CFG = MegalodonConfig(num_layers=2, model_dim=32, z_dim=16, value_dim=32, ffn_hidden_dim=64, chunk_size=4,
                      vocab_size=50, norm_num_groups=4, cema_ndim=4, dropout=0.2)


def test_greedy_generation_equals_full_forward_argmax():
  model = MegalodonLM(CFG, rngs=nnx.Rngs(0))
  graphdef, *states = nnx.split(model, nnx.Param, ...)
  prompt = np.array([[1, 2, 3], [4, 5, 6]])
  out = np.asarray(generate(graphdef, states, jnp.asarray(prompt), jax.random.key(0), num_tokens=9,
                            temperature=0.0))
  model.eval()
  forward = nnx.jit(lambda m, ids: m(ids))
  # The model is causal, so one fixed-length buffer (zeros after the current position) serves every step: position
  # t's logits depend only on tokens <= t, and a single compile keeps the test fast.
  seq = np.zeros((2, 12), np.int64)
  seq[:, :3] = prompt
  for t in range(3, 12):  # 3 + 9 tokens cross three chunk boundaries of the cache
    logits = np.asarray(forward(model, jnp.asarray(seq)))
    seq[:, t] = logits[:, t - 1].argmax(-1)
  np.testing.assert_array_equal(out, seq[:, 3:])


def test_sampling_draws_from_the_temperature_softmax():
  model = MegalodonLM(CFG, rngs=nnx.Rngs(1))
  graphdef, *states = nnx.split(model, nnx.Param, ...)
  prompt = jnp.tile(jnp.asarray([[7, 8]]), (512, 1))
  first = np.asarray(generate(graphdef, states, prompt, jax.random.key(3), num_tokens=1, temperature=2.0))[:, 0]
  model.eval()
  p = np.asarray(jax.nn.softmax(model(prompt[:1])[0, -1] / 2.0), np.float64)
  freq = np.bincount(first, minlength=50) / first.size
  assert np.abs(freq - p).sum() < 0.25  # total variation ~0.1 expected from 512 draws over 50 ids


def test_bad_arguments():
  model = MegalodonLM(CFG, rngs=nnx.Rngs(0))
  graphdef, *states = nnx.split(model, nnx.Param, ...)
  with pytest.raises(ValueError, match="num_tokens"):
    generate(graphdef, states, jnp.zeros((1, 2), jnp.int32), jax.random.key(0), num_tokens=0)
  with pytest.raises(ValueError, match="prompt"):
    generate(graphdef, states, jnp.zeros((2,), jnp.int32), jax.random.key(0), num_tokens=2)
