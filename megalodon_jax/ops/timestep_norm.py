"""TimestepNorm: group normalisation with exact cumulative (Welford/Chan) statistics over time.

See docs/model.md#timestep-norm.

At step t, each (batch row, group) is normalised with the mean and population variance of everything seen so
far: the carried state (count n0 rows of mean M0, variance S0) plus all m*t scalars of the group up to and
including step t. The official kernel merges one step at a time; the merge of (n, M, S) summaries is associative,
so the steps of a piece run in parallel, in float32: Welford's recurrence as running sums of deviations and of
non-negative variance terms (`local_prefix`, `reset_prefix`). Like Chan's pairwise form it never subtracts large
sums, which keeps it stable over streams of millions of steps where a plain cumsum of x and x^2 drifts.

The step count is exact integer state kept in two int32 words (see NormState), so it neither wraps (as one int32
would after 2^31 ≈ 2.1e9 steps) nor needs `jax_enable_x64`; it becomes float32 only to form the merge weights.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np


# The step count is count_hi * COUNT_BASE + count. With the low word kept below 2^30, adding a piece of up to
# MAX_PIECE steps cannot overflow int32, and the high word wraps only after (2^31 - 1) * 2^30 ≈ 2.3e18 steps.
COUNT_BITS = 30
COUNT_BASE = 1 << COUNT_BITS
MAX_PIECE = COUNT_BASE


class NormState(NamedTuple):
  """Running statistics per (batch row, group).

  count: (B,) int32 low word of the number of steps merged so far, in [0, 2^30).
  mean: (B, G) float32 running mean.
  var: (B, G) float32 running population variance.
  count_hi: (B,) int32 high word: the count is `count_hi * 2^30 + count`, exact up to about 2.3e18 steps (no int32
    wrap-around, no 64-bit types); `total_count` reads it.
  """
  count: jax.Array
  mean: jax.Array
  var: jax.Array
  count_hi: jax.Array


def split_count(count, batch_size: int) -> tuple[jax.Array, jax.Array]:
  """A non-negative step count (a Python or NumPy int, or an int32 array) as (low, high) (B,) int32 words."""
  if isinstance(count, (int, np.integer)):
    if not 0 <= int(count) < (1 << 31) * COUNT_BASE:
      raise ValueError(f"TimestepNorm count {int(count)} is outside [0, 2^61)")
    lo, hi = int(count) % COUNT_BASE, int(count) // COUNT_BASE
    return jnp.full((batch_size,), lo, jnp.int32), jnp.full((batch_size,), hi, jnp.int32)
  count = jnp.broadcast_to(jnp.asarray(count).astype(jnp.int32), (batch_size,))  # an int32 buffer: < 2^31
  return count & (COUNT_BASE - 1), count >> COUNT_BITS


def total_count(state: NormState) -> np.ndarray:
  """The exact step count of each row: (B,) NumPy int64 (host side; for reports and tests)."""
  return np.asarray(state.count_hi, np.int64) * COUNT_BASE + np.asarray(state.count, np.int64)


def _count_as_float(state: NormState) -> jax.Array:
  """(B,) float32 count: relative rounding 2^-24, which only perturbs the merge weights at that level."""
  return state.count_hi.astype(jnp.float32) * float(COUNT_BASE) + state.count.astype(jnp.float32)


def _add_count(state: NormState, steps: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(low, high) words after adding `steps` (B,) int32 in [0, MAX_PIECE], normalised to a low word < 2^30.

  A low word of up to 2^31 - 1 (e.g. a state built by hand from a plain int32 count) is accepted: its bits above
  the 30th move to the high word before the addition, so the sum stays below 2^31.
  """
  lo = (state.count & (COUNT_BASE - 1)) + steps
  return lo & (COUNT_BASE - 1), state.count_hi + (state.count >> COUNT_BITS) + (lo >> COUNT_BITS)


def initial_state(batch_size: int, prior_count, prior_mean, prior_logv) -> NormState:
  """The state the official module starts from: (prior_count, prior_mean, exp(prior_logv)) for every row.

  prior_count: () int (Python/NumPy, or an int32 array such as the module's buffer); prior_mean, prior_logv: (G,).
  """
  g = prior_mean.shape[-1]
  lo, hi = split_count(prior_count, batch_size)
  mean = jnp.broadcast_to(prior_mean.astype(jnp.float32), (batch_size, g))
  var = jnp.broadcast_to(jnp.exp(prior_logv.astype(jnp.float32)), (batch_size, g))
  return NormState(lo, mean, var, hi)


def chan_merge(a, b):
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


def _step_summaries(x: jax.Array, num_groups: int, mask: Optional[jax.Array]):
  """Per-step (count, mean, var) of `x` (B, L, D): each (B, L, G) float32; padded steps have count 0."""
  b, l, d = x.shape
  xf = x.astype(jnp.float32).reshape(b, l, num_groups, d // num_groups)
  step_mean = jnp.mean(xf, axis=-1)
  step_var = jnp.mean(jnp.square(xf - step_mean[..., None]), axis=-1)
  step_n = jnp.ones((b, l, 1), jnp.float32)
  if mask is not None:
    step_n = jnp.where(mask[..., None], 0.0, step_n)
  return jnp.broadcast_to(step_n, step_mean.shape), step_mean, step_var


def _welford_prefix(n, m, v, running_sum):
  """Inclusive prefix of (count, mean, var) summaries along axis 1 (each (B, L, G) float32), Welford's recurrence in
  parallel: the running mean is a running sum of step means (or of their deviations from the first step's, where
  those are the smaller numbers); then each step's addition to count * var, n_t*v_t + (n_before*n_t/count) *
  (m_t - mean before t)^2, is known at every step at once and never negative, so the variance is a running sum of
  non-negative terms: no cancellation, the same result as Chan's merge one step at a time. Everything at step t
  depends on steps <= t only, to the bit (a perturbation later in the piece leaves earlier outputs unchanged).
  `running_sum(*arrays)` sums each array along axis 1 (a cumulative sum, or one that restarts at document starts).
  """
  # Sums about the first step's mean are exact for a stream with a large common offset, plain sums for a first step
  # far from the rest (a massive first token); each step takes the form whose summed magnitudes are smaller.
  shift = jax.lax.stop_gradient(m[:, :1])
  count, deviation, plain, dev_size, plain_size = running_sum(n, n * (m - shift), n * m, jax.lax.stop_gradient(
      n * jnp.abs(m - shift)), jax.lax.stop_gradient(n * jnp.abs(m)))
  safe = jnp.maximum(count, 1.0)
  mean = jnp.where(dev_size <= plain_size, shift + deviation / safe, plain / safe)
  before = count - n  # 0 where a run starts: the previous step's mean gets weight 0 there
  mean_before = jnp.concatenate([mean[:, :1], mean[:, :-1]], axis=1)
  (spread,) = running_sum(n * v + (before * n / safe) * jnp.square(m - mean_before))
  return count, mean, spread / safe


def local_prefix(x: jax.Array, num_groups: int, mask: Optional[jax.Array] = None):
  """The inclusive prefix of per-step (count, mean, var) summaries of `x` from an empty state.

  Args:
    x: (B, L, D) any float dtype, L >= 1.  num_groups: G.  mask: optional (B, L) bool, True = padded step.
  Returns:
    (n, mean, var), each (B, L, G) float32: the statistics of steps 0..t alone (no carried state). Where no real
    step has been seen yet (n 0) mean and var are placeholders that `chan_merge` ignores.

  Cumulative sums compile to a few ops per level; Chan's merge as a `lax.associative_scan` unrolled some 45 per
  level, forward and backward, and was a third of the tiny config's train-step compile (benchmarks/RESULTS.md,
  "TimestepNorm as running sums").
  """
  n, m, v = _step_summaries(x, num_groups, mask)
  return _welford_prefix(n, m, v, lambda *a: tuple(jnp.cumsum(e, axis=1) for e in a))


def segmented_merge(a, b):
  """`chan_merge` that restarts at flagged elements: (flag, summary) pairs; a flagged right side drops the left."""
  fa, sa = a[0], a[1:]
  fb, sb = b[0], b[1:]
  merged = chan_merge(sa, sb)
  return (fa | fb,) + tuple(jnp.where(fb, y, m) for y, m in zip(sb, merged))


def reset_prefix(x: jax.Array, num_groups: int, resets: jax.Array, prior, mask: Optional[jax.Array] = None):
  """Per-step statistics that restart from `prior` at every reset step (document boundaries).

  Args:
    x: (B, L, D).  num_groups: G.  resets: (B, L) bool, True where a new document starts.
    prior: (count, mean, var), each (B, G) float32: what a fresh stream starts from (`state_summary` of the
      `initial_state`).  mask: optional (B, L) bool padding (a reset on a padded step is ignored).
  Returns:
    seen: (B, L, 1) bool, a reset at or before step t in this piece; and (n, mean, var) (B, L, G) float32: the
    statistics since the last reset (prior included) where `seen`, else of steps 0..t alone (the caller merges
    its carried state into those).
  """
  if mask is not None:
    resets = resets & ~mask
  n, m, v = _step_summaries(x, num_groups, mask)
  flag = resets[..., None]
  started = chan_merge(tuple(a[:, None] for a in prior), (n, m, v))  # a reset step: prior, then the step
  n, m, v = (jnp.where(flag, s, e) for s, e in zip(started, (n, m, v)))

  def running_sum(*arrays):  # sums that restart at every reset step: exact, nothing subtracted
    def add(a, b):
      return (a[0] | b[0],) + tuple(jnp.where(b[0], q, p + q) for p, q in zip(a[1:], b[1:]))
    return jax.lax.associative_scan(add, (flag, *arrays), axis=1)[1:]

  seen = jax.lax.cummax(resets.astype(jnp.int32), axis=1)[..., None] > 0
  return seen, _welford_prefix(n, m, v, running_sum)


def state_summary(state: NormState):
  """A NormState as a (count, mean, var) summary for `chan_merge`: each (B, G) float32."""
  n0 = jnp.broadcast_to(_count_as_float(state)[:, None], state.mean.shape)
  return n0, state.mean.astype(jnp.float32), state.var.astype(jnp.float32)


def valid_steps(x: jax.Array, mask: Optional[jax.Array]) -> jax.Array:
  """(B,) int32: the steps of `x` (B, L, ...) that are not padding."""
  b, l = x.shape[:2]
  return jnp.full((b,), l, jnp.int32) if mask is None else jnp.sum(~mask, axis=1, dtype=jnp.int32)


def steps_since_reset(resets: jax.Array, mask: Optional[jax.Array]) -> tuple[jax.Array, jax.Array]:
  """Per row of (B, L) `resets`: whether a (non-padded) reset occurs, and the real steps from the last one on
  (all real steps when there is none): two (B,) arrays, bool and int32."""
  live = resets if mask is None else resets & ~mask
  real = jnp.ones(resets.shape, jnp.int32) if mask is None else (~mask).astype(jnp.int32)
  steps = jnp.arange(resets.shape[1])
  last = jnp.max(jnp.where(live, steps, -1), axis=1)  # -1: no reset
  return last >= 0, jnp.sum(jnp.where(steps >= last[:, None], real, 0), axis=1)


def count_after(state: NormState, prior: NormState, any_reset: jax.Array,
                steps: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(low, high) count words after `steps` (B,) more steps on top of the prior's count where `any_reset`, else on
  top of the state's."""
  base = NormState(jnp.where(any_reset, prior.count, state.count), state.mean, state.var,
                   jnp.where(any_reset, prior.count_hi, state.count_hi))
  return _add_count(base, steps)


def cumulative_stats(x: jax.Array, state: NormState, num_groups: int, mask: Optional[jax.Array] = None,
                     resets: Optional[jax.Array] = None, prior: Optional[NormState] = None):
  """Per-step cumulative statistics.

  Args:
    x: (B, L, D) any float dtype.
    state: statistics carried in (see NormState).
    num_groups: G; groups are contiguous feature slices of D // G.
    mask: optional (B, L) bool, True = padded step (merged with weight 0).
    resets: optional (B, L) bool, True where a document starts: the statistics restart from `prior` there
      (document_boundaries="reset"), as if the document were a stream of its own.
    prior: the NormState a fresh stream starts from (`initial_state`); required with `resets`.
  Returns:
    mean, var: (B, L, G) float32 statistics including step t; and the NormState after the last step.
  """
  b, l, _ = x.shape
  if l > MAX_PIECE:
    raise ValueError(f"a TimestepNorm piece of {l} steps is longer than {MAX_PIECE}; split the sequence")
  if l == 0:
    # An empty piece merges nothing (the prefix below would have no last step to read the state from).
    empty = jnp.zeros((b, 0, num_groups), jnp.float32)
    return empty, empty, NormState(state.count, state.mean.astype(jnp.float32), state.var.astype(jnp.float32),
                                   state.count_hi)
  init = jax.tree.map(lambda a: a[:, None, :], state_summary(state))
  if resets is None:
    prefix = local_prefix(x, num_groups, mask)
    _, mean, var = chan_merge(init, prefix)
    lo, hi = _add_count(state, valid_steps(x, mask))
    return mean, var, NormState(lo, mean[:, -1], var[:, -1], hi)
  if prior is None:
    raise ValueError("cumulative_stats: resets need the prior state a document starts from")
  seen, prefix = reset_prefix(x, num_groups, resets, state_summary(prior), mask)
  _, carried_mean, carried_var = chan_merge(init, prefix)
  mean = jnp.where(seen, prefix[1], carried_mean)
  var = jnp.where(seen, prefix[2], carried_var)
  # The count: the prior's plus the real steps from the last reset on, or, without a reset, the state's plus all.
  any_reset, since = steps_since_reset(resets, mask)
  lo, hi = count_after(state, prior, any_reset, since)
  return mean, var, NormState(lo, mean[:, -1], var[:, -1], hi)


def normalize(x: jax.Array, mean: jax.Array, var: jax.Array, weight: jax.Array, bias: jax.Array, eps: float,
              mask: Optional[jax.Array] = None) -> jax.Array:
  """(x - mean) / sqrt(var + eps) per group, then (1 + weight) and bias: x (B, L, D), mean/var (B, L, G) -> x.dtype."""
  b, l, d = x.shape
  g = mean.shape[-1]
  xf = x.astype(jnp.float32).reshape(b, l, g, d // g)
  y = (xf - mean[..., None]) * jax.lax.rsqrt(var[..., None] + eps)
  y = y.reshape(b, l, d) * (1.0 + weight.astype(jnp.float32)) + bias.astype(jnp.float32)
  if mask is not None:
    y = jnp.where(mask[..., None], 0.0, y)
  return y.astype(x.dtype)


def timestep_norm(x: jax.Array, weight: jax.Array, bias: jax.Array, state: NormState, *, num_groups: int,
                  eps: float, mask: Optional[jax.Array] = None, resets: Optional[jax.Array] = None,
                  prior: Optional[NormState] = None):
  """TimestepNorm forward (the official `group_timestep_norm_fwd`).

  Args:
    x: (B, L, D) any float dtype.
    weight, bias: (D,) plus-one scale offset and shift.
    state: NormState carried in (use `initial_state` at the start of a stream).
    num_groups: G.
    eps: added to the variance inside the square root.
    mask: optional (B, L) bool, True = padded: output 0 there and the state is not updated.
    resets, prior: document starts and the state they restart from (see `cumulative_stats`).
  Returns:
    y: (B, L, D) in x.dtype, and the NormState after the last step.
  """
  mean, var, new_state = cumulative_stats(x, state, num_groups, mask, resets, prior)
  return normalize(x, mean, var, weight, bias, eps, mask), new_state
