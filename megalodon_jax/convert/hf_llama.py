"""LlamaLM <-> the Hugging Face `transformers` LlamaForCausalLM layout (model.safetensors + config.json).

Key map (torch weights are (out, in), our kernels (in, out): every matrix but the embedding is transposed):

  embed.weight (V, D)                          model.embed_tokens.weight (V, D)
  layers.{i}.attention_norm.weight             model.layers.{i}.input_layernorm.weight
  layers.{i}.attention.w{q,k,v,o}.kernel       model.layers.{i}.self_attn.{q,k,v,o}_proj.weight
  layers.{i}.ffn_norm.weight                   model.layers.{i}.post_attention_layernorm.weight
  layers.{i}.mlp.w1 / w3 / w2 .kernel          model.layers.{i}.mlp.gate_proj / up_proj / down_proj .weight
  final_norm.weight                            model.norm.weight
  output.kernel (D, V)                         lm_head.weight (V, D); absent when tied (share_emb)

The conventions match (rotate-half RoPE on the projections as stored, query head n reading key/value head
n // (H / K), RMSNorm with a plain weight), so no permutation of rows is needed.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any, Mapping

import numpy as np

from megalodon_jax.checkpoints import output_guard
from megalodon_jax.errors import StateDictError
from megalodon_jax.llama.config import LlamaConfig

CONFIG_JSON = "config.json"
WEIGHTS_FILE = "model.safetensors"
# What export_hf writes (and an --overwrite of its output may replace).
HF_LLAMA_ENTRIES = output_guard.KnownEntries(
    re.compile(re.escape(WEIGHTS_FILE) + "|" + re.escape(CONFIG_JSON)), "a Hugging Face Llama export",
    f"{WEIGHTS_FILE}, {CONFIG_JSON}")

_ATTENTION = {"wq": "q_proj", "wk": "k_proj", "wv": "v_proj", "wo": "o_proj"}
_MLP = {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}


def _key_map(config: LlamaConfig) -> dict[tuple, tuple[str, bool]]:
  """{our param path (tuple of keys): (HF name, transposed)}."""
  out: dict[tuple, tuple[str, bool]] = {("embed", "weight"): ("model.embed_tokens.weight", False),
                                        ("final_norm", "weight"): ("model.norm.weight", False)}
  for i in range(config.num_layers):
    hf = f"model.layers.{i}"
    out[("layers", i, "attention_norm", "weight")] = (f"{hf}.input_layernorm.weight", False)
    out[("layers", i, "ffn_norm", "weight")] = (f"{hf}.post_attention_layernorm.weight", False)
    for ours, theirs in _ATTENTION.items():
      out[("layers", i, "attention", ours, "kernel")] = (f"{hf}.self_attn.{theirs}.weight", True)
    for ours, theirs in _MLP.items():
      out[("layers", i, "mlp", ours, "kernel")] = (f"{hf}.mlp.{theirs}.weight", True)
  if not config.share_emb:
    out[("output", "kernel")] = ("lm_head.weight", True)
  return out


def _flat(tree: Any, prefix: tuple = ()) -> dict[tuple, Any]:
  if isinstance(tree, Mapping):
    out = {}
    for k, v in tree.items():
      out.update(_flat(v, prefix + (k,)))
    return out
  return {prefix: tree}


def _pure_params(params_state: Any) -> dict:
  """A nested dict of arrays from an LlamaLM, its `nnx.state(model, nnx.Param)` or a pure dict of it."""
  from flax import nnx  # pylint: disable=import-outside-toplevel
  if isinstance(params_state, nnx.Module):
    params_state = nnx.state(params_state, nnx.Param)
  if isinstance(params_state, nnx.State):
    params_state = nnx.to_pure_dict(params_state)
  return params_state


def to_hf_state_dict(params_state: Any, config: LlamaConfig) -> dict[str, np.ndarray]:
  """The LlamaForCausalLM state dict (NumPy, torch's (out, in) weights) of our params (a model, its Param state or
  that state as a pure dict). Raises StateDictError when a parameter is missing, extra or misshapen."""
  flat = {tuple(int(p) if isinstance(p, (int, np.integer)) else p for p in path): v
          for path, v in _flat(_pure_params(params_state)).items()}
  keys = _key_map(config)
  problems = [f"missing parameter {'.'.join(map(str, p))}" for p in keys if p not in flat]
  problems += [f"unexpected parameter {'.'.join(map(str, p))}" for p in flat if p not in keys]
  if problems:
    raise StateDictError("not a LlamaLM of this config: " + "; ".join(problems))
  out = {}
  for path, (name, transpose) in keys.items():
    a = np.asarray(flat[path])
    out[name] = np.ascontiguousarray(a.T if transpose else a)
  return out


def _expected_shapes(config: LlamaConfig) -> dict[str, tuple[int, ...]]:
  D, F, V, hd = config.model_dim, config.ffn_hidden_dim, config.vocab_size, config.head_size
  H, K = config.num_heads, config.kv_heads
  shapes = {"model.embed_tokens.weight": (V, D), "model.norm.weight": (D,)}
  for i in range(config.num_layers):
    hf = f"model.layers.{i}"
    shapes.update({f"{hf}.input_layernorm.weight": (D,), f"{hf}.post_attention_layernorm.weight": (D,),
                   f"{hf}.self_attn.q_proj.weight": (H * hd, D), f"{hf}.self_attn.k_proj.weight": (K * hd, D),
                   f"{hf}.self_attn.v_proj.weight": (K * hd, D), f"{hf}.self_attn.o_proj.weight": (D, H * hd),
                   f"{hf}.mlp.gate_proj.weight": (F, D), f"{hf}.mlp.up_proj.weight": (F, D),
                   f"{hf}.mlp.down_proj.weight": (D, F)})
  if not config.share_emb:
    shapes["lm_head.weight"] = (V, D)
  return shapes


def from_hf_state_dict(state_dict: Mapping[str, Any], config: LlamaConfig) -> dict:
  """Our params (a nested pure dict of NumPy arrays in `config.param_dtype`, which `nnx.update(model, ...)` and
  `nnx.replace_by_pure_dict` accept) from a LlamaForCausalLM state dict (torch tensors or NumPy arrays).

  With share_emb a `lm_head.weight` equal to the embedding (what HF saves for tied weights, if anything) is
  accepted; `model.rotary_emb.inv_freq` (a buffer older transformers saved) is ignored.
  Raises StateDictError naming every missing, unexpected or misshapen tensor."""
  import ml_dtypes  # pylint: disable=import-outside-toplevel
  expected = _expected_shapes(config)
  arrays = {k: _numpy(v) for k, v in state_dict.items() if not k.endswith("rotary_emb.inv_freq")}
  if config.share_emb and "lm_head.weight" in arrays:
    tied = arrays.pop("lm_head.weight")
    if not np.array_equal(tied, arrays.get("model.embed_tokens.weight", tied)):
      raise StateDictError("share_emb=True but lm_head.weight differs from model.embed_tokens.weight")
  problems = [f"missing {k}" for k in expected if k not in arrays]
  problems += [f"unexpected {k}" for k in arrays if k not in expected]
  problems += [f"{k}: shape {tuple(arrays[k].shape)}, expected {shape}" for k, shape in expected.items()
               if k in arrays and tuple(arrays[k].shape) != shape]
  if problems:
    raise StateDictError("not a LlamaForCausalLM state dict of this config:\n  " + "\n  ".join(problems))
  dtype = np.dtype(ml_dtypes.bfloat16) if config.param_dtype == "bfloat16" else np.dtype(config.param_dtype)
  out: dict = {}
  for path, (name, transpose) in _key_map(config).items():
    a = arrays[name].T if transpose else arrays[name]
    node = out
    for p in path[:-1]:
      node = node.setdefault(p, {})
    node[path[-1]] = np.ascontiguousarray(a.astype(dtype))
  return out


def _numpy(t: Any) -> np.ndarray:
  if isinstance(t, np.ndarray):
    return t
  if type(t).__module__.startswith("torch"):
    from megalodon_jax.convert.torch_files import to_numpy  # pylint: disable=import-outside-toplevel
    return to_numpy(t)
  return np.asarray(t)


def hf_config(config: LlamaConfig, *, max_position_embeddings: int = 4096, dtype: str = "float32") -> dict:
  """The config.json of LlamaForCausalLM for `config`; `dtype` the stored weights' dtype. RoPE's base is written
  both as `rope_theta` (transformers < 5) and as `rope_parameters` (transformers >= 5)."""
  if not isinstance(max_position_embeddings, int) or max_position_embeddings <= 0:
    raise ValueError(f"max_position_embeddings must be a positive integer; got {max_position_embeddings!r}")
  base = config.effective_rope_base
  return {
      "architectures": ["LlamaForCausalLM"],
      "model_type": "llama",
      "hidden_size": config.model_dim,
      "intermediate_size": config.ffn_hidden_dim,
      "num_attention_heads": config.num_heads,
      "num_key_value_heads": config.kv_heads,
      "head_dim": config.head_size,
      "num_hidden_layers": config.num_layers,
      "rms_norm_eps": config.norm_eps,
      "rope_theta": base,
      "rope_parameters": {"rope_type": "default", "rope_theta": base},
      "vocab_size": config.vocab_size,
      "tie_word_embeddings": config.share_emb,
      "hidden_act": "silu",
      "attention_bias": False,
      "mlp_bias": False,
      "initializer_range": config.init_std,
      "torch_dtype": dtype,
      "dtype": dtype,
      "max_position_embeddings": max_position_embeddings,
      "use_cache": True,
  }


def write_hf_llama(folder: str, tensors: Mapping[str, np.ndarray], config: LlamaConfig, *, dtype: str = "float32",
                   max_position_embeddings: int = 4096, max_shard_size: str = "5GB") -> list[str]:
  """Writes model.safetensors (the tensors cast to `dtype`; sharded above `max_shard_size` with
  model.safetensors.index.json, convert/safetensors_shards.py) + config.json into `folder`; returns the file
  names."""
  # pylint: disable=import-outside-toplevel
  from megalodon_jax.convert import safetensors_shards, torch_files
  if dtype not in torch_files.DTYPES:
    raise ValueError(f"dtype must be one of {tuple(torch_files.DTYPES)}; got {dtype!r}")
  tensors = torch_files.cast(tensors, dtype)
  files = safetensors_shards.write_shards(folder, {k: torch_files.to_torch(v) for k, v in tensors.items()},
                                          max_shard_size)
  with open(os.path.join(folder, CONFIG_JSON), "w", encoding="utf-8") as f:
    json.dump(hf_config(config, max_position_embeddings=max_position_embeddings, dtype=dtype), f, indent=2)
    f.write("\n")
  return files + [CONFIG_JSON]


def export_hf(model: Any, out_dir: str, *, dtype: str = "float32", max_position_embeddings: int = 4096,
              overwrite: bool = False) -> list[str]:
  """Writes `model` (a LlamaLM) as a LlamaForCausalLM folder (model.safetensors + config.json), atomically: into a
  temporary sibling renamed into place at the end (`model_io.atomic_output`). A non-empty `out_dir` is replaced
  only with `overwrite` and only when it holds nothing but these two files. Returns the file names."""
  from megalodon_jax.checkpoints import model_io  # pylint: disable=import-outside-toplevel
  tensors = to_hf_state_dict(model, model.config)
  with model_io.atomic_output(out_dir, known=HF_LLAMA_ENTRIES, overwrite=overwrite) as tmp:
    return write_hf_llama(tmp, tensors, model.config, dtype=dtype, max_position_embeddings=max_position_embeddings)
