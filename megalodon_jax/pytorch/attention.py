"""The attention sub-layer of a Megalodon block: TimestepNorm → CEMA → RMSNorm → normalised chunked attention.

Attention is block-diagonal causal over chunks of C tokens, with chunk-local RoPE positions
(docs/model.md#attention). The official code accepts only L < C or L % C == 0 (and, with a cache, count + L ≤ C);
here any length and any cached count work: the last chunk may be partial and a piece may cross chunk boundaries.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from megalodon_jax.pytorch.config import ModelConf
from megalodon_jax.pytorch.layers import ComplexEMA, RMSNorm, TimestepNorm

AttnCache = tuple[Tensor, Tensor, int]  # K (B, count, H, dz), V (B, count, H, dv), count


def rope_frequencies(head_dim: int, base: float) -> Tensor:
  """The official `rope.freqs` buffer, 1 / base^(2i/dz) for i < dz/2: (dz/2,) float32.

  The powers are taken in float64, rounded to float32, then inverted in float32 (the official construction).
  """
  powers = torch.tensor([base ** (j / head_dim) for j in range(0, head_dim, 2)], dtype=torch.float64).float()
  return 1.0 / powers


class RotaryEmbedding(nn.Module):
  """Holds the persistent `freqs` buffer (dz/2,); it stays float32 when the model is cast to another dtype."""

  def __init__(self, head_dim: int, base: float):
    super().__init__()
    self.register_buffer("freqs", rope_frequencies(head_dim, base))

  def _apply(self, fn, recurse=True):
    # model.to(torch.bfloat16) would round the frequencies; keep them float32 (only device moves apply).
    freqs = self.freqs
    super()._apply(fn, recurse)
    if self.freqs.dtype != torch.float32:
      self.freqs = freqs.to(device=self.freqs.device, dtype=torch.float32)
    return self

  def forward(self, x: Tensor, positions: Tensor) -> Tensor:
    """Rotates interleaved pairs (2i, 2i+1) of x (B, T, H, d) by positions (T,) × freqs_i, in float32.

    Returns (B, T, H, d) in x.dtype.
    """
    angle = positions.to(torch.float32).unsqueeze(-1) * self.freqs.float()  # (T, d/2)
    rot = torch.polar(torch.ones_like(angle), angle)[None, :, None, :]
    xc = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2).contiguous())
    return torch.view_as_real(xc * rot).flatten(-2).to(x.dtype)


def _attend(q: Tensor, k: Tensor, v: Tensor, allowed: Tensor, dropout: float, drop_key: bool) -> Tensor:
  """Masked attention with float32 softmax and unscaled logits.

  Args:
    q: (..., H, Tq, dz), k: (..., H, Tk, dz), v: (..., H, Tk, dv); allowed: (Tq, Tk) bool.
    dropout: attention dropout rate (0 outside training); drop_key: DropKey (mask logits before the softmax,
      the official fused kernel) rather than post-softmax dropout.
  Returns:
    (..., H, Tq, dv) in v.dtype.
  """
  scores = torch.matmul(q, k.transpose(-1, -2)).float()
  if dropout > 0 and drop_key:
    # A large finite penalty rather than -inf keeps a row whose keys were all dropped finite.
    scores = scores.masked_fill(torch.rand_like(scores) < dropout, -1e30)
  scores = scores.masked_fill(~allowed, float("-inf"))
  probs = torch.softmax(scores, dim=-1)
  if dropout > 0 and not drop_key:
    probs = F.dropout(probs, dropout, True)
  return torch.matmul(probs.to(v.dtype), v)


def chunked_causal_attention(q: Tensor, k: Tensor, v: Tensor, chunk_size: int, dropout: float = 0.0,
                             drop_key: bool = False) -> Tensor:
  """Block-diagonal causal attention over chunks of `chunk_size` tokens (the last one may be partial).

  Args:
    q, k: (B, L, H, dz) rotated with chunk-local positions; v: (B, L, H, dv).
  Returns:
    (B, L, H, dv) in v.dtype.
  """
  b, l, h, _ = q.shape
  c = min(chunk_size, l)
  nc = -(-l // c)
  pad = nc * c - l
  if pad:  # padded keys follow every real query of the last chunk, so the causal mask hides them
    q, k, v = (F.pad(t, (0, 0, 0, 0, 0, pad)) for t in (q, k, v))
  q, k, v = (t.reshape(b * nc, c, h, t.shape[-1]).transpose(1, 2) for t in (q, k, v))  # (B·nc, H, C, ·)
  if dropout > 0 and drop_key:
    allowed = torch.ones(c, c, dtype=torch.bool, device=q.device).tril()
    out = _attend(q, k, v, allowed, dropout, drop_key)
  else:
    # Fused kernels when available; they keep the softmax in float32 for half-precision inputs.
    out = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=True, scale=1.0)
  return out.transpose(1, 2).reshape(b, nc * c, h, -1)[:, :l]


def attention_with_cache(q: Tensor, k: Tensor, v: Tensor, cache: AttnCache, chunk_size: int, dropout: float = 0.0,
                         drop_key: bool = False):
  """Chunked causal attention continuing a stream whose current chunk already holds `count` tokens.

  The first min(L, C - count) new tokens finish the current chunk and attend to the cached keys; the rest start
  at a chunk boundary and need no cache.

  Args:
    q, k: (B, L, H, dz) rotated with positions (count + i) mod C; v: (B, L, H, dv).
    cache: (K (B, count, H, dz), V (B, count, H, dv), count).
  Returns:
    (B, L, H, dv) in v.dtype, and the new cache: keys/values of the last, unfinished chunk and their count.
  """
  cache_k, cache_v, count = cache
  if not 0 <= count < chunk_size or cache_k.shape[1] != count or cache_v.shape[1] != count:
    raise ValueError(f"attention cache holds K {tuple(cache_k.shape)}, V {tuple(cache_v.shape)} with count={count}; "
                     f"expected {count} cached tokens and 0 <= count < chunk_size={chunk_size}")
  l = q.shape[1]
  first = min(l, chunk_size - count)
  keys = torch.cat([cache_k.to(k.dtype), k[:, :first]], 1).transpose(1, 2)
  values = torch.cat([cache_v.to(v.dtype), v[:, :first]], 1).transpose(1, 2)
  # Query i (position count + i) sees keys at positions ≤ count + i.
  allowed = torch.ones(first, count + first, dtype=torch.bool, device=q.device).tril(diagonal=count)
  out = _attend(q[:, :first].transpose(1, 2), keys, values, allowed, dropout, drop_key).transpose(1, 2)
  if first < l:
    rest = chunked_causal_attention(q[:, first:], k[:, first:], v[:, first:], chunk_size, dropout, drop_key)
    out = torch.cat([out, rest], 1)
  new_count = (count + l) % chunk_size
  if first == l:  # the piece stays inside the current chunk: keep it all unless it completed the chunk
    new_k = torch.cat([cache_k.to(k.dtype), k], 1) if new_count else k[:, :0]
    new_v = torch.cat([cache_v.to(v.dtype), v], 1) if new_count else v[:, :0]
  else:  # the piece crossed a boundary: keep the tokens after the last one
    new_k, new_v = k[:, l - new_count:], v[:, l - new_count:]
  return out, (new_k.detach(), new_v.detach(), new_count)


class MovingAverageGatedAttention(nn.Module):
  """Official `MovingAverageGatedAttention`: y = x + dropout(wh1(mx) + wh2(dropout_h(attn ⊙ r)))."""

  def __init__(self, cfg: ModelConf):
    super().__init__()
    d, z, e, h = cfg.model_dim, cfg.z_dim, cfg.value_dim, cfg.num_heads
    self.num_heads, self.z_head_dim, self.v_head_dim = h, cfg.z_head_dim, cfg.v_head_dim
    self.chunk_size = cfg.chunk_size
    self.dropout, self.hidden_dropout, self.attention_dropout = cfg.dropout, cfg.hidden_dropout, cfg.attention_dropout
    self.drop_key = cfg.efficient_attn is not None
    self.timenorm = TimestepNorm(d, cfg.norm_num_groups, eps=cfg.norm_eps)
    self.cema = ComplexEMA(d, cfg.cema_ndim)
    self.rmsnorm = RMSNorm(d, eps=cfg.norm_eps, elementwise_affine=cfg.norm_affine)
    self.znorm = RMSNorm(self.z_head_dim, eps=cfg.norm_eps, elementwise_affine=False)
    self.wv = nn.Linear(d, e)
    self.wz = nn.Linear(d, z)
    self.wr = nn.Linear(d, e)
    self.wh1 = nn.Linear(d, d)
    self.wh2 = nn.Linear(e, d, bias=False)
    self.gamma = nn.Parameter(torch.zeros(2, z))
    self.beta = nn.Parameter(torch.zeros(2, z))

  def forward(self, x: Tensor, rope: RotaryEmbedding, cache=None):
    """Attention sub-layer.

    Args:
      x: (B, L, D) block input in the compute dtype.
      rope: the model's RotaryEmbedding.
      cache: None, or this layer's official cache tuple (attn_cache, norm_state, ema_state) with
        attn_cache = (K, V, count) or None, norm_state = (count, mean, var) or Nones, ema_state (B, D, N)
        complex64 or None.
    Returns:
      y = x + h (B, L, D) in x.dtype, and the updated cache tuple (None without a cache).
    """
    b, l, _ = x.shape
    h = self.num_heads
    p_drop = self.dropout if self.training else 0.0
    p_hidden = self.hidden_dropout if self.training else 0.0
    p_attn = self.attention_dropout if self.training else 0.0
    if cache is None:
      attn_cache, norm_state, hx = None, (None, None, None), None
    else:
      attn_cache, norm_state, hx = cache
      norm_state = norm_state if norm_state is not None else (None, None, None)
    xn, n_count, n_mean, n_var = self.timenorm(x, *norm_state)
    c, hx = self.cema(xn, hx, compute_last_state=cache is not None)
    mx = F.dropout(self.rmsnorm(c), p_hidden, self.training)

    z = self.znorm(self.wz(mx).view(b, l, h, self.z_head_dim)).view(b, l, -1)
    zz = z.unsqueeze(2) * ((self.gamma + 1.0) / math.sqrt(self.z_head_dim)) + self.beta  # (B, L, 2, Z)
    q, k = (t.reshape(b, l, h, self.z_head_dim) for t in zz.unbind(2))
    v = F.silu(self.wv(xn)).view(b, l, h, self.v_head_dim)
    r = F.silu(self.wr(mx))

    count = 0 if cache is None or attn_cache is None else int(attn_cache[2])
    positions = (torch.arange(l, device=x.device) + count) % self.chunk_size
    q, k = rope(q, positions), rope(k, positions)
    if cache is None:
      out = chunked_causal_attention(q, k, v, self.chunk_size, p_attn, self.drop_key)
      new_cache = None
    else:
      if attn_cache is None:
        attn_cache = (k[:, :0], v[:, :0], 0)
      out, attn_cache = attention_with_cache(q, k, v, attn_cache, self.chunk_size, p_attn, self.drop_key)
      new_cache = (attn_cache, (n_count.detach(), n_mean.detach(), n_var.detach()), hx.detach())
    a = F.dropout(out.reshape(b, l, -1) * r, p_hidden, self.training)
    y = F.dropout(self.wh1(mx) + self.wh2(a), p_drop, self.training)
    return y + x, new_cache
