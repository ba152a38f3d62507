"""MegalodonLM: embedding → blocks → final TimestepNorm → LM head, with a streaming cache.

See docs/model.md#block and docs/streaming.md."""

from __future__ import annotations

import math
from typing import NamedTuple, Optional, Union

import jax
import jax.numpy as jnp
from flax import nnx

from megalodon_jax.config import REMAT_POLICIES, MegalodonConfig, rope_inv_freq
from megalodon_jax.nn import document_boundaries
from megalodon_jax.nn.attention import LayerCache, SlotWrite
from megalodon_jax.nn.block import MegalodonBlock
from megalodon_jax.nn.init import truncated_normal
from megalodon_jax.nn.inputs import check_token_inputs
from megalodon_jax.nn.precision import under_matmul_precision
from megalodon_jax.nn.stacking import stack_blocks
from megalodon_jax.nn.layers import Buffer, Embed, Linear, TimestepNorm
from megalodon_jax.ops.attention import next_cache_segment_ids
from megalodon_jax.ops.partitioning import constrain
from megalodon_jax.ops.timestep_norm import NormState



class Cache(NamedTuple):
  """Streaming state of the whole model; a pytree, usable under `jax.jit`.

  layers: the blocks' LayerCaches as one, every leaf stacked over the blocks on axis 1 (after the batch axis): k is
    (B, num_layers, C, H, dz), the norm counts (B, num_layers); `layer(i)` reads block i's. One array per field lets
    a call update the whole cache in place (the scanned blocks read and write their slice of it).
  final_norm: the output TimestepNorm's state.
  count: () int32, tokens of the current attention chunk already in the KV caches (0 ≤ count < chunk_size).
  segment_ids: (B, C) int32 document ids of the KV cache slots, shared by every layer (only read when a call
  passes positions; `init_cache` makes zeros).
  Its size does not grow with the stream: KV of at most one chunk, CEMA and norm states per layer.
  """
  layers: LayerCache
  final_norm: NormState
  count: jax.Array
  segment_ids: Optional[jax.Array] = None

  @property
  def num_layers(self) -> int:
    return self.layers.k.shape[1]

  def layer(self, i) -> LayerCache:
    """Block i's LayerCache (i: an int, or a traced int32 scalar)."""
    return _read_layer_cache(self.layers, i)


class MegalodonLM(nnx.Module):
  """The Megalodon decoder LM (official `Mega`).

  Call `model(input_ids)` for float32 logits (B, L, V_out), or `model(input_ids, cache=cache)` for
  `(logits, cache)` to continue a stream (start from `model.init_cache(batch_size)`); any split of a sequence
  into pieces gives the logits of one full forward.
  """

  def __init__(self, config: MegalodonConfig, *, rngs: nnx.Rngs):
    c = config
    self.config = c
    # Separate streams, drawn the same way whatever the config, so that initial weights do not depend on
    # which dropouts are enabled (dropout layers fork their stream at construction).
    rngs = nnx.Rngs(params=rngs.params(), dropout=rngs.dropout())
    dt, pdt = jnp.dtype(c.dtype), jnp.dtype(c.param_dtype)
    emb_init = truncated_normal(1.0 / math.sqrt(c.model_dim))
    self.embed = Embed(c.vocab_size, c.model_dim, init=emb_init, dtype=dt, param_dtype=pdt, rngs=rngs)
    self.rope_freqs = Buffer(jnp.asarray(rope_inv_freq(c)))
    self.emb_dropout = nnx.Dropout(c.dropout, rngs=rngs if c.dropout > 0 else None)
    self.layers = nnx.List([MegalodonBlock(c, i, rngs=rngs) for i in range(c.num_layers)])
    self.final_norm = TimestepNorm(c.model_dim, c.norm_num_groups, eps=c.norm_eps, param_dtype=pdt)
    self.output = None if c.share_emb else Linear(
        c.model_dim, c.out_size, use_bias=False, init_mode=c.init_mode, axes=("embed", "vocab"), dtype=dt,
        param_dtype=pdt, rngs=rngs, kernel_init=emb_init)

  def init_cache(self, batch_size: int, max_length: Optional[int] = None) -> Cache:
    """An empty stream: no cached tokens, zero CEMA states, norm states from the TimestepNorm priors.

    `max_length` (the tokens a stream will hold, which a growing cache needs) is ignored: this one's size is
    constant."""
    del max_length
    c = self.config
    dt = jnp.dtype(c.dtype)
    layers = _stack_layer_caches([
        LayerCache(
            k=jnp.zeros((batch_size, c.chunk_size, c.num_heads, c.z_head_dim), dt),
            v=jnp.zeros((batch_size, c.chunk_size, c.num_heads, c.v_head_dim), dt),
            norm=blk.mega.timenorm.initial_state(batch_size),
            cema=jnp.zeros((batch_size, c.model_dim, c.cema_ndim, 2), jnp.float32),
        ) for blk in self.layers])
    return Cache(layers, self.final_norm.initial_state(batch_size), jnp.zeros((), jnp.int32),
                 jnp.zeros((batch_size, c.chunk_size), jnp.int32))

  @under_matmul_precision
  def __call__(self, input_ids: jax.Array, cache: Optional[Cache] = None, *,
               positions: Optional[jax.Array] = None, last_only: bool = False):
    """Forward pass.

    Args:
      input_ids: (B, L) integer token ids in [0, vocab_size).
      cache: None for a stand-alone sequence, or the Cache returned by `init_cache` / a previous call.
      positions: optional (B, L) int index of each token in its document, for packed rows
        (data.document_boundaries="reset"): where it is 0 a document starts and the model restarts (CEMA and
        TimestepNorm state, attention), as if each document ran alone (nn/document_boundaries.py). None: no boundaries.
        With a cache, a document may continue across calls.
      last_only: with a cache, the logits of the last position only, (B, 1, V_out): what a prefill needs, without
        the (B, L, V_out) array.
    Returns:
      logits (B, L, V_out) float32; with a cache, `(logits, new_cache)`.
    """
    if cache is None:
      return self.head(self.features(input_ids, positions=positions))
    self._check_inputs(input_ids, cache, positions)
    c = self.config
    x, inv_freq = self._embed(input_ids)
    cache_ids = cache.segment_ids
    docs = None
    if positions is not None:
      if cache_ids is None:  # a Cache built without the field: no cached ids yet
        cache_ids = jnp.zeros((input_ids.shape[0], c.chunk_size), jnp.int32)
      docs = document_boundaries.from_positions(positions, cache_ids, cache.count)
    if c.scan_layers and c.num_layers > 1:
      x, new_layers = _scan_blocks(list(self.layers), x, inv_freq, "none", docs, cache.layers, cache.count)
    else:
      new_layers = cache.layers
      for i, block in enumerate(self.layers):
        x, layer_cache = block(x, inv_freq, cache.layer(i), cache.count, docs)
        new_layers = _write_layer_cache(new_layers, i, layer_cache, cache.count)
    x, norm_state = self.final_norm(x, cache.final_norm, resets=None if docs is None else docs.resets)
    logits = self.head(x[:, -1:] if last_only else x)
    if docs is not None:  # the ids of the slots every layer just wrote into its KV cache
      cache_ids = next_cache_segment_ids(cache_ids, docs.segment_ids, cache.count, c.chunk_size)
    count = (cache.count + input_ids.shape[1]) % c.chunk_size
    return logits, Cache(new_layers, norm_state, count, cache_ids)

  @under_matmul_precision
  def features(self, input_ids: jax.Array, *, positions: Optional[jax.Array] = None) -> jax.Array:
    """The final-norm output of a stand-alone sequence, the LM head's input: (B, L) ids -> (B, L, D) float32.

    `head(features(ids))` are the logits; training applies the head to a few positions at a time so that the
    (B, L, V) logits never exist whole (training/loss.py).
    """
    self._check_inputs(input_ids, None, positions)
    c = self.config
    x, inv_freq = self._embed(input_ids)
    docs = None if positions is None else document_boundaries.from_positions(positions)
    if c.scan_layers and c.num_layers > 1:
      x, _ = _scan_blocks(list(self.layers), x, inv_freq, c.remat_policy, docs)
    else:
      run = _remat_block(c.remat_policy)
      for block in self.layers:
        x, _ = run(block, x, inv_freq, docs)
    x, _ = self.final_norm(x, None, resets=None if docs is None else docs.resets)
    return constrain(x, ("batch", "length", "act_embed"))

  def _embed(self, input_ids: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(B, L) ids -> ((B, L, D) embeddings in the compute dtype, (dz/2,) float32 RoPE frequencies)."""
    c = self.config
    x = self.embed(input_ids)
    if c.scale_emb:
      x = x * jnp.asarray(math.sqrt(c.model_dim), x.dtype)
    x = constrain(self.emb_dropout(x), ("batch", "length", "act_embed"))
    return x, self.rope_freqs[...]

  @under_matmul_precision
  def head(self, x: jax.Array) -> jax.Array:
    """(B, L, D) -> (B, L, V_out) float32 logits; accumulation in float32 whatever the compute dtype."""
    if self.output is None:
      logits = self.embed.attend(x)
    else:
      kernel = self.output.kernel[...].astype(x.dtype)
      logits = jnp.dot(x, kernel, preferred_element_type=jnp.float32)
    return constrain(logits, ("batch", "length", "act_vocab"))

  def _check_inputs(self, input_ids: jax.Array, cache: Optional[Cache],
                    positions: Optional[jax.Array] = None) -> None:
    c = self.config
    check_token_inputs(input_ids, c.vocab_size, positions)
    if cache is not None:
      if not isinstance(cache.layers, LayerCache) or cache.layers.k.ndim != 5:
        raise ValueError("cache.layers must be one LayerCache stacked over the blocks on axis 1 (model.init_cache)")
      if cache.num_layers != c.num_layers:
        raise ValueError(f"cache has {cache.num_layers} layers; the model has num_layers={c.num_layers}")
      if cache.final_norm.mean.shape[0] != input_ids.shape[0]:
        raise ValueError(f"cache was made for batch size {cache.final_norm.mean.shape[0]}; input_ids has batch "
                         f"size {input_ids.shape[0]}")


def _remat_block(policy: str):
  """Calls a block, under `nnx.remat` with the configured policy unless it is "none"."""
  def run(block, x, inv_freq, docs=None):
    return block(x, inv_freq, docs=docs)
  if policy == "none":
    return run
  return nnx.remat(run, policy=getattr(jax.checkpoint_policies, REMAT_POLICIES[policy]))


def _stack_layer_caches(caches: list) -> LayerCache:
  """One LayerCache per block -> one LayerCache, every leaf stacked over the blocks on axis 1."""
  return jax.tree.map(lambda *leaves: jnp.stack(leaves, axis=1), *caches)


def _read_layer_cache(stacked: LayerCache, i) -> LayerCache:
  """Block i's slice of the stacked LayerCache (i: an int, or a traced int32 scalar)."""
  return jax.tree.map(lambda a: jax.lax.dynamic_index_in_dim(a, i, axis=1, keepdims=False), stacked)


def _write_layer_cache(stacked: LayerCache, i, new: Union[LayerCache, SlotWrite], count: jax.Array) -> LayerCache:
  """`stacked` with block i's slice replaced by `new` (an in-place update when the buffer is donated or carried);
  a SlotWrite (a one-token call's) replaces only KV slot `count` of block i, and its norm and CEMA states."""
  def write(a, n):
    return jax.lax.dynamic_update_index_in_dim(a, n.astype(a.dtype), i, axis=1)

  if isinstance(new, LayerCache):
    return jax.tree.map(write, stacked, new)

  def write_slot(a, row):  # row: (B, 1, H, d)
    zero = jnp.zeros((), jnp.int32)
    return jax.lax.dynamic_update_slice(a, row[:, None].astype(a.dtype),
                                        (zero, jnp.asarray(i, jnp.int32), count, zero, zero))

  return LayerCache(write_slot(stacked.k, new.k), write_slot(stacked.v, new.v),
                    jax.tree.map(write, stacked.norm, new.norm), write(stacked.cema, new.cema))


def _scan_blocks(blocks: list, x: jax.Array, inv_freq: jax.Array, policy: str,
                 docs: Optional[document_boundaries.Documents] = None, caches: Optional[LayerCache] = None,
                 count: Optional[jax.Array] = None):
  """All blocks as one `lax.scan`, so the block is traced and compiled once whatever the depth (training, and the
  streaming path's prefill and decode).

  Parameters stay stored per block (checkpoints, conversion and sharding rules are the same with or without
  scanning) and are stacked along a new leading axis for the call; this costs one transient copy of the block
  parameters and returns their gradients through the stack. The only state a call updates, the dropout RNG
  counters, is written back to each block. `caches` (the Cache's stacked LayerCache) rides in the scan's carry:
  block i reads and writes its slice in place, so streaming holds one copy of the cache, not three.

  x: (B, L, D) activations; docs: optional document boundaries (every block).
  Returns (x, the updated stacked LayerCache, or None without `caches`).
  """
  graphdef, stacked = stack_blocks(blocks)

  def body(carry, xs):
    h, layer_caches = carry
    state, i = xs
    block = nnx.merge(graphdef, state)
    if layer_caches is None:
      h, _ = block(h, inv_freq, docs=docs)
    else:
      h, layer_cache = block(h, inv_freq, _read_layer_cache(layer_caches, i), count, docs)
      layer_caches = _write_layer_cache(layer_caches, i, layer_cache, count)
    return (h, layer_caches), nnx.state(block, nnx.RngState)

  if policy != "none":
    body = jax.checkpoint(body, policy=getattr(jax.checkpoint_policies, REMAT_POLICIES[policy]))
  (x, caches), new_states = jax.lax.scan(body, (x, caches), (stacked, jnp.arange(len(blocks), dtype=jnp.int32)))
  for i, b in enumerate(blocks):
    nnx.update(b, jax.tree.map(lambda leaf: leaf[i], new_states))
  return x, caches
