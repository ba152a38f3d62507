"""The Megalodon decoder LM (official `Mega`) in plain PyTorch: embedding → blocks → TimestepNorm → LM head.

Module names, parameter/buffer names, shapes and dtypes are the official ones, so an official `state_dict()`
(e.g. `consolidated.pth`) loads with `load_state_dict(strict=True)`.

Cache (official layout, docs/streaming.md#per-layer-cache): `(layers, final_norm_state)` with, per layer,
`(attn_cache, norm_state, ema_state)`:
  attn_cache = (K (B, count, H, dz), V (B, count, H, dv), count): keys/values of the current, unfinished chunk;
  norm_state = (count (B,) int64, mean (B, G) float32, var (B, G) float32), or (None, None, None) at the start;
  ema_state = (B, D, N) complex64 CEMA state, or None at the start;
and final_norm_state the output TimestepNorm's (count, mean, var). `Mega.init_cache` builds the empty one.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from megalodon_jax.pytorch.attention import MovingAverageGatedAttention, RotaryEmbedding
from megalodon_jax.pytorch.config import ModelConf, require_vocab
from megalodon_jax.pytorch.layers import LayerNorm, TimestepNorm


class NormalizedFeedForwardNetwork(nn.Module):
  """out = residual + [alpha ⊙] dropout(fc2(dropout_h(act(LN(y))))), act = silu(fc1) [⊙ fc3 with SwiGLU]."""

  def __init__(self, cfg: ModelConf, layer_id: int):
    super().__init__()
    d, f = cfg.model_dim, cfg.ffn_hidden_dim
    self.dropout, self.hidden_dropout = cfg.dropout, cfg.hidden_dropout
    self.layer_id = layer_id
    # Learned layer scale (official rescale_nffn), initialised to 0.1 · 0.5^layer_id.
    self.alpha = nn.Parameter(torch.full((d,), 0.1 * 0.5 ** layer_id)) if cfg.rescale_nffn else None
    self.norm = LayerNorm(d, eps=cfg.norm_eps, elementwise_affine=cfg.norm_affine)
    self.fc1 = nn.Linear(d, f, bias=False)
    self.fc2 = nn.Linear(f, d, bias=False)
    self.fc3 = nn.Linear(d, f, bias=False) if cfg.swiglu else None

  def forward(self, y: Tensor, residual: Tensor) -> Tensor:
    """y: (B, L, D) attention output, residual: (B, L, D) block input (the two-hop residual). Returns (B, L, D)."""
    u = self.norm(y)
    hidden = F.silu(self.fc1(u))
    if self.fc3 is not None:
      hidden = hidden * self.fc3(u)
    out = self.fc2(F.dropout(hidden, self.hidden_dropout, self.training))
    out = F.dropout(out, self.dropout, self.training)
    if self.alpha is not None:
      out = out * self.alpha
    return out + residual


class MegaBlock(nn.Module):
  """One block: out = x + FFN(LN(x + h(x))) (official `MegaBlock`)."""

  def __init__(self, cfg: ModelConf, layer_id: int):
    super().__init__()
    self.layer_id = layer_id
    self.mega = MovingAverageGatedAttention(cfg)
    self.nffn = NormalizedFeedForwardNetwork(cfg, layer_id)

  def forward(self, x: Tensor, rope: RotaryEmbedding, cache=None):
    """x: (B, L, D) -> ((B, L, D), the layer's updated cache tuple or None)."""
    y, cache = self.mega(x, rope, cache)
    return self.nffn(y, x), cache


class MegaOutputLayer(nn.Module):
  """Final TimestepNorm and the LM head (no bias; tied to the embedding when share_emb)."""

  def __init__(self, cfg: ModelConf, embed_weight: nn.Parameter):
    super().__init__()
    self.final_norm = TimestepNorm(cfg.model_dim, cfg.norm_num_groups, eps=cfg.norm_eps)
    self.output = nn.Linear(cfg.model_dim, cfg.out_size, bias=False)
    if cfg.share_emb:
      self.output.weight = embed_weight

  def forward(self, x: Tensor, cache=None):
    """x: (B, L, D) -> logits (B, L, V_out) in x.dtype, and the final norm's (count, mean, var) or None."""
    state = (None, None, None) if cache is None else cache
    x, count, mean, var = self.final_norm(x, *state)
    new_cache = None if cache is None else (count.detach(), mean.detach(), var.detach())
    return self.output(x), new_cache


class Mega(nn.Module):
  """The Megalodon LM with the official module tree, forward signature and cache layout.

  `model(tokens)` returns `(logits, None)`; `model(tokens, cache)` continues a stream and returns
  `(logits, new_cache)` (start from `model.init_cache(batch_size)`). Any split of a sequence into pieces, of any
  lengths, gives the logits of one full forward. Logits are float32 whatever the model dtype; CEMA, norm
  statistics, RoPE and softmax run in float32 after `model.to(torch.bfloat16)` too.
  """

  def __init__(self, cfg: ModelConf, *, init: bool = True, generator: Optional[torch.Generator] = None):
    """Builds the model.

    Args:
      cfg: a ModelConf (or anything `ModelConf.from_dict` accepts) with vocab_size set.
      init: apply the official initialisation (cfg.init_mode); False leaves placeholders (zeros / torch
        defaults), e.g. to load a checkpoint right after.
      generator: torch RNG for the initialisation.
    """
    super().__init__()
    cfg = ModelConf.from_dict(cfg)
    require_vocab(cfg)
    self.cfg = cfg
    self.vocab_size, self.num_layers, self.model_dim = cfg.vocab_size, cfg.num_layers, cfg.model_dim
    self.chunk_size, self.output_size = cfg.chunk_size, cfg.out_size
    self.embed = nn.Embedding(cfg.vocab_size, cfg.model_dim)
    self.rope = RotaryEmbedding(cfg.z_head_dim, cfg.effective_rope_base)
    self.layers = nn.ModuleList(MegaBlock(cfg, i) for i in range(cfg.num_layers))
    self.output = MegaOutputLayer(cfg, self.embed.weight)
    if init:
      self.reset_parameters(generator)

  @torch.no_grad()
  def reset_parameters(self, generator: Optional[torch.Generator] = None) -> None:
    """Official initialisation (docs/model.md#initialisation): linears by init_mode with zero biases, embedding/head
    truncated normal std 1/√D (±3σ), the CEMA recipe, norms and attention gamma/beta zero, nffn.alpha 0.1·0.5^layer."""
    std = 1.0 / math.sqrt(self.model_dim)
    nn.init.trunc_normal_(self.embed.weight, std=std, a=-3 * std, b=3 * std, generator=generator)
    if not self.cfg.share_emb:
      nn.init.trunc_normal_(self.output.output.weight, std=std, a=-3 * std, b=3 * std, generator=generator)
    for block in self.layers:
      m, f = block.mega, block.nffn
      for lin in (m.wv, m.wz, m.wr, m.wh1, m.wh2, f.fc1, f.fc2, f.fc3):
        if lin is not None:
          _init_linear(lin, self.cfg.init_mode, generator)
      m.cema.reset_parameters(generator)
      for t in (m.gamma, m.beta, m.timenorm.weight, m.timenorm.bias, m.rmsnorm.weight, f.norm.weight, f.norm.bias):
        if t is not None:
          t.zero_()
      if f.alpha is not None:
        f.alpha.fill_(0.1 * 0.5 ** block.layer_id)
    self.output.final_norm.weight.zero_()
    self.output.final_norm.bias.zero_()

  def init_cache(self, batch_size: int):
    """The empty streaming cache for `batch_size` rows (the official `init_cache` layout; see module doc)."""
    p = next(self.parameters())
    h = self.cfg.num_heads
    layers = [((torch.empty(batch_size, 0, h, self.cfg.z_head_dim, dtype=p.dtype, device=p.device),
                torch.empty(batch_size, 0, h, self.cfg.v_head_dim, dtype=p.dtype, device=p.device), 0),
               (None, None, None), None) for _ in range(self.num_layers)]
    return layers, (None, None, None)

  def forward(self, tokens: Tensor, cache=None):
    """Forward pass.

    Args:
      tokens: (B, L) integer token ids in [0, vocab_size), L ≥ 1.
      cache: None (a stand-alone sequence) or a cache from `init_cache` / a previous call.
    Returns:
      logits (B, L, V_out) float32, and the new cache (None when `cache` is None).
    """
    self._check_inputs(tokens, cache)
    x = self.embed(tokens)
    if self.cfg.scale_emb:
      x = x * math.sqrt(self.model_dim)
    x = F.dropout(x, self.cfg.dropout, self.training)
    cache_layers, cache_output = (None, None) if cache is None else cache
    new_layers = []
    for i, layer in enumerate(self.layers):
      if cache is None and self.cfg.layerwise_ckpt and self.training and torch.is_grad_enabled():
        x, _ = checkpoint(layer, x, self.rope, None, use_reentrant=False)
      else:
        x, layer_cache = layer(x, self.rope, None if cache is None else cache_layers[i])
        new_layers.append(layer_cache)
    if cache is not None:
      cache_output = (None, None, None) if cache_output is None else cache_output
    logits, cache_output = self.output(x, cache_output)
    return logits.float(), (None if cache is None else (new_layers, cache_output))

  def _check_inputs(self, tokens: Tensor, cache) -> None:
    if not isinstance(tokens, Tensor) or tokens.dim() != 2:
      raise ValueError(f"tokens must be a (batch, length) tensor; got {getattr(tokens, 'shape', type(tokens))}")
    if tokens.dtype.is_floating_point or tokens.dtype.is_complex or tokens.dtype == torch.bool:
      raise TypeError(f"tokens must be integers; got dtype {tokens.dtype}")
    if tokens.shape[1] == 0:
      raise ValueError("tokens has length 0; pass at least one token")
    lo, hi = int(tokens.min()), int(tokens.max())  # a bad id would be a device-side assert on CUDA
    if lo < 0 or hi >= self.vocab_size:
      bad = lo if lo < 0 else hi
      where = tuple(int(i) for i in (tokens == bad).nonzero()[0])
      raise ValueError(f"token id {bad} at position {where} is outside [0, vocab_size={self.vocab_size})")
    if cache is not None:
      if not isinstance(cache, (tuple, list)) or len(cache) != 2 or len(cache[0]) != self.num_layers:
        raise ValueError(f"cache must be (layers, final_norm_state) with {self.num_layers} layers; build it with "
                         "init_cache(batch_size)")
      mean = cache[1][1] if cache[1] is not None else None
      if mean is not None and mean.shape[0] != tokens.shape[0]:
        raise ValueError(f"cache was made for batch size {mean.shape[0]}; tokens has batch size {tokens.shape[0]}")


def _init_linear(lin: nn.Linear, mode: str, generator: Optional[torch.Generator]) -> None:
  """Official `get_init_fn(mode)` on the weight (out, in); biases zero."""
  w = lin.weight
  if mode == "he":  # kaiming_normal_ with a = √5: std = 1 / √(3 · fan_in)
    nn.init.kaiming_normal_(w, a=math.sqrt(5.0), generator=generator)
  elif mode == "bert":
    nn.init.normal_(w, std=0.02, generator=generator)
  elif mode == "gaussian":  # no dim passed for linears: std 1, truncated at ±3
    nn.init.trunc_normal_(w, std=1.0, a=-3.0, b=3.0, generator=generator)
  elif mode == "xavier":
    nn.init.xavier_uniform_(w, generator=generator)
  # "none": left as constructed (meant to be overwritten by a checkpoint)
  if lin.bias is not None:
    lin.bias.zero_()
