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
from megalodon_jax.convert import StateDictError, hf, state_dict_entries, to_official_state_dict
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
