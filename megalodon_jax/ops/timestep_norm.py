"""TimestepNorm: group normalisation with exact cumulative (Welford/Chan) statistics over time (spec §3).

At step t, each (batch row, group) is normalised with the mean and population variance of everything seen so
far: the carried state (count n0 rows of mean M0, variance S0) plus all m*t scalars of the group up to and
including step t. The official kernel merges one step at a time; the merge of (n, M, S) summaries is associative,
so we run it as a parallel prefix (`jax.lax.associative_scan`) in float32. Chan's pairwise form never subtracts
large sums, which keeps it stable over streams of millions of steps where a plain cumsum of x and x^2 drifts.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp


class NormState(NamedTuple):
  """Running statistics per (batch row, group).

  count: (B,) int32 number of steps merged so far.
  mean: (B, G) float32 running mean.
  var: (B, G) float32 running population variance.
  """
  count: jax.Array
  mean: jax.Array
  var: jax.Array


def initial_state(batch_size: int, prior_count, prior_mean, prior_logv) -> NormState:
  """The state the official module starts from: (prior_count, prior_mean, exp(prior_logv)) for every row.

  prior_count: () int; prior_mean, prior_logv: (G,) float.
  """
  g = prior_mean.shape[-1]
  count = jnp.full((batch_size,), prior_count, dtype=jnp.int32)
  mean = jnp.broadcast_to(prior_mean.astype(jnp.float32), (batch_size, g))
  var = jnp.broadcast_to(jnp.exp(prior_logv.astype(jnp.float32)), (batch_size, g))
  return NormState(count, mean, var)


def _chan_merge(a, b):
  """Merges summaries a = (n, M, S) then b, each of count n, mean M and population variance S."""
  na, ma, sa = a
  nb, mb, sb = b
  n = na + nb
  safe_n = jnp.where(n > 0, n, 1.0)
  wa = na / safe_n
  wb = nb / safe_n
  delta = mb - ma
  mean = ma + delta * wb
  var = sa * wa + sb * wb + jnp.square(delta) * (wa * wb)
  # An empty summary on both sides (padding only) keeps the left statistics.
  mean = jnp.where(n > 0, mean, ma)
  var = jnp.where(n > 0, var, sa)
  return n, mean, var


def cumulative_stats(x: jax.Array, state: NormState, num_groups: int, mask: Optional[jax.Array] = None):
  """Per-step cumulative statistics.

  Args:
    x: (B, L, D) any float dtype.
    state: statistics carried in (see NormState).
    num_groups: G; groups are contiguous feature slices of D // G.
    mask: optional (B, L) bool, True = padded step (merged with weight 0).
  Returns:
    mean, var: (B, L, G) float32 statistics including step t; and the NormState after the last step.
  """
  b, l, d = x.shape
  if l == 0:
    # An empty piece merges nothing (the prefix below would have no last step to read the state from).
    empty = jnp.zeros((b, 0, num_groups), jnp.float32)
    return empty, empty, NormState(state.count, state.mean.astype(jnp.float32), state.var.astype(jnp.float32))
  xf = x.astype(jnp.float32).reshape(b, l, num_groups, d // num_groups)
  step_mean = jnp.mean(xf, axis=-1)
  step_var = jnp.mean(jnp.square(xf - step_mean[..., None]), axis=-1)
  step_n = jnp.ones((b, l, 1), jnp.float32)
  if mask is not None:
    step_n = jnp.where(mask[..., None], 0.0, step_n)
  step_n = jnp.broadcast_to(step_n, step_mean.shape)
  prefix = jax.lax.associative_scan(_chan_merge, (step_n, step_mean, step_var), axis=1)
  n0 = jnp.broadcast_to(state.count.astype(jnp.float32)[:, None, None], step_mean.shape)
  init = (n0, state.mean[:, None, :].astype(jnp.float32), state.var[:, None, :].astype(jnp.float32))
  _, mean, var = _chan_merge(init, prefix)
  valid = l if mask is None else jnp.sum(~mask, axis=1, dtype=jnp.int32)
  new_state = NormState(state.count + valid, mean[:, -1], var[:, -1])
  return mean, var, new_state


def timestep_norm(x: jax.Array, weight: jax.Array, bias: jax.Array, state: NormState, *, num_groups: int,
                  eps: float, mask: Optional[jax.Array] = None):
  """TimestepNorm forward (the official `group_timestep_norm_fwd`).

  Args:
    x: (B, L, D) any float dtype.
    weight, bias: (D,) plus-one scale offset and shift.
    state: NormState carried in (use `initial_state` at the start of a stream).
    num_groups: G.
    eps: added to the variance inside the square root.
    mask: optional (B, L) bool, True = padded: output 0 there and the state is not updated.
  Returns:
    y: (B, L, D) in x.dtype, and the NormState after the last step.
  """
  b, l, d = x.shape
  mean, var, new_state = cumulative_stats(x, state, num_groups, mask)
  m = d // num_groups
  xf = x.astype(jnp.float32).reshape(b, l, num_groups, m)
  y = (xf - mean[..., None]) * jax.lax.rsqrt(var[..., None] + eps)
  y = y.reshape(b, l, d) * (1.0 + weight.astype(jnp.float32)) + bias.astype(jnp.float32)
  if mask is not None:
    y = jnp.where(mask[..., None], 0.0, y)
  return y.astype(x.dtype), new_state
