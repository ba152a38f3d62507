"""Official PyTorch state dict ⇄ MegalodonLM (docs/export.md#official-key-map), against state dicts saved by the
official model.

The fixtures (tests/fixtures/official/*.safetensors) are the official `state_dict()` with its exact keys, shapes
and dtypes. The expected key list for a config is derived here from the table of
docs/export.md#official-key-map, independently of `megalodon_jax.convert`.
"""

from __future__ import annotations

import functools
import re

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax import nnx

import fixtures
from megalodon_jax.config import MegalodonConfig
from megalodon_jax.convert import StateDictError, from_official_state_dict, to_official_state_dict
from megalodon_jax.model import MegalodonLM

# Identical to test_init.WIDE (one pytest process then compiles the eager init ops once).
WIDE = dict(model_dim=256, z_dim=64, value_dim=512, ffn_hidden_dim=512, num_heads=2, num_layers=2, vocab_size=512,
            cema_ndim=16, chunk_size=64, norm_num_groups=16)


@functools.cache
def _fixture(name):
  return fixtures.load(name)


def _config(fx, **kw) -> MegalodonConfig:
  return MegalodonConfig.from_official(fx.conf, **kw)


def spec_official_keys(c: MegalodonConfig) -> dict[str, tuple[tuple, str]]:
  """docs/export.md#official-key-map: official key -> (shape, dtype) for a model-parallel-1 `Mega` with this config."""
  D, Z, E, F, N, G = c.model_dim, c.z_dim, c.value_dim, c.ffn_hidden_dim, c.cema_ndim, c.norm_num_groups
  V = c.vocab_size
  v_out = V if c.output_size == -1 else c.output_size
  dz = Z // c.num_heads
  f32, i64 = "float32", "int64"
  keys = {"embed.weight": ((V, D), f32), "rope.freqs": ((dz // 2,), f32)}

  def timestep_norm(prefix):
    keys.update({f"{prefix}.weight": ((D,), f32), f"{prefix}.bias": ((D,), f32), f"{prefix}.prior_count": ((), i64),
                 f"{prefix}.prior_mean": ((G,), f32), f"{prefix}.prior_logv": ((G,), f32)})

  for i in range(c.num_layers):
    m, f = f"layers.{i}.mega", f"layers.{i}.nffn"
    keys.update({f"{m}.gamma": ((2, Z), f32), f"{m}.beta": ((2, Z), f32)})
    timestep_norm(f"{m}.timenorm")
    keys.update({f"{m}.cema.alpha": ((D, N, 1), f32), f"{m}.cema.delta": ((D, N, 1), f32),
                 f"{m}.cema.theta": ((D, 1, 1), f32), f"{m}.cema.gamma": ((D, N, 2), f32),
                 f"{m}.cema.omega": ((D, 1), f32)})
    if c.norm_affine:
      keys[f"{m}.rmsnorm.weight"] = ((D,), f32)
    keys.update({f"{m}.wv.weight": ((E, D), f32), f"{m}.wv.bias": ((E,), f32),
                 f"{m}.wz.weight": ((Z, D), f32), f"{m}.wz.bias": ((Z,), f32),
                 f"{m}.wr.weight": ((E, D), f32), f"{m}.wr.bias": ((E,), f32),
                 f"{m}.wh1.weight": ((D, D), f32), f"{m}.wh1.bias": ((D,), f32),
                 f"{m}.wh2.weight": ((D, E), f32)})
    if c.rescale_nffn:
      keys[f"{f}.alpha"] = ((D,), f32)
    if c.norm_affine:
      keys.update({f"{f}.norm.weight": ((D,), f32), f"{f}.norm.bias": ((D,), f32)})
    keys.update({f"{f}.fc1.weight": ((F, D), f32), f"{f}.fc2.weight": ((D, F), f32)})
    if c.swiglu:
      keys[f"{f}.fc3.weight"] = ((F, D), f32)
  timestep_norm("output.final_norm")
  keys["output.output.weight"] = ((v_out, D), f32)
  return keys


def _assert_state_dicts_identical(got, want):
  assert sorted(got) == sorted(want), (sorted(set(got) ^ set(want)))
  for k, w in want.items():
    g = got[k]
    assert isinstance(g, np.ndarray), k
    assert g.dtype == w.dtype and g.shape == w.shape, (k, g.dtype, g.shape, w.dtype, w.shape)
    assert g.tobytes() == w.tobytes(), f"{k}: values differ"  # bit for bit (also -0.0 vs 0.0, NaN payloads)


# ---------------------------------------------------------------------------------------------------------------
# The fixtures themselves, and round trips


@pytest.mark.parametrize("name", fixtures.CASES)
def test_spec_key_table_matches_the_official_state_dicts(name):
  """Sanity check of this file's reference: the key-map table reproduces the official state_dict exactly."""
  fx = _fixture(name)
  want = spec_official_keys(_config(fx))
  assert sorted(fx.state_dict) == sorted(want)
  for k, (shape, dtype) in want.items():
    assert fx.state_dict[k].shape == shape and fx.state_dict[k].dtype == np.dtype(dtype), k


@pytest.mark.parametrize("name", fixtures.CASES)
def test_numpy_round_trip_is_bit_exact(name):
  fx = _fixture(name)
  model = from_official_state_dict(fx.state_dict, _config(fx))
  out = to_official_state_dict(model)
  _assert_state_dicts_identical(out, fx.state_dict)
  # Our layout: torch Linear (out, in) becomes an (in, out) kernel.
  w = fx.state_dict["layers.0.mega.wz.weight"]
  np.testing.assert_array_equal(np.asarray(model.layers[0].mega.wz.kernel[...]), w.T)
  np.testing.assert_array_equal(np.asarray(model.rope_freqs[...]), fx.state_dict["rope.freqs"])


def test_tied_fixture_shares_one_table():
  fx = _fixture("tiny_tied")
  sd = fx.state_dict
  assert np.array_equal(sd["embed.weight"], sd["output.output.weight"])
  model = from_official_state_dict(sd, _config(fx))
  assert model.output is None  # head = embedding table
  assert sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param))) == _config(fx).num_params()


@pytest.mark.parametrize("name", fixtures.CASES)
def test_torch_tensors_load_like_numpy(name):
  torch = pytest.importorskip("torch")
  fx = _fixture(name)
  sd_torch = {k: torch.from_numpy(v.copy()) for k, v in fx.state_dict.items()}
  assert sd_torch["output.final_norm.prior_count"].dtype == torch.int64
  model_t = from_official_state_dict(sd_torch, _config(fx))
  model_n = from_official_state_dict(fx.state_dict, _config(fx))
  _assert_state_dicts_identical(to_official_state_dict(model_t), fx.state_dict)
  for a, b in zip(jax.tree.leaves(nnx.state(model_t)), jax.tree.leaves(nnx.state(model_n)), strict=True):
    assert np.asarray(a).tobytes() == np.asarray(b).tobytes()


@pytest.mark.parametrize("name", fixtures.CASES)
def test_bfloat16_torch_tensors(name):
  torch = pytest.importorskip("torch")
  fx = _fixture(name)
  sd_bf16 = {k: (torch.from_numpy(v.copy()).to(torch.bfloat16) if v.dtype == np.float32 else torch.from_numpy(v))
             for k, v in fx.state_dict.items()}
  cfg = _config(fx, param_dtype="bfloat16")
  model = from_official_state_dict(sd_bf16, cfg)
  for path, v in nnx.to_flat_state(nnx.state(model, nnx.Param)):
    assert v[...].dtype == jnp.bfloat16, path
  out = to_official_state_dict(model)
  assert sorted(out) == sorted(fx.state_dict)
  for k, t in sd_bf16.items():
    want = t.float().numpy() if t.dtype == torch.bfloat16 else t.numpy()
    got = out[k]
    assert got.shape == want.shape, k
    if k.endswith("prior_count"):
      assert got.dtype == np.int64 and got == 0, k
      continue
    if not (k == "rope.freqs" or ".prior_" in k):  # buffers may stay float32; parameters are bfloat16
      assert got.dtype == ml_dtypes.bfloat16, k
    # The bf16-rounded values, exactly (bf16 -> f32 is exact).
    np.testing.assert_array_equal(got.astype(np.float32), want, err_msg=k)
  # Rounding really happened: the f32 originals are not all representable in bf16.
  w32 = fx.state_dict["embed.weight"]
  assert not np.array_equal(out["embed.weight"].astype(np.float32), w32)


def test_loaded_model_with_dropout_has_concrete_rng_streams():
  """Loading into a config with dropout (e.g. to fine-tune) gives working dropout RNG streams."""
  fx = _fixture("tiny_short")
  cfg = _config(fx).replace(dropout=0.2, hidden_dropout=0.1, attention_dropout=0.1)
  model = from_official_state_dict(fx.state_dict, cfg, seed=0)
  for path, v in nnx.to_flat_state(nnx.state(model)):
    assert not isinstance(v[...], jax.ShapeDtypeStruct), path
  _assert_state_dicts_identical(to_official_state_dict(model), fx.state_dict)
  # Every dropout layer draws fresh masks from its own stream (a full forward is covered by the model tests).
  x = jnp.ones((4, 256), jnp.float32)
  blk = model.layers[0]
  masks = []
  for drop in (model.emb_dropout, blk.mega.dropout, blk.mega.hidden_dropout, blk.nffn.dropout, blk.nffn.hidden_dropout):
    first, second = np.asarray(drop(x)), np.asarray(drop(x))
    assert (first == 0).any() and (first != 0).any() and not np.array_equal(first, second)
    masks.append(first != 0)
  assert not np.array_equal(masks[1], masks[3])  # distinct streams
  k1, k2 = blk.mega.attention_rngs(), blk.mega.attention_rngs()
  assert not np.array_equal(jax.random.key_data(k1), jax.random.key_data(k2))
  # The seed picks the streams.
  other = from_official_state_dict(fx.state_dict, cfg, seed=1)
  assert not np.array_equal(np.asarray(other.emb_dropout(x)), np.asarray(
      from_official_state_dict(fx.state_dict, cfg, seed=0).emb_dropout(x)))


# ---------------------------------------------------------------------------------------------------------------
# Errors: StateDictError lists every problem in one message


def _error(sd, cfg) -> str:
  with pytest.raises(StateDictError) as err:
    from_official_state_dict(sd, cfg)
  assert isinstance(err.value, ValueError)
  return str(err.value)


def test_missing_keys_are_all_listed():
  fx = _fixture("tiny_swiglu")
  gone = ["layers.1.nffn.fc3.weight", "layers.0.mega.cema.theta", "rope.freqs", "output.final_norm.prior_count",
          "layers.0.mega.wz.bias"]
  sd = {k: v for k, v in fx.state_dict.items() if k not in gone}
  msg = _error(sd, _config(fx))
  assert "missing keys (5)" in msg
  for k in gone:
    assert k in msg


def test_unexpected_keys_are_all_listed():
  fx = _fixture("tiny_swiglu")
  # The fixture has rescale_nffn=True and 2 layers: loading it without rescale leaves nffn.alpha unexpected.
  extra = {"layers.0.mega.wh2.bias": np.zeros(64, np.float32), "lm_head.weight": np.zeros((256, 64), np.float32)}
  msg = _error({**fx.state_dict, **extra}, _config(fx).replace(rescale_nffn=False))
  assert "unexpected keys (4)" in msg
  for k in ("layers.0.nffn.alpha", "layers.1.nffn.alpha", *extra):
    assert k in msg


def test_misshaped_keys_are_listed_with_shapes():
  fx = _fixture("tiny_short")
  sd = dict(fx.state_dict)
  sd["layers.0.mega.wz.weight"] = sd["layers.0.mega.wz.weight"].T.copy()  # (24, 48) -> (48, 24)
  sd["layers.0.mega.cema.omega"] = sd["layers.0.mega.cema.omega"].reshape(-1)  # (48, 1) -> (48,)
  msg = _error(sd, _config(fx))
  assert "mis-shaped keys (2)" in msg
  assert re.search(r"layers\.0\.mega\.wz\.weight: got \(48, 24\), expected \(24, 48\)", msg), msg
  assert re.search(r"layers\.0\.mega\.cema\.omega: got \(48,\), expected \(48, 1\)", msg), msg


def test_a_wrong_config_reports_everything_at_once():
  fx = _fixture("tiny_swiglu")
  sd = {k: v for k, v in fx.state_dict.items() if k != "embed.weight"}
  sd["layers.0.mega.bogus"] = np.zeros(3, np.float32)
  sd["layers.1.nffn.fc2.weight"] = np.zeros((64, 100), np.float32)
  cfg = _config(fx).replace(swiglu=False)  # the fixture is SwiGLU: its fc3 weights become unexpected
  msg = _error(sd, cfg)
  for part in ("missing keys (1)", "embed.weight", "unexpected keys (3)", "layers.0.mega.bogus",
               "layers.0.nffn.fc3.weight", "layers.1.nffn.fc3.weight", "mis-shaped keys (1)",
               "layers.1.nffn.fc2.weight: got (64, 100), expected (64, 128)"):
    assert part in msg, part
  # A config with more layers than the checkpoint: every missing key of the extra layer is listed.
  msg = _error(fx.state_dict, _config(fx).replace(num_layers=3))
  n_layer_keys = sum(1 for k in fx.state_dict if k.startswith("layers.1."))
  assert f"missing keys ({n_layer_keys})" in msg
  assert all(k.replace("layers.1.", "layers.2.") in msg for k in fx.state_dict if k.startswith("layers.1."))


def test_tied_config_with_a_different_head_is_refused():
  fx = _fixture("tiny_tied")
  sd = dict(fx.state_dict)
  sd["output.output.weight"] = sd["output.output.weight"] + np.float32(1e-3)
  msg = _error(sd, _config(fx))
  assert "output.output.weight" in msg and "embed.weight" in msg and "share_emb=False" in msg
  # Loading the same tensors untied is the fix, and keeps both tables.
  model = from_official_state_dict(sd, _config(fx).replace(share_emb=False))
  out = to_official_state_dict(model)
  np.testing.assert_array_equal(out["output.output.weight"], sd["output.output.weight"])
  np.testing.assert_array_equal(out["embed.weight"], sd["embed.weight"])


# ---------------------------------------------------------------------------------------------------------------
# Export of freshly initialised models


EXPORT_CONFIGS = {
    "plain": dict(WIDE),
    "swiglu_rescale": dict(WIDE, swiglu=True, rescale_nffn=True, num_layers=3),
    "tied": dict(WIDE, share_emb=True, scale_emb=True),
    "no_affine": dict(WIDE, norm_affine=False, num_heads=1, rope_base=1e5),
}


@pytest.mark.parametrize("name", list(EXPORT_CONFIGS))
def test_fresh_model_exports_the_official_key_set(name):
  cfg = MegalodonConfig(**EXPORT_CONFIGS[name])
  model = MegalodonLM(cfg, rngs=nnx.Rngs(0))
  out = to_official_state_dict(model)
  want = spec_official_keys(cfg)
  assert sorted(out) == sorted(want), sorted(set(out) ^ set(want))
  for k, (shape, dtype) in want.items():
    assert out[k].shape == shape and out[k].dtype == np.dtype(dtype), (k, out[k].shape, out[k].dtype)
  # Trainable parameters = every key but the buffers (and the tied head's second name).
  buffers = [k for k in out if k == "rope.freqs" or ".prior_" in k]
  n = sum(v.size for k, v in out.items() if k not in buffers)
  if cfg.share_emb:
    np.testing.assert_array_equal(out["output.output.weight"], out["embed.weight"])
    n -= out["output.output.weight"].size
  assert n == cfg.num_params()
  # And it loads back to the same model.
  back = to_official_state_dict(from_official_state_dict(out, cfg))
  _assert_state_dicts_identical(back, out)
