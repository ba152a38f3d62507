"""NormalizedFeedForward: LayerNorm → SiLU (or SwiGLU) MLP, with the two-hop residual (docs/model.md#block)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from megalodon_jax.config import MegalodonConfig
from megalodon_jax.nn.layers import LayerNorm, Linear
from megalodon_jax.ops.partitioning import constrain


class NormalizedFeedForward(nnx.Module):
  """out = residual + [alpha ⊙] drop(fc2(drop_h(act(LN(y))))); act = silu(fc1) or silu(fc1) ⊙ fc3 (SwiGLU)."""

  def __init__(self, config: MegalodonConfig, layer_id: int, *, rngs: nnx.Rngs):
    c = config
    dt, pdt = jnp.dtype(c.dtype), jnp.dtype(c.param_dtype)

    def linear(din, dout, axes):
      return Linear(din, dout, use_bias=False, init_mode=c.init_mode, axes=axes, dtype=dt, param_dtype=pdt, rngs=rngs)

    self.norm = LayerNorm(c.model_dim, eps=c.norm_eps, affine=c.norm_affine, param_dtype=pdt)
    self.fc1 = linear(c.model_dim, c.ffn_hidden_dim, ("embed", "mlp"))
    self.fc2 = linear(c.ffn_hidden_dim, c.model_dim, ("mlp", "embed"))
    self.fc3 = linear(c.model_dim, c.ffn_hidden_dim, ("embed", "mlp")) if c.swiglu else None
    # Learned layer scale, initialised to 0.1 * 0.5^layer_id (official `rescale_nffn`).
    self.alpha = (nnx.Param(jnp.full((c.model_dim,), 0.1 * 0.5 ** layer_id, pdt), logical_axes=("norm",))
                  if c.rescale_nffn else None)
    self.hidden_dropout = nnx.Dropout(c.hidden_dropout, rngs=rngs if c.hidden_dropout > 0 else None)
    self.dropout = nnx.Dropout(c.dropout, rngs=rngs if c.dropout > 0 else None)

  def __call__(self, y: jax.Array, residual: jax.Array) -> jax.Array:
    """y: (B, L, D) attention output; residual: (B, L, D) the block input. Returns (B, L, D)."""
    u = self.norm(y)
    btf = ("batch", "length", "act_mlp")
    hidden = jax.nn.silu(constrain(self.fc1(u), btf))
    if self.fc3 is not None:
      hidden = hidden * constrain(self.fc3(u), btf)
    out = self.dropout(self.fc2(self.hidden_dropout(hidden)))
    if self.alpha is not None:
      out = out * self.alpha[...].astype(out.dtype)
    return out + residual
