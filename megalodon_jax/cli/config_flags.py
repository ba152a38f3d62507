"""Training configs on a command line: `--config tiny` (a shipped config by name) or `--config path/to/file.py`, and
`--config.<key>=<value>` overrides of its ml_collections fields, with one-line errors.

Used by train (`cli/train.py`) and the AOT planner (`cli/aot.py`). An override's key is a field path
(`--config.optimizer.lr=1e-3`, `--config.model.num_layers 4`); its value is parsed by the field's current type: int,
float, str as given, bool (`true`/`false`/`1`/`0`, or a bare `--config.tensorboard` for true and
`--config.notensorboard` for false), tuple/list as a Python literal (`"('a', 'b')"`), and for a field that is None by
default a Python literal or else a string. `None` sets a non-string field to None. Anything wrong (unknown config name,
unloadable file, unknown key, unparsable value) raises `ConfigError` with one line that names the fix:

    unknown config key --config.optimizer.lrr (did you mean --config.optimizer.lr?); every field is in configs/default.py

No jax import.
"""

from __future__ import annotations

import ast
import importlib.util
import os
from typing import Any, Optional, Sequence

import ml_collections
from ml_collections.config_flags import config_path

from megalodon_jax.errors import ConfigError, did_you_mean
from megalodon_jax.typed_config import PREFIX, unknown_key

_TRUE, _FALSE = ("true", "1", "yes", "on"), ("false", "0", "no", "off")


# The shipped configs (the package megalodon_jax.configs), in a checkout and in an installed wheel alike.
SHIPPED_CONFIGS_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")


def shipped_config_names() -> list[str]:
  """Names `--config` accepts without a path: default, tiny, enwik8, ... (files of `configs/` not starting with _)."""
  return sorted(f[:-3] for f in os.listdir(SHIPPED_CONFIGS_DIR) if f.endswith(".py") and not f.startswith("_"))


def resolve_config_path(spec: str) -> str:
  """The config file `--config spec` names: an existing file, or a shipped config's name (`tiny` or `tiny.py`)."""
  if os.path.isfile(spec):
    return spec
  names = shipped_config_names()
  name = spec[:-3] if spec.endswith(".py") else spec
  if os.sep not in spec and "/" not in spec and name in names:
    return os.path.join(SHIPPED_CONFIGS_DIR, name + ".py")
  if os.sep in spec or "/" in spec or spec.endswith(".py"):
    raise ConfigError(f"--config {spec}: no such file (shipped configs by name: {', '.join(names)})")
  raise ConfigError(f"--config {spec}: unknown config{did_you_mean(name, names)}; give a shipped config's name "
                    f"({', '.join(names)}) or a path to a config .py file")


def load_config(spec: str) -> tuple[ml_collections.ConfigDict, str]:
  """(the config `--config spec` names, locked: new keys are errors; the file it came from)."""
  path = resolve_config_path(spec)
  stem = os.path.splitext(os.path.basename(path))[0]
  try:
    module_spec = importlib.util.spec_from_file_location(f"megalodon_config_{stem}", path)
    if module_spec is None or module_spec.loader is None:
      raise ImportError("not a Python source file")
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    if not callable(getattr(module, "get_config", None)):
      raise AttributeError("it defines no get_config()")
    cfg = module.get_config()
  except Exception as e:  # pylint: disable=broad-except  (any failure of the user's file is bad input)
    raise ConfigError(f"--config {spec}: cannot load {path} ({type(e).__name__}: {e})") from e
  if not isinstance(cfg, ml_collections.ConfigDict):
    raise ConfigError(f"--config {spec}: get_config() of {path} returned {type(cfg).__name__}, not a ConfigDict")
  cfg.lock()
  return cfg, path


def split_overrides(argv: Sequence[str]) -> tuple[list[str], list[tuple[str, Optional[str]]]]:
  """(the other arguments, [(key, value or None for a bare flag)]) of argv's `--config.<key>[=<value>]` items.

  `--config.key value` takes the next argument as its value unless that starts with `--` (then the flag is bare,
  which only a bool field accepts).
  """
  rest: list[str] = []
  overrides: list[tuple[str, Optional[str]]] = []
  i = 0
  while i < len(argv):
    arg = argv[i]
    i += 1
    if not arg.startswith(PREFIX):
      rest.append(arg)
      continue
    key, eq, value = arg[len(PREFIX):].partition("=")
    if not eq:
      value = None
      if i < len(argv) and not argv[i].startswith("--"):
        value, i = argv[i], i + 1
    overrides.append((key, value))
  return rest, overrides


def config_keys(cfg: ml_collections.ConfigDict, prefix: str = "") -> list[str]:
  """Every field path of `cfg`, groups included: ["model", "model.num_layers", ...]."""
  keys = []
  for k, v in cfg.items():
    keys.append(prefix + k)
    if isinstance(v, ml_collections.ConfigDict):
      keys += config_keys(v, prefix + k + ".")
  return keys


def apply_overrides(cfg: ml_collections.ConfigDict, overrides: Sequence[tuple[str, Optional[str]]]) -> dict[str, Any]:
  """Sets each `(key, value)` of `split_overrides` on `cfg` (in order; a later one wins); returns {key: value set}."""
  keys = set(config_keys(cfg))
  done: dict[str, Any] = {}
  for key, text in overrides:
    if key not in keys and text is None and key.rpartition(".")[2].startswith("no"):
      head, dot, leaf = key.rpartition(".")
      negated = head + dot + leaf[2:]
      if negated in keys and isinstance(config_path.get_value(negated, cfg), bool):
        key, text = negated, "false"
    if key not in keys:
      raise unknown_key("", key, keys)
    value = parse_value(key, config_path.get_value(key, cfg), text)
    try:
      config_path.set_value(key, cfg, value)
    except (TypeError, ValueError, AttributeError, KeyError) as e:
      raise ConfigError(f"{PREFIX}{key}={text}: cannot set it ({type(e).__name__}: {e})") from None
    done[key] = value
  return done


def parse_value(key: str, current: Any, text: Optional[str]) -> Any:
  """The value `--config.<key>=<text>` sets, parsed by the type of the field's `current` value."""
  flag = f"{PREFIX}{key}"
  if isinstance(current, ml_collections.ConfigDict):
    raise ConfigError(f"{flag} is a group of settings: set its fields, e.g. {flag}.{next(iter(current.keys()), 'x')}"
                      f"=<value>")
  if text is None:
    if isinstance(current, bool) or current is None:
      return True
    raise ConfigError(f"{flag} needs a value: {flag}=<value> (now {current!r})")
  if isinstance(current, bool):
    if text.lower() in _TRUE + _FALSE:
      return text.lower() in _TRUE
    raise ConfigError(f"{flag}={text}: expected true or false")
  if text == "None" and not isinstance(current, str):
    return None
  if isinstance(current, str):
    return text
  for kind, expected in ((int, "an integer"), (float, "a number")):
    if isinstance(current, kind):
      try:
        return kind(text)
      except ValueError:
        raise ConfigError(f"{flag}={text}: expected {expected} (now {current!r})") from None
  literal = _literal(text)
  if isinstance(current, (tuple, list)):
    if literal is _NOT_LITERAL:
      raise ConfigError(f"{flag}={text}: expected a Python tuple literal like \"('a', 'b')\" (now {current!r})")
    return type(current)(literal if isinstance(literal, (tuple, list)) else (literal,))
  return text if literal is _NOT_LITERAL else literal  # a None-valued (or untyped) field: a plain word is a string


_NOT_LITERAL = object()


def _literal(text: str) -> Any:
  if text in ("true", "false"):
    return text == "true"
  try:
    return ast.literal_eval(text)
  except (SyntaxError, ValueError, TypeError, MemoryError, RecursionError):
    return _NOT_LITERAL
