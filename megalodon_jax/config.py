"""MegalodonConfig: the official `ModelConf` fields plus our execution settings.

Model fields carry the official names and defaults (megalodon/config.py, `ModelConf`), so
`MegalodonConfig(**official_conf_kwargs)` builds the same architecture. Execution fields (dtypes, which
CEMA / attention implementation, rematerialisation) are ours and never change the math.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Optional

# Names of the official `ModelConf` fields, in its order.
OFFICIAL_FIELDS = (
    "num_layers", "model_dim", "z_dim", "value_dim", "num_heads", "ffn_hidden_dim", "cema_ndim", "chunk_size",
    "efficient_attn", "init_mode", "vocab_size", "output_size", "norm_num_groups", "norm_affine", "norm_eps",
    "rope_base", "dropout", "hidden_dropout", "attention_dropout", "swiglu", "rescale_nffn", "scale_emb",
    "share_emb", "layerwise_ckpt",
)

INIT_MODES = ("he", "bert", "gaussian", "xavier", "none")
EFFICIENT_ATTN = (None, "swift", "fused")
CEMA_IMPLS = ("auto", "fft", "associative_scan", "sequential", "chunked", "pallas")
ATTENTION_IMPLS = ("auto", "xla", "pallas")
REMAT_POLICIES = ("auto", "none", "full", "dots_saveable")
DTYPES = ("float32", "bfloat16", "float16")
DEFAULT_ROPE_BASE = 10000.0


class ConfigError(ValueError):
  """A MegalodonConfig field has an invalid value; the message names the field and the fix."""


@dataclasses.dataclass(frozen=True)
class MegalodonConfig:
  """Architecture (official `ModelConf` names and defaults) and execution settings of a Megalodon LM.

  Dimension letters used in docstrings across the package: B batch, L length, D = model_dim,
  H = num_heads, Z = z_dim (dz = Z/H), E = value_dim (dv = E/H), N = cema_ndim, G = norm_num_groups,
  C = chunk_size, F = ffn_hidden_dim, V = vocab_size.
  """

  # ---- official ModelConf fields (same names, same defaults) ----
  num_layers: int = 8
  model_dim: int = 1024
  z_dim: int = 256
  value_dim: int = 2048
  num_heads: int = 1
  ffn_hidden_dim: int = 2048
  cema_ndim: int = 16
  chunk_size: int = 2048
  # None: plain attention with post-softmax dropout; "swift"/"fused": the official fused kernel, whose
  # attention dropout is DropKey. Both compute the same function when attention_dropout == 0.
  efficient_attn: Optional[str] = None
  init_mode: str = "he"
  vocab_size: int = -1  # the official default -1 means "set later from the tokenizer"; we require it set
  output_size: int = -1  # -1: same as vocab_size
  norm_num_groups: int = 32
  norm_affine: bool = True
  norm_eps: float = 1e-5
  rope_base: Optional[float] = None  # None means 10000 (the official RotaryEmbedding default)
  dropout: float = 0.0
  hidden_dropout: float = 0.0
  attention_dropout: float = 0.0
  swiglu: bool = False
  rescale_nffn: bool = False
  scale_emb: bool = False
  share_emb: bool = False
  layerwise_ckpt: bool = False  # maps onto remat="full" when remat is "auto"

  # ---- execution settings (ours) ----
  dtype: str = "float32"  # activations / matmuls; CEMA, norms, softmax and logits always run in float32
  param_dtype: str = "float32"  # parameter storage
  cema_impl: str = "auto"  # auto | fft | associative_scan | sequential | chunked | pallas (all compute the same)
  attention_impl: str = "auto"  # auto | xla | pallas
  remat: str = "auto"  # auto (from layerwise_ckpt) | none | full | dots_saveable
  scan_layers: bool = False  # full forward as one lax.scan over stacked blocks: compile time flat in depth

  def __post_init__(self):
    _validate(self)

  # ---- derived quantities ----
  @property
  def z_head_dim(self) -> int:
    return self.z_dim // self.num_heads

  @property
  def v_head_dim(self) -> int:
    return self.value_dim // self.num_heads

  @property
  def out_size(self) -> int:
    """Size of the LM head's output (`output_size`, or `vocab_size` when -1)."""
    return self.vocab_size if self.output_size == -1 else self.output_size

  @property
  def effective_rope_base(self) -> float:
    return DEFAULT_ROPE_BASE if self.rope_base is None else float(self.rope_base)

  @property
  def remat_policy(self) -> str:
    if self.remat != "auto":
      return self.remat
    return "full" if self.layerwise_ckpt else "none"

  def replace(self, **changes: Any) -> "MegalodonConfig":
    return dataclasses.replace(self, **changes)

  def official_kwargs(self) -> dict[str, Any]:
    """The official `ModelConf(**kwargs)` arguments for this architecture."""
    return {name: getattr(self, name) for name in OFFICIAL_FIELDS}

  @classmethod
  def from_official(cls, conf: Mapping[str, Any] | Any, **execution: Any) -> "MegalodonConfig":
    """Builds a config from an official `ModelConf` (a mapping of its fields, or the object itself).

    Unknown keys are an error (listing all of them); `execution` sets our own fields.
    """
    if not isinstance(conf, Mapping):
      conf = {k: v for k, v in vars(conf).items() if not k.startswith("_")}
    unknown = sorted(set(conf) - set(OFFICIAL_FIELDS))
    if unknown:
      raise ConfigError(f"from_official: unknown ModelConf field(s) {unknown}; known fields: {list(OFFICIAL_FIELDS)}")
    bad_exec = sorted(set(execution) & set(OFFICIAL_FIELDS))
    if bad_exec:
      raise ConfigError(f"from_official: {bad_exec} are ModelConf fields; pass them inside `conf`")
    return cls(**dict(conf), **execution)

  def num_params(self) -> int:
    """Exact trainable parameter count of the official model; buffers are not counted.

    The formula is in docs/export.md#parameter-count.
    """
    D, N, E, Z, F = self.model_dim, self.cema_ndim, self.value_dim, self.z_dim, self.ffn_hidden_dim
    affine = 1 if self.norm_affine else 0
    attn = (2 * D  # timenorm weight + bias
            + D * (4 * N + 2)  # cema alpha, delta (D,N), gamma (D,N,2), theta (D,1), omega (D,1)
            + affine * D  # rmsnorm
            + (E * D + E) + (Z * D + Z) + (E * D + E) + (D * D + D)  # wv, wz, wr, wh1
            + D * E  # wh2 (no bias)
            + 4 * Z)  # gamma, beta (2, Z)
    ffn = affine * 2 * D + (3 if self.swiglu else 2) * F * D + (D if self.rescale_nffn else 0)
    total = self.num_layers * (attn + ffn) + self.vocab_size * D + 2 * D
    if not self.share_emb:
      total += self.out_size * D
    return total


def _fail(field: str, value: Any, why: str) -> None:
  raise ConfigError(f"MegalodonConfig.{field}={value!r}: {why}")


def _validate(c: MegalodonConfig) -> None:
  for name in ("num_layers", "model_dim", "z_dim", "value_dim", "num_heads", "ffn_hidden_dim", "cema_ndim",
               "chunk_size", "norm_num_groups"):
    v = getattr(c, name)
    if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
      _fail(name, v, "must be a positive integer")
  if not isinstance(c.vocab_size, int) or c.vocab_size <= 0:
    _fail("vocab_size", c.vocab_size, "must be a positive integer (the official -1 means 'set from the "
          "tokenizer'; pass vocab_size=<tokenizer size>)")
  if c.output_size != -1 and (not isinstance(c.output_size, int) or c.output_size <= 0):
    _fail("output_size", c.output_size, "must be -1 (same as vocab_size) or a positive integer")
  if c.z_dim % c.num_heads:
    _fail("z_dim", c.z_dim, f"is not divisible by num_heads={c.num_heads}; choose z_dim as a multiple of num_heads")
  if c.value_dim % c.num_heads:
    _fail("value_dim", c.value_dim,
          f"is not divisible by num_heads={c.num_heads}; choose value_dim as a multiple of num_heads")
  if (c.z_dim // c.num_heads) % 2:
    _fail("z_dim", c.z_dim, f"gives an odd per-head width z_dim/num_heads={c.z_dim // c.num_heads}; RoPE rotates "
          "feature pairs, so it must be even")
  if c.model_dim % c.norm_num_groups:
    _fail("norm_num_groups", c.norm_num_groups,
          f"does not divide model_dim={c.model_dim}; TimestepNorm groups are contiguous slices of equal size")
  if c.model_dim // c.norm_num_groups < 2:
    _fail("norm_num_groups", c.norm_num_groups, f"gives groups of one feature (model_dim={c.model_dim}); the first "
          "step's variance would be 0. Use fewer groups")
  for name in ("dropout", "hidden_dropout", "attention_dropout"):
    v = getattr(c, name)
    if not isinstance(v, (int, float)) or not 0.0 <= v < 1.0:
      _fail(name, v, "must be a probability in [0, 1)")
  if not isinstance(c.norm_eps, (int, float)) or not c.norm_eps > 0:
    _fail("norm_eps", c.norm_eps, "must be > 0")
  if c.rope_base is not None and not (isinstance(c.rope_base, (int, float)) and c.rope_base > 1):
    _fail("rope_base", c.rope_base, "must be None (10000) or a number > 1")
  if c.efficient_attn not in EFFICIENT_ATTN:
    _fail("efficient_attn", c.efficient_attn, f"must be one of {EFFICIENT_ATTN}")
  if c.init_mode not in INIT_MODES:
    _fail("init_mode", c.init_mode, f"must be one of {INIT_MODES}")
  if c.share_emb and c.out_size != c.vocab_size:
    _fail("share_emb", c.share_emb, f"ties the head to the embedding, so output_size={c.output_size} must be -1 or "
          f"equal vocab_size={c.vocab_size}")
  for name, allowed in (("dtype", DTYPES), ("param_dtype", DTYPES), ("cema_impl", CEMA_IMPLS),
                        ("attention_impl", ATTENTION_IMPLS), ("remat", REMAT_POLICIES)):
    if getattr(c, name) not in allowed:
      _fail(name, getattr(c, name), f"must be one of {allowed}")
  if c.attention_impl == "pallas" and c.attention_dropout > 0 and c.efficient_attn is None:
    _fail("attention_impl", c.attention_impl, "implements DropKey attention dropout only: with attention_dropout > 0 "
          "set efficient_attn to 'swift' or 'fused', or use attention_impl='xla' for plain softmax dropout")
  for name in ("norm_affine", "swiglu", "rescale_nffn", "scale_emb", "share_emb", "layerwise_ckpt", "scan_layers"):
    if not isinstance(getattr(c, name), bool):
      _fail(name, getattr(c, name), "must be a bool")


# ---- presets: the official ModelStore shapes (megalodon/model/mega.py) and the paper's 7B ----
_LLAMA2_VOCAB = 32000

_PRESETS: dict[str, dict[str, Any]] = {
    "mega200M": dict(num_layers=12, model_dim=1024, num_heads=1, z_dim=256, value_dim=2048, ffn_hidden_dim=2560,
                     chunk_size=2048, norm_num_groups=32),
    "mega1.3B": dict(num_layers=24, model_dim=2048, num_heads=2, z_dim=512, value_dim=4096, ffn_hidden_dim=4864,
                     chunk_size=2048, norm_num_groups=64),
    "mega1.3B_pg19": dict(num_layers=24, model_dim=2048, num_heads=2, z_dim=512, value_dim=4096,
                          ffn_hidden_dim=3584, chunk_size=2048, norm_num_groups=64, swiglu=True, scale_emb=True,
                          share_emb=True),
    "mega7.1B": dict(num_layers=32, model_dim=4096, num_heads=4, z_dim=1024, value_dim=8192, ffn_hidden_dim=11264,
                     chunk_size=2048, norm_num_groups=64),
    "mega7.3B": dict(num_layers=32, model_dim=4096, num_heads=4, z_dim=1024, value_dim=8192, ffn_hidden_dim=8192,
                     chunk_size=2048, norm_num_groups=64, swiglu=True),
    # The paper's Megalodon-7B (paper §4.1): mega7.3B with 4096-token chunks and RoPE base 1e5.
    "megalodon_7b": dict(num_layers=32, model_dim=4096, num_heads=4, z_dim=1024, value_dim=8192,
                         ffn_hidden_dim=8192, chunk_size=4096, norm_num_groups=64, swiglu=True, rope_base=1e5),
}
PRESET_NAMES = tuple(_PRESETS)


def preset(name: str, **overrides: Any) -> MegalodonConfig:
  """A named preset (`PRESET_NAMES`) with vocab_size 32000 (Llama-2 tokenizer) unless overridden."""
  if name not in _PRESETS:
    raise ConfigError(f"unknown preset {name!r}; available: {list(PRESET_NAMES)}")
  kwargs = dict(vocab_size=_LLAMA2_VOCAB, **_PRESETS[name])
  kwargs.update(overrides)
  return MegalodonConfig(**kwargs)


def rope_inv_freq(config: MegalodonConfig):
  """The official `rope.freqs` buffer, 1 / base^(2i/dz) for i < dz/2, as float32 NumPy (dz/2,).

  Mirrors the official construction bit for bit: the powers in float64, rounded to float32, then inverted.
  """
  import numpy as np
  dz, base = config.z_head_dim, config.effective_rope_base
  powers = np.array([base ** (j / dz) for j in range(0, dz, 2)], dtype=np.float64).astype(np.float32)
  return (np.float32(1.0) / powers).astype(np.float32)
