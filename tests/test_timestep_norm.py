"""TimestepNorm (docs/model.md#timestep-norm) against an independent float64 NumPy reference of the official
per-step merge."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from megalodon_jax.ops.timestep_norm import (COUNT_BASE, NormState, cumulative_stats, initial_state, split_count,
                                             timestep_norm, total_count)

EPS = 1e-5


# ---------------------------------------------------------------------------------------------------------------
# Independent references (float64 NumPy, written from docs/model.md#timestep-norm).


def ref_timestep_norm(x, weight, bias, count, mean, var, num_groups, eps=EPS, mask=None):
  """The official kernel, literally: one Welford/Chan merge per time step, in float64.

  x: (B, L, D); weight, bias: (D,); count: (B,); mean, var: (B, G); mask: (B, L) bool, True = padded.
  Returns y (B, L, D), per-step mean/var (B, L, G) (the pre-step state on padded steps) and the final state.
  """
  x = np.asarray(x, np.float64)
  b, l, d = x.shape
  m = d // num_groups
  n = np.asarray(count, np.float64).copy()
  cur_m = np.asarray(mean, np.float64).copy()
  cur_s = np.asarray(var, np.float64).copy()
  w = 1.0 + np.asarray(weight, np.float64)
  bi = np.asarray(bias, np.float64)
  ys, ms, ss = [], [], []
  for t in range(l):
    xt = x[:, t].reshape(b, num_groups, m)
    mu = xt.mean(-1)
    v = np.square(xt - mu[..., None]).mean(-1)
    n1 = n + 1.0
    r = (n / n1)[:, None]
    new_m = r * cur_m + mu / n1[:, None]
    new_s = r * cur_s + v / n1[:, None] + r * (1.0 / n1[:, None]) * np.square(mu - cur_m)
    y = ((xt - new_m[..., None]) / np.sqrt(new_s[..., None] + eps)).reshape(b, d) * w + bi
    if mask is not None:
      pad = np.asarray(mask[:, t], bool)
      y = np.where(pad[:, None], 0.0, y)
      n1 = np.where(pad, n, n1)
      new_m = np.where(pad[:, None], cur_m, new_m)
      new_s = np.where(pad[:, None], cur_s, new_s)
    n, cur_m, cur_s = n1, new_m, new_s
    ys.append(y)
    ms.append(cur_m)
    ss.append(cur_s)
  return np.stack(ys, 1), np.stack(ms, 1), np.stack(ss, 1), (n, cur_m, cur_s)


def ref_cumulative_stats_closed_form(x, count, mean, var, num_groups):
  """Closed form of the merge (docs/model.md#timestep-norm) via float64 cumulative sums (vectorised; for long streams).

  Mean and population variance of n0 pseudo-rows (mean M0, variance S0) plus all scalars seen so far, each
  step weighted like one pseudo-row. Sums are taken about a fixed shift (the first step's mean) so the float64
  reference itself does not lose digits to cancellation when the stream has a large offset.
  """
  x = np.asarray(x, np.float64)
  b, l, d = x.shape
  xt = x.reshape(b, l, num_groups, d // num_groups)
  shift = xt[:, :1].mean(-1)  # (B, 1, G)
  xs = xt - shift[..., None]
  mu = xs.mean(-1)  # (B, L, G) per-step mean about the shift
  sq = np.square(xs).mean(-1)  # per-step mean square about the shift
  n0 = np.asarray(count, np.float64)[:, None, None]
  m0 = np.asarray(mean, np.float64)[:, None] - shift
  s0 = np.asarray(var, np.float64)[:, None]
  n = n0 + np.arange(1, l + 1, dtype=np.float64)[None, :, None]
  cm = (n0 * m0 + np.cumsum(mu, axis=1)) / n
  csq = (n0 * (s0 + np.square(m0)) + np.cumsum(sq, axis=1)) / n
  return cm + shift, csq - np.square(cm)


def _norm_state(count, mean, var):
  """A NormState from a (B,) count below 2^31 (high word 0; the op normalises a low word >= 2^30 itself)."""
  count = jnp.asarray(count, jnp.int32)
  return NormState(count, jnp.asarray(mean), jnp.asarray(var), jnp.zeros_like(count))


def _random_params(rng, d):
  return (rng.normal(size=d).astype(np.float32) * 0.5, rng.normal(size=d).astype(np.float32) * 0.5)


def _random_state(rng, b, g, offset=0.0):
  count = rng.integers(1, 50, size=b).astype(np.int32)
  mean = (offset + rng.normal(size=(b, g))).astype(np.float32)
  var = rng.uniform(0.2, 3.0, size=(b, g)).astype(np.float32)
  return count, mean, var


def _prior_state(b, g):
  st = initial_state(b, 0, jnp.zeros((g,)), jnp.zeros((g,)))
  return np.asarray(st.count), np.asarray(st.mean), np.asarray(st.var)


# Jitted once per shape: eager dispatch of the associative scan is slow on a small CPU.
_tsn = jax.jit(timestep_norm, static_argnames=("num_groups", "eps"))


def _run(x, weight, bias, state, g, mask=None):
  st = _norm_state(*state)
  y, new = _tsn(jnp.asarray(x), jnp.asarray(weight), jnp.asarray(bias), st, num_groups=g, eps=EPS,
                mask=None if mask is None else jnp.asarray(mask))
  return np.asarray(y), new


def _max_rel(a, b, floor=0.0):
  a = np.asarray(a, np.float64)
  b = np.asarray(b, np.float64)
  return float(np.max(np.abs(a - b) / np.maximum(np.abs(b), floor)))


# ---------------------------------------------------------------------------------------------------------------
# The reference itself: the per-step merge equals the closed form (cumulative statistics of the multiset).


def test_reference_merge_matches_closed_form():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(2, 9, 6)) * 2 + 0.7
  count, mean, var = _random_state(rng, 2, 3)
  _, ms, ss, _ = ref_timestep_norm(x, np.zeros(6), np.zeros(6), count, mean, var, 3)
  cm, cv = ref_cumulative_stats_closed_form(x, count, mean, var, 3)
  np.testing.assert_allclose(ms, cm, rtol=1e-12, atol=1e-12)
  np.testing.assert_allclose(ss, cv, rtol=1e-12, atol=1e-12)
  # Direct multiset check at one step: 2 pseudo-rows are not representable exactly, but with n0 = 0 the statistics
  # are the plain mean/variance of all scalars seen so far.
  _, ms0, ss0, _ = ref_timestep_norm(x, np.zeros(6), np.zeros(6), np.zeros(2), mean, var, 3)
  flat = x[:, :5].reshape(2, 5, 3, 2).transpose(0, 2, 1, 3).reshape(2, 3, 10)
  np.testing.assert_allclose(ms0[:, 4], flat.mean(-1), rtol=1e-12)
  np.testing.assert_allclose(ss0[:, 4], flat.var(-1), rtol=1e-12)


# ---------------------------------------------------------------------------------------------------------------
# Forward against the sequential reference.

SHAPES = [(1, 1, 4, 2), (2, 7, 8, 2), (3, 16, 12, 3), (2, 33, 16, 4), (1, 64, 8, 1)]


def _check(x, weight, bias, state, g, mask=None, y_tol=2e-5, stat_rtol=1e-5):
  y, new = _run(x, weight, bias, state, g, mask)
  ry, _, _, (rn, rm, rs) = ref_timestep_norm(x, weight, bias, *state, g, mask=mask)
  np.testing.assert_allclose(y, ry, rtol=y_tol, atol=y_tol)
  np.testing.assert_array_equal(total_count(new), rn.astype(np.int64))
  assert new.count.dtype == jnp.int32 and new.count_hi.dtype == jnp.int32
  np.testing.assert_allclose(np.asarray(new.mean), rm, rtol=stat_rtol, atol=stat_rtol * np.abs(rm).max())
  np.testing.assert_allclose(np.asarray(new.var), rs, rtol=stat_rtol)


@pytest.mark.parametrize("b,l,d,g", SHAPES)
def test_forward_from_prior(b, l, d, g):
  rng = np.random.default_rng(b * 1000 + l * 10 + d)
  x = (rng.normal(size=(b, l, d)) * 1.5 + 0.3).astype(np.float32)
  weight, bias = _random_params(rng, d)
  state = _prior_state(b, g)
  np.testing.assert_array_equal(state[0], 0)
  np.testing.assert_array_equal(state[1], 0.0)
  np.testing.assert_array_equal(state[2], 1.0)
  _check(x, weight, bias, state, g)


@pytest.mark.parametrize("b,l,d,g", SHAPES)
def test_forward_from_nontrivial_state(b, l, d, g):
  rng = np.random.default_rng(7 + b * 1000 + l * 10 + d)
  x = (rng.normal(size=(b, l, d)) * 0.8 - 0.5).astype(np.float32)
  weight, bias = _random_params(rng, d)
  _check(x, weight, bias, _random_state(rng, b, g), g)


def test_initial_state_with_prior():
  """A non-zero prior count / mean / logv is the starting state; exp(logv) is the variance."""
  rng = np.random.default_rng(3)
  g, d = 2, 6
  pm = rng.normal(size=g).astype(np.float32)
  pl = rng.normal(size=g).astype(np.float32)
  st = initial_state(3, 4, jnp.asarray(pm), jnp.asarray(pl))
  assert st.count.shape == (3,) and st.mean.shape == (3, g) and st.var.shape == (3, g)
  np.testing.assert_array_equal(total_count(st), 4)
  np.testing.assert_allclose(np.asarray(st.mean), np.broadcast_to(pm, (3, g)))
  np.testing.assert_allclose(np.asarray(st.var), np.broadcast_to(np.exp(pl.astype(np.float64)), (3, g)), rtol=1e-6)
  x = rng.normal(size=(3, 5, d)).astype(np.float32)
  weight, bias = _random_params(rng, d)
  _check(x, weight, bias, (np.full(3, 4), np.broadcast_to(pm, (3, g)), np.exp(np.broadcast_to(pl, (3, g)))), g)


@pytest.mark.parametrize("from_prior", [True, False])
def test_forward_with_mask(from_prior):
  rng = np.random.default_rng(11)
  b, l, d, g = 4, 13, 8, 2
  x = (rng.normal(size=(b, l, d)) + 0.2).astype(np.float32)
  weight, bias = _random_params(rng, d)
  mask = rng.uniform(size=(b, l)) < 0.35
  mask[0, :4] = True  # leading padding (with the prior: nothing merged yet)
  mask[1, -3:] = True  # trailing padding
  mask[2, :] = True  # a fully padded row: state must come back unchanged
  mask[3, :] = False
  state = _prior_state(b, g) if from_prior else _random_state(rng, b, g)
  _check(x, weight, bias, state, g, mask=mask)
  y, new = _run(x, weight, bias, state, g, mask)
  assert np.all(y[mask] == 0.0)
  assert np.isfinite(y).all()
  np.testing.assert_array_equal(total_count(new)[2], state[0][2])
  np.testing.assert_array_equal(np.asarray(new.mean)[2], state[1][2])
  np.testing.assert_array_equal(np.asarray(new.var)[2], state[2][2])
  np.testing.assert_array_equal(total_count(new), state[0] + (~mask).sum(1))


def test_per_step_statistics_with_mask():
  """cumulative_stats: per-step statistics equal the reference's running state (pre-step state on padded steps)."""
  rng = np.random.default_rng(12)
  b, l, d, g = 2, 11, 6, 3
  x = rng.normal(size=(b, l, d)).astype(np.float32)
  mask = rng.uniform(size=(b, l)) < 0.3
  state = _random_state(rng, b, g)
  stats = jax.jit(cumulative_stats, static_argnums=2)
  mean, var, _ = stats(jnp.asarray(x), _norm_state(*state), g, jnp.asarray(mask))
  _, rm, rs, _ = ref_timestep_norm(x, np.zeros(d), np.zeros(d), *state, g, mask=mask)
  np.testing.assert_allclose(np.asarray(mean), rm, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(np.asarray(var), rs, rtol=1e-5)


@pytest.mark.parametrize("offset", [1000.0, -250.0])
def test_forward_large_offset(offset):
  """x = offset + N(0, 1): the statistics must not cancel catastrophically.

  The float32 input itself carries an absolute rounding of |offset|·2⁻²⁴ and the float32 mean cannot be closer to
  the true mean than |offset|·2⁻²⁴, so y = (x − M)/σ is only determined to ≈ |offset|·2⁻²⁴·few / σ. A naive
  E[x²] − E[x]² in float32 would instead lose everything (error ≈ offset²·2⁻²⁴ ≈ 0.06 for offset 1000 vs var 1).
  """
  rng = np.random.default_rng(int(abs(offset)))
  b, l, d, g = 2, 40, 8, 2
  x = (offset + rng.normal(size=(b, l, d))).astype(np.float32)
  weight, bias = _random_params(rng, d)
  ulp = abs(offset) * 2.0**-23
  for state in (_prior_state(b, g), _random_state(rng, b, g, offset=offset)):
    y, new = _run(x, weight, bias, state, g)
    ry, _, _, (_, rm, rs) = ref_timestep_norm(x, weight, bias, *state, g)
    err_y = np.abs(y - ry).max()
    assert err_y < 4 * ulp, f"max |Δy| = {err_y:.3g} (ulp of offset {ulp:.3g})"
    np.testing.assert_allclose(np.asarray(new.mean), rm, rtol=0, atol=2 * ulp)
    err_v = _max_rel(np.asarray(new.var), rs)
    # Variance error ≈ (2·|Δmean|·σ)/σ² with |Δmean| a few ulps of the offset; σ² ≈ 1 here.
    assert err_v < 2 * ulp, f"max rel var err {err_v:.3g}"


@pytest.mark.parametrize("jump", [1000.0, -300.0])
def test_first_step_far_from_the_rest(jump):
  """The first step sits `jump` away from the 20,000 after it (spread 1): the running mean leaves the first step's
  mean (what the running sums are taken about) by ~`jump` while the variance falls to ~jump^2/t, so sums of
  squares about the first step less the squared mean would lose about t*2^-24 of it (~1e-3 at the end); the
  variance terms the op sums are non-negative and keep it to float32 rounding, like the step-by-step merge."""
  rng = np.random.default_rng(7)
  b, l, d, g = 2, 20_000, 8, 2
  x = rng.normal(size=(b, l, d))
  x[:, 0] += jump
  x = x.astype(np.float32)
  state = _prior_state(b, g)
  ref_m, ref_v = ref_cumulative_stats_closed_form(x, *state, g)
  m, v, _ = jax.jit(lambda xx: cumulative_stats(xx, _norm_state(*state), g))(jnp.asarray(x))
  err_m = float(np.max(np.abs(np.asarray(m) - ref_m) / (np.abs(ref_m) + np.sqrt(ref_v))))
  err_v = _max_rel(v, ref_v)
  assert err_m < 1e-5 and err_v < 5e-5, f"mean {err_m:.3g}, var {err_v:.3g}"


# ---------------------------------------------------------------------------------------------------------------
# State carrying.


@pytest.mark.parametrize("splits,use_mask", [((5, 9), False), ((1, 1, 1, 20), True), ((13, 0, 10), True)])
def test_split_sequence_equals_one_call(splits, use_mask):
  rng = np.random.default_rng(sum(splits) + 17 * use_mask)
  b, d, g = 3, 8, 4
  l = 23
  x = (rng.normal(size=(b, l, d)) * 2 + 1).astype(np.float32)
  weight, bias = _random_params(rng, d)
  mask = (rng.uniform(size=(b, l)) < 0.3) if use_mask else None
  state = _random_state(rng, b, g)
  y_full, st_full = _run(x, weight, bias, state, g, mask)
  bounds = np.cumsum((0,) + splits)
  bounds = [int(v) for v in bounds if v < l] + [l]
  st = _norm_state(*state)
  pieces = []
  for s, e in zip(bounds[:-1], bounds[1:]):
    piece_mask = None if mask is None else jnp.asarray(mask[:, s:e])
    yp, st = _tsn(jnp.asarray(x[:, s:e]), jnp.asarray(weight), jnp.asarray(bias), st, num_groups=g, eps=EPS,
                  mask=piece_mask)
    pieces.append(np.asarray(yp))
  np.testing.assert_allclose(np.concatenate(pieces, 1), y_full, rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(total_count(st), total_count(st_full))
  np.testing.assert_allclose(np.asarray(st.mean), np.asarray(st_full.mean), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(np.asarray(st.var), np.asarray(st_full.var), rtol=1e-5)


@pytest.mark.parametrize("start", [2**31 - 3, 10**10 - 2, 2**30 - 1])
def test_count_stays_exact_past_int32(start):
  """The step count is exact beyond 2^31 (where one int32 would wrap) and at 1e10; statistics stay finite."""
  rng = np.random.default_rng(start % 1000)
  b, l, d, g = 2, 7, 8, 2
  x = rng.normal(size=(b, l, d)).astype(np.float32)
  weight, bias = _random_params(rng, d)
  mask = np.zeros((b, l), bool)
  mask[1, 2:4] = True
  lo, hi = split_count(start, b)
  _, mean, var = _random_state(rng, b, g)
  st = NormState(lo, jnp.asarray(mean), jnp.asarray(var), hi)
  np.testing.assert_array_equal(total_count(st), start)
  y, new = _tsn(jnp.asarray(x), jnp.asarray(weight), jnp.asarray(bias), st, num_groups=g, eps=EPS,
                mask=jnp.asarray(mask))
  np.testing.assert_array_equal(total_count(new), [start + l, start + l - 2])
  assert np.all(np.asarray(new.count) >= 0) and np.all(np.asarray(new.count) < COUNT_BASE)
  ry, _, _, (_, rm, rs) = ref_timestep_norm(x, weight, bias, np.full(b, float(start)), mean, var, g, mask=mask)
  np.testing.assert_allclose(np.asarray(y), ry, rtol=2e-5, atol=2e-5)
  np.testing.assert_allclose(np.asarray(new.mean), rm, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(np.asarray(new.var), rs, rtol=1e-5)


def test_count_words_and_float_weights():
  """split_count / total_count round-trip; a hand-built low word >= 2^30 is normalised; the float32 view is right."""
  from megalodon_jax.ops.timestep_norm import _count_as_float  # pylint: disable=import-outside-toplevel
  counts = [0, 5, 2**30, 2**31 - 1, 3 * 2**30 + 5, 10**10, 2**61 - 1]
  as_float = jax.jit(_count_as_float)
  for c in counts:
    lo, hi = split_count(c, 1)
    st = NormState(lo, jnp.zeros((1, 1)), jnp.ones((1, 1)), hi)
    assert int(total_count(st)[0]) == c
    np.testing.assert_allclose(float(as_float(st)[0]), float(c), rtol=1e-7)
  with pytest.raises(ValueError, match="outside"):
    split_count(-1, 1)
  with pytest.raises(ValueError, match="outside"):
    split_count(2**61, 1)
  # An int32 array count (the module's prior buffer) and a plain int32 low word above 2^30 carry into the high word.
  lo, hi = split_count(jnp.asarray(2**31 - 1, jnp.int32), 2)
  assert list(total_count(NormState(lo, None, None, hi))) == [2**31 - 1] * 2
  st = _norm_state(np.array([2**31 - 10, 2**30]), np.zeros((2, 1), np.float32), np.ones((2, 1), np.float32))
  _, new = _tsn(jnp.ones((2, 20, 2), jnp.float32), jnp.zeros(2), jnp.zeros(2), st, num_groups=1, eps=EPS)
  np.testing.assert_array_equal(total_count(new), [2**31 + 10, 2**30 + 20])


# ---------------------------------------------------------------------------------------------------------------
# Long streams: float32 statistics after a million steps stay close to the float64 closed form.

LONG = 1 << 20  # 1,048,576 steps


def _long_stream_errors(offset, pieces, seed):
  b, d, g = 1, 4, 2
  rng = np.random.default_rng(seed)
  # A slowly drifting signal so the running statistics keep changing over the whole stream.
  t = np.arange(LONG, dtype=np.float64)
  drift = 0.5 * np.sin(2 * np.pi * t / 300_000.0)[None, :, None]
  x = (offset + drift + rng.normal(size=(b, LONG, d)) * np.array([1.0, 2.0, 0.5, 1.5])).astype(np.float32)
  state = _prior_state(b, g)
  ref_m, ref_v = ref_cumulative_stats_closed_form(x, *state, g)
  st = _norm_state(*state)
  means, variances = [], []
  stats = jax.jit(lambda xp, s: cumulative_stats(xp, s, g))
  bounds = np.linspace(0, LONG, pieces + 1).astype(int)
  for s, e in zip(bounds[:-1], bounds[1:]):
    m, v, st = stats(jnp.asarray(x[:, s:e]), st)
    means.append(np.asarray(m))
    variances.append(np.asarray(v))
  mean = np.concatenate(means, 1)
  var = np.concatenate(variances, 1)
  # Also the public op on the tail piece, from the carried state, to check the returned NormState.
  assert int(total_count(st)[0]) == LONG
  sampled = np.unique(np.concatenate([np.geomspace(1, LONG, 200).astype(int) - 1,
                                      rng.integers(0, LONG, 800), [LONG - 1]]))
  # Mean error measured relative to |M| + σ (the mean of a zero-offset stream sits near 0, where a plain
  # relative error is meaningless; what matters for y = (x − M)/σ is |ΔM|/σ).
  scale = np.abs(ref_m) + np.sqrt(ref_v)
  err_m = np.abs(mean - ref_m) / scale
  err_v = np.abs(var - ref_v) / ref_v
  end_m = float(np.max(np.abs(np.asarray(st.mean) - ref_m[:, -1]) / scale[:, -1]))
  end_v = float(np.max(np.abs(np.asarray(st.var) - ref_v[:, -1]) / ref_v[:, -1]))
  # What the bound guards against: the textbook float32 running sums of x and x² (E[x²] − E[x]²).
  xg = x.reshape(b, LONG, g, d // g)
  n = np.arange(1, LONG + 1, dtype=np.float32)[None, :, None]
  naive_m = np.cumsum(xg.mean(-1), axis=1, dtype=np.float32) / n
  naive_v = np.cumsum(np.square(xg).mean(-1), axis=1, dtype=np.float32) / n - np.square(naive_m)
  naive_err_v = float(np.max(np.abs(naive_v[:, -1] - ref_v[:, -1]) / ref_v[:, -1]))
  return {
      "naive_var_end": naive_err_v,
      "mean_sampled": float(err_m[:, sampled].max()), "var_sampled": float(err_v[:, sampled].max()),
      "mean_all": float(err_m.max()), "var_all": float(err_v.max()), "mean_end": end_m, "var_end": end_v,
  }


@pytest.mark.parametrize("offset", [0.0, 100.0])
def test_long_stream_drift(offset):
  pieces = 4  # 262,144 steps per call, state carried (both variants share one compilation)
  errs = _long_stream_errors(offset, pieces, seed=int(offset) + 1)
  msg = (f"offset {offset}, {LONG} steps in {pieces} piece(s): max rel err mean/var at sampled steps "
         f"{errs['mean_sampled']:.3g}/{errs['var_sampled']:.3g}, over all steps {errs['mean_all']:.3g}/"
         f"{errs['var_all']:.3g}, final state {errs['mean_end']:.3g}/{errs['var_end']:.3g} "
         f"(naive float32 running sums: final var rel err {errs['naive_var_end']:.3g})")
  print(msg)
  bound = 1e-4
  assert errs["mean_sampled"] < bound and errs["var_sampled"] < bound, msg
  assert errs["mean_end"] < bound and errs["var_end"] < bound, msg
  assert errs["mean_all"] < bound and errs["var_all"] < bound, msg
  assert errs["naive_var_end"] > 100 * errs["var_end"], msg  # the stream is long enough to expose drift


# ---------------------------------------------------------------------------------------------------------------
# Gradients: jax.grad (float32) vs central differences of the float64 reference.


def _flatten(params):
  return np.concatenate([np.ravel(p) for p in params])


def _unflatten(vec, like):
  out, i = [], 0
  for p in like:
    out.append(vec[i:i + p.size].reshape(p.shape))
    i += p.size
  return out


@pytest.mark.parametrize("use_mask", [False, True])
def test_gradients_match_finite_differences(use_mask):
  rng = np.random.default_rng(21 + use_mask)
  b, l, d, g = 2, 5, 6, 2
  x = rng.normal(size=(b, l, d)) + 0.5
  weight = rng.normal(size=d) * 0.3
  bias = rng.normal(size=d) * 0.3
  count = np.array([3, 1], np.int32)
  mean = rng.normal(size=(b, g))
  var = rng.uniform(0.5, 2.0, size=(b, g))
  mask = None
  if use_mask:
    mask = np.zeros((b, l), bool)
    mask[0, 1] = mask[1, 3] = True
  # Random linear functional of y and of the returned state (mean, var).
  cy = rng.normal(size=(b, l, d))
  cm = rng.normal(size=(b, g))
  cv = rng.normal(size=(b, g))

  def ref_loss(flat):
    xx, ww, bb, mm, vv = _unflatten(flat, [x, weight, bias, mean, var])
    y, _, _, (_, fm, fv) = ref_timestep_norm(xx, ww, bb, count, mm, vv, g, mask=mask)
    return np.sum(cy * y) + np.sum(cm * fm) + np.sum(cv * fv)

  def jax_loss(xx, ww, bb, mm, vv):
    y, st = timestep_norm(xx, ww, bb, _norm_state(count, mm, vv), num_groups=g, eps=EPS,
                          mask=None if mask is None else jnp.asarray(mask))
    return jnp.sum(cy.astype(np.float32) * y) + jnp.sum(cm.astype(np.float32) * st.mean) + jnp.sum(
        cv.astype(np.float32) * st.var)

  f32 = [jnp.asarray(a, jnp.float32) for a in (x, weight, bias, mean, var)]
  grads = jax.jit(jax.grad(jax_loss, argnums=(0, 1, 2, 3, 4)))(*f32)
  flat = _flatten([x, weight, bias, mean, var])
  h = 1e-6
  fd = np.empty_like(flat)
  for i in range(flat.size):
    e = np.zeros_like(flat)
    e[i] = h
    fd[i] = (ref_loss(flat + e) - ref_loss(flat - e)) / (2 * h)
  names = ["x", "weight", "bias", "mean", "var"]
  for name, got, want in zip(names, grads, _unflatten(fd, [x, weight, bias, mean, var])):
    got = np.asarray(got, np.float64)
    scale = np.abs(want).max()
    assert scale > 1e-3, name  # every input really influences the functional
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * scale, err_msg=f"grad wrt {name}")
