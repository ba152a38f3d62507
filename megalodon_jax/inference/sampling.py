"""Autoregressive sampling with the streaming cache: prefill the prompt, then one token per step in a `lax.scan`.

Memory is constant in the number of generated tokens: the cache holds at most one attention chunk of keys and
values per layer plus the CEMA and TimestepNorm states (model.Cache).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx


def _pick(logits: jax.Array, key: jax.Array, temperature: float) -> jax.Array:
  """logits: (B, V) float32 -> (B,) int32: argmax when temperature == 0, else a draw from softmax(logits / T)."""
  if temperature == 0.0:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  return jax.random.categorical(key, logits / temperature, axis=-1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("graphdef", "num_tokens", "temperature"))
def _generate(graphdef: nnx.GraphDef, states: tuple[nnx.State, ...], prompt: jax.Array, key: jax.Array, *,
              num_tokens: int, temperature: float) -> jax.Array:
  model = nnx.merge(graphdef, *states)
  model.eval()
  logits, cache = model(prompt, cache=model.init_cache(prompt.shape[0]))
  keys = jax.random.split(key, num_tokens)
  first = _pick(logits[:, -1], keys[0], temperature)

  def step(carry, k):
    token, cache = carry  # token: (B,) the latest draw, fed back as the next input
    logits, cache = model(token[:, None], cache=cache)
    return (_pick(logits[:, -1], k, temperature), cache), token

  (last, _), fed = jax.lax.scan(step, (first, cache), keys[1:])
  return jnp.concatenate([fed.T, last[:, None]], axis=1)


def generate(graphdef: nnx.GraphDef, states: tuple[nnx.State, ...], prompt: jax.Array, key: jax.Array, *,
             num_tokens: int, temperature: float = 1.0) -> jax.Array:
  """Samples a continuation of each prompt.

  Args:
    graphdef, states: a MegalodonLM split by `nnx.split` (e.g. `graphdef, *states = nnx.split(model, nnx.Param,
      ...)`); states may be any partition of its variables.
    prompt: (B, P) int32 token ids, P >= 1.
    key: a PRNG key (typed or raw uint32 (2,)).
    num_tokens: tokens to generate, >= 1.
    temperature: softmax temperature; 0 = greedy.
  Returns:
    (B, num_tokens) int32 generated ids (the prompt not included).
  """
  if num_tokens < 1:
    raise ValueError(f"num_tokens must be >= 1, got {num_tokens}")
  if temperature < 0:
    raise ValueError(f"temperature must be >= 0, got {temperature}")
  prompt = jnp.asarray(prompt, jnp.int32)
  if prompt.ndim != 2 or prompt.shape[1] < 1:
    raise ValueError(f"prompt must be (batch, length >= 1); got shape {tuple(prompt.shape)}")
  return _generate(graphdef, tuple(states), prompt, key, num_tokens=num_tokens, temperature=float(temperature))
