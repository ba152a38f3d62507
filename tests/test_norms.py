"""RMSNorm and LayerNorm with plus-one scales (docs/model.md#attention) against float64 NumPy."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from megalodon_jax.ops.norms import layer_norm, rms_norm

EPS = 1e-5


def ref_rms_norm(x, weight, eps=EPS):
  x = np.asarray(x, np.float64)
  y = x / np.sqrt(np.mean(np.square(x), -1, keepdims=True) + eps)
  return y if weight is None else y * (1.0 + np.asarray(weight, np.float64))


def ref_layer_norm(x, weight, bias, eps=EPS):
  x = np.asarray(x, np.float64)
  mu = x.mean(-1, keepdims=True)
  var = np.square(x - mu).mean(-1, keepdims=True)  # population variance
  y = (x - mu) / np.sqrt(var + eps)
  if weight is not None:
    y = y * (1.0 + np.asarray(weight, np.float64))
  if bias is not None:
    y = y + np.asarray(bias, np.float64)
  return y


def _data(seed, shape, scale, offset=0.0):
  rng = np.random.default_rng(seed)
  x = (offset + rng.normal(size=shape) * scale).astype(np.float32)
  w = (rng.normal(size=shape[-1]) * 0.5).astype(np.float32)
  b = (rng.normal(size=shape[-1]) * 0.5).astype(np.float32)
  return x, w, b


# Small scales make eps matter (mean square ≈ eps), large ones test the plain normalisation.
CASES = [((3, 16), 1.0), ((2, 5, 64), 10.0), ((4, 7), 3e-3), ((1, 2, 3, 32), 1e-2), ((5, 1), 1.0)]


@pytest.mark.parametrize("shape,scale", CASES)
@pytest.mark.parametrize("affine", [True, False])
def test_rms_norm(shape, scale, affine):
  x, w, _ = _data(len(shape) * 7 + shape[-1], shape, scale)
  weight = w if affine else None
  y = jax.jit(rms_norm, static_argnums=2)(jnp.asarray(x), None if weight is None else jnp.asarray(weight), EPS)
  assert y.dtype == jnp.float32 and y.shape == x.shape
  np.testing.assert_allclose(np.asarray(y), ref_rms_norm(x, weight), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("shape,scale", CASES)
@pytest.mark.parametrize("affine", ["both", "weight", "bias", "none"])
def test_layer_norm(shape, scale, affine):
  x, w, b = _data(len(shape) * 11 + shape[-1], shape, scale, offset=0.3 * scale)
  weight = w if affine in ("both", "weight") else None
  bias = b if affine in ("both", "bias") else None
  f = jax.jit(layer_norm, static_argnums=3)
  y = f(jnp.asarray(x), None if weight is None else jnp.asarray(weight), None if bias is None else jnp.asarray(bias),
        EPS)
  assert y.dtype == jnp.float32 and y.shape == x.shape
  np.testing.assert_allclose(np.asarray(y), ref_layer_norm(x, weight, bias), rtol=1e-5, atol=2e-6)


def test_zero_weight_is_identity_scale():
  """Plus-one convention: weight = 0 (the init) is the same as no affine."""
  x, _, _ = _data(0, (3, 12), 2.0)
  z = jnp.zeros(12)
  np.testing.assert_array_equal(np.asarray(rms_norm(jnp.asarray(x), z, EPS)), np.asarray(rms_norm(jnp.asarray(x), None,
                                                                                                    EPS)))
  np.testing.assert_array_equal(np.asarray(layer_norm(jnp.asarray(x), z, z, EPS)),
                                np.asarray(layer_norm(jnp.asarray(x), None, None, EPS)))


def test_layer_norm_large_offset():
  """Two-pass variance: a mean of 1e3 over unit noise does not cancel (E[x²] − E[x]² in float32 would)."""
  x, w, b = _data(1, (4, 256), 1.0, offset=1e3)
  y = layer_norm(jnp.asarray(x), jnp.asarray(w), jnp.asarray(b), EPS)
  # The float32 mean is off by a few ulps of 1e3 (≈ 6e-5 each), which shifts y by that much over σ ≈ 1.
  np.testing.assert_allclose(np.asarray(y), ref_layer_norm(x, w, b), rtol=0, atol=1e-3)


def _bf16_bound(got_bf16, want):
  """Largest violation of: |got − want| ≤ one bf16 rounding (2⁻⁸ relative, with slack) + float32 noise."""
  got = np.asarray(got_bf16.astype(jnp.float32), np.float64)
  return np.max(np.abs(got - want) - (2.0**-8 * np.abs(want) + 1e-5))


@pytest.mark.parametrize("scale,offset", [(1.0, 0.0), (1.0, 20.0), (3e-3, 0.0)])
def test_bf16_input_returns_bf16_with_float32_statistics(scale, offset):
  """bf16 in, bf16 out, and the output is the exact normalisation of the bf16 values rounded once to bf16.

  A long row (K = 4096) with an offset makes bf16 statistics visibly wrong: a bf16 mean has an error of up to
  2⁻⁹·|mean|, which alone would shift every LayerNorm output by far more than one bf16 ulp.
  """
  x, w, b = _data(2, (3, 4096), scale, offset)
  xb = jnp.asarray(x).astype(jnp.bfloat16)
  wb = jnp.asarray(w).astype(jnp.bfloat16)
  bb = jnp.asarray(b).astype(jnp.bfloat16)
  x64 = np.asarray(xb.astype(jnp.float32), np.float64)
  w64 = np.asarray(wb.astype(jnp.float32), np.float64)
  b64 = np.asarray(bb.astype(jnp.float32), np.float64)
  y = rms_norm(xb, wb, EPS)
  assert y.dtype == jnp.bfloat16
  assert _bf16_bound(y, ref_rms_norm(x64, w64)) <= 0
  y = layer_norm(xb, wb, bb, EPS)
  assert y.dtype == jnp.bfloat16
  assert _bf16_bound(y, ref_layer_norm(x64, w64, b64)) <= 0
  # float32 affine params with bf16 activations: still bf16 out.
  assert layer_norm(xb, jnp.asarray(w), jnp.asarray(b), EPS).dtype == jnp.bfloat16
  assert rms_norm(xb, jnp.asarray(w), EPS).dtype == jnp.bfloat16
  # What bf16 statistics would give (a sanity check that the bound above can fail): mean/var rounded to bf16.
  if offset:
    mu = np.asarray(jnp.asarray(x64.mean(-1, keepdims=True)).astype(jnp.bfloat16).astype(jnp.float32), np.float64)
    y_bad = (x64 - mu) / np.sqrt(np.square(x64 - x64.mean(-1, keepdims=True)).mean(-1, keepdims=True) + EPS)
    y_bad = y_bad * (1 + w64) + b64
    bad = jnp.asarray(y_bad).astype(jnp.bfloat16)
    assert _bf16_bound(bad, ref_layer_norm(x64, w64, b64)) > 0
