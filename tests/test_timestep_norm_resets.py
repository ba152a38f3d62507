"""TimestepNorm with document resets against float64 NumPy: every document normalised as a stream of its own."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from megalodon_jax.ops import timestep_norm as tsn


def reference(x, groups, resets, prior, carried, eps, mask=None):
  """Step by step in float64: merge each step into the running (n, mean, var); a reset restarts from `prior`."""
  b, l, d = x.shape
  xg = x.astype(np.float64).reshape(b, l, groups, d // groups)
  out = np.zeros((b, l, d))
  for r in range(b):
    n, m, v = (np.float64(carried[0][r]), carried[1][r].astype(np.float64), carried[2][r].astype(np.float64))
    for t in range(l):
      if mask is not None and mask[r, t]:
        continue
      if resets[r, t]:
        n, m, v = np.float64(prior[0]), prior[1].astype(np.float64), prior[2].astype(np.float64)
      sm, sv = xg[r, t].mean(-1), xg[r, t].var(-1)
      tot = n + 1
      delta = sm - m
      m, v = m + delta / tot, v * n / tot + sv / tot + delta ** 2 * n / tot ** 2
      n = tot
      out[r, t] = ((xg[r, t] - m[:, None]) / np.sqrt(v[:, None] + eps)).reshape(d)
  return out, (n, m, v)


def _resets(rng, b, l, p=0.15):
  r = rng.random((b, l)) < p
  r[0, 0] = True  # a reset on the very first step
  r[1, :] = False  # a row without any
  return r


@pytest.mark.parametrize("with_state", [False, True])
def test_resets_restart_statistics(with_state):
  rng = np.random.default_rng(0)
  b, l, d, g = 3, 37, 12, 3
  x = rng.normal(size=(b, l, d)).astype(np.float32) * 2 + 1
  resets = _resets(rng, b, l)
  prior = tsn.initial_state(b, 0, jnp.zeros(g), jnp.zeros(g))
  state = prior if not with_state else tsn.NormState(jnp.full((b,), 5, jnp.int32),
                                                     jnp.asarray(rng.normal(size=(b, g)), jnp.float32),
                                                     jnp.asarray(rng.random((b, g)) + 0.5, jnp.float32),
                                                     jnp.zeros((b,), jnp.int32))
  w = jnp.zeros(d)
  y, new = tsn.timestep_norm(jnp.asarray(x), w, w, state, num_groups=g, eps=1e-5, resets=jnp.asarray(resets),
                             prior=prior)
  carried = (np.asarray(tsn.total_count(state), np.float64), np.asarray(state.mean), np.asarray(state.var))
  want, _ = reference(x, g, resets, (0.0, np.zeros(g), np.ones(g)), carried, 1e-5)
  np.testing.assert_allclose(np.asarray(y), want, rtol=2e-5, atol=2e-5)
  # The count after the piece: steps since the last reset, or all of them plus the carried count.
  for r in range(b):
    starts = np.flatnonzero(resets[r])
    expect = l - starts[-1] if starts.size else carried[0][r] + l
    assert tsn.total_count(new)[r] == expect


def test_streaming_pieces_equal_the_whole_and_no_resets_is_the_carry_path():
  rng = np.random.default_rng(1)
  b, l, d, g = 2, 40, 8, 2
  x = jnp.asarray(rng.normal(size=(b, l, d)), jnp.float32)
  resets = jnp.asarray(_resets(rng, b, l, 0.1))
  prior = tsn.initial_state(b, 0, jnp.zeros(g), jnp.zeros(g))
  w = jnp.asarray(rng.normal(size=d), jnp.float32) * 0.1
  kw = dict(num_groups=g, eps=1e-5, prior=prior)
  whole, end = tsn.timestep_norm(x, w, w, prior, resets=resets, **kw)
  state, parts = prior, []
  for lo, hi in ((0, 1), (1, 13), (13, 14), (14, 40)):  # boundaries at, before and after resets
    y, state = tsn.timestep_norm(x[:, lo:hi], w, w, state, resets=resets[:, lo:hi], **kw)
    parts.append(y)
  np.testing.assert_allclose(np.concatenate(parts, 1), whole, rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(tsn.total_count(state), tsn.total_count(end))
  np.testing.assert_allclose(state.mean, end.mean, rtol=1e-5, atol=1e-6)
  # All-false resets give exactly the carry result.
  plain, _ = tsn.timestep_norm(x, w, w, prior, num_groups=g, eps=1e-5)
  none, _ = tsn.timestep_norm(x, w, w, prior, resets=jnp.zeros((b, l), bool), **kw)
  np.testing.assert_allclose(none, plain, rtol=1e-6, atol=1e-6)


def test_padding_with_resets():
  rng = np.random.default_rng(2)
  b, l, d, g = 2, 16, 4, 1
  x = rng.normal(size=(b, l, d)).astype(np.float32)
  resets = np.zeros((b, l), bool)
  resets[:, [0, 5, 11]] = True
  mask = np.zeros((b, l), bool)
  mask[0, :3] = True  # left padding, with a reset on a padded step (ignored)
  mask[1, 12:] = True
  prior = tsn.initial_state(b, 0, jnp.zeros(g), jnp.zeros(g))
  w = jnp.zeros(d)
  y, _ = tsn.timestep_norm(jnp.asarray(x), w, w, prior, num_groups=g, eps=1e-5, mask=jnp.asarray(mask),
                           resets=jnp.asarray(resets), prior=prior)
  want, _ = reference(x, g, resets & ~mask, (0.0, np.zeros(g), np.ones(g)), (np.zeros(b), np.zeros((b, g)),
                                                                             np.ones((b, g))), 1e-5, mask)
  np.testing.assert_allclose(np.where(mask[..., None], 0, np.asarray(y)), want, rtol=2e-5, atol=2e-5)


def test_gradients_do_not_cross_a_reset():
  rng = np.random.default_rng(3)
  x = jnp.asarray(rng.normal(size=(1, 20, 4)), jnp.float32)
  resets = jnp.zeros((1, 20), bool).at[0, 8].set(True)
  prior = tsn.initial_state(1, 0, jnp.zeros(1), jnp.zeros(1))

  def after(x):
    y, _ = tsn.timestep_norm(x, jnp.zeros(4), jnp.zeros(4), prior, num_groups=1, eps=1e-5, resets=resets,
                             prior=prior)
    return jnp.sum(jnp.sin(y[:, 8:]))

  grad = jax.grad(after)(x)
  assert np.all(np.asarray(grad[:, :8]) == 0)
  assert np.any(np.asarray(grad[:, 8:]) != 0)


def test_documents_far_apart_in_mean():
  """Documents whose means differ by 1000 times their spread: each one's statistics restart from the prior and
  must not inherit rounding from the documents before it (sums restarted at a reset, not differences of running
  totals)."""
  rng = np.random.default_rng(3)
  b, l, d, g = 2, 600, 8, 2
  offsets = np.repeat(rng.choice([-500.0, 0.0, 300.0, 1000.0], size=(b, 6)), l // 6, axis=1)[..., None]
  x = (offsets + 0.5 * rng.normal(size=(b, l, d))).astype(np.float32)
  resets = np.zeros((b, l), bool)
  resets[:, ::l // 6] = True
  prior = tsn.initial_state(b, 0, jnp.zeros(g), jnp.zeros(g))
  w = jnp.zeros(d)
  y, _ = jax.jit(lambda xx: tsn.timestep_norm(xx, w, w, prior, num_groups=g, eps=1e-5, resets=jnp.asarray(resets),
                                              prior=prior))(jnp.asarray(x))
  want, _ = reference(x, g, resets, (0.0, np.zeros(g), np.ones(g)), (np.zeros(b), np.zeros((b, g)),
                                                                     np.ones((b, g))), 1e-5)
  # The float32 input holds x to 1000 * 2^-24 = 6e-5 absolute, 1.2e-4 of the spread: y cannot be closer.
  np.testing.assert_allclose(np.asarray(y), want, rtol=0, atol=1e-3)
