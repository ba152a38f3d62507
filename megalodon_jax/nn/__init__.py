"""Thin NNX modules over `megalodon_jax.ops`."""

from megalodon_jax.nn.attention import LayerCache, MovingAverageGatedAttention
from megalodon_jax.nn.block import MegalodonBlock
from megalodon_jax.nn.cema import ComplexEMA
from megalodon_jax.nn.ffn import NormalizedFeedForward
from megalodon_jax.nn.layers import Buffer, Embed, LayerNorm, Linear, RMSNorm, TimestepNorm

__all__ = ["LayerCache", "MovingAverageGatedAttention", "MegalodonBlock", "ComplexEMA", "NormalizedFeedForward",
           "Buffer", "Embed", "LayerNorm", "Linear", "RMSNorm", "TimestepNorm"]
