"""The official ⇄ megalodon-hf state-dict mapping (docs/export.md#megalodon-hf) on its own, against references
derived here.

The HF key list is restated from the spec's table; the RoPE permutation is checked against interleaved and
half-split rotations re-derived here, and functionally: one layer's attention scores computed from the official
weights with interleaved RoPE equal those computed from the HF weights with half-split RoPE.
"""

from __future__ import annotations

import numpy as np
import pytest
from flax import nnx

import fixtures
from megalodon_jax.config import MegalodonConfig
from megalodon_jax.convert import (StateDictError, from_official_state_dict, hf, state_dict_entries,
                                   to_official_state_dict)
from megalodon_jax.model import MegalodonLM


def rotate_interleaved(x, pos, inv_freq):
  """Official RoPE: feature pairs (2i, 2i+1) as complex numbers rotated by pos·inv_freq[i]."""
  a, b = x[..., 0::2], x[..., 1::2]
  ang = pos[:, None] * inv_freq[None, :]
  out = np.empty_like(x)
  out[..., 0::2], out[..., 1::2] = a * np.cos(ang) - b * np.sin(ang), a * np.sin(ang) + b * np.cos(ang)
  return out


def rotate_half_split(x, pos, inv_freq):
  """megalodon-hf RoPE: feature pairs (i, i + dz/2)."""
  h = x.shape[-1] // 2
  a, b = x[..., :h], x[..., h:]
  ang = pos[:, None] * inv_freq[None, :]
  return np.concatenate([a * np.cos(ang) - b * np.sin(ang), a * np.sin(ang) + b * np.cos(ang)], axis=-1)


def test_rope_permutation_turns_interleaved_pairs_into_half_split_pairs():
  assert hf.rope_permutation(1, 4).tolist() == [0, 2, 1, 3]
  assert hf.rope_permutation(2, 6).tolist() == [0, 2, 4, 1, 3, 5, 6, 8, 10, 7, 9, 11]
  heads, dz, length = 3, 8, 5
  perm = hf.rope_permutation(heads, dz)
  inv_freq = 10000.0 ** (-np.arange(0, dz, 2) / dz)
  pos = np.arange(length, dtype=np.float64)
  x = np.random.default_rng(0).normal(size=(length, heads * dz))
  for h in range(heads):
    own = slice(h * dz, (h + 1) * dz)
    local = perm[own] - h * dz  # the permutation stays within the head
    assert sorted(local.tolist()) == list(range(dz))
    np.testing.assert_allclose(rotate_half_split(x[:, own][:, local], pos, inv_freq),
                               rotate_interleaved(x[:, own], pos, inv_freq)[:, local], rtol=0, atol=1e-12)


def spec_hf_keys(c: MegalodonConfig) -> dict:
  """docs/export.md#megalodon-hf: megalodon-hf key -> shape."""
  D, Z, E, F, N, V = c.model_dim, c.z_dim, c.value_dim, c.ffn_hidden_dim, c.cema_ndim, c.vocab_size
  keys = {"model.embed.weight": (V, D)}
  for i in range(c.num_layers):
    a, f = f"model.layers.{i}.attn", f"model.layers.{i}.ffn"
    keys.update({f"{a}.gamma": (2, Z), f"{a}.beta": (2, Z), f"{a}.timenorm.weight": (D,), f"{a}.timenorm.bias": (D,),
                 f"{a}.cema.alpha": (D, N, 1), f"{a}.cema.delta": (D, N, 1), f"{a}.cema.theta": (D, 1, 1),
                 f"{a}.cema.gamma_real": (D, N), f"{a}.cema.gamma_imag": (D, N), f"{a}.cema.omega": (D,),
                 f"{a}.rmsnorm.gamma": (D,), f"{a}.wz.weight": (Z, D), f"{a}.wz.bias": (Z,),
                 f"{a}.wv.weight": (E, D), f"{a}.wv.bias": (E,), f"{a}.wr.weight": (E, D), f"{a}.wr.bias": (E,),
                 f"{a}.wh1.weight": (D, D), f"{a}.wh1.bias": (D,), f"{a}.wh2.weight": (D, E), f"{a}.wh2.bias": (D,),
                 f"{f}.norm.weight": (D,), f"{f}.norm.bias": (D,), f"{f}.fc1.weight": (F, D), f"{f}.fc1.bias": (F,),
                 f"{f}.fc2.weight": (D, F), f"{f}.fc2.bias": (D,)})
    if c.swiglu:
      keys.update({f"{f}.fc3.weight": (F, D), f"{f}.fc3.bias": (F,)})
  keys.update({"model.norm.weight": (D,), "model.norm.bias": (D,), "lm_head.weight": (V, D)})
  if not c.norm_affine:  # megalodon-hf then has no RMSNorm / LayerNorm affine and keeps its TimestepNorm ones unsaved
    keys = {k: v for k, v in keys.items()
            if not k.endswith(("rmsnorm.gamma", "ffn.norm.weight", "ffn.norm.bias", "timenorm.weight",
                               "timenorm.bias", "model.norm.weight", "model.norm.bias"))}
  return keys


def random_official(config: MegalodonConfig, seed: int) -> dict:
  """An official state dict of `config` with every weight random (gamma/beta included), default buffers."""
  rng = np.random.default_rng(seed)
  sd = to_official_state_dict(MegalodonLM(config, rngs=nnx.Rngs(seed)))
  for k, v in sd.items():
    if v.dtype == np.float32 and k != "rope.freqs" and "prior" not in k:
      sd[k] = rng.normal(0, 0.3, v.shape).astype(np.float32)
  if config.share_emb:
    sd["output.output.weight"] = sd["embed.weight"]
  return sd


def attention_scores(mx, wz, bz, gamma, beta, heads, half_split):
  """Per-head q·k scores (H, L, L) of one layer in float64, official (interleaved) or HF (half-split) RoPE."""
  z = mx @ wz.T.astype(np.float64) + bz
  length, dz = z.shape[0], z.shape[1] // heads
  inv_freq = 10000.0 ** (-np.arange(0, dz, 2) / dz)
  pos = np.arange(length, dtype=np.float64)
  rotate = rotate_half_split if half_split else rotate_interleaved
  out = []
  for h in range(heads):
    zh = z[:, h * dz:(h + 1) * dz]
    zh = zh / np.sqrt(np.mean(zh ** 2, -1, keepdims=True) + 1e-5)  # per-head RMSNorm, no affine
    g, b = gamma[:, h * dz:(h + 1) * dz], beta[:, h * dz:(h + 1) * dz]
    q, k = (rotate(zh * (1 + g[i]) / np.sqrt(dz) + b[i], pos, inv_freq) for i in (0, 1))
    out.append(q @ k.T)
  return np.stack(out)


@pytest.mark.parametrize("case", ["tiny_tied", "two_heads_swiglu"])
def test_hf_mapping_and_its_inverse(case):
  if case == "tiny_tied":  # the official model's own weights
    fx = fixtures.load("tiny_tied")
    config, sd = MegalodonConfig.from_official(fx.conf), fx.state_dict
  else:
    config = MegalodonConfig(num_layers=2, model_dim=32, z_dim=16, value_dim=32, num_heads=2, ffn_hidden_dim=48,
                             cema_ndim=4, chunk_size=8, norm_num_groups=4, vocab_size=40, swiglu=True, share_emb=True)
    sd = random_official(config, 1)
  out = hf.official_to_hf(sd, config)
  want = spec_hf_keys(config)
  assert {k: v.shape for k, v in out.items()} == want
  D, perm = config.model_dim, hf.rope_permutation(config.num_heads, config.z_head_dim)
  for i in range(config.num_layers):
    a, m = f"model.layers.{i}.attn", f"layers.{i}.mega"
    np.testing.assert_array_equal(out[f"model.layers.{i}.ffn.norm.weight"], sd[f"layers.{i}.nffn.norm.weight"] + 1)
    np.testing.assert_array_equal(np.stack([out[f"{a}.cema.gamma_real"], out[f"{a}.cema.gamma_imag"]], -1),
                                  sd[f"{m}.cema.gamma"])
    np.testing.assert_array_equal(out[f"{a}.cema.omega"], sd[f"{m}.cema.omega"][:, 0])
    np.testing.assert_array_equal(out[f"{a}.wz.weight"], sd[f"{m}.wz.weight"][perm])
    np.testing.assert_array_equal(out[f"{a}.gamma"], sd[f"{m}.gamma"][:, perm])
    for b in ("attn.wh2", "ffn.fc1", "ffn.fc2") + (("ffn.fc3",) if config.swiglu else ()):
      assert not out[f"model.layers.{i}.{b}.bias"].any()
    # The layer computes the same attention scores in both layouts (mx: a random RMSNorm output).
    mx = np.random.default_rng(i).normal(size=(6, D))
    official = attention_scores(mx, sd[f"{m}.wz.weight"], sd[f"{m}.wz.bias"], sd[f"{m}.gamma"], sd[f"{m}.beta"],
                                config.num_heads, half_split=False)
    ported = attention_scores(mx, out[f"{a}.wz.weight"], out[f"{a}.wz.bias"], out[f"{a}.gamma"], out[f"{a}.beta"],
                              config.num_heads, half_split=True)
    np.testing.assert_allclose(ported, official, rtol=1e-10, atol=1e-10)
  np.testing.assert_array_equal(out["lm_head.weight"], sd["embed.weight"])
  back = hf.hf_to_official(out, config)
  assert list(back) == [e.key for e in state_dict_entries(config)]
  for k, v in back.items():
    assert v.dtype == sd[k].dtype and v.shape == sd[k].shape, k
    if k.endswith("nffn.norm.weight"):  # (w + 1) - 1 in float32 rounds once
      np.testing.assert_allclose(v, sd[k], rtol=0, atol=1.2e-7)
    else:
      np.testing.assert_array_equal(v, sd[k], err_msg=k)
  bad = dict(out, **{"model.layers.0.ffn.fc2.bias": np.full((D,), 0.5, np.float32)})
  with pytest.raises(StateDictError, match=r"model\.layers\.0\.ffn\.fc2\.bias"):
    hf.hf_to_official(bad, config)


TIMESTEP_NORM_KEYS = ("mega.timenorm.weight", "mega.timenorm.bias")


def _timestep_norm_keys(config):
  """Official keys of every TimestepNorm weight and bias (each layer's, the final norm's)."""
  return ([f"layers.{i}.{k}" for i in range(config.num_layers) for k in TIMESTEP_NORM_KEYS]
          + ["output.final_norm.weight", "output.final_norm.bias"])


NO_AFFINE = MegalodonConfig(num_layers=2, model_dim=32, z_dim=16, value_dim=32, num_heads=2, ffn_hidden_dim=48,
                            cema_ndim=4, chunk_size=8, norm_num_groups=4, vocab_size=40, share_emb=True,
                            norm_affine=False)


def test_norm_affine_false_refuses_non_zero_timestep_norm_weights():
  """megalodon-hf does not load them with norm_affine=False (it keeps zeros): the export would silently differ."""
  sd = random_official(NO_AFFINE, 2)
  problems = hf.hf_export_problems(sd, NO_AFFINE)
  assert len(problems) == 1 and "norm_affine=False" in problems[0] and "6 of them are non-zero" in problems[0]
  with pytest.raises(StateDictError, match=r"norm_affine=False.*layers\.0\.mega\.timenorm\.weight"):
    hf.official_to_hf(sd, NO_AFFINE)
  # One non-zero entry is enough; the message names it.
  for k in _timestep_norm_keys(NO_AFFINE):
    sd[k] = np.zeros_like(sd[k])
  assert hf.hf_export_problems(sd, NO_AFFINE) == []
  sd["output.final_norm.bias"] = sd["output.final_norm.bias"].copy()
  sd["output.final_norm.bias"][3] = 1e-3
  with pytest.raises(StateDictError, match=r"1 of them are non-zero \(output\.final_norm\.bias\)"):
    hf.official_to_hf(sd, NO_AFFINE)


def test_norm_affine_false_round_trip_without_the_timestep_norm_keys():
  sd = random_official(NO_AFFINE, 3)
  for k in _timestep_norm_keys(NO_AFFINE):
    sd[k] = np.zeros_like(sd[k])
  out = hf.official_to_hf(sd, NO_AFFINE)
  assert {k: v.shape for k, v in out.items()} == spec_hf_keys(NO_AFFINE)  # no TimestepNorm weight or bias keys
  back = hf.hf_to_official(out, NO_AFFINE)
  assert list(back) == [e.key for e in state_dict_entries(NO_AFFINE)]
  for k, v in back.items():
    assert v.dtype == sd[k].dtype, k
    np.testing.assert_array_equal(v, sd[k], err_msg=k)
  # Files written before this rule held the keys: zeros are still accepted, non-zero values are refused.
  with_keys = dict(out, **{"model.layers.1.attn.timenorm.weight": np.zeros(32, np.float32),
                           "model.norm.bias": np.zeros(32, np.float32)})
  for k, v in hf.hf_to_official(with_keys, NO_AFFINE).items():
    np.testing.assert_array_equal(v, sd[k], err_msg=k)
  with_keys["model.norm.bias"] = np.full(32, 0.5, np.float32)
  with pytest.raises(StateDictError, match=r"(?s)non-zero TimestepNorm weights.*model\.norm\.bias"):
    hf.hf_to_official(with_keys, NO_AFFINE)
  with_keys["model.norm.bias"] = np.zeros(31, np.float32)
  with pytest.raises(StateDictError, match=r"model\.norm\.bias: got \(31,\)"):
    hf.hf_to_official(with_keys, NO_AFFINE)
  # With norm_affine=True the keys are required.
  affine = NO_AFFINE.replace(norm_affine=True)
  full = hf.official_to_hf(random_official(affine, 4), affine)
  del full["model.layers.0.attn.timenorm.bias"]
  with pytest.raises(StateDictError, match=r"missing keys \(1\).*model\.layers\.0\.attn\.timenorm\.bias"):
    hf.hf_to_official(full, affine)


def test_genuine_megalodon_hf_state_dict_with_norm_affine_false_loads_with_zero_timestep_norms():
  """A megalodon-hf state dict (norm_affine=False: no TimestepNorm weights saved) built here from HF's own layout
  rules, not by `official_to_hf`: it imports, and the model runs with zero TimestepNorm weights, as HF does."""
  rng = np.random.default_rng(5)
  hf_sd = {k: rng.normal(0, 0.3, shape).astype(np.float32) for k, shape in spec_hf_keys(NO_AFFINE).items()}
  for k in hf_sd:
    if k.endswith(("wh2.bias", "fc1.bias", "fc2.bias")):  # HF's extra biases: zero for a representable model
      hf_sd[k] = np.zeros_like(hf_sd[k])
  hf_sd["lm_head.weight"] = hf_sd["model.embed.weight"]
  official = hf.hf_to_official(hf_sd, NO_AFFINE)
  for k in _timestep_norm_keys(NO_AFFINE):
    assert official[k].dtype == np.float32 and not official[k].any(), k
  np.testing.assert_array_equal(official["layers.1.mega.cema.gamma"][..., 1],
                                hf_sd["model.layers.1.attn.cema.gamma_imag"])
  # Those weights act even with norm_affine=False (the official TimestepNorm always applies them), which is why
  # zeros, HF's values, are the only faithful reading of their absence.
  ids = np.random.default_rng(6).integers(0, NO_AFFINE.vocab_size, (2, 20))
  altered = dict(official, **{k: rng.normal(0, 0.3, NO_AFFINE.model_dim).astype(np.float32)
                              for k in _timestep_norm_keys(NO_AFFINE)})
  got = np.asarray(from_official_state_dict(official, NO_AFFINE)(ids))
  assert np.abs(got - np.asarray(from_official_state_dict(altered, NO_AFFINE)(ids))).max() > 1e-2
