"""Token selection: `Sampler` settings and `sample_logits`, the one sampling rule of every decode loop.

Greedy, temperature, top-k and top-p (nucleus), applied in that order. The decode loop itself (prefill, then
jitted blocks of steps with the streaming cache) is `generation.Generator`; the CLI, the trainer's periodic samples
and the notebooks all go through it.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Union

import jax
import jax.numpy as jnp

from megalodon_jax.inference.options import check_sampling


@dataclasses.dataclass(frozen=True)
class Sampler:
  """How the next token is chosen from the logits.

  temperature: 0 = greedy (argmax; top_k / top_p are then irrelevant), else logits are divided by it.
  top_k: keep only the k most likely tokens (0 = all).
  top_p: keep the smallest set of most likely tokens whose probability reaches top_p (1.0 = all).
  The settings enter the jitted decode loop as traced scalars (`as_arrays`), so changing them never recompiles.
  """
  temperature: float = 1.0
  top_k: int = 0
  top_p: float = 1.0

  def __post_init__(self):
    check_sampling(self.temperature, self.top_k, self.top_p)  # ValueError

  def as_arrays(self) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(temperature () float32, top_k () int32, top_p () float32)."""
    return jnp.float32(self.temperature), jnp.int32(self.top_k), jnp.float32(self.top_p)


def filter_logits(logits: jax.Array, temperature: jax.Array, top_k: jax.Array, top_p: jax.Array) -> jax.Array:
  """Temperature, then top-k, then top-p: (B, V) logits -> (B, V) float32 with excluded tokens at -inf.

  temperature > 0, top_k (0 = off) and top_p (1 = off) are scalars, traced or not. One descending sort serves
  both filters, and is skipped at run time when neither is on. Ties at a threshold are all kept (the filters
  compare against the threshold logit).
  """
  logits = logits.astype(jnp.float32) / temperature
  v = logits.shape[-1]

  def filtered(x):
    desc = -jnp.sort(-x, axis=-1)
    rank = jnp.arange(v)
    k = jnp.where(top_k > 0, jnp.minimum(top_k, v), v)
    desc = jnp.where(rank < k, desc, -jnp.inf)  # top-k, then the nucleus of what is left
    probs = jax.nn.softmax(desc, axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs  # mass of the strictly more likely tokens
    keep = (before < top_p) & (rank < k)  # the most likely token always stays (before = 0 < top_p)
    last = jnp.sum(keep, axis=-1, keepdims=True) - 1
    cutoff = jnp.take_along_axis(desc, last, axis=-1)
    return jnp.where(x < cutoff, -jnp.inf, x)

  return jax.lax.cond((top_k > 0) | (top_p < 1.0), filtered, lambda x: x, logits)


def sample_logits(logits: jax.Array, keys: Union[jax.Array, Callable[[], jax.Array]], temperature: jax.Array,
                  top_k: jax.Array, top_p: jax.Array) -> jax.Array:
  """(B, V) logits and (B,) per-row PRNG keys -> (B,) int32 tokens; argmax when temperature == 0.

  One key per row makes a row's draw independent of the other rows of its batch. `keys` may be a function that
  makes them: greedy decoding then never derives keys, filters or draws (a `lax.cond` on the temperature; in a
  decode loop of a small model they are a sizeable part of a step).
  """
  def draw(logits):
    filtered = filter_logits(logits, jnp.where(temperature > 0, temperature, 1.0), top_k, top_p)
    row_keys = keys() if callable(keys) else keys
    return jax.vmap(jax.random.categorical)(row_keys, filtered).astype(jnp.int32)

  return jax.lax.cond(temperature > 0, draw, lambda x: jnp.argmax(x, axis=-1).astype(jnp.int32), logits)
