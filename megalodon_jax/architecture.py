"""The official `ModelConf` fields, their defaults and their validation, shared by both runtimes.

`Architecture` holds the 24 fields of the official `megalodon/config.py` `ModelConf`, under the same names and
with the same defaults, and validates them on construction. The JAX config (`megalodon_jax.config.MegalodonConfig`)
adds our execution settings to it; the pure-PyTorch runtime (`megalodon_jax.pytorch.ModelConf`) uses it as is.
Nothing here imports jax.

Dimension letters used in docstrings across the package: B batch, L length, D = model_dim, H = num_heads,
Z = z_dim (dz = Z/H), E = value_dim (dv = E/H), N = cema_ndim, G = norm_num_groups, C = chunk_size,
F = ffn_hidden_dim, V = vocab_size.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, ClassVar, Optional

from megalodon_jax.errors import FieldError

INIT_MODES = ("he", "bert", "gaussian", "xavier", "none")
EFFICIENT_ATTN = (None, "swift", "fused")
DEFAULT_ROPE_BASE = 10000.0


@dataclasses.dataclass(frozen=True)
class Architecture:
  """The official `ModelConf` fields (same names, same defaults, same order), validated on construction.

  Errors name the field as `<ClassName>.<field>=<value>` and say how to fix it. Subclasses set
  `_VOCAB_MAY_BE_UNSET` to accept the official `vocab_size=-1` ("set later"), which a model cannot be built from.
  """

  _VOCAB_MAY_BE_UNSET: ClassVar[bool] = False

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
  vocab_size: int = -1  # the official default -1 means "set later from the tokenizer"
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
  layerwise_ckpt: bool = False  # remat every block (the JAX config maps it onto remat="full")

  def __post_init__(self):
    validate_architecture(self)

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

  def official_kwargs(self) -> dict[str, Any]:
    """The official `ModelConf(**kwargs)` arguments for this architecture (what `params.json` holds)."""
    return {name: getattr(self, name) for name in OFFICIAL_FIELDS}

  def num_params(self) -> int:
    """Exact trainable parameter count of the official model (docs/export.md#parameter-count); buffers are not
    counted."""
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


# Names of the official `ModelConf` fields, in its order.
OFFICIAL_FIELDS = tuple(f.name for f in dataclasses.fields(Architecture))

_SIZES = ("num_layers", "model_dim", "z_dim", "value_dim", "num_heads", "ffn_hidden_dim", "cema_ndim", "chunk_size",
          "norm_num_groups")
_FLAGS = ("norm_affine", "swiglu", "rescale_nffn", "scale_emb", "share_emb", "layerwise_ckpt")


def fail(config: Any, field: str, value: Any, why: str) -> None:
  """Raises FieldError("<ClassName>.<field>=<value>: <why>")."""
  raise FieldError(type(config).__name__, field, value, why)


def is_int(v: Any) -> bool:
  """An integer that is not a bool (True would otherwise pass as 1)."""
  return isinstance(v, int) and not isinstance(v, bool)


def is_number(v: Any) -> bool:
  """An int or float that is not a bool."""
  return isinstance(v, (int, float)) and not isinstance(v, bool)


def validate_architecture(c: Architecture) -> None:
  """Checks the official fields of `c`; raises ConfigError naming the first bad field, its value and the fix."""
  for name in _SIZES:
    v = getattr(c, name)
    if not is_int(v) or v <= 0:
      fail(c, name, v, "must be a positive integer")
  if c._VOCAB_MAY_BE_UNSET:
    if not is_int(c.vocab_size) or (c.vocab_size <= 0 and c.vocab_size != -1):
      fail(c, "vocab_size", c.vocab_size, "must be a positive integer, or -1 (unset: taken from the checkpoint's "
           "embed.weight by load())")
  elif not is_int(c.vocab_size) or c.vocab_size <= 0:
    fail(c, "vocab_size", c.vocab_size, "must be a positive integer (the official -1 means 'set from the "
         "tokenizer'; pass vocab_size=<tokenizer size>)")
  if not is_int(c.output_size) or (c.output_size <= 0 and c.output_size != -1):
    fail(c, "output_size", c.output_size, "must be -1 (same as vocab_size) or a positive integer")
  for name, width in (("z_dim", c.z_dim), ("value_dim", c.value_dim)):
    if width % c.num_heads:
      fail(c, name, width, f"is not divisible by num_heads={c.num_heads}; choose {name} as a multiple of num_heads")
  if c.z_head_dim % 2:
    fail(c, "z_dim", c.z_dim, f"gives an odd per-head width z_dim/num_heads={c.z_head_dim}; RoPE rotates feature "
         "pairs, so it must be even")
  if c.model_dim % c.norm_num_groups:
    fail(c, "norm_num_groups", c.norm_num_groups,
         f"does not divide model_dim={c.model_dim}; TimestepNorm groups are contiguous slices of equal size")
  if c.model_dim // c.norm_num_groups < 2:
    fail(c, "norm_num_groups", c.norm_num_groups, f"gives groups of one feature (model_dim={c.model_dim}); the "
         "first step's variance would be 0. Use fewer groups")
  for name in ("dropout", "hidden_dropout", "attention_dropout"):
    v = getattr(c, name)
    if not is_number(v) or not 0.0 <= v < 1.0:
      fail(c, name, v, "must be a probability in [0, 1)")
  if not is_number(c.norm_eps) or not c.norm_eps > 0:
    fail(c, "norm_eps", c.norm_eps, "must be a number > 0")
  if c.rope_base is not None and not (is_number(c.rope_base) and c.rope_base > 1 and math.isfinite(c.rope_base)):
    fail(c, "rope_base", c.rope_base, "must be None (meaning 10000) or a finite number > 1")
  if c.efficient_attn not in EFFICIENT_ATTN:
    fail(c, "efficient_attn", c.efficient_attn, f"must be one of {list(EFFICIENT_ATTN)}")
  if c.init_mode not in INIT_MODES:
    fail(c, "init_mode", c.init_mode, f"must be one of {list(INIT_MODES)}")
  for name in _FLAGS:
    if not isinstance(getattr(c, name), bool):
      fail(c, name, getattr(c, name), "must be a bool (true or false)")
  if c.share_emb and c.output_size not in (-1, c.vocab_size):
    fail(c, "share_emb", c.share_emb, f"ties the head to the embedding, so output_size={c.output_size} must be -1 "
         f"or equal vocab_size={c.vocab_size}")
