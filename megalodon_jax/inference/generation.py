"""Batched, streamed generation with the constant-size cache: bucketed prefill, then jitted blocks of decode steps.

How a batch of prompts (token ids, lengths may differ) is run:
1. Shapes are bucketed so that a long session compiles a handful of programs, not one per prompt length: the batch
   is padded to a power of two (padding rows are finished from the start) and the prompts to a power-of-two
   length (the padding is never read).
2. Prefill: of the first P0 tokens of every row (P0 = min(prompt lengths)), all but the last few (fewer than
   `PREFILL_GRAIN`, or than the chunk when it is smaller) go through the model in large pieces: as many
   `prefill_piece` tokens as fit, then the whole chunks left (in power-of-two multiples of the chunk), then the
   partial chunk (in powers of two of at least the grain). Piece lengths therefore come from a fixed set of O(log)
   sizes, and the many small ones are not among them: each piece length is a program to compile (seconds each on a
   CPU), while the few tokens below the grain cost a few decode steps. Prefill returns the cache and the logits of
   its last position only (B x piece x vocab floats would dominate memory): a row whose whole prompt was prefilled
   samples its first token from them, so a prompt of a multiple of the grain costs no decode step of its own.
3. Decode: a jitted loop of up to `block_size` steps (the step count is a traced argument, so the last block runs
   only the steps still needed, with no recompile). Each step picks row i's next input: the prompt token while the
   row is still inside its prompt (teacher forcing: the tokens after the prefilled ones, and the rest of longer
   prompts), else a token sampled from the previous step's logits. After each block the new tokens go back to the
   host and are yielded, so text streams block by block with no per-token Python dispatch. A prompt's tokens beyond
   P0 are therefore fed one per step: batch prompts of similar lengths when some are long.

A row finishes when it samples one of its stop ids (not included in the output) or after `max_new_tokens`
generated tokens. Draws use one PRNG stream per row, `fold_in(fold_in(key(seed), row), position)`, so a row's
sample depends on the seed, its index and its prompt, but not on the rows after it, the batch padding,
`block_size` or `prefill_piece`. Sampling settings are traced arguments: changing them does not recompile.

The decode position is an int32 counter local to one call (it would wrap after 2^31 - 1 tokens of prompt plus
generation in a single call); the model's own counters do not wrap (model.Cache, ops.timestep_norm.NormState).

Any model family runs here (families.LanguageModel). A model whose cache grows with the context (the Llama
baseline's KV cache) is given its capacity, `init_cache(batch, max_length=...)`: every token a call will feed,
rounded up to a power of two so that similar requests share compiled programs; Megalodon's cache ignores it.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
from typing import Any, Iterator, NamedTuple, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from megalodon_jax.errors import InferenceError
from megalodon_jax.inference.options import DEFAULT_BLOCK_SIZE, check_decode_sizes
from megalodon_jax.inference.sampling import Sampler, sample_logits
from megalodon_jax.families import LanguageModel

DEFAULT_PREFILL_TOKENS = 4096
# Prompt tokens below this multiple (at the end of the prefilled part) are fed by decode steps instead: the prefill
# pieces of 1, 2, ..., 16 tokens would each be one more program to compile, for a few milliseconds of work.
PREFILL_GRAIN = 32
_MIN_PROMPT_BUCKET = 16
_STOP_SLOTS = 4  # stop-id arrays are padded to a multiple of this (with -1) so their count rarely recompiles


def default_prefill_piece(chunk_size: int) -> int:
  """Tokens per prefill call when none is asked for: about DEFAULT_PREFILL_TOKENS, in whole chunks."""
  return chunk_size * max(1, DEFAULT_PREFILL_TOKENS // chunk_size)


@dataclasses.dataclass
class Completion:
  """One row's result: generated ids (no prompt, no stop id) and why it ended ("stop" or "length")."""
  tokens: list[int]
  finish_reason: str


class Update(NamedTuple):
  """What one decode block produced, per row of the caller's batch.

  new_tokens: ids generated in this block (possibly empty).  finished: the row has ended (now or before).
  finish_reasons: "stop" / "length" for finished rows, None otherwise.
  """
  new_tokens: list[list[int]]
  finished: list[bool]
  finish_reasons: list[Optional[str]]


class _DecodeState(NamedTuple):
  cache: Any  # the model's cache pytree (families.LanguageModel.init_cache)
  logits: jax.Array  # (B, V) float32: the prediction for the token at `pos`
  pos: jax.Array  # () int32: tokens consumed so far by every row
  done: jax.Array  # (B,) bool
  stopped: jax.Array  # (B,) bool: ended on a stop id
  produced: jax.Array  # (B,) int32: tokens generated so far


def prefill_plan(length: int, chunk_size: int, max_piece: int) -> list[int]:
  """Piece lengths (summing to `length`) for prefilling: full `max_piece`s, whole chunks, then the partial chunk.

  `max_piece` is a multiple of `chunk_size`, so every piece but the partial-chunk ones starts on a chunk boundary;
  all lengths are `max_piece`, `chunk_size * 2^j` or `2^j`, which bounds the number of compiled shapes.
  """
  pieces = [max_piece] * (length // max_piece)
  whole, tail = divmod(length % max_piece, chunk_size)
  pieces += [chunk_size << bit for bit in reversed(range(whole.bit_length())) if (whole >> bit) & 1]
  pieces += [1 << bit for bit in reversed(range(tail.bit_length())) if (tail >> bit) & 1]
  return pieces


def prefilled_length(tokens: int, chunk_size: int) -> int:
  """How many of `tokens` leading prompt tokens `Generator.stream` prefills: a multiple of the grain (at most the
  chunk size), the rest go through the decode steps."""
  grain = min(PREFILL_GRAIN, chunk_size)
  return tokens - tokens % grain


def _pow2_at_least(n: int, minimum: int = 1) -> int:
  return max(minimum, 1 << max(0, n - 1).bit_length())


def _check_ids(ids: Sequence[int], vocab_size: int, what: str) -> np.ndarray:
  try:
    arr = np.asarray(ids, dtype=np.int64).reshape(-1)
  except (TypeError, ValueError, OverflowError):
    raise InferenceError(f"{what} must be a sequence of integer token ids") from None
  bad = (arr < 0) | (arr >= vocab_size)
  if bad.any():
    i = int(np.argmax(bad))
    raise InferenceError(f"{what}: token id {int(arr[i])} at index {i} is outside the vocabulary [0, {vocab_size})")
  return arr


# The jitted functions live at module level with the graphdef as a static argument, so every Generator of the same
# model structure shares the compiled programs (one per shape bucket).
@functools.partial(jax.jit, static_argnums=0)
def _prefill(graphdef: nnx.GraphDef, state, cache: Any, ids: jax.Array) -> tuple[Any, jax.Array]:
  """ids: (B, L) int32 -> (the cache after them, (B, V) float32 logits of the last position)."""
  model = nnx.merge(graphdef, state)
  if _takes_last_only(type(model)):
    logits, cache = model(ids, cache=cache, last_only=True)
  else:  # a family without the option: all positions' logits, of which XLA keeps the last row's
    logits, cache = model(ids, cache=cache)
  return cache, logits[:, -1, :model.config.vocab_size]


@functools.lru_cache(maxsize=None)
def _takes_last_only(model_class: type) -> bool:
  """Whether the family's `__call__` has the `last_only` option (families.LanguageModel); older ones may not."""
  return "last_only" in inspect.signature(model_class.__call__).parameters


@functools.partial(jax.jit, static_argnums=0, static_argnames=("steps",))
def _decode(graphdef: nnx.GraphDef, state, carry: _DecodeState, prompts, lengths, stop_ids, max_new, key, sampling,
            num, *, steps: int):
  """`num` (<= `steps`) decode steps. prompts: (B, P) int32; lengths: (B,) int32; max_new: () int32;
  stop_ids: (B, S) int32; key: a PRNG key; sampling: `Sampler.as_arrays()`; num: () int32, traced, so that a last
  block of fewer steps reuses the program.

  Returns the new carry and, per step, (token, emitted), each (steps, B); rows past `num` are 0 / False.
  """
  model = nnx.merge(graphdef, state)
  vocab = model.config.vocab_size
  b, p = prompts.shape
  row_keys = jax.vmap(lambda r: jax.random.fold_in(key, r))(jnp.arange(b))

  def step(s: _DecodeState, _):
    keys = lambda: jax.vmap(lambda k: jax.random.fold_in(k, s.pos))(row_keys)
    sampled = sample_logits(s.logits, keys, *sampling)
    forced = jax.lax.dynamic_index_in_dim(prompts, jnp.minimum(s.pos, p - 1), axis=1, keepdims=False)
    in_prompt = s.pos < lengths
    token = jnp.where(in_prompt, forced, sampled)
    active = ~in_prompt & ~s.done
    hit_stop = active & jnp.any(token[:, None] == stop_ids, axis=1)
    emitted = active & ~hit_stop
    produced = s.produced + emitted.astype(jnp.int32)
    done = s.done | hit_stop | (produced >= max_new)
    logits, cache = model(token[:, None], cache=s.cache)
    new = _DecodeState(cache, logits[:, 0, :vocab], s.pos + 1, done, s.stopped | hit_stop, produced)
    return new, (token, emitted)

  def body(i, val):
    s, tokens, emitted = val
    s, (token, emit) = step(s, None)
    return s, tokens.at[i].set(token), emitted.at[i].set(emit)

  init = (carry, jnp.zeros((steps, b), jnp.int32), jnp.zeros((steps, b), bool))
  return jax.lax.fori_loop(0, jnp.minimum(num, steps), body, init)


class Generator:
  """Streams completions of batches of prompts from one model.

  `model` is put in eval mode (dropout off). `prefill_piece`: the largest prefill call in tokens (a multiple of
  the chunk size; default about 4096). `block_size`: decode steps per jitted call (and per streamed update).
  `min_prefill`: a batch whose shortest prompt has fewer tokens is fed by decode steps alone, with no prefill
  program to compile (for a few short prompts drawn once in a while, as the trainer's samples: a prefill program
  costs seconds of compiling, a short prompt a few milliseconds of decode steps). Compiled programs are shared by
  all Generators of models with the same structure (one per shape bucket).
  """

  def __init__(self, model: LanguageModel, *, prefill_piece: Optional[int] = None,
               block_size: int = DEFAULT_BLOCK_SIZE, min_prefill: int = 0):
    c = model.config
    if prefill_piece is None:
      prefill_piece = default_prefill_piece(c.chunk_size)
    check_decode_sizes(prefill_piece, block_size, c.chunk_size)
    model.eval()
    self.model = model
    self.config = c
    self.prefill_piece = prefill_piece
    self.block_size = block_size
    self.min_prefill = min_prefill
    self.graphdef, self.state = nnx.split(model)

  # ------------------------------------------------------------------------------------------------ host side

  def _stop_array(self, stop_ids, batch: int, padded_batch: int) -> np.ndarray:
    """(padded_batch, S) int32 stop ids, -1 = unused slot; `stop_ids` is one list for all rows or one per row."""
    v = self.config.vocab_size
    if len(stop_ids) > 0 and all(isinstance(s, (list, tuple, np.ndarray)) for s in stop_ids):  # one list per row
      if len(stop_ids) != batch:
        raise InferenceError(f"stop_ids has {len(stop_ids)} per-row lists for {batch} prompts")
      rows = [_check_ids(s, v, f"stop_ids[{i}]") for i, s in enumerate(stop_ids)]
    else:
      rows = [_check_ids(stop_ids, v, "stop_ids")] * batch
    width = _STOP_SLOTS * max(1, -(-max(len(r) for r in rows) // _STOP_SLOTS))
    out = np.full((padded_batch, width), -1, np.int32)
    for i, r in enumerate(rows):
      out[i, :len(r)] = r
    return out

  def prefill(self, ids: np.ndarray, cache: Optional[Any] = None) -> tuple[Any, Optional[jax.Array]]:
    """Feeds ids (B, L) through the model in `prefill_plan` pieces.

    Returns the cache and the (B, V) float32 next-token logits after the last id (None when L is 0); the logits of
    the other positions are never formed. `cache` continues a stream (default: an empty one of batch B). Ids are
    not range-checked here.
    """
    ids = np.asarray(ids, np.int32)
    cache = self.model.init_cache(ids.shape[0], max_length=ids.shape[1]) if cache is None else cache
    start, logits = 0, None
    for n in prefill_plan(ids.shape[1], self.config.chunk_size, self.prefill_piece):
      cache, logits = _prefill(self.graphdef, self.state, cache, jnp.asarray(ids[:, start:start + n]))
      start += n
    return cache, logits

  def stream(self, prompts: Sequence[Sequence[int]], *, max_new_tokens: int, sampler: Sampler = Sampler(),
             stop_ids: Union[Sequence[int], Sequence[Sequence[int]]] = (), seed: int = 0) -> Iterator[Update]:
    """Generates continuations of `prompts`, yielding an Update after every decode block.

    Args:
      prompts: B >= 1 lists of token ids, each non-empty, ids in [0, vocab_size).
      max_new_tokens: generated tokens per row at most (>= 1).
      sampler: greedy / temperature / top-k / top-p.
      stop_ids: ids that end a row (not included in its output); one list for all rows or one list per row.
      seed: PRNG seed of the draws.
    Raises:
      InferenceError: empty batch or prompt, ids outside the vocabulary, max_new_tokens < 1.
    """
    c = self.config
    if isinstance(prompts, (str, bytes)) or len(prompts) == 0:
      raise InferenceError("no prompts given: pass a list of token-id lists")
    rows = [_check_ids(p, c.vocab_size, f"prompt {i}") for i, p in enumerate(prompts)]
    for i, r in enumerate(rows):
      if r.size == 0:
        raise InferenceError(f"prompt {i} is empty: generation needs at least one prompt token")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens < 1:
      raise InferenceError(f"max_new_tokens must be an int >= 1, got {max_new_tokens!r}")
    b = len(rows)
    lengths = np.array([r.size for r in rows], np.int64)
    if lengths.max() + max_new_tokens >= 2**31:
      raise InferenceError("prompt plus max_new_tokens must stay below 2^31 tokens per call")
    bp = _pow2_at_least(b)
    pp = _pow2_at_least(int(lengths.max()), _MIN_PROMPT_BUCKET)
    padded_rows = rows + [min(rows, key=len)] * (bp - b)  # the shortest prompt: changes neither P0 nor step count
    prompt_arr = np.zeros((bp, pp), np.int32)
    for i, r in enumerate(padded_rows):
      prompt_arr[i, :r.size] = r
    len_arr = np.array([r.size for r in padded_rows], np.int32)
    stops = self._stop_array(stop_ids, b, bp)
    # Prefilled tokens (the shortest prompt's, down to the grain); the rest of the prompts are fed by decode steps.
    shortest = int(lengths.min())
    p0 = prefilled_length(shortest, c.chunk_size) if shortest >= self.min_prefill else 0

    # Every row ends within this many steps (by length at the latest); the bound also keeps a host loop finite.
    steps_left = int(lengths.max()) - p0 + max_new_tokens
    capacity = _pow2_at_least(p0 + steps_left)  # tokens ever fed: the last block runs only the steps left
    cache, logits = self.prefill(prompt_arr[:, :p0], self.model.init_cache(bp, max_length=capacity))
    if logits is None:  # nothing prefilled: every row is inside its prompt at step one, and the logits go unread
      logits = jnp.zeros((bp, c.vocab_size), jnp.float32)
    carry = _DecodeState(cache, logits, jnp.int32(p0), jnp.arange(bp) >= b, jnp.zeros((bp,), bool),
                         jnp.zeros((bp,), jnp.int32))
    args = (jnp.asarray(prompt_arr), jnp.asarray(len_arr), jnp.asarray(stops), jnp.int32(max_new_tokens),
            jax.random.key(seed), sampler.as_arrays())
    done = np.zeros(b, bool)
    while steps_left > 0 and not done.all():
      num = min(steps_left, self.block_size)
      carry, tokens, emitted = _decode(self.graphdef, self.state, carry, *args, jnp.int32(num),
                                       steps=self.block_size)
      steps_left -= num
      tokens, emitted = np.asarray(tokens), np.asarray(emitted)
      done, stopped = np.asarray(carry.done)[:b], np.asarray(carry.stopped)[:b]
      new = [tokens[emitted[:, i], i].tolist() for i in range(b)]
      reasons = [("stop" if stopped[i] else "length") if done[i] else None for i in range(b)]
      yield Update(new, done.tolist(), reasons)

  def generate(self, prompts: Sequence[Sequence[int]], **kwargs) -> list[Completion]:
    """All completions at once: `stream`'s arguments, one Completion per prompt."""
    out = [Completion([], "length") for _ in prompts]
    for update in self.stream(prompts, **kwargs):
      for comp, new, reason in zip(out, update.new_tokens, update.finish_reasons):
        comp.tokens.extend(new)
        if reason is not None:
          comp.finish_reason = reason
    return out
