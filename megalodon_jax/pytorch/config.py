"""ModelConf: the official Megalodon `ModelConf` fields and defaults, validated with clear errors.

The fields, defaults and validation are `megalodon_jax.architecture.Architecture`'s (shared with the JAX config),
so a `params.json` (or the `model` section of an official training config) builds the same architecture with
`ModelConf.from_dict`. Unlike the JAX config, `vocab_size=-1` is accepted here: `load()` takes the size from the
checkpoint's `embed.weight`. Nothing here imports jax.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

from megalodon_jax.architecture import OFFICIAL_FIELDS, Architecture
from megalodon_jax.errors import ConfigError

FIELDS = OFFICIAL_FIELDS


@dataclasses.dataclass(frozen=True)
class ModelConf(Architecture):
  """Architecture of an official Megalodon `Mega` model (official names and defaults, see `Architecture`).

  Dimension letters used across `megalodon_jax.pytorch` are those of `megalodon_jax.architecture`, plus
  V_out = output size of the LM head.
  """

  _VOCAB_MAY_BE_UNSET = True  # the official "set later"; `require_vocab` checks it before a model is built

  def to_dict(self) -> dict[str, Any]:
    """The official `ModelConf(**kwargs)` arguments (what `params.json` holds)."""
    return self.official_kwargs()

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


def require_vocab(c: ModelConf) -> None:
  """Raises ConfigError unless the vocabulary size is set (building a model needs it)."""
  if c.vocab_size == -1:
    raise ConfigError("ModelConf.vocab_size=-1: the vocabulary size is unset; set vocab_size (the tokenizer's size) "
                      "or load a checkpoint, whose embed.weight gives it")
