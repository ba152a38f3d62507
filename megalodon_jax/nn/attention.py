"""MovingAverageGatedAttention: TimestepNorm → CEMA → RMSNorm → normalised chunked attention.

See docs/model.md#attention."""

from __future__ import annotations

from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
from flax import nnx

from megalodon_jax.config import MegalodonConfig
from megalodon_jax.nn.cema import ComplexEMA
from megalodon_jax.nn.document_boundaries import Documents
from megalodon_jax.nn.layers import Linear, RMSNorm, TimestepNorm
from megalodon_jax.ops import attention as attn_ops
from megalodon_jax.ops.impl_names import pallas_dropout_problem
from megalodon_jax.ops.partitioning import constrain
from megalodon_jax.ops.timestep_norm import NormState

BTD = ("batch", "length", "act_embed")
BTHD = ("batch", "length", "heads", None)


class LayerCache(NamedTuple):
  """Streaming state of one block.

  k: (B, C, H, dz), v: (B, C, H, dv) in the compute dtype: keys (rotated) and values of the current chunk; only
    the first `count` slots (kept once, on the model's Cache) are meaningful.
  norm: the TimestepNorm state.  cema: (B, D, N, 2) float32 CEMA state (real, imag).
  """
  k: jax.Array
  v: jax.Array
  norm: NormState
  cema: jax.Array


class SlotWrite(NamedTuple):
  """What a one-token call changes in a LayerCache: the new token's key and value, which belong in slot `count`
  (k: (B, 1, H, dz), v: (B, 1, H, dv)), and the whole (small) norm and CEMA states. The model writes just that
  slot into its stacked cache; a whole updated (B, C, H, d) slice would cost XLA a copy of it on every step."""
  k: jax.Array
  v: jax.Array
  norm: NormState
  cema: jax.Array


def _dropout(rate: float, rngs: nnx.Rngs) -> nnx.Dropout:
  # Streams only where a rate is set, so dropout-free models carry no RNG state.
  return nnx.Dropout(rate, rngs=rngs if rate > 0 else None)


class MovingAverageGatedAttention(nnx.Module):
  """The attention sub-layer of a Megalodon block: y = x + h(x) (no update gate, no activation on h)."""

  def __init__(self, config: MegalodonConfig, *, rngs: nnx.Rngs):
    c = config
    dt, pdt = jnp.dtype(c.dtype), jnp.dtype(c.param_dtype)
    D, Z, E = c.model_dim, c.z_dim, c.value_dim

    def linear(din, dout, axes, bias=True):
      return Linear(din, dout, use_bias=bias, init_mode=c.init_mode, axes=axes, dtype=dt, param_dtype=pdt, rngs=rngs)

    self.timenorm = TimestepNorm(D, c.norm_num_groups, eps=c.norm_eps, param_dtype=pdt)
    self.cema = ComplexEMA(D, c.cema_ndim, impl=c.cema_impl, param_dtype=pdt, rngs=rngs)
    self.rmsnorm = RMSNorm(D, eps=c.norm_eps, affine=c.norm_affine, param_dtype=pdt)
    self.wv = linear(D, E, ("embed", "value"))
    self.wz = linear(D, Z, ("embed", "qk"))
    self.wr = linear(D, E, ("embed", "value"))
    self.wh1 = linear(D, D, ("embed", "embed_out"))
    self.wh2 = linear(E, D, ("value", "embed"), bias=False)
    self.gamma = nnx.Param(jnp.zeros((2, Z), pdt), logical_axes=(None, "qk"))
    self.beta = nnx.Param(jnp.zeros((2, Z), pdt), logical_axes=(None, "qk"))
    self.hidden_dropout = _dropout(c.hidden_dropout, rngs)
    self.dropout = _dropout(c.dropout, rngs)
    self.attention_dropout = c.attention_dropout
    self.attention_rngs = rngs["dropout"].fork() if c.attention_dropout > 0 else nnx.data(None)
    self.drop_key = c.efficient_attn is not None
    self.attention_impl = c.attention_impl  # resolved per call: "auto" depends on the platform it is traced for
    self.deterministic = False
    self.num_heads = c.num_heads
    self.chunk_size = c.chunk_size
    self.norm_eps = c.norm_eps
    self.dtype = dt

  def __call__(self, x: jax.Array, inv_freq: jax.Array, cache: Optional[LayerCache] = None,
               count: Optional[jax.Array] = None, docs: Optional[Documents] = None):
    """Attention sub-layer.

    Args:
      x: (B, L, D) block input in the compute dtype.
      inv_freq: (dz/2,) float32 RoPE frequencies.
      cache: this layer's LayerCache to continue a stream, or None for a stand-alone sequence.
      count: () int32 tokens already in the current chunk (with a cache).
      docs: document boundaries of packed rows (nn/document_boundaries.py), or None: TimestepNorm and CEMA restart at
        `docs.resets`, attention never crosses a document (`docs.segment_ids`; with a cache the cached slots' ids
        are `docs.cache_segment_ids`, the model's Cache.segment_ids, which the layer does not return).
    Returns:
      y = x + h: (B, L, D) in the compute dtype, and the updated LayerCache (None without a cache; a SlotWrite
      after one token).
    """
    b, l, _ = x.shape
    h = self.num_heads
    resets = None if docs is None else docs.resets
    segment_ids = None if docs is None else docs.segment_ids
    xn, norm_state = self.timenorm(x, None if cache is None else cache.norm, resets=resets)
    c, cema_state = self.cema(constrain(xn, BTD), None if cache is None else cache.cema,
                              return_state=cache is not None, resets=resets)
    mx = constrain(self.hidden_dropout(self.rmsnorm(constrain(c, BTD)).astype(self.dtype)), BTD)

    q, k = attn_ops.normalized_qk(self.wz(mx), self.gamma[...], self.beta[...], h, self.norm_eps)
    q, k = constrain(q, BTHD), constrain(k, BTHD)
    v = constrain(jax.nn.silu(self.wv(xn)).reshape(b, l, h, -1), BTHD)
    r = constrain(jax.nn.silu(self.wr(mx)), ("batch", "length", "act_value"))

    rate = 0.0 if self.deterministic else self.attention_dropout
    drop = dict(dropout_rate=rate, dropout_rng=self.attention_rngs() if rate > 0 else None, drop_key=self.drop_key,
                impl=attn_ops.resolve_attention_impl(
                    self.attention_impl, chunk_size=self.chunk_size, z_head_dim=q.shape[-1], v_head_dim=v.shape[-1],
                    # a measured "pallas" must not turn a dropout the kernel cannot run into an error
                    pallas_ok=pallas_dropout_problem(rate, self.drop_key) is None))
    offset = 0 if cache is None else count
    positions = (offset + jnp.arange(l)) % self.chunk_size
    q, k = attn_ops.rope(q, inv_freq, positions), attn_ops.rope(k, inv_freq, positions)
    if cache is None:
      out = attn_ops.chunked_causal_attention(q, k, v, self.chunk_size, segment_ids=segment_ids, **drop)
      new_cache = None
    else:
      out, ck, cv, *_ = attn_ops.attention_with_cache(q, k, v, cache.k, cache.v, count, self.chunk_size,
                                                      segment_ids=segment_ids,
                                                      cache_segment_ids=None if docs is None else
                                                      docs.cache_segment_ids, **drop)
      new_cache = LayerCache(ck, cv, norm_state, cema_state) if l > 1 else SlotWrite(
          k.astype(cache.k.dtype), v.astype(cache.v.dtype), norm_state, cema_state)
    out = constrain(out, BTHD)
    a = self.hidden_dropout(out.reshape(b, l, -1) * r)
    y = self.dropout(self.wh1(mx) + self.wh2(a))
    return y + x, new_cache
