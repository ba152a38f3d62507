"""The trainer's periodic samples (`trainer.sample_tokens`, through `generation.Generator` and `sample_logits`).

References: greedy decoding by re-running the full forward for every token, and the temperature softmax of the full
forward's logits for the sampling frequencies. Compile reuse is read from the jitted decode program's own cache.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from megalodon_jax.config import MegalodonConfig
from megalodon_jax.errors import InferenceError
from megalodon_jax.model import MegalodonLM
from megalodon_jax.training.trainer import sample_tokens
from tests.tracing import count_traces

CFG = MegalodonConfig(num_layers=2, model_dim=32, z_dim=16, value_dim=32, ffn_hidden_dim=64, chunk_size=4,
                      vocab_size=50, norm_num_groups=4, cema_ndim=4, dropout=0.2)


def test_greedy_samples_equal_full_forward_argmax():
  model = MegalodonLM(CFG, rngs=nnx.Rngs(0))
  prompt = np.array([[1, 2, 3], [4, 5, 6]])
  out = sample_tokens(model, prompt, num_tokens=9, temperature=0.0, seed=0)
  assert out.dtype == np.int32 and out.shape == (2, 9)
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


def test_samples_draw_from_the_temperature_softmax():
  model = MegalodonLM(CFG, rngs=nnx.Rngs(1))
  prompt = np.tile(np.array([[7, 8]]), (512, 1))
  first = sample_tokens(model, prompt, num_tokens=1, temperature=2.0, seed=3)[:, 0]
  model.eval()
  p = np.asarray(jax.nn.softmax(model(jnp.asarray(prompt[:1]))[0, -1] / 2.0), np.float64)
  freq = np.bincount(first, minlength=50) / first.size
  assert np.abs(freq - p).sum() < 0.25  # total variation ~0.1 expected from 512 draws over 50 ids


def test_rows_draw_independently_and_temperature_does_not_recompile():
  model = MegalodonLM(CFG.replace(num_layers=1, vocab_size=47), rngs=nnx.Rngs(2))  # compiled by no other test
  prompt = np.array([[7, 8, 9]] * 4)
  with count_traces("_decode") as traces:
    out = sample_tokens(model, prompt, num_tokens=6, temperature=1.0, seed=5)
    assert traces["_decode"] == 1
    # One PRNG stream per row: equal prompts give different rows, and a row does not depend on the rows after it.
    assert len({tuple(r) for r in out}) > 1
    np.testing.assert_array_equal(sample_tokens(model, prompt[:1], num_tokens=6, temperature=1.0, seed=5), out[:1])
    assert traces["_decode"] == 2  # batch bucket 1: its own program
    # Other temperatures (greedy included), seeds and batch sizes inside the bucket reuse the compiled programs.
    colder = sample_tokens(model, prompt, num_tokens=6, temperature=0.3, seed=5)
    sample_tokens(model, prompt[:3], num_tokens=6, temperature=0.0, seed=6)
    sample_tokens(model, prompt[:1], num_tokens=6, temperature=1.7, seed=7)
    assert traces["_decode"] == 2
  assert not np.array_equal(colder, out)


def test_bad_arguments():
  model = MegalodonLM(CFG, rngs=nnx.Rngs(0))
  with pytest.raises(InferenceError, match="max_new_tokens"):
    sample_tokens(model, np.zeros((1, 2), np.int32), num_tokens=0, temperature=1.0, seed=0)
  with pytest.raises(ValueError, match="prompts"):
    sample_tokens(model, np.zeros((2,), np.int32), num_tokens=2, temperature=1.0, seed=0)
  with pytest.raises(ValueError, match="temperature"):
    sample_tokens(model, np.zeros((1, 2), np.int32), num_tokens=2, temperature=-1.0, seed=0)
