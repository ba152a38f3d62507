"""MegalodonBlock: attention sub-layer then FFN, with the two-hop residual out = x + FFN(LN(x + h(x)))."""

from __future__ import annotations

from typing import Optional

import jax
from flax import nnx

from megalodon_jax.config import MegalodonConfig
from megalodon_jax.nn.attention import LayerCache, MovingAverageGatedAttention
from megalodon_jax.nn.document_boundaries import Documents
from megalodon_jax.nn.ffn import NormalizedFeedForward
from megalodon_jax.ops.partitioning import constrain

BTD = ("batch", "length", "act_embed")


class MegalodonBlock(nnx.Module):
  """One block (official `MegaBlock`): `mega` (attention unit) and `nffn` (feed-forward)."""

  def __init__(self, config: MegalodonConfig, layer_id: int, *, rngs: nnx.Rngs):
    self.mega = MovingAverageGatedAttention(config, rngs=rngs)
    self.nffn = NormalizedFeedForward(config, layer_id, rngs=rngs)

  def __call__(self, x: jax.Array, inv_freq: jax.Array, cache: Optional[LayerCache] = None,
               count: Optional[jax.Array] = None, docs: Optional[Documents] = None):
    """x: (B, L, D) -> ((B, L, D), updated LayerCache or None). The FFN's residual is the block input x.

    docs: the rows' document boundaries (nn/document_boundaries.py); only the attention unit holds state to restart."""
    x = constrain(x, BTD)
    y, cache = self.mega(x, inv_freq, cache, count, docs)
    return constrain(self.nffn(constrain(y, BTD), x), BTD), cache
