"""CEMA with document resets (packed training windows, docs/model.md#cema): every implementation against an
independent float64 NumPy reference that runs each document of a row on its own and concatenates, and gradients
of the packed run against the sum over the documents run separately."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from megalodon_jax.ops import cema as cema_lib
from megalodon_jax.ops.cema.chunked import cema_chunked
from megalodon_jax.ops.cema.final_state import DEFAULT_BLOCK_SIZE

TOL = 1e-5  # max abs error relative to the reference's max abs value
DIM, NSTATE = 8, 4
IMPLS = tuple(cema_lib.IMPLEMENTATIONS) + ("chunked_b8",)  # pallas: interpret mode on CPU


def _impl(name: str):
  """fn(x, coeffs, omega, h0, return_state, resets=None); "chunked_b8": blocks of 8 steps (many blocks)."""
  if name == "chunked_b8":
    return functools.partial(cema_chunked, block_size=8)
  return cema_lib.IMPLEMENTATIONS[name]


def _params(rng):
  return {"alpha": rng.normal(size=(DIM, NSTATE, 1)), "delta": rng.normal(size=(DIM, NSTATE, 1)) - 1.0,
          "theta": rng.normal(size=(DIM, 1, 1)), "gamma": rng.normal(size=(DIM, NSTATE, 2)),
          "omega": rng.normal(size=(DIM, 1))}


def _coeffs(params):
  return cema_lib.cema_coefficients(params["alpha"], params["delta"], params["theta"], params["gamma"])


def _sigmoid(z):
  return 1.0 / (1.0 + np.exp(-z))


def _ref_document(params, u, h):
  """One document from state h (D, N) complex128: y (T, D) float64 and the final state, step by step."""
  n = params["alpha"].shape[1]
  a, d = _sigmoid(params["alpha"][..., 0]), _sigmoid(params["delta"][..., 0])
  q = (1 - a * d) * np.exp(1j * np.arange(1, n + 1)[None] * _sigmoid(params["theta"][:, 0]) * 2 * np.pi / n)
  g = (params["gamma"][..., 0] + 1j * params["gamma"][..., 1]) / np.sqrt(n)
  ys = []
  for u_t in u:
    h = q * h + a * u_t[:, None]
    ys.append(np.real(np.sum(g * h, axis=-1)) + params["omega"][:, 0] * u_t)
  return np.stack(ys), h


def _documents(row_resets):
  """[(start, end)] of the documents of one row (a document starts at 0 and at every reset)."""
  starts = sorted({0, *np.flatnonzero(row_resets).tolist()})
  return list(zip(starts, starts[1:] + [len(row_resets)]))


def ref_packed(params, x, resets, h0):
  """Each document of each row run separately from a zero state (the first from h0) and concatenated."""
  ys, states = [], []
  for b in range(x.shape[0]):
    h = h0[b, ..., 0] + 1j * h0[b, ..., 1]
    parts = []
    for start, end in _documents(resets[b]):
      h = h if start == 0 and not resets[b, 0] else np.zeros_like(h)  # a reset at t = 0 drops h0 too
      y, h = _ref_document(params, x[b, start:end], h)
      parts.append(y)
    ys.append(np.concatenate(parts))
    states.append(np.stack([h.real, h.imag], axis=-1))
  return np.stack(ys), np.stack(states)


def _rel(got, want) -> float:
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  return float(np.max(np.abs(got - want)) / max(np.max(np.abs(want)), 1e-30))


# L = 70: not a multiple of the chunked block sizes (32 by default, 8 for chunked_b8), so the last block is partial.
LENGTH = 70
RESETS = {
    # t = 0 (h0 dropped), a block start of both block sizes (32), inside a block (45), two in one block (50, 53
    # for T = 8; 45, 50, 53 for T = 32) and one in the last, partial block (66): the final state starts there.
    0: [0, 32, 45, 50, 53, 66],
    1: [],  # no reset: the whole row continues from h0
    2: [10, 11, 12, 13],  # consecutive resets: 1-token documents
    3: [5, 69],  # a 1-token document at the very end: the final state is p u_{L-1}
}
assert DEFAULT_BLOCK_SIZE == 32  # the cases above name the default chunked block


def _case(seed=0, length=LENGTH, rows=RESETS):
  rng = np.random.default_rng(seed)
  params = _params(rng)
  x = rng.normal(size=(len(rows), length, DIM))
  h0 = rng.normal(size=(len(rows), DIM, NSTATE, 2))
  resets = np.zeros((len(rows), length), bool)
  for b, where in rows.items():
    resets[b, where] = True
  return params, x, h0, resets


def _f32(tree):
  return jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), tree)


@pytest.mark.parametrize("with_h0", [True, False])
@pytest.mark.parametrize("impl", IMPLS)
def test_values_and_final_state_match_documents_run_separately(impl, with_h0):
  params, x, h0, resets = _case()
  h0 = h0 if with_h0 else np.zeros_like(h0)
  y_ref, h_ref = ref_packed(params, x, resets, h0)
  p32 = _f32(params)
  y, h = jax.jit(lambda x_, h0_, r_: _impl(impl)(x_, _coeffs(p32), p32["omega"], h0_, True, resets=r_))(
      _f32(x), _f32(h0) if with_h0 else None, jnp.asarray(resets))
  assert y.shape == x.shape and y.dtype == jnp.float32 and h.shape == h0.shape
  assert _rel(y, y_ref) <= TOL, f"y: {_rel(y, y_ref):.3g}"
  assert _rel(h, h_ref) <= TOL, f"state: {_rel(h, h_ref):.3g}"
  # The reference really restarts: without resets the same rows give different outputs.
  y_plain, _ = ref_packed(params, x, np.zeros_like(resets), h0)
  assert _rel(y_plain, y_ref) > 1e-2


@pytest.mark.parametrize("impl", ["auto", "sequential", "chunked"])
def test_dispatcher_passes_resets_and_checks_their_shape(impl):
  params, x, h0, resets = _case(seed=1)
  y_ref, h_ref = ref_packed(params, x, resets, h0)
  p32 = _f32(params)
  y, h = cema_lib.cema(_f32(x), _coeffs(p32), p32["omega"], _f32(h0), impl=impl, return_state=True,
                       resets=jnp.asarray(resets))
  assert _rel(y, y_ref) <= TOL and _rel(h, h_ref) <= TOL
  with pytest.raises(ValueError, match=r"resets must be \(B, L\)"):
    cema_lib.cema(_f32(x), _coeffs(p32), p32["omega"], impl=impl, resets=jnp.asarray(resets[:, 1:]))


# Gradients: two rows of 40 steps, resets at t = 0, a block start (8, for T = 8), inside blocks, consecutive.
GRAD_ROWS = {0: [0, 8, 13, 15, 16, 17], 1: [20, 39]}


def _loss_terms(rng, shape, state_shape):
  return jnp.asarray(rng.normal(size=shape), jnp.float32), jnp.asarray(rng.normal(size=state_shape), jnp.float32)


@pytest.mark.parametrize("impl", IMPLS)
def test_gradients_equal_the_sum_over_documents_run_separately(impl):
  """d/d(x, alpha, delta, theta, gamma, omega, h0) of Σ y·c + Σ h_last·c': the packed run with resets against the
  same implementation without resets on every document slice (h0 feeding only each row's first document)."""
  params, x, h0, resets = _case(seed=2, length=40, rows=GRAD_ROWS)
  cot_y, cot_h = _loss_terms(np.random.default_rng(3), x.shape, h0.shape)
  fn = _impl(impl)

  def packed(params, x, h0):
    y, h = fn(x, _coeffs(params), params["omega"], h0, True, resets=jnp.asarray(resets))
    return jnp.sum(y * cot_y) + jnp.sum(h * cot_h)

  def separate(params, x, h0):
    coeffs, total = _coeffs(params), 0.0
    for b in range(x.shape[0]):
      for start, end in _documents(resets[b]):
        first = start == 0 and not resets[b, 0]
        y, h = fn(x[b:b + 1, start:end], coeffs, params["omega"], h0[b:b + 1] if first else None, True)
        total = total + jnp.sum(y * cot_y[b:b + 1, start:end])
        if end == x.shape[1]:
          total = total + jnp.sum(h * cot_h[b:b + 1])
    return total

  args = (_f32(params), _f32(x), _f32(h0))
  grads = jax.jit(jax.grad(packed, argnums=(0, 1, 2)))(*args)
  want = jax.jit(jax.grad(separate, argnums=(0, 1, 2)))(*args)
  for (path, g), w in zip(jax.tree_util.tree_leaves_with_path(grads), jax.tree.leaves(want)):
    assert float(np.max(np.abs(w))) > 0, jax.tree_util.keystr(path)
    err = _rel(g, w)
    assert err <= TOL, f"{impl} d{jax.tree_util.keystr(path)}: relative error {err:.3g}"
  # h0 reaches only row 1 (row 0 resets at t = 0).
  assert float(np.max(np.abs(grads[2][0]))) == 0.0 and float(np.max(np.abs(grads[2][1]))) > 0


@pytest.mark.parametrize("impl", IMPLS)
def test_no_resets_is_todays_path_and_all_false_agrees(impl):
  """resets=None traces exactly the implementation's own path (the same jaxpr as calling it without the
  argument); an all-False mask runs the reset code and agrees to float32 rounding."""
  params, x, h0, _ = _case(seed=4)
  p32, x32, h32 = _f32(params), _f32(x), _f32(h0)
  fn = _impl(impl)
  plain = lambda x_, h_: fn(x_, _coeffs(p32), p32["omega"], h_, True)  # pylint: disable=unnecessary-lambda-assignment
  name = "chunked" if impl == "chunked_b8" else impl
  none = lambda x_, h_: cema_lib.cema(x_, _coeffs(p32), p32["omega"], h_, impl=name, return_state=True,  # pylint: disable=unnecessary-lambda-assignment
                                      resets=None)
  if impl != "chunked_b8":
    assert str(jax.make_jaxpr(none)(x32, h32)) == str(jax.make_jaxpr(plain)(x32, h32))
  want = jax.jit(plain)(x32, h32)
  got = jax.jit(lambda x_, h_: fn(x_, _coeffs(p32), p32["omega"], h_, True, resets=jnp.zeros(x.shape[:2], bool)))(
      x32, h32)
  for g, w in zip(got, want):
    assert _rel(g, w) <= 1e-6
