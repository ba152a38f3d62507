"""ModelConf: the official Megalodon `ModelConf` fields and defaults, validated with clear errors.

The field names and defaults are those of the official `megalodon/config.py`, so a `params.json` (or the
`model` section of an official training config) builds the same architecture with `ModelConf.from_dict`.
Nothing here imports jax.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping, Optional

DEFAULT_ROPE_BASE = 10000.0
INIT_MODES = ("he", "bert", "gaussian", "xavier", "none")
EFFICIENT_ATTN = (None, "swift", "fused")


class ConfigError(ValueError):
  """A ModelConf field has an invalid value; the message names the field and how to fix it."""


@dataclasses.dataclass(frozen=True)
class ModelConf:
  """Architecture of an official Megalodon `Mega` model (official names and defaults).

  Dimension letters used across `megalodon_jax.pytorch`: B batch, L length, D = model_dim, H = num_heads,
  Z = z_dim (dz = Z/H per head), E = value_dim (dv = E/H), N = cema_ndim, G = norm_num_groups, C = chunk_size,
  F = ffn_hidden_dim, V = vocab_size, V_out = output size of the LM head.
  """

  num_layers: int = 8
  model_dim: int = 1024
  z_dim: int = 256
  value_dim: int = 2048
  num_heads: int = 1
  ffn_hidden_dim: int = 2048
  cema_ndim: int = 16
  chunk_size: int = 2048
  # None: plain attention, post-softmax dropout; "swift"/"fused": the official fused kernel's semantics (DropKey
  # attention dropout). Identical functions when attention_dropout == 0.
  efficient_attn: Optional[str] = None
  init_mode: str = "he"
  vocab_size: int = -1  # official default: "set later from the tokenizer"; a model needs it > 0
  output_size: int = -1  # -1: same as vocab_size
  norm_num_groups: int = 32
  norm_affine: bool = True
  norm_eps: float = 1e-5
  rope_base: Optional[float] = None  # None means 10000
  dropout: float = 0.0
  hidden_dropout: float = 0.0
  attention_dropout: float = 0.0
  swiglu: bool = False
  rescale_nffn: bool = False
  scale_emb: bool = False
  share_emb: bool = False
  layerwise_ckpt: bool = False

  def __post_init__(self):
    _validate(self)

  @property
  def z_head_dim(self) -> int:
    return self.z_dim // self.num_heads

  @property
  def v_head_dim(self) -> int:
    return self.value_dim // self.num_heads

  @property
  def out_size(self) -> int:
    """Output size of the LM head: `output_size`, or `vocab_size` when it is -1."""
    return self.vocab_size if self.output_size == -1 else self.output_size

  @property
  def effective_rope_base(self) -> float:
    return DEFAULT_ROPE_BASE if self.rope_base is None else float(self.rope_base)

  def to_dict(self) -> dict[str, Any]:
    """The official `ModelConf(**kwargs)` arguments (what `params.json` holds)."""
    return dataclasses.asdict(self)

  def replace(self, **changes: Any) -> "ModelConf":
    return dataclasses.replace(self, **changes)

  @classmethod
  def from_dict(cls, conf: Mapping[str, Any] | Any, *, strict: bool = True) -> "ModelConf":
    """Builds a ModelConf from official `ModelConf` kwargs: a mapping, an object with those attributes, or an
    official training config whose `model` entry holds them.

    Args:
      conf: the kwargs; fields not given take the official defaults.
      strict: unknown keys are an error (listing all of them); with False they are ignored.
    Raises:
      ConfigError: unknown keys (strict), wrong types or inconsistent values.
    """
    if isinstance(conf, ModelConf):
      return conf
    if not isinstance(conf, Mapping):
      conf = {k: v for k, v in vars(conf).items() if not k.startswith("_")}
    if "model" in conf and isinstance(conf["model"], Mapping) and not set(conf) & set(FIELDS):
      conf = conf["model"]  # an official trainer config.json: {"model": {...}, "optim": {...}, ...}
    unknown = sorted(set(conf) - set(FIELDS))
    if unknown and strict:
      raise ConfigError(f"unknown ModelConf field(s) {unknown}; known fields: {list(FIELDS)} (pass strict=False to "
                        "ignore them)")
    return cls(**{k: v for k, v in conf.items() if k in FIELDS})


FIELDS = tuple(f.name for f in dataclasses.fields(ModelConf))


def _fail(name: str, value: Any, why: str):
  raise ConfigError(f"ModelConf.{name}={value!r}: {why}")


def _is_int(v: Any) -> bool:
  return isinstance(v, int) and not isinstance(v, bool)


def _validate(c: ModelConf) -> None:
  for name in ("num_layers", "model_dim", "z_dim", "value_dim", "num_heads", "ffn_hidden_dim", "cema_ndim",
               "chunk_size", "norm_num_groups"):
    v = getattr(c, name)
    if not _is_int(v) or v <= 0:
      _fail(name, v, "must be a positive integer")
  if not _is_int(c.vocab_size) or (c.vocab_size <= 0 and c.vocab_size != -1):
    _fail("vocab_size", c.vocab_size, "must be a positive integer, or -1 (unset: taken from the checkpoint's "
          "embed.weight by load())")
  if not _is_int(c.output_size) or (c.output_size <= 0 and c.output_size != -1):
    _fail("output_size", c.output_size, "must be -1 (same as vocab_size) or a positive integer")
  for name, width in (("z_dim", c.z_dim), ("value_dim", c.value_dim)):
    if width % c.num_heads:
      _fail(name, width, f"is not divisible by num_heads={c.num_heads}")
  if c.z_head_dim % 2:
    _fail("z_dim", c.z_dim, f"gives an odd per-head width {c.z_head_dim}; RoPE rotates feature pairs")
  if c.model_dim % c.norm_num_groups:
    _fail("norm_num_groups", c.norm_num_groups, f"does not divide model_dim={c.model_dim} (groups are contiguous "
          "slices of equal size)")
  if c.model_dim // c.norm_num_groups < 2:
    _fail("norm_num_groups", c.norm_num_groups, f"gives one feature per group (model_dim={c.model_dim}): the first "
          "step's variance would be 0; use fewer groups")
  for name in ("dropout", "hidden_dropout", "attention_dropout"):
    v = getattr(c, name)
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.0 <= v < 1.0:
      _fail(name, v, "must be a probability in [0, 1)")
  if isinstance(c.norm_eps, bool) or not isinstance(c.norm_eps, (int, float)) or not c.norm_eps > 0:
    _fail("norm_eps", c.norm_eps, "must be a number > 0")
  if c.rope_base is not None and (isinstance(c.rope_base, bool) or not isinstance(c.rope_base, (int, float))
                                  or not (c.rope_base > 1 and math.isfinite(c.rope_base))):
    _fail("rope_base", c.rope_base, "must be None (meaning 10000) or a finite number > 1")
  if c.efficient_attn not in EFFICIENT_ATTN:
    _fail("efficient_attn", c.efficient_attn, f"must be one of {list(EFFICIENT_ATTN)}")
  if c.init_mode not in INIT_MODES:
    _fail("init_mode", c.init_mode, f"must be one of {list(INIT_MODES)}")
  for name in ("norm_affine", "swiglu", "rescale_nffn", "scale_emb", "share_emb", "layerwise_ckpt"):
    if not isinstance(getattr(c, name), bool):
      _fail(name, getattr(c, name), "must be true or false")
  if c.share_emb and c.output_size not in (-1, c.vocab_size):
    _fail("share_emb", c.share_emb, f"ties the head to the embedding, so output_size={c.output_size} must be -1 "
          f"or equal vocab_size={c.vocab_size}")


def require_vocab(c: ModelConf) -> None:
  """Raises ConfigError unless the vocabulary size is set (building a model needs it)."""
  if c.vocab_size == -1:
    raise ConfigError("ModelConf.vocab_size=-1: the vocabulary size is unset; set vocab_size (the tokenizer's size) "
                      "or load a checkpoint, whose embed.weight gives it")
