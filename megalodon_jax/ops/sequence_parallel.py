"""Chunk parallelism: CEMA and TimestepNorm over a sequence split across the `sequence` mesh axis.

With `mesh.sequence` = S > 1 each device holds a contiguous slice of T = L / S steps (whole attention chunks, so
attention needs no communication). The two recurrences of a block carry state across slices, and both carries
are affine-like maps that compose associatively:

  CEMA           h_out = q^T ⊙ h_in + h_local         (h_local: the slice run from a zero state; q^T its decay)
  TimestepNorm   (n, M, S)_out = chan_merge((n, M, S)_in, (n, M, S)_local)

So each slice runs its local recurrence from an empty state, the small per-slice summaries ((B, D, N, 2) states,
(B, G) statistics) are all-gathered over `sequence`, every device forms the exclusive prefix over the slices
locally (an associative scan of S + 1 summaries, the first one the stream's incoming state), and adds the
contribution of its incoming state: for CEMA Re Σ γ̃ q^{t+1} h_in (what `cema(..., h0=...)` adds), for the norm
one more Chan merge per step. One all-gather of a few KiB per call, no chain of sends, and autodiff runs through
it (the transpose of an all-gather is a reduce-scatter); no hand-written backward.

All of it runs under `jax.shard_map` over the ambient mesh (every axis manual): the length over `sequence`, the
batch over data x fsdp where it divides, everything else replicated (the model width of these activations is
whole on every device, mesh_axes' "act_embed"). The functions here are used only when the ambient mesh has a
`sequence` axis of size > 1 that divides the length (`sequence_mesh`); otherwise callers run the plain ops.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from megalodon_jax import mesh_axes
from megalodon_jax.mesh_axes import SEQUENCE_AXIS
from megalodon_jax.ops import cema as cema_ops
from megalodon_jax.ops import timestep_norm as tsn


def sequence_mesh(length: int):
  """The ambient mesh when its `sequence` axis splits a length-`length` activation, else None.

  None outside a mesh, without the axis or with size 1, inside a shard_map that already made it manual, and when
  the size does not divide `length` (a decoding step of one token, say): callers then run the plain op, which is
  correct under any sharding (XLA gathers what it needs).
  """
  mesh = jax.sharding.get_abstract_mesh()
  return mesh if mesh_axes.sequence_axis(mesh, length) else None


def _take(x: jax.Array, index: jax.Array) -> jax.Array:
  return jax.lax.dynamic_index_in_dim(x, index, axis=0, keepdims=False)


def complex_power(re: jax.Array, im: jax.Array, exponent: int) -> tuple[jax.Array, jax.Array]:
  """(re + i·im)^exponent by binary exponentiation: log2(exponent) complex products, float32."""
  out_re, out_im = jnp.ones_like(re), jnp.zeros_like(im)
  base_re, base_im = re, im
  while exponent:
    if exponent & 1:
      out_re, out_im = out_re * base_re - out_im * base_im, out_re * base_im + out_im * base_re
    exponent >>= 1
    if exponent:
      base_re, base_im = base_re * base_re - base_im * base_im, 2 * base_re * base_im
  return out_re, out_im


def cema_carry(decay_re: jax.Array, decay_im: jax.Array, local: jax.Array, h0: jax.Array,
               index: jax.Array, keep: Optional[jax.Array] = None) -> tuple[jax.Array, jax.Array]:
  """The CEMA state entering and leaving slice `index`, from every slice's summary.

  Args:
    decay_re, decay_im: (D, N) q^T, the decay of one slice of T steps.
    local: (S, B, D, N, 2) each slice's final state when run from a zero state.
    h0: (B, D, N, 2) the state entering slice 0.
    index: () int32, this slice.
    keep: optional (S, B) float32, 0 where slice s of row b holds a document start (docs/model.md#cema): the state
      entering it does not reach its end, so that slice's decay is 0 for that row.
  Returns:
    (h_in, h_out), each (B, D, N, 2) float32.
  """
  if keep is not None:
    decay_re = keep[..., None, None] * decay_re  # (S, B, D, N): the decay becomes per row
    decay_im = keep[..., None, None] * decay_im
    return _carry_scan(jnp.ones_like(decay_re[:1]), jnp.zeros_like(decay_im[:1]), decay_re, decay_im, local, h0,
                       index, batched=True)
  shards = local.shape[0]
  return _carry_scan(jnp.ones((1,) + decay_re.shape), jnp.zeros((1,) + decay_im.shape),
                     jnp.broadcast_to(decay_re, (shards,) + decay_re.shape),
                     jnp.broadcast_to(decay_im, (shards,) + decay_im.shape), local, h0, index, batched=False)


def _carry_scan(one_re, one_im, decay_re, decay_im, local, h0, index, *, batched: bool):
  """`cema_carry`'s prefix over the S + 1 maps; decays (S, D, N), or (S, B, D, N) when `batched`."""
  # Elements (a, b) of the map h -> a h + b; slot 0 is the constant map to h0, then one map per slice.
  a_re = jnp.concatenate([one_re, decay_re])
  a_im = jnp.concatenate([one_im, decay_im])
  b = jnp.concatenate([h0[None].astype(jnp.float32), local.astype(jnp.float32)])  # (S + 1, B, D, N, 2)

  def compose(first, second):  # apply `first`, then `second`
    ar1, ai1, br1, bi1 = first
    ar2, ai2, br2, bi2 = second
    ar2b, ai2b = (ar2, ai2) if batched else (ar2[:, None], ai2[:, None])  # broadcast a (D, N) decay over the batch
    return (ar2 * ar1 - ai2 * ai1, ar2 * ai1 + ai2 * ar1,
            ar2b * br1 - ai2b * bi1 + br2, ar2b * bi1 + ai2b * br1 + bi2)

  _, _, hr, hi = jax.lax.associative_scan(compose, (a_re, a_im, b[..., 0], b[..., 1]), axis=0)
  states = jnp.stack([hr, hi], axis=-1)  # (S + 1, B, D, N, 2): states[j] enters slice j
  return _take(states, index), _take(states, index + 1)


def cema(x: jax.Array, coeffs: cema_ops.CEMACoeffs, omega: jax.Array, h0: Optional[jax.Array] = None, *,
         impl: str = "auto", return_state: bool = False, resets: Optional[jax.Array] = None):
  """`ops.cema.cema` with the length split over the ambient mesh's `sequence` axis (see the module docstring).

  Args and returns as `cema.cema`; `impl` runs on each slice ("auto" picks for the slice's length). Requires
  `sequence_mesh(L)`. resets (B, L) bool is split like x; a slice holding a document start has zero decay for the
  state coming in (`cema_carry`'s keep), and the incoming state reaches only the steps before its first reset.
  """
  mesh = sequence_mesh(x.shape[1])
  if mesh is None:
    raise ValueError(f"sequence_parallel.cema needs an ambient mesh whose 'sequence' axis divides L={x.shape[1]}")
  batch, _, dim = x.shape
  nstate = coeffs.p.shape[1]
  bax = mesh_axes.split_axes(mesh, batch, "batch") or None
  h0 = jnp.zeros((batch, dim, nstate, 2), jnp.float32) if h0 is None else h0.astype(jnp.float32)

  def body(x, coeffs, omega, h0, *maybe_resets):
    resets = maybe_resets[0] if maybe_resets else None
    t = x.shape[1]
    y, local = cema_ops.cema(x, coeffs, omega, None, impl=impl, return_state=True, resets=resets)
    decay_re, decay_im = complex_power(coeffs.q_re, coeffs.q_im, t)
    gathered = jax.lax.all_gather(local, SEQUENCE_AXIS)  # (S, B, D, N, 2): a few KiB per sequence
    index = jax.lax.axis_index(SEQUENCE_AXIS)
    if resets is None:
      h_in, h_out = cema_carry(decay_re, decay_im, gathered, h0, index)
      return y + cema_ops.initial_state_contribution(coeffs, h_in, t), h_out[None]
    keep = jax.lax.all_gather(jnp.where(jnp.any(resets, axis=1), 0.0, 1.0), SEQUENCE_AXIS)  # (S, B)
    h_in, h_out = cema_carry(decay_re, decay_im, gathered, h0, index, keep=keep)
    fresh = (jnp.cumsum(resets, axis=1) == 0).astype(jnp.float32)[..., None]  # (B, T, 1): before the first reset
    return y + fresh * cema_ops.initial_state_contribution(coeffs, h_in, t), h_out[None]

  seq, state = P(bax, SEQUENCE_AXIS, None), P(bax, None, None, None)
  plane = jax.tree.map(lambda _: P(), coeffs)
  extra = () if resets is None else (resets.astype(bool),)
  # check_vma=False: the local implementation may be a Pallas kernel, which carries no varying-axes typing. The
  # replicated inputs' cotangents are still summed over the mesh by shard_map's transpose.
  y, states = jax.shard_map(body, mesh=mesh, in_specs=(seq, plane, P(), state) + (P(bax, SEQUENCE_AXIS),) * len(extra),
                            out_specs=(seq, P(SEQUENCE_AXIS, bax, None, None, None)), check_vma=False)(
                                x, coeffs, omega, h0, *extra)
  return y, (states[-1] if return_state else None)


def norm_carry(summaries, initial, index: jax.Array):
  """The TimestepNorm statistics entering and leaving slice `index`, merged with the op's Chan rule.

  Args:
    summaries: (n, mean, var), each (S, B, G) float32: every slice's statistics alone.
    initial: (n, mean, var), each (B, G) float32: the statistics entering slice 0.
    index: () int32, this slice.
  Returns:
    (incoming, outgoing): (n, mean, var) triples of (B, G) float32.
  """
  elems = tuple(jnp.concatenate([i[None], s]) for i, s in zip(initial, summaries))
  prefix = jax.lax.associative_scan(tsn.chan_merge, elems, axis=0)  # prefix[j] enters slice j
  return tuple(_take(p, index) for p in prefix), tuple(_take(p, index + 1) for p in prefix)


def _reset_norm_slice(x, state, prior, resets, num_groups, mask, index):
  """One slice's statistics with document resets: (mean, var) (B, T, G) and the stream's final NormState.

  Each slice's summary is (any reset in the slice, statistics since its last reset or of the whole slice); the
  slices compose with `timestep_norm.segmented_merge` (a reset drops what came before), and the state entering a
  slice reaches only its steps before its first reset.
  """
  seen, prefix = tsn.reset_prefix(x, num_groups, resets, tsn.state_summary(prior), mask)
  last = (seen[:, -1],) + tuple(p[:, -1] for p in prefix)  # (B, 1) flag and (B, G) statistics
  gathered = jax.lax.all_gather(last, SEQUENCE_AXIS)  # (S, B, 1) and (S, B, G)
  first = (jnp.zeros_like(last[0]),) + tsn.state_summary(state)
  elems = tuple(jnp.concatenate([jnp.broadcast_to(f[None], g[:1].shape), g]) for f, g in zip(first, gathered))
  carried = jax.lax.associative_scan(tsn.segmented_merge, elems, axis=0)  # carried[j] enters slice j
  incoming = tuple(_take(c, index) for c in carried[1:])
  _, mean, var = tsn.chan_merge(tuple(a[:, None] for a in incoming), prefix)
  mean, var = jnp.where(seen, prefix[1], mean), jnp.where(seen, prefix[2], var)
  # The final count: the prior's plus the real steps from the last reset of the whole sequence, else the state's
  # plus all of them.
  local = tsn.steps_since_reset(resets, mask)  # whole slice if no reset
  flags, since = jax.lax.all_gather(local, SEQUENCE_AXIS)  # (S, B)
  # Across slices: the slice of the last reset counts from that reset, every later slice whole.
  slices = jnp.arange(flags.shape[0])[:, None]
  last_slice = jnp.max(jnp.where(flags, slices, -1), axis=0)  # (B,)
  total = jnp.sum(jnp.where(slices >= last_slice[None], since, 0), axis=0)
  lo, hi = tsn.count_after(state, prior, last_slice >= 0, total)
  outgoing = tuple(_take(c, index + 1) for c in carried[1:])
  return mean, var, tsn.NormState(lo, outgoing[1], outgoing[2], hi)


def timestep_norm(x: jax.Array, weight: jax.Array, bias: jax.Array, state: tsn.NormState, *, num_groups: int,
                  eps: float, mask: Optional[jax.Array] = None, resets: Optional[jax.Array] = None,
                  prior: Optional[tsn.NormState] = None):
  """`ops.timestep_norm.timestep_norm` with the length split over the ambient mesh's `sequence` axis.

  Args and returns as `timestep_norm.timestep_norm` (including document `resets` and their `prior`). Requires
  `sequence_mesh(L)`; each slice must be shorter than `timestep_norm.MAX_PIECE` steps, and so must the whole
  sequence (one count update).
  """
  if resets is not None:
    return _timestep_norm_resets(x, weight, bias, state, num_groups=num_groups, eps=eps, mask=mask, resets=resets,
                                 prior=prior)
  mesh = sequence_mesh(x.shape[1])
  if mesh is None:
    raise ValueError(f"sequence_parallel.timestep_norm needs an ambient mesh whose 'sequence' axis divides "
                     f"L={x.shape[1]}")
  if x.shape[1] > tsn.MAX_PIECE:
    raise ValueError(f"a TimestepNorm piece of {x.shape[1]} steps is longer than {tsn.MAX_PIECE}; split it")
  bax = mesh_axes.split_axes(mesh, x.shape[0], "batch") or None

  def body(x, weight, bias, state, *maybe_mask):
    mask = maybe_mask[0] if maybe_mask else None
    prefix = tsn.local_prefix(x, num_groups, mask)  # (B, T, G) each
    gathered = jax.lax.all_gather(tuple(p[:, -1] for p in prefix), SEQUENCE_AXIS)  # (S, B, G) each
    index = jax.lax.axis_index(SEQUENCE_AXIS)
    incoming, outgoing = norm_carry(gathered, tsn.state_summary(state), index)
    _, mean, var = tsn.chan_merge(tuple(a[:, None] for a in incoming), prefix)
    y = tsn.normalize(x, mean, var, weight, bias, eps, mask)
    steps = jnp.cumsum(jax.lax.all_gather(tsn.valid_steps(x, mask), SEQUENCE_AXIS), axis=0)  # (S, B) int32
    lo, hi = tsn._add_count(state, _take(steps, index))  # pylint: disable=protected-access
    out = tsn.NormState(lo, outgoing[1], outgoing[2], hi)
    return y, jax.tree.map(lambda a: a[None], out)

  seq = P(bax, SEQUENCE_AXIS, None)
  state_spec = tsn.NormState(P(bax), P(bax, None), P(bax, None), P(bax))
  out_state = tsn.NormState(P(SEQUENCE_AXIS, bax), P(SEQUENCE_AXIS, bax, None), P(SEQUENCE_AXIS, bax, None),
                            P(SEQUENCE_AXIS, bax))
  masks = () if mask is None else (mask,)
  in_specs = (seq, P(), P(), state_spec) + (P(bax, SEQUENCE_AXIS),) * len(masks)
  y, states = jax.shard_map(body, mesh=mesh, in_specs=in_specs, out_specs=(seq, out_state),
                            check_vma=False)(x, weight, bias, state, *masks)
  return y, jax.tree.map(lambda a: a[-1], states)


def _timestep_norm_resets(x, weight, bias, state, *, num_groups, eps, mask, resets, prior):
  """`timestep_norm` with document resets (see `_reset_norm_slice`)."""
  if prior is None:
    raise ValueError("sequence_parallel.timestep_norm: resets need the prior state a document starts from")
  mesh = sequence_mesh(x.shape[1])
  if mesh is None:
    raise ValueError(f"sequence_parallel.timestep_norm needs an ambient mesh whose 'sequence' axis divides "
                     f"L={x.shape[1]}")
  bax = mesh_axes.split_axes(mesh, x.shape[0], "batch") or None
  masks = () if mask is None else (mask,)

  def body(x, weight, bias, state, prior, resets, *maybe_mask):
    mask = maybe_mask[0] if maybe_mask else None
    index = jax.lax.axis_index(SEQUENCE_AXIS)
    mean, var, out = _reset_norm_slice(x, state, prior, resets, num_groups, mask, index)
    return tsn.normalize(x, mean, var, weight, bias, eps, mask), jax.tree.map(lambda a: a[None], out)

  seq = P(bax, SEQUENCE_AXIS, None)
  row = P(bax, SEQUENCE_AXIS)
  state_spec = tsn.NormState(P(bax), P(bax, None), P(bax, None), P(bax))
  out_state = tsn.NormState(P(SEQUENCE_AXIS, bax), P(SEQUENCE_AXIS, bax, None), P(SEQUENCE_AXIS, bax, None),
                            P(SEQUENCE_AXIS, bax))
  in_specs = (seq, P(), P(), state_spec, state_spec, row) + (row,) * len(masks)
  y, states = jax.shard_map(body, mesh=mesh, in_specs=in_specs, out_specs=(seq, out_state),
                            check_vma=False)(x, weight, bias, state, prior, resets, *masks)
  return y, jax.tree.map(lambda a: a[-1], states)
