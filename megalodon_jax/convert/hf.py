"""Official state dict ⇄ megalodon-hf (`pszemraj/megalodon-hf`, `MegalodonForCausalLM`) layout
(docs/export.md#megalodon-hf).

What changes between the two layouts:
- RoPE pairing: official rotates interleaved pairs (2i, 2i+1) of each head's dz features, HF rotates half-split
  pairs (i, i + dz/2) with the same frequencies. HF feature i of a head is official feature 2i, HF feature
  i + dz/2 is official feature 2i+1; the rows of `wz.weight`, the entries of `wz.bias` and the columns of
  `gamma`/`beta` are permuted accordingly (the per-head RMSNorm of z does not see the order).
- `nffn.norm` is a plain `nn.LayerNorm` in HF: HF weight = official weight + 1.
- CEMA `gamma` (D, N, 2) is stored as `gamma_real`, `gamma_imag` (D, N); `omega` (D, 1) as (D,).
- HF has biases the official model lacks (`wh2`, `fc1`, `fc2`, `fc3`): zero on export, required ≈ 0 on import.
- HF has no buffers: it recomputes the RoPE table from `rope_base` and has no TimestepNorm priors.
- HF always ties `lm_head` to the embedding when the output size equals the vocabulary, and its `rescale_nffn`
  is the constant 0.1·0.5^layer: an untied official head or a trained `nffn.alpha` cannot be represented.
- With `norm_affine=False` HF's TimestepNorms (each layer's `timenorm` and the final `model.norm`) keep their
  weight and bias as zero buffers that it neither saves nor loads, while the official model still has them as
  parameters: export writes no such keys and refuses non-zero ones; import takes absent ones as zeros.

HF's TimestepNorm computes a different variance than the official kernel (docs/export.md#megalodon-hf), so an
exported model does not reproduce our logits inside megalodon-hf unless its TimestepNorm is replaced by the official
formula.
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from megalodon_jax.config import MegalodonConfig, rope_inv_freq
from megalodon_jax.convert.official import StateDictError, state_dict_entries

TIMESTEP_NORM_WARNING = (
    "warning: megalodon-hf's TimestepNorm differs from the official one (its running variance omits the within-step "
    "group variance, docs/export.md#megalodon-hf): the exported weights are mapped exactly, but megalodon-hf will "
    "not reproduce these logits unless its TimestepNorm is replaced by the official formula.")

# Extra HF biases: HF key suffix -> the official weight whose output size they have.
_EXTRA_BIASES = (("attn.wh2", "mega.wh2"), ("ffn.fc1", "nffn.fc1"), ("ffn.fc2", "nffn.fc2"), ("ffn.fc3", "nffn.fc3"))
_BIAS_ATOL = 1e-6  # HF biases this close to 0 are dropped on import; anything larger changes the function


def _timestep_norm_pairs(config: MegalodonConfig) -> list[tuple[str, str]]:
  """(official prefix, HF prefix) of every TimestepNorm: each layer's, then the final one."""
  return ([(f"layers.{i}.mega.timenorm", f"model.layers.{i}.attn.timenorm") for i in range(config.num_layers)]
          + [("output.final_norm", "model.norm")])


def rope_permutation(num_heads: int, head_dim: int) -> np.ndarray:
  """Index array p (num_heads·head_dim,) int64 with hf_features = official_features[..., p].

  Within each head, HF feature j < dz/2 is official 2j and HF feature dz/2 + j is official 2j+1.
  """
  half = head_dim // 2
  within = np.concatenate([2 * np.arange(half), 2 * np.arange(half) + 1])
  return (np.arange(num_heads)[:, None] * head_dim + within[None, :]).reshape(-1).astype(np.int64)


def nffn_alpha_constant(layer: int) -> float:
  """megalodon-hf's fixed FFN rescale factor of block `layer` (also the official `nffn.alpha` init)."""
  return 0.1 * 0.5 ** layer


def hf_export_problems(tensors: Mapping[str, Any], config: MegalodonConfig) -> list[str]:
  """Why this official checkpoint cannot be represented in megalodon-hf (empty list: it can)."""
  problems = []
  if not config.share_emb and config.out_size == config.vocab_size:
    problems.append("the LM head is untied (share_emb=False, output size == vocab_size) but megalodon-hf always ties "
                    "lm_head to the embedding")
  if config.rescale_nffn:
    learned = [i for i in range(config.num_layers)
               if not np.all(np.asarray(tensors[f"layers.{i}.nffn.alpha"], np.float32)
                             == np.float32(nffn_alpha_constant(i)))]
    if learned:
      problems.append(f"nffn.alpha (rescale_nffn) of layers {learned} differs from megalodon-hf's fixed constant "
                      f"0.1*0.5**layer; a learned alpha cannot be stored in megalodon-hf")
  if not config.norm_affine:
    nonzero = [f"{off}.{w}" for off, _ in _timestep_norm_pairs(config) for w in ("weight", "bias")
               if np.any(np.asarray(tensors[f"{off}.{w}"]) != 0)]
    if nonzero:
      shown = ", ".join(nonzero[:4]) + (", ..." if len(nonzero) > 4 else "")
      problems.append(f"norm_affine=False: megalodon-hf keeps every TimestepNorm weight and bias at zero and does not "
                      f"load them, but {len(nonzero)} of them are non-zero ({shown}); the exported model would differ")
  return problems


def official_to_hf(tensors: Mapping[str, Any], config: MegalodonConfig) -> dict[str, np.ndarray]:
  """The megalodon-hf state dict of an official one.

  Args:
    tensors: official key -> NumPy array (checked keys/shapes, e.g. `to_official_state_dict`).
    config: its architecture.

  Returns:
    HF key -> NumPy array, in the dtype of the source (the LayerNorm +1 is computed in float32 and cast back).
    `lm_head.weight` is always written (a copy of the embedding when tied) so a strict `load_state_dict` works.
    With `norm_affine=False` the TimestepNorm weights and biases (all zero) are not written: HF does not load them.

  Raises:
    StateDictError: an untied head, a learned `nffn.alpha`, or non-zero TimestepNorm weights or biases with
      `norm_affine=False` (see `hf_export_problems`).
  """
  problems = hf_export_problems(tensors, config)
  if problems:
    raise StateDictError("cannot export to the megalodon-hf layout:\n  " + "\n  ".join(problems))
  t = {k: np.asarray(v) for k, v in tensors.items()}
  perm = rope_permutation(config.num_heads, config.z_head_dim)
  out: dict[str, np.ndarray] = {"model.embed.weight": t["embed.weight"]}
  for i in range(config.num_layers):
    m, f, a, h = f"layers.{i}.mega", f"layers.{i}.nffn", f"model.layers.{i}.attn", f"model.layers.{i}.ffn"
    out[f"{a}.gamma"] = t[f"{m}.gamma"][:, perm]
    out[f"{a}.beta"] = t[f"{m}.beta"][:, perm]
    if config.norm_affine:
      out[f"{a}.timenorm.weight"] = t[f"{m}.timenorm.weight"]
      out[f"{a}.timenorm.bias"] = t[f"{m}.timenorm.bias"]
    for name in ("alpha", "delta", "theta"):
      out[f"{a}.cema.{name}"] = t[f"{m}.cema.{name}"]
    out[f"{a}.cema.gamma_real"] = t[f"{m}.cema.gamma"][..., 0]
    out[f"{a}.cema.gamma_imag"] = t[f"{m}.cema.gamma"][..., 1]
    out[f"{a}.cema.omega"] = t[f"{m}.cema.omega"].reshape(-1)
    if config.norm_affine:
      out[f"{a}.rmsnorm.gamma"] = t[f"{m}.rmsnorm.weight"]
    out[f"{a}.wz.weight"] = t[f"{m}.wz.weight"][perm, :]
    out[f"{a}.wz.bias"] = t[f"{m}.wz.bias"][perm]
    for name in ("wv", "wr", "wh1"):
      out[f"{a}.{name}.weight"] = t[f"{m}.{name}.weight"]
      out[f"{a}.{name}.bias"] = t[f"{m}.{name}.bias"]
    out[f"{a}.wh2.weight"] = t[f"{m}.wh2.weight"]
    if config.norm_affine:
      w = t[f"{f}.norm.weight"]
      out[f"{h}.norm.weight"] = (w.astype(np.float32) + np.float32(1)).astype(w.dtype)
      out[f"{h}.norm.bias"] = t[f"{f}.norm.bias"]
    for name in ("fc1", "fc2") + (("fc3",) if config.swiglu else ()):
      out[f"{h}.{name}.weight"] = t[f"{f}.{name}.weight"]
  for hf_name, off_name in _EXTRA_BIASES:
    for i in range(config.num_layers):
      src = t.get(f"layers.{i}.{off_name}.weight")
      if src is not None:  # fc3 only with swiglu
        out[f"model.layers.{i}.{hf_name}.bias"] = np.zeros((src.shape[0],), src.dtype)
  if config.norm_affine:
    out["model.norm.weight"] = t["output.final_norm.weight"]
    out["model.norm.bias"] = t["output.final_norm.bias"]
  out["lm_head.weight"] = t["output.output.weight"]
  return {k: np.array(v, order="C") for k, v in out.items()}  # copies: tied tensors must not share memory


def hf_to_official(tensors: Mapping[str, Any], config: MegalodonConfig) -> dict[str, np.ndarray]:
  """The official state dict (keys of `state_dict_entries(config)`, buffers included) of a megalodon-hf one.

  `config` must describe the official architecture: share_emb True when the head is tied, and rescale_nffn as in
  HF (its constant becomes `nffn.alpha`). Buffers come from the config: `rope.freqs` from rope_base, priors 0.
  With `norm_affine=False` the TimestepNorm weights and biases, which HF does not save, are zeros (the values HF
  runs with); if present they must be ≈ 0.

  Raises:
    StateDictError: missing/unexpected HF keys, mis-shaped tensors, or extra biases (or, with norm_affine=False,
      TimestepNorm weights) that are not ≈ 0 (all listed).
  """
  t = {k: np.asarray(v) for k, v in tensors.items()}
  expected = official_to_hf(_placeholder(config), config)  # the HF keys and shapes of this config
  # Keys HF may or may not hold, read as zeros when absent: the TimestepNorm weights with norm_affine=False.
  optional = {} if config.norm_affine else {f"{h}.{w}": np.zeros((config.model_dim,), np.float32)
                                            for _, h in _timestep_norm_pairs(config) for w in ("weight", "bias")}
  missing = [k for k in expected if k not in t and not (k == "lm_head.weight" and config.share_emb)]
  unexpected = sorted(k for k in t if k not in expected and k not in optional)
  misshaped = [f"{k}: got {t[k].shape}, expected {v.shape}" for k, v in {**expected, **optional}.items()
               if k in t and t[k].shape != v.shape]
  extra = [k for k in expected if k.endswith(".bias") and any(f".{h}.bias" in k for h, _ in _EXTRA_BIASES)]
  nonzero = [f"{k}: max |bias| = {_max_abs(t[k]):.3g}" for k in extra
             if k in t and t[k].shape == expected[k].shape and _max_abs(t[k]) > _BIAS_ATOL]
  ignored = [f"{k}: max |value| = {_max_abs(t[k]):.3g}" for k in optional
             if k in t and t[k].shape == optional[k].shape and _max_abs(t[k]) > _BIAS_ATOL]
  problems = [f"{title} ({len(v)}): {v}" for title, v in (("missing keys", missing), ("unexpected keys", unexpected),
                                                          ("mis-shaped keys", misshaped),
                                                          ("non-zero extra biases the official model lacks",
                                                           nonzero),
                                                          ("non-zero TimestepNorm weights megalodon-hf ignores "
                                                           "with norm_affine=False", ignored)) if v]
  if problems:
    raise StateDictError("megalodon-hf state dict does not match the config:\n  " + "\n  ".join(problems))
  inv = np.argsort(rope_permutation(config.num_heads, config.z_head_dim))
  dtype = t["model.embed.weight"].dtype
  for k, zeros in optional.items():
    t.setdefault(k, zeros.astype(dtype))
  out: dict[str, np.ndarray] = {"embed.weight": t["model.embed.weight"], "rope.freqs": rope_inv_freq(config)}
  for i in range(config.num_layers):
    m, f, a, h = f"layers.{i}.mega", f"layers.{i}.nffn", f"model.layers.{i}.attn", f"model.layers.{i}.ffn"
    out[f"{m}.gamma"] = t[f"{a}.gamma"][:, inv]
    out[f"{m}.beta"] = t[f"{a}.beta"][:, inv]
    out.update(_timestep_norm(f"{m}.timenorm", t[f"{a}.timenorm.weight"], t[f"{a}.timenorm.bias"], config))
    for name in ("alpha", "delta", "theta"):
      out[f"{m}.cema.{name}"] = t[f"{a}.cema.{name}"]
    out[f"{m}.cema.gamma"] = np.stack([t[f"{a}.cema.gamma_real"], t[f"{a}.cema.gamma_imag"]], axis=-1)
    out[f"{m}.cema.omega"] = t[f"{a}.cema.omega"].reshape(-1, 1)
    if config.norm_affine:
      out[f"{m}.rmsnorm.weight"] = t[f"{a}.rmsnorm.gamma"]
    out[f"{m}.wz.weight"] = t[f"{a}.wz.weight"][inv, :]
    out[f"{m}.wz.bias"] = t[f"{a}.wz.bias"][inv]
    for name in ("wv", "wr", "wh1"):
      out[f"{m}.{name}.weight"] = t[f"{a}.{name}.weight"]
      out[f"{m}.{name}.bias"] = t[f"{a}.{name}.bias"]
    out[f"{m}.wh2.weight"] = t[f"{a}.wh2.weight"]
    if config.rescale_nffn:
      out[f"{f}.alpha"] = np.full((config.model_dim,), nffn_alpha_constant(i), np.float32).astype(dtype)
    if config.norm_affine:
      w = t[f"{h}.norm.weight"]
      out[f"{f}.norm.weight"] = (w.astype(np.float32) - np.float32(1)).astype(w.dtype)
      out[f"{f}.norm.bias"] = t[f"{h}.norm.bias"]
    for name in ("fc1", "fc2") + (("fc3",) if config.swiglu else ()):
      out[f"{f}.{name}.weight"] = t[f"{h}.{name}.weight"]
  out.update(_timestep_norm("output.final_norm", t["model.norm.weight"], t["model.norm.bias"], config))
  out["output.output.weight"] = t["model.embed.weight"] if config.share_emb else t["lm_head.weight"]
  order = [e.key for e in state_dict_entries(config)]
  return {k: np.array(out[k], order="C") for k in order}


def _max_abs(x: np.ndarray) -> float:
  return float(np.max(np.abs(x.astype(np.float32)))) if x.size else 0.0


def _timestep_norm(prefix: str, weight: np.ndarray, bias: np.ndarray, config: MegalodonConfig) -> dict:
  g = config.norm_num_groups
  return {f"{prefix}.weight": weight, f"{prefix}.bias": bias, f"{prefix}.prior_count": np.zeros((), np.int64),
          f"{prefix}.prior_mean": np.zeros((g,), np.float32), f"{prefix}.prior_logv": np.zeros((g,), np.float32)}


def _placeholder(config: MegalodonConfig) -> dict[str, np.ndarray]:
  """Zero official tensors of the right shapes (tied, constant alpha), to derive the HF key/shape list."""
  out = {e.key: np.zeros(e.shape, np.float32) for e in state_dict_entries(config)}
  for i in range(config.num_layers if config.rescale_nffn else 0):
    out[f"layers.{i}.nffn.alpha"][:] = nffn_alpha_constant(i)
  return out


def hf_config(config: MegalodonConfig, torch_dtype: str) -> dict[str, Any]:
  """The megalodon-hf `config.json` of this architecture.

  Assumptions: HF's `MegalodonConfig` takes the official `ModelConf` field names (it does, for every field the
  model uses), plus `model_type="megalodon"`, `architectures`, `num_attention_heads` and `tie_word_embeddings`.
  `rope_base` is written as the effective float base (HF has no None). Token ids (`pad/bos/eos_token_id`) and
  `max_positions` are left at HF's defaults: the tokenizer is not part of a checkpoint, and HF's padding index only
  changes gradients. `layerwise_ckpt` maps to HF's `gradient_checkpointing`.
  """
  c = config
  tied = c.out_size == c.vocab_size  # HF ties whenever the sizes agree (export refuses the untied case)
  return {
      "model_type": "megalodon", "architectures": ["MegalodonForCausalLM"], "vocab_size": c.vocab_size,
      "model_dim": c.model_dim, "num_layers": c.num_layers, "num_heads": c.num_heads,
      "num_attention_heads": c.num_heads,
      "z_dim": c.z_dim, "value_dim": c.value_dim, "ffn_hidden_dim": c.ffn_hidden_dim, "cema_ndim": c.cema_ndim,
      "chunk_size": c.chunk_size, "norm_num_groups": c.norm_num_groups, "dropout": c.dropout,
      "attention_dropout": c.attention_dropout, "hidden_dropout": c.hidden_dropout, "swiglu": c.swiglu,
      "rescale_nffn": c.rescale_nffn, "scale_emb": c.scale_emb, "share_emb": tied, "tie_word_embeddings": tied,
      "efficient_attn": c.efficient_attn, "norm_affine": c.norm_affine, "norm_eps": c.norm_eps,
      "init_mode": c.init_mode, "rope_base": c.effective_rope_base, "output_size": c.output_size,
      "gradient_checkpointing": c.layerwise_ckpt, "is_decoder": True, "use_cache": True, "torch_dtype": torch_dtype,
  }


def config_from_hf(hf: Mapping[str, Any]) -> MegalodonConfig:
  """The official architecture of a megalodon-hf `config.json` (HF-only keys are ignored).

  The head is tied whenever the output size equals the vocabulary (HF's behaviour), whatever `share_emb` says.
  """
  from megalodon_jax.config import OFFICIAL_FIELDS  # pylint: disable=import-outside-toplevel
  kwargs = {k: hf[k] for k in OFFICIAL_FIELDS if k in hf}
  kwargs["layerwise_ckpt"] = bool(hf.get("gradient_checkpointing", False))
  out_size = kwargs.get("output_size", -1)
  kwargs["share_emb"] = out_size in (-1, kwargs.get("vocab_size"))
  if kwargs.get("rope_base") is not None:
    kwargs["rope_base"] = float(kwargs["rope_base"])
  return MegalodonConfig.from_official(kwargs)
