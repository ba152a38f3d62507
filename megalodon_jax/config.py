"""MegalodonConfig: the official `ModelConf` fields plus our execution settings.

The official fields, their defaults and their validation live in `megalodon_jax.architecture.Architecture`
(shared with the pure-PyTorch runtime), so `MegalodonConfig(**official_conf_kwargs)` builds the same
architecture. Execution fields (dtypes, matmul precision, which CEMA / attention implementation,
rematerialisation) are ours and never change the math beyond float rounding.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, Mapping

from megalodon_jax.architecture import OFFICIAL_FIELDS, Architecture, fail
from megalodon_jax.errors import ConfigError
from megalodon_jax.ops.impl_names import ATTENTION_IMPLEMENTATIONS, CEMA_IMPLEMENTATIONS, pallas_dropout_problem
from megalodon_jax.typed_config import check_family, section_model_config

# remat (besides "none" and "auto") -> the jax.checkpoint_policies entry a rematerialised block saves by (model.py)
REMAT_POLICIES = {"full": "nothing_saveable", "dots_saveable": "dots_with_no_batch_dims_saveable"}
DTYPES = ("float32", "bfloat16", "float16")
# "default" leaves jax's own setting (`jax_default_matmul_precision`, the backend default unless set); "high" and
# "highest" are jax's precisions: on TPU "default" multiplies float32 operands in one bfloat16 pass, "high" in
# three, "highest" in full float32 (what float32 parity with the official model needs).
MATMUL_PRECISIONS = ("default", "high", "highest")
# The execution settings every model family has, and the values they take.
SHARED_EXECUTION_CHOICES = (("dtype", DTYPES), ("param_dtype", DTYPES), ("matmul_precision", MATMUL_PRECISIONS),
                            ("remat", ("auto", "none", *REMAT_POLICIES)))


def check_choices(config, choices) -> None:
  """Each (field, allowed values) of `choices`: the config's value is one of them (FieldError naming the field)."""
  for name, allowed in choices:
    if getattr(config, name) not in allowed:
      fail(config, name, getattr(config, name), f"must be one of {allowed}")


@dataclasses.dataclass(frozen=True)
class MegalodonConfig(Architecture):
  """Architecture (official `ModelConf` names and defaults, see `Architecture`) and execution settings of a
  Megalodon LM. `vocab_size` must be set (the official -1 is rejected: a model needs its size).

  Dimension letters are listed in `megalodon_jax.architecture`.
  """

  # ---- execution settings (ours) ----
  dtype: str = "float32"  # activations / matmuls; CEMA, norms, softmax and logits always run in float32
  param_dtype: str = "float32"  # parameter storage
  cema_impl: str = "auto"  # auto | one of ops/impl_names.CEMA_IMPLEMENTATIONS (all compute the same)
  attention_impl: str = "auto"  # auto | one of ops/impl_names.ATTENTION_IMPLEMENTATIONS
  remat: str = "auto"  # auto (from layerwise_ckpt) | none | one of REMAT_POLICIES
  scan_layers: bool = False  # full forward as one lax.scan over stacked blocks: compile time flat in depth
  matmul_precision: str = "default"  # default | high | highest: precision of every matmul / einsum the model runs

  def __post_init__(self):
    super().__post_init__()
    _validate_execution(self)

  @property
  def remat_policy(self) -> str:
    if self.remat != "auto":
      return self.remat
    return "full" if self.layerwise_ckpt else "none"

  def replace(self, **changes: Any) -> "MegalodonConfig":
    return dataclasses.replace(self, **changes)

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

  @classmethod
  def execution_fields(cls) -> tuple[str, ...]:
    """The execution settings (saved beside a checkpoint's architecture, overridable when loading it)."""
    return EXECUTION_FIELDS

  @classmethod
  def from_checkpoint(cls, model: Mapping[str, Any], execution: Mapping[str, Any]) -> "MegalodonConfig":
    """The config a checkpoint records: `model` = official ModelConf kwargs; the execution settings among
    `execution` (other keys, e.g. a training section's, are skipped)."""
    return MegalodonConfig.from_official(model, **{k: v for k, v in execution.items() if k in EXECUTION_FIELDS})


@dataclasses.dataclass(frozen=True)
class MegalodonSection(MegalodonConfig):
  """The `model` section of a training config: a MegalodonConfig whose vocab_size may be -1, the tokenizer's, and
  the family's name."""

  _VOCAB_MAY_BE_UNSET: ClassVar[bool] = True
  family: str = "megalodon"  # the model family (megalodon_jax/families.py); picks this section's class

  def __post_init__(self):
    super().__post_init__()
    check_family(self)

  def with_vocab(self, tokenizer_vocab_size: int) -> MegalodonConfig:
    """The model's config: vocab_size -1 becomes the tokenizer's size; a set one must hold every token id."""
    return section_model_config(self, MegalodonConfig, tokenizer_vocab_size)


# Names of our execution fields, in order (saved beside converted checkpoints, overridable when loading one).
EXECUTION_FIELDS = tuple(f.name for f in dataclasses.fields(MegalodonConfig) if f.name not in OFFICIAL_FIELDS)


def _validate_execution(c: MegalodonConfig) -> None:
  check_choices(c, (*SHARED_EXECUTION_CHOICES, ("cema_impl", ("auto", *CEMA_IMPLEMENTATIONS)),
                    ("attention_impl", ("auto", *ATTENTION_IMPLEMENTATIONS))))
  if c.attention_impl == "pallas" and (why := pallas_dropout_problem(c.attention_dropout, bool(c.efficient_attn))):
    fail(c, "attention_impl", c.attention_impl, why)
  if not isinstance(c.scan_layers, bool):
    fail(c, "scan_layers", c.scan_layers, "must be a bool (true or false)")


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
