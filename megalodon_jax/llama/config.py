"""LlamaConfig: the Llama-style baseline family's config (RMSNorm, RoPE, SwiGLU, no biases, grouped-query heads).

The fields that mean the same thing in both families carry Megalodon's names (`num_layers`, `model_dim`,
`num_heads`, `ffn_hidden_dim`, `vocab_size`, `norm_eps`, `rope_base`, `share_emb`, the execution settings), so any
training config runs with `--config.model.family=llama`: the baseline takes its width, depth, heads, FFN size,
vocabulary and norm settings from it. Fields only Llama has: `num_kv_heads`, `head_dim`, `init_std`,
`full_attention_impl`. Nothing here imports jax.

Dimension letters: D = model_dim, H = num_heads, K = kv_heads (grouped-query heads), hd = head_size,
F = ffn_hidden_dim (the SwiGLU hidden size), V = vocab_size.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, Mapping, Optional

from megalodon_jax.architecture import DEFAULT_ROPE_BASE, fail, is_int, is_number
from megalodon_jax.config import SHARED_EXECUTION_CHOICES, check_choices
from megalodon_jax.errors import ConfigError
from megalodon_jax.typed_config import check_family, section_model_config

# auto: cuDNN flash attention on GPU (jax.nn.dot_product_attention), splash attention on TPU
# (jax.experimental.pallas.ops.tpu), XLA elsewhere.
FULL_ATTENTION_IMPLEMENTATIONS = ("xla", "cudnn", "splash")
# The architecture fields (what a checkpoint records as the model, and what the Hugging Face export maps).
ARCHITECTURE_FIELDS = ("num_layers", "model_dim", "num_heads", "num_kv_heads", "head_dim", "ffn_hidden_dim",
                       "vocab_size", "norm_eps", "rope_base", "share_emb", "init_std")


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
  """Architecture and execution settings of the Llama baseline (`megalodon_jax.llama.model.LlamaLM`)."""

  _VOCAB_MAY_BE_UNSET: ClassVar[bool] = False

  num_layers: int = 8
  model_dim: int = 1024
  num_heads: int = 8
  num_kv_heads: int = -1  # grouped-query attention: K heads of keys and values; -1 = num_heads (multi-head)
  head_dim: int = -1  # -1 = model_dim // num_heads
  ffn_hidden_dim: int = 2816  # SwiGLU hidden size
  vocab_size: int = -1
  norm_eps: float = 1e-5  # RMSNorm epsilon
  rope_base: Optional[float] = None  # None means 10000
  share_emb: bool = False  # tie the LM head to the embedding table
  init_std: float = 0.02  # N(0, init_std^2) for every matrix (the Hugging Face LlamaConfig initializer_range)
  layerwise_ckpt: bool = False  # remat every block (remat="auto" reads it)
  # ---- execution settings ----
  dtype: str = "float32"  # activations / matmuls; norms, softmax and logits run in float32
  param_dtype: str = "float32"
  full_attention_impl: str = "auto"  # auto | xla | cudnn | splash
  remat: str = "auto"  # auto (from layerwise_ckpt) | none | one of REMAT_POLICIES
  scan_layers: bool = False  # all blocks as one lax.scan
  matmul_precision: str = "default"  # default | high | highest

  def __post_init__(self):
    for name in ("num_layers", "model_dim", "num_heads", "ffn_hidden_dim"):
      if not is_int(getattr(self, name)) or getattr(self, name) <= 0:
        fail(self, name, getattr(self, name), "must be a positive integer")
    if self._VOCAB_MAY_BE_UNSET:
      if not is_int(self.vocab_size) or (self.vocab_size <= 0 and self.vocab_size != -1):
        fail(self, "vocab_size", self.vocab_size, "must be a positive integer, or -1 (the tokenizer's size)")
    elif not is_int(self.vocab_size) or self.vocab_size <= 0:
      fail(self, "vocab_size", self.vocab_size, "must be a positive integer")
    if not is_int(self.num_kv_heads) or not (self.num_kv_heads == -1 or self.num_kv_heads > 0):
      fail(self, "num_kv_heads", self.num_kv_heads, "must be a positive integer or -1 (= num_heads)")
    if self.kv_heads > self.num_heads or self.num_heads % self.kv_heads:
      fail(self, "num_kv_heads", self.num_kv_heads, f"must divide num_heads={self.num_heads} (each key/value head "
           "serves a group of query heads)")
    if not is_int(self.head_dim) or not (self.head_dim == -1 or self.head_dim > 0):
      fail(self, "head_dim", self.head_dim, "must be a positive integer or -1 (= model_dim // num_heads)")
    if self.head_dim == -1 and self.model_dim % self.num_heads:
      fail(self, "num_heads", self.num_heads, f"must divide model_dim={self.model_dim} (or set head_dim)")
    if self.head_size % 2:
      fail(self, "head_dim", self.head_size, "must be even (RoPE rotates pairs of dimensions)")
    if not is_number(self.norm_eps) or not self.norm_eps > 0:
      fail(self, "norm_eps", self.norm_eps, "must be a number > 0")
    if self.rope_base is not None and (not is_number(self.rope_base) or not self.rope_base > 0):
      fail(self, "rope_base", self.rope_base, "must be a number > 0, or None (10000)")
    if not is_number(self.init_std) or not self.init_std > 0:
      fail(self, "init_std", self.init_std, "must be a number > 0")
    for name in ("share_emb", "layerwise_ckpt", "scan_layers"):
      if not isinstance(getattr(self, name), bool):
        fail(self, name, getattr(self, name), "must be a bool (true or false)")
    check_choices(self, (*SHARED_EXECUTION_CHOICES,
                         ("full_attention_impl", ("auto", *FULL_ATTENTION_IMPLEMENTATIONS))))

  # ---- derived quantities ----
  @property
  def kv_heads(self) -> int:
    return self.num_heads if self.num_kv_heads == -1 else self.num_kv_heads

  @property
  def head_size(self) -> int:
    return self.model_dim // self.num_heads if self.head_dim == -1 else self.head_dim

  @property
  def chunk_size(self) -> int:
    """1: no chunks (the family contract: sequences need not split into blocks, prefill pieces align to 1)."""
    return 1

  @property
  def effective_rope_base(self) -> float:
    return DEFAULT_ROPE_BASE if self.rope_base is None else float(self.rope_base)

  @property
  def remat_policy(self) -> str:
    if self.remat != "auto":
      return self.remat
    return "full" if self.layerwise_ckpt else "none"

  def replace(self, **changes: Any) -> "LlamaConfig":
    return dataclasses.replace(self, **changes)

  @classmethod
  def execution_fields(cls) -> tuple[str, ...]:
    """The execution settings (saved beside a checkpoint's architecture, overridable when loading it)."""
    return EXECUTION_FIELDS

  @classmethod
  def from_checkpoint(cls, model: Mapping[str, Any], execution: Mapping[str, Any]) -> "LlamaConfig":
    """The config a checkpoint records: `model` = `official_kwargs()`; the execution settings among `execution`."""
    unknown = sorted(set(model) - set(ARCHITECTURE_FIELDS))
    if unknown:
      raise ConfigError(f"unknown Llama architecture field(s) {unknown}; known: {list(ARCHITECTURE_FIELDS)}")
    return LlamaConfig(**dict(model), **{k: v for k, v in execution.items() if k in EXECUTION_FIELDS})

  def official_kwargs(self) -> dict[str, Any]:
    """The architecture (ARCHITECTURE_FIELDS) as a checkpoint records it."""
    return {name: getattr(self, name) for name in ARCHITECTURE_FIELDS}

  def num_params(self) -> int:
    """Exact trainable parameter count: per block q, k, v, o, the three SwiGLU matrices and two RMSNorm scales;
    the embedding, the final norm, and the LM head unless tied."""
    D, F, hd = self.model_dim, self.ffn_hidden_dim, self.head_size
    attention = D * self.num_heads * hd * 2 + D * self.kv_heads * hd * 2
    block = attention + 3 * D * F + 2 * D
    return self.num_layers * block + self.vocab_size * D * (1 if self.share_emb else 2) + D

  def kv_cache_bytes(self, tokens: int, batch: int = 1) -> int:
    """Bytes of the generation KV cache holding `tokens` tokens of `batch` sequences (keys and values of every
    layer in the compute dtype)."""
    itemsize = 2 if self.dtype in ("bfloat16", "float16") else 4
    return 2 * self.num_layers * batch * tokens * self.kv_heads * self.head_size * itemsize


@dataclasses.dataclass(frozen=True)
class LlamaSection(LlamaConfig):
  """The `model` section of a training config with family "llama": vocab_size may be -1 (the tokenizer's)."""

  _VOCAB_MAY_BE_UNSET: ClassVar[bool] = True
  family: str = "llama"  # the model family (megalodon_jax/families.py); picks this section's class

  def __post_init__(self):
    super().__post_init__()
    check_family(self)

  def with_vocab(self, tokenizer_vocab_size: int) -> LlamaConfig:
    """The model's config: vocab_size -1 becomes the tokenizer's size; a set one must hold every token id."""
    return section_model_config(self, LlamaConfig, tokenizer_vocab_size)


# Execution settings: the fields that are not architecture (dtypes, kernels, remat, scanning, precision).
EXECUTION_FIELDS = tuple(f.name for f in dataclasses.fields(LlamaConfig) if f.name not in ARCHITECTURE_FIELDS)
