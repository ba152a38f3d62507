"""Initialisation statistics against the official recipe (docs/model.md#initialisation).

Each expected value is derived here from the spec's formulas: Kaiming-normal with a = √5 (std 1/√(3·fan_in)),
truncated normals, the CEMA recipe, the RoPE table. Sample statistics get a tolerance of several standard errors.
"""

from __future__ import annotations

import math

import jax
import numpy as np
import pytest
from flax import nnx

import fixtures
from megalodon_jax.config import MegalodonConfig, rope_inv_freq
from megalodon_jax.model import MegalodonLM

# Moderately wide, so that every tensor has enough samples for tight statistics. Kept identical in
# test_convert.py so that one pytest process compiles the eager init ops once.
WIDE = dict(model_dim=256, z_dim=64, value_dim=512, ffn_hidden_dim=512, num_heads=2, num_layers=2, vocab_size=512,
            cema_ndim=16, chunk_size=64, norm_num_groups=16)
CONFIG = MegalodonConfig(**dict(WIDE, num_layers=3, swiglu=True, rescale_nffn=True))
D, Z, E, F, N, V = 256, 64, 512, 512, 16, 512


def _trunc_std_factor(b: float) -> float:
  """Std of N(0, 1) truncated to [-b, b]: sqrt(1 - 2bφ(b) / (2Φ(b) - 1))."""
  pdf = math.exp(-b * b / 2) / math.sqrt(2 * math.pi)
  return math.sqrt(1 - 2 * b * pdf / math.erf(b / math.sqrt(2)))


TRUNC3 = _trunc_std_factor(3.0)  # 0.98658...
TRUNC4 = _trunc_std_factor(4.0)  # omega: std 0.25 cut at ±1 = ±4σ


def test_truncation_factor_reference():
  assert TRUNC3 == pytest.approx(0.9866, abs=1e-4)
  rng = np.random.default_rng(0)
  x = rng.standard_normal(2_000_000)
  assert np.std(x[np.abs(x) <= 3]) == pytest.approx(TRUNC3, rel=2e-3)


def _np(v) -> np.ndarray:
  return np.asarray(v[...], dtype=np.float64)


def assert_normal_stats(x, std, what, mean=0.0, n_se=5.0):
  """Sample mean and std of x against (mean, std) within n_se standard errors (std's SE ≈ std/√(2n))."""
  x = np.asarray(x, np.float64).ravel()
  n = x.size
  assert abs(x.mean() - mean) <= n_se * std / math.sqrt(n), f"{what}: mean {x.mean():.4g}, expected {mean}"
  assert abs(x.std() / std - 1) <= n_se / math.sqrt(2 * n), f"{what}: std {x.std():.5g}, expected {std:.5g}"


@pytest.fixture(scope="module")
def model():
  return MegalodonLM(CONFIG, rngs=nnx.Rngs(0))


def _linears(m, config):
  """(name, Linear module, in_features, out_features, has_bias) for every block's linear layer."""
  out = []
  for i, blk in enumerate(m.layers):
    a, f = blk.mega, blk.nffn
    out += [(f"{i}.wv", a.wv, D, E, True), (f"{i}.wz", a.wz, D, Z, True), (f"{i}.wr", a.wr, D, E, True),
            (f"{i}.wh1", a.wh1, D, D, True), (f"{i}.wh2", a.wh2, E, D, False),
            (f"{i}.fc1", f.fc1, D, F, False), (f"{i}.fc2", f.fc2, F, D, False)]
    if config.swiglu:
      out.append((f"{i}.fc3", f.fc3, D, F, False))
  return out


# ---------------------------------------------------------------------------------------------------------------
# Default ('he') initialisation


def test_he_linear_kernels(model):
  for name, lin, din, dout, _ in _linears(model, CONFIG):
    w = _np(lin.kernel)
    assert w.shape == (din, dout), name  # stored (in, out): torch weight transposed
    # kaiming_normal_(a=√5) on torch's (out, in) weight: gain √(2/(1+5)), fan_in = in features.
    assert_normal_stats(w, 1.0 / math.sqrt(3.0 * din), name)


def test_linear_biases_zero_and_absent_where_official_has_none(model):
  for name, lin, _, dout, has_bias in _linears(model, CONFIG):
    if has_bias:
      b = _np(lin.bias)
      assert b.shape == (dout,) and not b.any(), name
    else:
      assert lin.bias is None, name


def test_embedding_and_head_truncated_normal(model):
  std = 1.0 / math.sqrt(D)
  for name, w in (("embed", _np(model.embed.weight)), ("output", _np(model.output.kernel))):
    assert_normal_stats(w, std * TRUNC3, name)
    assert np.abs(w).max() <= 3 * std * (1 + 1e-6), name
    assert np.abs(w).max() >= 2.9 * std, name  # cut at ±3σ, not narrower
  assert model.embed.weight[...].shape == (V, D) and model.output.kernel[...].shape == (D, V)


def test_norms_and_attention_affine_are_zero(model):
  tensors = {"final_norm.weight": model.final_norm.weight, "final_norm.bias": model.final_norm.bias}
  for i, blk in enumerate(model.layers):
    a, f = blk.mega, blk.nffn
    tensors.update({f"{i}.timenorm.weight": a.timenorm.weight, f"{i}.timenorm.bias": a.timenorm.bias,
                    f"{i}.rmsnorm.weight": a.rmsnorm.weight, f"{i}.nffn.norm.weight": f.norm.weight,
                    f"{i}.nffn.norm.bias": f.norm.bias, f"{i}.mega.gamma": a.gamma, f"{i}.mega.beta": a.beta})
  for name, v in tensors.items():
    assert not _np(v).any(), name
  assert model.layers[0].mega.gamma[...].shape == (2, Z)


def test_timestep_norm_prior_buffers_are_zero(model):
  norms = [blk.mega.timenorm for blk in model.layers] + [model.final_norm]
  for tn in norms:
    assert int(tn.prior_count[...]) == 0 and tn.prior_count[...].shape == ()
    assert tn.prior_mean[...].shape == (16,) and not _np(tn.prior_mean).any()
    assert tn.prior_logv[...].shape == (16,) and not _np(tn.prior_logv).any()
    assert not isinstance(tn.prior_mean, nnx.Param)  # buffers, not trainable


def test_cema_alpha_delta_gamma_omega(model):
  cemas = [blk.mega.cema for blk in model.layers]
  for c in cemas:
    assert c.alpha[...].shape == (D, N, 1) and c.delta[...].shape == (D, N, 1)
    assert c.gamma[...].shape == (D, N, 2) and c.omega[...].shape == (D, 1) and c.theta[...].shape == (D, 1, 1)
    assert not _np(c.gamma)[..., 1].any()  # imaginary part exactly 0
    om = _np(c.omega)
    assert om.min() >= -1.0 and om.max() <= 1.0
  alpha = np.stack([_np(c.alpha) for c in cemas])
  delta = np.stack([_np(c.delta) for c in cemas])
  assert_normal_stats(alpha, 0.2, "cema.alpha")
  assert_normal_stats(delta, 0.2, "cema.delta")
  assert_normal_stats(np.stack([_np(c.gamma)[..., 0] for c in cemas]), 1.0, "cema.gamma real")
  assert_normal_stats(np.stack([_np(c.omega) for c in cemas]), 0.25 * TRUNC4, "cema.omega")
  assert not np.array_equal(alpha, delta)


def test_cema_statistics_wide():
  """The same recipe on one wide CEMA (tight statistics for omega, which has only D entries per layer)."""
  from megalodon_jax.nn.cema import ComplexEMA  # pylint: disable=import-outside-toplevel
  dim = 8192
  c = ComplexEMA(dim, 2, impl="fft", param_dtype=np.float32, rngs=nnx.Rngs(3))
  om = _np(c.omega)
  assert_normal_stats(om, 0.25 * TRUNC4, "omega")
  assert om.min() >= -1.0 and om.max() <= 1.0 and np.abs(om).max() > 0.75  # bounds ±1, i.e. ±4σ
  assert_normal_stats(_np(c.alpha), 0.2, "alpha")
  assert_normal_stats(_np(c.gamma)[..., 0], 1.0, "gamma real")
  _check_theta(_np(c.theta), dim)


def _check_theta(theta: np.ndarray, dim: int) -> np.ndarray:
  """sigmoid(theta) is a permutation of f_k = dim^(-k/dim), k = 1..dim; returns sigmoid(theta) per channel."""
  assert theta.shape == (dim, 1, 1)
  s = 1.0 / (1.0 + np.exp(-theta.ravel()))
  k = np.arange(1, dim + 1, dtype=np.float64)
  f = dim ** (-k / dim)  # decreasing, in [1/dim, dim^(-1/dim)]
  np.testing.assert_allclose(np.sort(s)[::-1], f, rtol=1e-5, atol=1e-7)
  assert not np.all(np.diff(s) < 0), "theta is not permuted (identity order)"
  assert not np.all(np.diff(s) > 0), "theta is in reversed order, not a random permutation"
  return s


def test_cema_theta_is_a_permuted_geometric_grid(model):
  perms = [np.argsort(-_check_theta(_np(blk.mega.cema.theta), D)) for blk in model.layers]
  # Each block draws its own permutation (official: torch.randperm per module).
  assert not np.array_equal(perms[0], perms[1])
  # A random permutation keeps few fixed points; the identity would keep all D.
  assert (perms[0] == np.arange(D)).sum() < D // 8


def test_nffn_alpha_layer_scale(model):
  for i, blk in enumerate(model.layers):
    a = np.asarray(blk.nffn.alpha[...])
    assert a.shape == (D,) and a.dtype == np.float32
    assert np.all(a == np.float32(0.1 * 0.5 ** i)), (i, a[:3])
    assert isinstance(blk.nffn.alpha, nnx.Param)  # learnable


def test_no_nffn_alpha_without_rescale():
  m = nnx.eval_shape(lambda: MegalodonLM(CONFIG.replace(rescale_nffn=False), rngs=nnx.Rngs(0)))
  assert all(blk.nffn.alpha is None for blk in m.layers)


# ---------------------------------------------------------------------------------------------------------------
# Other init modes (official get_init_fn(init_mode) for the linear layers; embed, head and CEMA keep their recipe)


@pytest.fixture(scope="module")
def mode_models():
  return {mode: MegalodonLM(CONFIG.replace(init_mode=mode, num_layers=1), rngs=nnx.Rngs(1))
          for mode in ("bert", "xavier", "gaussian", "none")}


def _check_fixed_recipes(m):
  std = 1.0 / math.sqrt(D)
  assert_normal_stats(_np(m.embed.weight), std * TRUNC3, "embed")
  assert_normal_stats(_np(m.output.kernel), std * TRUNC3, "output")
  assert_normal_stats(_np(m.layers[0].mega.cema.alpha), 0.2, "cema.alpha")
  assert not _np(m.layers[0].mega.wv.bias).any()


def test_init_mode_bert(mode_models):
  m = mode_models["bert"]
  for name, lin, *_ in _linears(m, CONFIG):
    assert_normal_stats(_np(lin.kernel), 0.02, name)
  _check_fixed_recipes(m)


def test_init_mode_xavier(mode_models):
  m = mode_models["xavier"]
  for name, lin, din, dout, _ in _linears(m, CONFIG):
    w = _np(lin.kernel)
    bound = math.sqrt(6.0 / (din + dout))
    assert np.abs(w).max() <= bound * (1 + 1e-6), name
    assert np.abs(w).max() >= 0.99 * bound, name
    assert_normal_stats(w, bound / math.sqrt(3.0), name)  # U(-b, b) has std b/√3
  _check_fixed_recipes(m)


def test_init_mode_gaussian(mode_models):
  m = mode_models["gaussian"]
  for name, lin, *_ in _linears(m, CONFIG):
    w = _np(lin.kernel)
    assert_normal_stats(w, TRUNC3, name)  # std 1 (no dim given), truncated at ±3
    assert np.abs(w).max() <= 3.0 * (1 + 1e-6) and np.abs(w).max() >= 2.9, name
  _check_fixed_recipes(m)


def test_init_mode_none(mode_models):
  m = mode_models["none"]
  for name, lin, *_ in _linears(m, CONFIG):
    assert not _np(lin.kernel).any(), name
  _check_fixed_recipes(m)


# ---------------------------------------------------------------------------------------------------------------
# RoPE buffer


def _rope_reference(base: float, dz: int) -> np.ndarray:
  i = np.arange(dz // 2, dtype=np.float64)
  return (1.0 / base ** (2.0 * i / dz)).astype(np.float32)


def test_rope_buffer_default_base(model):
  buf = np.asarray(model.rope_freqs[...])
  assert buf.dtype == np.float32 and buf.shape == (16,)  # dz/2 with dz = Z/H = 32
  np.testing.assert_array_max_ulp(buf, _rope_reference(10000.0, 32), maxulp=1)
  assert buf[0] == 1.0


def test_rope_buffer_custom_base():
  m = MegalodonLM(CONFIG.replace(rope_base=1e5, num_layers=1, num_heads=1), rngs=nnx.Rngs(0))
  buf = np.asarray(m.rope_freqs[...])
  assert buf.shape == (32,)  # dz = 64
  np.testing.assert_array_max_ulp(buf, _rope_reference(1e5, 64), maxulp=1)
  assert not isinstance(m.rope_freqs, nnx.Param)


@pytest.mark.parametrize("name", fixtures.CASES)
def test_rope_buffer_equals_official_bits(name):
  fx = fixtures.load(name)
  ours = rope_inv_freq(MegalodonConfig.from_official(fx.conf))
  official = fx.state_dict["rope.freqs"]
  assert ours.dtype == official.dtype == np.float32
  assert ours.tobytes() == official.tobytes()


# ---------------------------------------------------------------------------------------------------------------
# Determinism


def _leaves(m):
  return [np.asarray(x) for x in jax.tree.leaves(nnx.state(m))]


def test_same_seed_same_model_different_seed_different_model(model):
  again = MegalodonLM(CONFIG, rngs=nnx.Rngs(0))
  for a, b in zip(_leaves(model), _leaves(again), strict=True):
    assert a.dtype == b.dtype and a.tobytes() == b.tobytes()

  other = MegalodonLM(CONFIG, rngs=nnx.Rngs(1))
  flat0 = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
  flat1 = dict(nnx.to_flat_state(nnx.state(other, nnx.Param)))
  assert flat0.keys() == flat1.keys()
  for path, v in flat0.items():
    a, b = np.asarray(v[...]), np.asarray(flat1[path][...])
    random = path[-1] == "kernel" or path[-2] == "cema" or path[-2:] == ("embed", "weight")
    if random:
      assert not np.array_equal(a, b), path
    else:  # deterministic inits: zeros, 0.1·0.5^i
      assert np.array_equal(a, b), path
