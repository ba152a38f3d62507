"""Basic layers: Linear, Embed, RMSNorm, LayerNorm (plus-one scales), TimestepNorm. Thin wrappers over `ops`."""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
from flax import nnx

from megalodon_jax.nn.init import Initializer, linear_kernel_init
from megalodon_jax.ops import norms
from megalodon_jax.ops import sequence_parallel as sp
from megalodon_jax.ops import timestep_norm as tsn


class Buffer(nnx.Variable):
  """A non-trainable tensor stored in checkpoints (torch `register_buffer`): rope.freqs, TimestepNorm priors."""


class Linear(nnx.Module):
  """y = x @ kernel (+ bias), computed in `dtype`. kernel: (in, out), the transpose of torch's weight."""

  def __init__(self, in_features: int, out_features: int, *, use_bias: bool, init_mode: str,
               axes: tuple[Optional[str], Optional[str]], dtype: jnp.dtype, param_dtype: jnp.dtype,
               rngs: nnx.Rngs, kernel_init: Optional[Initializer] = None):
    init = kernel_init or linear_kernel_init(init_mode)
    self.kernel = nnx.Param(init(rngs.params(), (in_features, out_features), param_dtype), logical_axes=axes)
    self.bias = nnx.Param(jnp.zeros((out_features,), param_dtype), logical_axes=axes[1:]) if use_bias else None
    self.dtype = dtype

  def __call__(self, x: jax.Array) -> jax.Array:
    """x: (..., in) -> (..., out) in self.dtype."""
    y = jnp.dot(x.astype(self.dtype), self.kernel[...].astype(self.dtype))
    if self.bias is not None:
      y = y + self.bias[...].astype(self.dtype)
    return y


class Embed(nnx.Module):
  """Token embedding table weight: (V, D); also usable as a tied output projection."""

  def __init__(self, num_embeddings: int, features: int, *, init: Initializer, dtype: jnp.dtype,
               param_dtype: jnp.dtype, rngs: nnx.Rngs):
    self.weight = nnx.Param(init(rngs.params(), (num_embeddings, features), param_dtype),
                            logical_axes=("vocab", "embed"))
    self.dtype = dtype

  def __call__(self, ids: jax.Array) -> jax.Array:
    """ids: (B, L) int -> (B, L, D) in self.dtype."""
    return jnp.take(self.weight[...], ids, axis=0).astype(self.dtype)

  def attend(self, x: jax.Array) -> jax.Array:
    """x: (B, L, D) -> (B, L, V) float32 logits against the table (tied head)."""
    return jnp.dot(x.astype(self.dtype), self.weight[...].astype(self.dtype).T, preferred_element_type=jnp.float32)


class RMSNorm(nnx.Module):
  """RMSNorm over the last axis with scale (1 + weight); weight is zero-initialised, absent if not affine."""

  def __init__(self, features: int, *, eps: float, affine: bool, param_dtype: jnp.dtype):
    self.weight = nnx.Param(jnp.zeros((features,), param_dtype), logical_axes=("norm",)) if affine else None
    self.eps = eps

  def __call__(self, x: jax.Array) -> jax.Array:
    """x: (..., K) -> same shape and dtype."""
    return norms.rms_norm(x, None if self.weight is None else self.weight[...], self.eps)


class LayerNorm(nnx.Module):
  """LayerNorm over the last axis with scale (1 + weight) and shift bias; zero-initialised, absent if not affine."""

  def __init__(self, features: int, *, eps: float, affine: bool, param_dtype: jnp.dtype):
    self.weight = nnx.Param(jnp.zeros((features,), param_dtype), logical_axes=("norm",)) if affine else None
    self.bias = nnx.Param(jnp.zeros((features,), param_dtype), logical_axes=("norm",)) if affine else None
    self.eps = eps

  def __call__(self, x: jax.Array) -> jax.Array:
    """x: (..., K) -> same shape and dtype."""
    w = None if self.weight is None else self.weight[...]
    b = None if self.bias is None else self.bias[...]
    return norms.layer_norm(x, w, b, self.eps)


class TimestepNorm(nnx.Module):
  """Group TimestepNorm with cumulative statistics (ops/timestep_norm.py), affine (1 + weight), bias.

  The prior buffers (count, mean, log-variance) give the state a fresh stream starts from; the official model
  keeps them at (0, 0, 0), which ignores the prior entirely. `prior_count` is an int32 scalar (the official int64
  buffer, always 0, converted); the running count in the state is two int32 words (ops.timestep_norm.NormState)
  and does not wrap over long streams.
  """

  def __init__(self, features: int, num_groups: int, *, eps: float, param_dtype: jnp.dtype):
    self.weight = nnx.Param(jnp.zeros((features,), param_dtype), logical_axes=("norm",))
    self.bias = nnx.Param(jnp.zeros((features,), param_dtype), logical_axes=("norm",))
    self.prior_count = Buffer(jnp.zeros((), jnp.int32))
    self.prior_mean = Buffer(jnp.zeros((num_groups,), jnp.float32))
    self.prior_logv = Buffer(jnp.zeros((num_groups,), jnp.float32))
    self.num_groups = num_groups
    self.eps = eps

  def initial_state(self, batch_size: int) -> tsn.NormState:
    return tsn.initial_state(batch_size, self.prior_count[...], self.prior_mean[...], self.prior_logv[...])

  def __call__(self, x: jax.Array, state: Optional[tsn.NormState] = None, mask: Optional[jax.Array] = None,
               resets: Optional[jax.Array] = None):
    """x: (B, L, D) -> (y (B, L, D) in x.dtype, NormState after the last step).

    resets: optional (B, L) bool, True where a packed document starts: the statistics restart there from the
    priors, as for a fresh stream. Under a mesh whose `sequence` axis splits L, the statistics are carried across
    the slices (ops/sequence_parallel.py); the result is the same.
    """
    if state is None:
      state = self.initial_state(x.shape[0])
    fn = sp.timestep_norm if sp.sequence_mesh(x.shape[1]) is not None else tsn.timestep_norm
    if resets is None:
      return fn(x, self.weight[...], self.bias[...], state, num_groups=self.num_groups, eps=self.eps, mask=mask)
    return fn(x, self.weight[...], self.bias[...], state, num_groups=self.num_groups, eps=self.eps, mask=mask,
              resets=resets, prior=self.initial_state(x.shape[0]))
