"""Typed configs: frozen dataclasses are the one definition of every config field (name, type, default,
validation), and `ml_collections.ConfigDict` is only their command-line form.

`config_dict(obj)` turns a (nested) config dataclass into the ConfigDict that `configs/*.py` start from and
`--config.<key>=<value>` overrides; `from_mapping(cls, values)` turns it back, field by field: unknown keys are
errors, ints are accepted where a float is typed and lists where a tuple is, and a `FieldError` raised by a
section's own validation is reported under its command-line key (`--config.model.z_dim=30: ...`), which this
module knows because it walked there. No jax import: command lines validate before jax starts.
"""

from __future__ import annotations

import dataclasses
import typing
from typing import Any, Mapping, Optional

from megalodon_jax.errors import ConfigError, FieldError, did_you_mean

PREFIX = "--config."


def config_dict(obj: Any):
  """The ConfigDict of a config dataclass instance (nested dataclasses become nested ConfigDicts)."""
  import ml_collections  # pylint: disable=import-outside-toplevel  (readers of typed configs need no ml_collections)
  out = ml_collections.ConfigDict()
  for f in dataclasses.fields(obj):
    value = getattr(obj, f.name)
    out[f.name] = config_dict(value) if dataclasses.is_dataclass(value) else value
  return out


def unknown_key(section: str, name: str, known) -> ConfigError:
  """The error for `--config.<section><name>`, which is no field, with the closest of `known` (names in the
  section)."""
  hint = did_you_mean(name, known, prefix=PREFIX + section)
  return ConfigError(f"unknown config key {PREFIX}{section}{name}{hint}; every field is in configs/default.py")


def field_error(section: str, e: FieldError) -> ConfigError:
  """`e`, raised by the config class of `section` ("model." or "" for the top level), under its command-line key."""
  return ConfigError(f"{PREFIX}{section}{e.field}={e.value!r}: {e.why}")


def _is_float(hint: Any) -> bool:
  return hint is float or (typing.get_origin(hint) is typing.Union and float in typing.get_args(hint))


def _coerce(hint: Any, value: Any) -> Any:
  """`value` as the field's declared type where the command line or a config file gives a looser one."""
  if _is_float(hint) and isinstance(value, int) and not isinstance(value, bool):
    return float(value)
  if (hint is tuple or typing.get_origin(hint) is tuple) and isinstance(value, list):
    return tuple(tuple(v) if isinstance(v, list) else v for v in value)
  return value


def from_mapping(cls: type, values: Mapping[str, Any], key: str = "", *, classes: Optional[Mapping] = None) -> Any:
  """An instance of config dataclass `cls` from `values` (a ConfigDict's `to_dict()` or a dict); missing fields keep
  their defaults.

  key: the command-line path of this section with its dot ("model."), used in messages.
  classes: {field name: dataclass} choosing the class of a nested section at run time (a model family's config).
  Raises:
    ConfigError: an unknown key (with the closest known one), or an invalid value named `--config.<key>`.
  """
  hints = typing.get_type_hints(cls)
  names = [f.name for f in dataclasses.fields(cls) if f.init]
  kwargs = {}
  for name, value in values.items():
    if name not in names:
      raise unknown_key(key, name, names)
    section = (classes or {}).get(name) or (hints[name] if dataclasses.is_dataclass(hints[name]) else None)
    if section is not None and isinstance(value, Mapping):
      kwargs[name] = from_mapping(section, value, f"{key}{name}.")
    else:
      kwargs[name] = _coerce(hints[name], value)
  try:
    return cls(**kwargs)
  except FieldError as e:
    raise field_error(key, e) from None


def check_family(section: Any) -> None:
  """A model section's `family` must be the one its class belongs to (the default of its `family` field)."""
  default = next(f.default for f in dataclasses.fields(section) if f.name == "family")
  if section.family != default:
    raise FieldError(type(section).__name__, "family", section.family, f"must be {default!r} in this model section")


def section_model_config(section: Any, config_cls: type, tokenizer_vocab_size: int) -> Any:
  """The model config (`config_cls`, from the section's fields it has) of a training config's model section:
  vocab_size -1 becomes the tokenizer's size; a set one must hold every token id (FieldError otherwise)."""
  vocab = tokenizer_vocab_size if section.vocab_size == -1 else section.vocab_size
  if vocab < tokenizer_vocab_size:
    raise FieldError(type(section).__name__, "vocab_size", section.vocab_size, f"is smaller than the tokenizer's "
                     f"vocabulary ({tokenizer_vocab_size}); use -1 to take the tokenizer's size")
  fields = {f.name: getattr(section, f.name) for f in dataclasses.fields(config_cls)}
  return config_cls(**{**fields, "vocab_size": vocab})
