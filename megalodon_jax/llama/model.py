"""LlamaLM: the Llama-style baseline (Hugging Face `transformers` LlamaForCausalLM, bit for bit in its conventions).

embedding -> num_layers x [x + attention(RMSNorm(x)); x + SwiGLU(RMSNorm(x))] -> RMSNorm -> LM head (tied to the
embedding with `share_emb`). Attention is full causal grouped-query attention with rotate-half RoPE
(ops/full_attention.py); no biases, no dropout, no buffers (RoPE is computed from the positions). Parameter names:
embed.weight (V, D), layers.{i}.attention_norm.weight, layers.{i}.attention.w{q,k,v,o}.kernel, layers.{i}.ffn_norm
.weight, layers.{i}.mlp.w{1,2,3}.kernel, final_norm.weight, output.kernel; kernels stored (in, out), the transpose
of torch's weight (convert/hf_llama.py maps them).

Streaming: `init_cache(batch, max_length)` allocates a KV cache of `max_length` slots per layer (a Llama cache has
no bound of its own, so its capacity must be given); `model(ids, cache=cache)` writes the new keys and values at
the cache's `length`, attends causally to every slot before them, and returns (logits, cache); any split of a
sequence into pieces gives the logits of one full forward.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from megalodon_jax.config import REMAT_POLICIES
from megalodon_jax.llama.config import LlamaConfig
from megalodon_jax.nn.inputs import check_token_inputs
from megalodon_jax.nn.precision import under_matmul_precision
from megalodon_jax.nn.stacking import stack_blocks
from megalodon_jax.nn.layers import Embed, Linear
from megalodon_jax.ops.full_attention import (apply_rope, full_attention, rope_cos_sin,
                                              segment_ids_from_positions)
from megalodon_jax.ops.partitioning import constrain


class LlamaLayerCache(NamedTuple):
  """One layer's keys and values: k, v (B, max_length, K, hd) in the compute dtype (RoPE applied to k)."""
  k: jax.Array
  v: jax.Array


class LlamaCache(NamedTuple):
  """Streaming state of LlamaLM; a pytree, usable under `jax.jit`.

  layers: one LlamaLayerCache per block.  length: () int32, tokens held (slots [0, length) are filled).
  segment_ids: (B, max_length) int32 document ids of the slots (a call with `positions` starts documents).
  next_position: (B,) int32 RoPE position of the next token in its document (= length without `positions`).
  """
  layers: tuple[LlamaLayerCache, ...]
  length: jax.Array
  segment_ids: jax.Array
  next_position: jax.Array

  @property
  def max_length(self) -> int:
    return self.segment_ids.shape[1]



def _normal(std: float):
  def init(key, shape, dtype=jnp.float32):
    return (std * jax.random.normal(key, shape, jnp.float32)).astype(dtype)
  return init


class LlamaRMSNorm(nnx.Module):
  """Hugging Face LlamaRMSNorm: weight * (x * rsqrt(mean(x^2) + eps)), statistics in float32 and the normalised
  value cast back to x's dtype before the (ones-initialised) weight multiplies it."""

  def __init__(self, features: int, *, eps: float, param_dtype: jnp.dtype):
    self.weight = nnx.Param(jnp.ones((features,), param_dtype), logical_axes=("norm",))
    self.eps = eps

  def __call__(self, x: jax.Array) -> jax.Array:
    xf = x.astype(jnp.float32)
    y = (xf * jax.lax.rsqrt(jnp.mean(jnp.square(xf), axis=-1, keepdims=True) + self.eps)).astype(x.dtype)
    return y * self.weight[...].astype(x.dtype)


class LlamaAttention(nnx.Module):
  """q, k, v, o projections and full causal grouped-query attention with RoPE."""

  def __init__(self, c: LlamaConfig, *, rngs: nnx.Rngs):
    dt, pdt = jnp.dtype(c.dtype), jnp.dtype(c.param_dtype)
    kw = dict(use_bias=False, init_mode="bert", dtype=dt, param_dtype=pdt, rngs=rngs, kernel_init=_normal(c.init_std))
    hd = c.head_size
    self.wq = Linear(c.model_dim, c.num_heads * hd, axes=("embed", "qk"), **kw)
    self.wk = Linear(c.model_dim, c.kv_heads * hd, axes=("embed", "qk"), **kw)
    self.wv = Linear(c.model_dim, c.kv_heads * hd, axes=("embed", "qk"), **kw)
    self.wo = Linear(c.num_heads * hd, c.model_dim, axes=("qk", "embed"), **kw)
    self.num_heads, self.kv_heads, self.head_size = c.num_heads, c.kv_heads, hd
    self.impl = c.full_attention_impl

  def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array, segment_ids: Optional[jax.Array] = None,
               cache: Optional[LlamaLayerCache] = None, length: Optional[jax.Array] = None,
               kv_segment_ids: Optional[jax.Array] = None) -> tuple[jax.Array, Optional[LlamaLayerCache]]:
    """x (B, L, D), cos / sin (B or 1, L, hd) -> ((B, L, D), the layer cache with these tokens written at
    `length`, or None without a cache)."""
    b, l, _ = x.shape
    hd = self.head_size
    q = apply_rope(self.wq(x).reshape(b, l, self.num_heads, hd), cos, sin)
    k = apply_rope(self.wk(x).reshape(b, l, self.kv_heads, hd), cos, sin)
    v = self.wv(x).reshape(b, l, self.kv_heads, hd)
    q = constrain(q, ("batch", "length", "heads", None))
    k = constrain(k, ("batch", "length", "heads", None))
    v = constrain(v, ("batch", "length", "heads", None))
    if cache is None:
      out = full_attention(q, k, v, impl=self.impl, q_segment_ids=segment_ids)
    else:
      start = (0, length, 0, 0)
      ck = jax.lax.dynamic_update_slice(cache.k, k.astype(cache.k.dtype), start)
      cv = jax.lax.dynamic_update_slice(cache.v, v.astype(cache.v.dtype), start)
      cache = LlamaLayerCache(ck, cv)
      out = full_attention(q, ck, cv, impl=self.impl, q_offset=length, q_segment_ids=segment_ids,
                           kv_segment_ids=kv_segment_ids)
    out = constrain(out, ("batch", "length", "heads", None))
    return self.wo(out.reshape(b, l, self.num_heads * hd)), cache


class LlamaMLP(nnx.Module):
  """SwiGLU: w2(silu(w1 x) * w3 x); w1 = gate_proj, w3 = up_proj, w2 = down_proj."""

  def __init__(self, c: LlamaConfig, *, rngs: nnx.Rngs):
    dt, pdt = jnp.dtype(c.dtype), jnp.dtype(c.param_dtype)
    kw = dict(use_bias=False, init_mode="bert", dtype=dt, param_dtype=pdt, rngs=rngs, kernel_init=_normal(c.init_std))
    self.w1 = Linear(c.model_dim, c.ffn_hidden_dim, axes=("embed", "mlp"), **kw)
    self.w3 = Linear(c.model_dim, c.ffn_hidden_dim, axes=("embed", "mlp"), **kw)
    self.w2 = Linear(c.ffn_hidden_dim, c.model_dim, axes=("mlp", "embed"), **kw)

  def __call__(self, x: jax.Array) -> jax.Array:
    h = jax.nn.silu(self.w1(x)) * self.w3(x)
    return self.w2(constrain(h, ("batch", "length", "act_mlp")))


class LlamaBlock(nnx.Module):
  """x + attention(attention_norm(x)), then + mlp(ffn_norm(x)) (HF LlamaDecoderLayer)."""

  def __init__(self, c: LlamaConfig, *, rngs: nnx.Rngs):
    pdt = jnp.dtype(c.param_dtype)
    self.attention_norm = LlamaRMSNorm(c.model_dim, eps=c.norm_eps, param_dtype=pdt)
    self.attention = LlamaAttention(c, rngs=rngs)
    self.ffn_norm = LlamaRMSNorm(c.model_dim, eps=c.norm_eps, param_dtype=pdt)
    self.mlp = LlamaMLP(c, rngs=rngs)

  def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array, segment_ids: Optional[jax.Array] = None,
               cache: Optional[LlamaLayerCache] = None, length: Optional[jax.Array] = None,
               kv_segment_ids: Optional[jax.Array] = None) -> tuple[jax.Array, Optional[LlamaLayerCache]]:
    a, cache = self.attention(self.attention_norm(x), cos, sin, segment_ids, cache, length, kv_segment_ids)
    x = constrain(x + a, ("batch", "length", "act_embed"))
    x = constrain(x + self.mlp(self.ffn_norm(x)), ("batch", "length", "act_embed"))
    return x, cache


class LlamaLM(nnx.Module):
  """The Llama baseline LM (family "llama"): `model(ids)` -> float32 logits (B, L, V); `model(ids, cache=cache)`
  -> (logits, cache), starting from `init_cache(batch_size, max_length)`."""

  def __init__(self, config: LlamaConfig, *, rngs: nnx.Rngs):
    c = config
    self.config = c
    dt, pdt = jnp.dtype(c.dtype), jnp.dtype(c.param_dtype)
    self.embed = Embed(c.vocab_size, c.model_dim, init=_normal(c.init_std), dtype=dt, param_dtype=pdt, rngs=rngs)
    self.layers = nnx.List([LlamaBlock(c, rngs=rngs) for _ in range(c.num_layers)])
    self.final_norm = LlamaRMSNorm(c.model_dim, eps=c.norm_eps, param_dtype=pdt)
    self.output = None if c.share_emb else Linear(
        c.model_dim, c.vocab_size, use_bias=False, init_mode="bert", axes=("embed", "vocab"), dtype=dt,
        param_dtype=pdt, rngs=rngs, kernel_init=_normal(c.init_std))

  def init_cache(self, batch_size: int, max_length: Optional[int] = None) -> LlamaCache:
    """An empty KV cache of `max_length` slots (required: the most tokens the stream will hold)."""
    c = self.config
    if max_length is None:
      raise ValueError("a Llama KV cache must be told its capacity: init_cache(batch_size, max_length=N), N the "
                       "most tokens the stream will hold (prompt + generated)")
    if not isinstance(max_length, (int, np.integer)) or isinstance(max_length, bool) or max_length <= 0:
      raise ValueError(f"max_length must be a positive integer; got {max_length!r}")
    if not isinstance(batch_size, (int, np.integer)) or batch_size <= 0:
      raise ValueError(f"batch_size must be a positive integer; got {batch_size!r}")
    dt = jnp.dtype(c.dtype)
    shape = (batch_size, int(max_length), c.kv_heads, c.head_size)
    layers = tuple(LlamaLayerCache(jnp.zeros(shape, dt), jnp.zeros(shape, dt)) for _ in range(c.num_layers))
    return LlamaCache(layers, jnp.zeros((), jnp.int32), jnp.zeros((batch_size, int(max_length)), jnp.int32),
                      jnp.zeros((batch_size,), jnp.int32))

  @under_matmul_precision
  def __call__(self, input_ids: jax.Array, cache: Optional[LlamaCache] = None, *,
               positions: Optional[jax.Array] = None, last_only: bool = False):
    """Forward pass.

    Args:
      input_ids: (B, L) integer token ids in [0, vocab_size).
      cache: None for a stand-alone sequence, or a LlamaCache from `init_cache` / a previous call.
      positions: optional (B, L) int index of each token in its document (0 starts one): RoPE takes these
        positions and attention stays within a document. With a cache, a document continues across calls until a
        0 starts the next; without positions a call continues the cache's last document.
      last_only: with a cache, the logits of the last position only, (B, 1, V) (a prefill's).
    Returns:
      logits (B, L, V) float32; with a cache, `(logits, new_cache)`. An eager call whose tokens do not fit in the
      cache raises ValueError (under jit the length is not known: size the cache for the whole stream).
    """
    if cache is None:
      return self.head(self.features(input_ids, positions=positions))
    self._check_inputs(input_ids, cache, positions)
    c = self.config
    b, l = input_ids.shape
    length = cache.length
    last = jax.lax.dynamic_index_in_dim(cache.segment_ids, jnp.maximum(length - 1, 0), axis=1, keepdims=False)
    prev_doc = jnp.where(length > 0, last, 0)  # (B,) the document the cache ends in
    if positions is None:
      pos = cache.next_position[:, None] + jnp.arange(l, dtype=jnp.int32)
      new_ids = jnp.broadcast_to(prev_doc[:, None], (b, l))
    else:
      pos = positions.astype(jnp.int32)
      new_ids = prev_doc[:, None] + segment_ids_from_positions(pos)
    kv_ids = jax.lax.dynamic_update_slice(cache.segment_ids, new_ids, (0, length))
    cos, sin = rope_cos_sin(pos, c.head_size, c.effective_rope_base)
    x = self._embed(input_ids)
    layers = []
    for block, layer_cache in zip(self.layers, cache.layers):
      x, layer_cache = block(x, cos, sin, new_ids, layer_cache, length, kv_ids)
      layers.append(layer_cache)
    logits = self.head(self.final_norm(x[:, -1:] if last_only else x).astype(jnp.float32))
    return logits, LlamaCache(tuple(layers), length + l, kv_ids, pos[:, -1] + 1)

  @under_matmul_precision
  def features(self, input_ids: jax.Array, *, positions: Optional[jax.Array] = None) -> jax.Array:
    """The final-norm output of a stand-alone sequence, the LM head's input: (B, L) ids -> (B, L, D) float32."""
    self._check_inputs(input_ids, None, positions)
    c = self.config
    l = input_ids.shape[1]
    if positions is None:
      pos, segment_ids = jnp.arange(l, dtype=jnp.int32)[None], None
    else:
      pos = positions.astype(jnp.int32)
      segment_ids = segment_ids_from_positions(pos)
    cos, sin = rope_cos_sin(pos, c.head_size, c.effective_rope_base)
    x = self._embed(input_ids)
    if c.scan_layers and c.num_layers > 1:
      x = _scan_blocks(list(self.layers), x, cos, sin, segment_ids, c.remat_policy)
    else:
      run = _remat_block(c.remat_policy)
      for block in self.layers:
        x = run(block, x, cos, sin, segment_ids)
    x = self.final_norm(x).astype(jnp.float32)
    return constrain(x, ("batch", "length", "act_embed"))

  def _embed(self, input_ids: jax.Array) -> jax.Array:
    return constrain(self.embed(input_ids), ("batch", "length", "act_embed"))

  @under_matmul_precision
  def head(self, x: jax.Array) -> jax.Array:
    """(B, L, D) -> (B, L, V) float32 logits: x in the compute dtype, accumulation in float32."""
    if self.output is None:
      logits = self.embed.attend(x)
    else:
      dt = jnp.dtype(self.config.dtype)
      logits = jnp.dot(x.astype(dt), self.output.kernel[...].astype(dt), preferred_element_type=jnp.float32)
    return constrain(logits, ("batch", "length", "act_vocab"))

  def _check_inputs(self, input_ids: jax.Array, cache: Optional[LlamaCache],
                    positions: Optional[jax.Array] = None) -> None:
    c = self.config
    check_token_inputs(input_ids, c.vocab_size, positions)
    if cache is not None:
      if not isinstance(cache, LlamaCache):
        raise TypeError(f"cache must be a LlamaCache from init_cache; got {type(cache).__name__}")
      if len(cache.layers) != c.num_layers:
        raise ValueError(f"cache has {len(cache.layers)} layers; the model has num_layers={c.num_layers}")
      if cache.segment_ids.shape[0] != input_ids.shape[0]:
        raise ValueError(f"cache was made for batch size {cache.segment_ids.shape[0]}; input_ids has batch "
                         f"size {input_ids.shape[0]}")
      try:  # an eager call: the cache's length is known, so an overflow is caught here
        held = int(np.asarray(cache.length))
      except jax.errors.TracerArrayConversionError:
        held = None
      if held is not None and held + input_ids.shape[1] > cache.max_length:
        raise ValueError(f"the KV cache holds {held} of {cache.max_length} tokens and cannot take "
                         f"{input_ids.shape[1]} more; make it with init_cache(batch_size, max_length=N) for a "
                         "larger N")


def _remat_block(policy: str):
  """Calls a block without a cache, under `nnx.remat` with the configured policy unless it is "none"."""
  def run(block, x, cos, sin, segment_ids=None):
    return block(x, cos, sin, segment_ids)[0]
  if policy == "none":
    return run
  return nnx.remat(run, policy=getattr(jax.checkpoint_policies, REMAT_POLICIES[policy]))


def _scan_blocks(blocks: list, x: jax.Array, cos: jax.Array, sin: jax.Array, segment_ids: Optional[jax.Array],
                 policy: str) -> jax.Array:
  """All blocks as one `lax.scan` (parameters stay stored per block and are stacked for the call, as in
  megalodon_jax.model's scan); the blocks hold no state a call updates."""
  graphdef, stacked = stack_blocks(blocks)

  def body(h, state):
    h, _ = nnx.merge(graphdef, state)(h, cos, sin, segment_ids)
    return h, None

  if policy != "none":
    body = jax.checkpoint(body, policy=getattr(jax.checkpoint_policies, REMAT_POLICIES[policy]))
  x, _ = jax.lax.scan(body, x, stacked)
  return x
