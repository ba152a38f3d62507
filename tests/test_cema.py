"""CEMA (docs/model.md#cema): every implementation against an independent float64 NumPy recurrence built from raw
parameters."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from megalodon_jax.ops import cema as cema_lib
from megalodon_jax.ops.cema.chunked import cema_chunked
from megalodon_jax.ops.cema.coefficients import HIGHEST, power_table
from megalodon_jax.ops.cema.final_state import final_state_blocked

IMPLS = ("fft", "associative_scan", "sequential", "chunked", "auto")


def _impl(name: str):
  """A callable with the common signature; "chunked_bK" is the chunked path with block size K (many blocks)."""
  if name.startswith("chunked_b"):
    return functools.partial(cema_chunked, block_size=int(name[len("chunked_b"):]))
  return lambda x, coeffs, omega, h0=None, return_state=False: cema_lib.cema(
      x, coeffs, omega, h0, impl=name, return_state=return_state)


ALL = IMPLS + ("chunked_b3",)  # block size 3: many blocks and a partial last block at every tested length


# ---------------------------------------------------------------------------------------------------------------
# Independent reference: the coefficients and the recurrence of docs/model.md#cema in complex128, one time step at
# a time.


def _sigmoid(z):
  return 1.0 / (1.0 + np.exp(-z))


def ref_coefficients(params):
  """(p, q, γ̃), each (D, N): p real, q and γ̃ complex128."""
  n = params["alpha"].shape[1]
  a = _sigmoid(params["alpha"][..., 0])
  d = _sigmoid(params["delta"][..., 0])
  phase = np.arange(1, n + 1)[None, :] * _sigmoid(params["theta"][:, 0, :]) * 2 * np.pi / n  # (D, N)
  q = (1 - a * d) * np.exp(1j * phase)
  g = (params["gamma"][..., 0] + 1j * params["gamma"][..., 1]) / np.sqrt(n)
  return a, q, g


def ref_cema(params, x, h0=None):
  """y (B, L, D) float64 and the final state (B, D, N, 2) float64, by looping over time."""
  p, q, g = ref_coefficients(params)
  batch, length, _ = x.shape
  h = np.zeros((batch,) + p.shape, np.complex128) if h0 is None else h0[..., 0] + 1j * h0[..., 1]
  ys = []
  for t in range(length):
    h = q * h + p * x[:, t, :, None]
    ys.append(np.real(np.sum(g * h, axis=-1)) + params["omega"][:, 0] * x[:, t])
  return np.stack(ys, axis=1), np.stack([h.real, h.imag], axis=-1)


def random_params(rng, dim, nstate, delta_shift=0.0):
  return {
      "alpha": rng.normal(size=(dim, nstate, 1)),
      "delta": rng.normal(size=(dim, nstate, 1)) + delta_shift,
      "theta": rng.normal(size=(dim, 1, 1)),
      "gamma": rng.normal(size=(dim, nstate, 2)),
      "omega": rng.normal(size=(dim, 1)),
  }


def run_impl(name, params, x, h0=None, jit=True):
  """Runs an implementation from raw float32 parameters (coefficients via `cema_coefficients`)."""
  f32 = {k: jnp.asarray(v, jnp.float32) for k, v in params.items()}

  def fn(f32, x, h0):
    coeffs = cema_lib.cema_coefficients(f32["alpha"], f32["delta"], f32["theta"], f32["gamma"])
    return _impl(name)(x, coeffs, f32["omega"], h0, return_state=True)

  fn = jax.jit(fn) if jit else fn
  y, state = fn(f32, jnp.asarray(x, jnp.float32), None if h0 is None else jnp.asarray(h0, jnp.float32))
  return np.asarray(y), np.asarray(state)


def assert_close(actual, expected, rtol=1e-5, what=""):
  """max |a - e| ≤ rtol · max(1, max |e|): float32 rounding relative to the size of the values."""
  scale = max(1.0, float(np.max(np.abs(expected))))
  err = float(np.max(np.abs(actual - expected)))
  assert err <= rtol * scale, f"{what}: max abs err {err:.3g} > {rtol:.1g} × {scale:.3g}"


# ---------------------------------------------------------------------------------------------------------------


def test_coefficients_match_spec_formulas():
  rng = np.random.default_rng(0)
  params = random_params(rng, 5, 8)
  coeffs = cema_lib.cema_coefficients(*(jnp.asarray(params[k], jnp.float32) for k in ("alpha", "delta", "theta",
                                                                                        "gamma")))
  a, d = _sigmoid(params["alpha"][..., 0]), _sigmoid(params["delta"][..., 0])
  q = np.asarray(coeffs.q_re, np.float64) + 1j * np.asarray(coeffs.q_im, np.float64)
  np.testing.assert_allclose(np.abs(q), 1 - a * d, rtol=1e-6)
  wavelets = np.arange(1, 9)[None, :]
  expected_angle = wavelets * _sigmoid(params["theta"][:, 0, :]) * 2 * np.pi / 8
  assert np.all(expected_angle < 2 * np.pi)  # the largest phase stays below a full turn (docs/model.md#cema)
  # Angles compared on the unit circle, since arg() wraps at π.
  np.testing.assert_allclose(q / np.abs(q), np.exp(1j * expected_angle), atol=2e-6)
  np.testing.assert_allclose(np.asarray(coeffs.p), a, rtol=1e-6)
  np.testing.assert_allclose(np.asarray(coeffs.g_re), params["gamma"][..., 0] / np.sqrt(8), rtol=1e-6)
  np.testing.assert_allclose(np.asarray(coeffs.g_im), params["gamma"][..., 1] / np.sqrt(8), rtol=1e-6)
  for field in coeffs:
    assert field.shape == (5, 8) and field.dtype == jnp.float32
  _, q_ref, _ = ref_coefficients(params)
  np.testing.assert_allclose(q, q_ref, atol=2e-6)


@pytest.mark.parametrize("with_h0", [False, True], ids=["zero_h0", "h0"])
@pytest.mark.parametrize("length", [1, 7, 64, 150])
@pytest.mark.parametrize("name", ALL)
def test_matches_reference(name, length, with_h0):
  rng = np.random.default_rng(length + 1000 * with_h0)
  batch, dim, nstate = 2, 6, 4
  params = random_params(rng, dim, nstate)
  x = rng.normal(size=(batch, length, dim))
  h0 = rng.normal(size=(batch, dim, nstate, 2)) if with_h0 else None
  y_ref, state_ref = ref_cema(params, x, h0)
  y, state = run_impl(name, params, x, h0)
  assert y.shape == (batch, length, dim) and y.dtype == np.float32
  assert state.shape == (batch, dim, nstate, 2) and state.dtype == np.float32
  assert_close(y, y_ref, what=f"{name} y")
  assert_close(state, state_ref, what=f"{name} state")


@pytest.mark.parametrize("name", IMPLS + ("chunked_b16",))
def test_long_memory(name):
  """|q| close to 1 (σ(delta) ≈ 0.003): the state remembers hundreds of steps and grows large.

  The problem itself is ill-conditioned in float32 here: rounding the raw parameters to float32 alone moves y by
  ~1e-5 of its size, and every implementation lands at ~2e-5, hence the looser tolerance.
  """
  rng = np.random.default_rng(7)
  params = random_params(rng, 4, 4, delta_shift=-6.0)
  x = rng.normal(size=(1, 600, 4))
  h0 = rng.normal(size=(1, 4, 4, 2))
  y_ref, state_ref = ref_cema(params, x, h0)
  y, state = run_impl(name, params, x, h0)
  assert_close(y, y_ref, rtol=1e-4, what=f"{name} y")
  assert_close(state, state_ref, rtol=1e-4, what=f"{name} state")


@pytest.mark.parametrize("name", ALL)
def test_split_sequence_carries_state(name):
  """Running pieces one after another, passing the state along, equals one call (decoding / chunk parallel)."""
  rng = np.random.default_rng(3)
  params = random_params(rng, 5, 3)
  x = rng.normal(size=(2, 90, 5)).astype(np.float32)
  y_full, state_full = run_impl(name, params, x)
  state, pieces = None, []
  for lo, hi in [(0, 1), (1, 37), (37, 90)]:
    y, state = run_impl(name, params, x[:, lo:hi], state)
    pieces.append(y)
  np.testing.assert_allclose(np.concatenate(pieces, axis=1), y_full, atol=2e-5)
  np.testing.assert_allclose(state, state_full, atol=2e-5)


def test_low_precision_input_computes_in_float32():
  rng = np.random.default_rng(4)
  params = random_params(rng, 3, 2)
  x = jnp.asarray(rng.normal(size=(1, 9, 3)), jnp.bfloat16)
  y_ref, _ = ref_cema(params, np.asarray(x.astype(jnp.float32), np.float64))
  for name in IMPLS:
    y, state = run_impl(name, params, x)
    assert y.dtype == np.float32 and state.dtype == np.float32
    assert_close(y, y_ref, what=name)


def final_state_direct(x, coeffs, h0):
  """h_L = q^L h0 + Σ_j p q^{L-1-j} u_j as one contraction over time: (B, D, N, 2) float32.

  Materialises q^j for every j < L, (D, N, L): a plain statement of the formula, a cross-check of
  `final_state_blocked`, which the implementations use.
  """
  length = x.shape[1]
  pr, pi = power_table(coeffs.q_re, coeffs.q_im, length + 1)  # (D, N, L + 1)
  rr, ri = pr[..., length - 1::-1], pi[..., length - 1::-1]  # q^{L-1-j}
  u = x.astype(jnp.float32)
  hr = jnp.einsum("dnl,bld->bdn", coeffs.p[..., None] * rr, u, precision=HIGHEST)
  hi = jnp.einsum("dnl,bld->bdn", coeffs.p[..., None] * ri, u, precision=HIGHEST)
  if h0 is not None:
    lr, li = pr[..., length], pi[..., length]
    hr = hr + lr * h0[..., 0] - li * h0[..., 1]
    hi = hi + lr * h0[..., 1] + li * h0[..., 0]
  return jnp.stack([hr, hi], axis=-1)


def test_final_state_blocked_matches_reference():
  rng = np.random.default_rng(5)
  params = random_params(rng, 4, 3)
  coeffs = cema_lib.cema_coefficients(*(jnp.asarray(params[k], jnp.float32) for k in ("alpha", "delta", "theta",
                                                                                        "gamma")))
  blocked = jax.jit(final_state_blocked, static_argnames="block_size")
  for length, block in ((5, 1), (64, 64), (131, 4)):
    x = jnp.asarray(rng.normal(size=(2, length, 4)), jnp.float32)
    h0 = jnp.asarray(rng.normal(size=(2, 4, 3, 2)), jnp.float32)
    _, state_ref = ref_cema(params, np.asarray(x, np.float64), np.asarray(h0, np.float64))
    assert_close(np.asarray(blocked(x, coeffs, h0, block_size=block)), state_ref, what=f"L={length} T={block}")
    assert_close(np.asarray(blocked(x, coeffs, None, block_size=block)), ref_cema(params, np.asarray(x, np.float64))[1],
                 what=f"L={length} T={block} no h0")
    assert_close(np.asarray(final_state_direct(x, coeffs, h0)), state_ref, what=f"direct L={length}")


# ---------------------------------------------------------------------------------------------------------------
# Gradients: JAX (float32) vs central finite differences of the float64 reference.


def _grad_inputs(rng, batch=1, length=7, dim=2, nstate=3):
  inputs = random_params(rng, dim, nstate)
  inputs["x"] = rng.normal(size=(batch, length, dim))
  inputs["h0"] = rng.normal(size=(batch, dim, nstate, 2))
  return inputs


def _ref_loss(inputs, wy, ws):
  y, state = ref_cema(inputs, inputs["x"], inputs["h0"])
  return np.sum(wy * y) + np.sum(ws * state)


def _finite_difference_grads(inputs, wy, ws, eps=1e-6):
  grads = {}
  for key, value in inputs.items():
    g = np.zeros_like(value)
    for idx in np.ndindex(value.shape):
      plus = {**inputs, key: value.copy()}
      minus = {**inputs, key: value.copy()}
      plus[key][idx] += eps
      minus[key][idx] -= eps
      g[idx] = (_ref_loss(plus, wy, ws) - _ref_loss(minus, wy, ws)) / (2 * eps)
    grads[key] = g
  return grads


@pytest.fixture(scope="module")
def grad_case():
  rng = np.random.default_rng(11)
  inputs = _grad_inputs(rng)
  wy = rng.normal(size=inputs["x"].shape)
  ws = rng.normal(size=inputs["h0"].shape)
  return inputs, wy, ws, _finite_difference_grads(inputs, wy, ws)


@pytest.mark.parametrize("name", ALL)
def test_gradients_match_reference(name, grad_case):
  inputs, wy, ws, fd = grad_case
  f32 = {k: jnp.asarray(v, jnp.float32) for k, v in inputs.items()}

  def loss(f32):
    coeffs = cema_lib.cema_coefficients(f32["alpha"], f32["delta"], f32["theta"], f32["gamma"])
    y, state = _impl(name)(f32["x"], coeffs, f32["omega"], f32["h0"], return_state=True)
    return jnp.sum(jnp.asarray(wy, jnp.float32) * y) + jnp.sum(jnp.asarray(ws, jnp.float32) * state)

  np.testing.assert_allclose(float(loss(f32)), _ref_loss(inputs, wy, ws), rtol=1e-5)
  grads = jax.jit(jax.grad(loss))(f32)
  for key, expected in fd.items():
    assert_close(np.asarray(grads[key]), expected, rtol=2e-5, what=f"{name} d/d{key}")


@pytest.mark.parametrize("count", [1, 2, 33, 100])
def test_power_table_and_its_gradient_match_float64(count):
  """b^j and the gradient of power_table against complex128 closed forms (d b^j / db = j b^(j-1))."""
  rng = np.random.default_rng(count)
  mag, phase = rng.uniform(0.3, 0.9999, (5, 4)), rng.uniform(0, 2 * np.pi, (5, 4))
  b = mag * np.exp(1j * phase)
  w_re, w_im = rng.normal(size=(5, 4, count)), rng.normal(size=(5, 4, count))
  br, bi = jnp.asarray(b.real, jnp.float32), jnp.asarray(b.imag, jnp.float32)
  b = np.asarray(br, np.float64) + 1j * np.asarray(bi, np.float64)  # the float32 inputs, exactly
  j = np.arange(count)
  table = b[..., None] ** j
  tr, ti = power_table(br, bi, count)
  assert tr.shape == ti.shape == (5, 4, count)
  np.testing.assert_allclose(np.asarray(tr), table.real, atol=2e-6)
  np.testing.assert_allclose(np.asarray(ti), table.imag, atol=2e-6)

  def loss(br, bi):
    tr, ti = power_table(br, bi, count)
    return jnp.sum(jnp.asarray(w_re, jnp.float32) * tr + jnp.asarray(w_im, jnp.float32) * ti)

  g_re, g_im = jax.jit(jax.grad(loss, argnums=(0, 1)))(br, bi)
  # Re Σ conj(c_j) b^j has the cotangent Σ_j conj(j b^(j-1)) c_j with c = w_re + i w_im.
  expected = np.sum(np.conj(j * b[..., None] ** np.maximum(j - 1, 0)) * (w_re + 1j * w_im), axis=-1)
  scale = np.abs(expected).max() + 1.0
  np.testing.assert_allclose(np.asarray(g_re), expected.real, atol=2e-6 * scale)
  np.testing.assert_allclose(np.asarray(g_im), expected.imag, atol=2e-6 * scale)


# ---------------------------------------------------------------------------------------------------------------


def test_unknown_impl_raises():
  coeffs = cema_lib.cema_coefficients(jnp.zeros((2, 3, 1)), jnp.zeros((2, 3, 1)), jnp.zeros((2, 1, 1)),
                                      jnp.zeros((2, 3, 2)))
  with pytest.raises(ValueError, match="unknown CEMA implementation"):
    cema_lib.cema(jnp.zeros((1, 4, 2)), coeffs, jnp.zeros((2, 1)), impl="nope")


@pytest.mark.parametrize("backend", [None, "cpu", "gpu", "tpu"])
def test_default_impl_is_valid(backend):
  names = set(cema_lib.IMPLEMENTATIONS)
  for length in (1, 2, 64, 1000, 4096, 32768):
    assert cema_lib.default_impl(length, backend) in names
  assert cema_lib.default_impl(1, backend) == "sequential"
