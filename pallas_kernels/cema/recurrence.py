"""The per-step CEMA math shared by the TPU and GPU kernels, on real/imaginary float32 planes.

Inside a kernel a channel tile of Dt channels is processed at once: one time step is a row (1, Dt) and a state is a
plane (N, Dt) with the N complex states on the sublane (TPU) / second axis and channels on the lanes, so the
readout Σ_n is a reduction over axis 0 and every other operation is elementwise across channels.

Forward (per channel; p real, q and g complex, h_{-1} = h0):
  h_t = q h_{t-1} + p u_t,   y_t = Re Σ_n g h_t + ω u_t.
Backward, from the cotangents dy_t and G = ∂L/∂h_{L-1} (written as complex numbers ∂/∂Re + i ∂/∂Im). The adjoint
λ_t = ∂L/∂h_t obeys λ_t = conj(q) λ_{t+1} + conj(g) dy_t; its conjugate σ = conj(λ) is the same recurrence as the
forward run backwards in time with the roles of the weights swapped, σ_t = q σ_{t+1} + g dy_t, σ_{L-1} = g dy + conj(G),
and no conjugation left inside the loop. The kernel carries S_t = q σ_{t+1} (S = conj(G) at the start, so no division
by q is needed for the initial value) and, for the coefficient gradients, two more reverse recurrences:
  ζ_t = dy_t + q ζ_{t+1}        (Σ_t dy_t h_t = q ζ_0 h0 + p Σ_t u_t ζ_t)
  ξ_{t-1} = σ_t + q ξ_t, ξ_{L-1} = 0   (Σ_t σ_t h_{t-1} = ξ_{-1} h0 + p Σ_t u_t ξ_t)
so that every gradient is a product of the input u with a reverse-time state, accumulated over time inside the
kernel; the forward states are never stored or recomputed. With the carries after the last (earliest) step,
S = q σ_0, Z = q ζ_0, X = ξ_{-1}, and the accumulators A_p = Σ u Re σ, A_c = Σ u ζ, A_q = Σ u ξ:
  du_t = Re Σ_n p σ_t + ω dy_t,  dp = A_p,  dg = conj(p A_c + h0 Z),  dq = conj(p A_q + h0 X),  dh0 = conj(S).
Document resets (docs/model.md#cema): a step t where a document starts has decay a_t q with a_t = 0 (else 1), so
h_t = a_t q h_{t-1} + p u_t; in reverse σ_t = g dy_t + a_{t+1} q σ_{t+1}, ζ_t = dy_t + a_{t+1} q ζ_{t+1} and
ξ_{t-1} = a_t (σ_t + q ξ_t), and the formulas above hold unchanged with these carries (`backward_step`'s keep).
"""

from __future__ import annotations

from typing import Callable, NamedTuple, TypeVar

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

# Planes of the packed coefficient array (5, N, D).
P, Q_RE, Q_IM, G_RE, G_IM = range(5)
NUM_COEF_PLANES = 5

Carry = TypeVar("Carry")


class Coefs(NamedTuple):
  """Coefficient planes of one channel tile: p, q, g each (N, Dt) float32; omega (1, Dt) float32."""
  p: jax.Array
  q_re: jax.Array
  q_im: jax.Array
  g_re: jax.Array
  g_im: jax.Array
  omega: jax.Array


def load_coefs(coef_ref, omega_ref) -> Coefs:
  """Reads the tile's coefficients. coef_ref: (5, N, Dt) float32; omega_ref: (1, Dt) float32."""
  return Coefs(*(coef_ref[k] for k in range(NUM_COEF_PLANES)), omega_ref[...])


class BwdCarry(NamedTuple):
  """The backward kernel's carries, each (N, Dt) float32; in this order they are the planes of its (11, N, Dt) output.

  s: S_t = q σ_{t+1}.  z: Z_t = q ζ_{t+1}.  x: ξ_t.  acc_p, acc_c, acc_q: Σ u Re σ, Σ u ζ, Σ u ξ.
  """
  s_re: jax.Array
  s_im: jax.Array
  z_re: jax.Array
  z_im: jax.Array
  x_re: jax.Array
  x_im: jax.Array
  acc_p: jax.Array
  acc_c_re: jax.Array
  acc_c_im: jax.Array
  acc_q_re: jax.Array
  acc_q_im: jax.Array


NUM_BWD_PLANES = len(BwdCarry._fields)


def _cmul(ar, ai, br, bi):
  return ar * br - ai * bi, ar * bi + ai * br


def forward_step(c: Coefs, state: tuple[jax.Array, jax.Array], u: jax.Array, keep: jax.Array | None = None):
  """One forward step. state: (hr, hi) each (N, Dt); u: (1, Dt) float32. Returns (new state, y row (1, Dt)).

  keep: optional (1, 1) float32, 0 where a document starts at this step (the state entering it is dropped), else 1.
  """
  hr, hi = state
  if keep is not None:
    hr, hi = keep * hr, keep * hi
  hr, hi = c.q_re * hr - c.q_im * hi + c.p * u, c.q_re * hi + c.q_im * hr
  y = jnp.sum(c.g_re * hr - c.g_im * hi, axis=0, keepdims=True) + c.omega * u
  return (hr, hi), y


def backward_step(c: Coefs, k: BwdCarry, u: jax.Array, dy: jax.Array, keep: jax.Array | None = None):
  """One reverse-time step at t. k: carries entering t (from t + 1); u, dy: (1, Dt) float32. Returns (carry, du row).

  keep: optional (1, 1) float32 a_t, 0 where a document starts at t. The forward decay into t is a_t q, so the
  carries handed to t - 1 (S = a_t q σ_t, Z = a_t q ζ_t, ξ_{t-1} = a_t (σ_t + q ξ_t)) are scaled by a_t: the adjoint
  does not flow through a reset. The accumulators use this step's own values and are not scaled.
  """
  sr, si = c.g_re * dy + k.s_re, c.g_im * dy + k.s_im  # σ_t
  zr, zi = dy + k.z_re, k.z_im  # ζ_t
  du = jnp.sum(c.p * sr, axis=0, keepdims=True) + c.omega * dy
  qxr, qxi = _cmul(c.q_re, c.q_im, k.x_re, k.x_im)
  new = BwdCarry(
      *_cmul(c.q_re, c.q_im, sr, si),
      *_cmul(c.q_re, c.q_im, zr, zi),
      sr + qxr, si + qxi,
      k.acc_p + u * sr,
      k.acc_c_re + u * zr, k.acc_c_im + u * zi,
      k.acc_q_re + u * k.x_re, k.acc_q_im + u * k.x_im)  # ξ_t: the carry before this step's update
  if keep is not None:
    new = new._replace(**{f: keep * getattr(new, f) for f in BwdCarry._fields[:6]})
  return new, du


def sweep(nsteps: int, group: int, group_fn: Callable[[jax.Array | int, int, Carry], Carry], carry: Carry, *,
          reverse: bool) -> Carry:
  """Runs `nsteps` (static) time steps as a loop over groups of `group` steps plus one static partial group.

  group_fn(start, count, carry) -> carry processes steps start .. start + count - 1 (in reverse order when
  `reverse`); count is static, start is traced inside the loop (a multiple of `group`) and static for the partial
  group. Unrolling `group` steps per iteration amortises the loop overhead and lets the TPU kernel move whole
  (8, 128) tiles. In reverse, the partial group (the latest steps) comes first.
  """
  full, rem = divmod(nsteps, group)

  def body(i, carry):
    g = full - 1 - i if reverse else i
    return group_fn(pl.multiple_of(g * group, group), group, carry)

  if reverse and rem:
    carry = group_fn(full * group, rem, carry)
  if full == 1:
    carry = group_fn(0, group, carry)
  elif full > 1:
    carry = jax.lax.fori_loop(0, full, body, carry)
  if not reverse and rem:
    carry = group_fn(full * group, rem, carry)
  return carry


def stack_rows(rows: list[jax.Array]) -> jax.Array:
  """Rows (1, Dt) → (len(rows), Dt) by selects on a row index (sublane concatenation is not a safe Mosaic op)."""
  if len(rows) == 1:
    return rows[0]
  shape = (len(rows), rows[0].shape[-1])
  index = jax.lax.broadcasted_iota(jnp.int32, shape, 0)
  out = jnp.broadcast_to(rows[0], shape)
  for k, row in enumerate(rows[1:], start=1):
    out = jnp.where(index == k, row, out)
  return out
