"""megalodon-jax: Megalodon (Ma et al. 2024) in JAX/Flax NNX, exact to the official PyTorch model.

The top-level names are imported lazily (PEP 562), so `import megalodon_jax.pytorch` (the pure-PyTorch model)
does not import jax.
"""

import importlib

__version__ = "0.1.0"  # pyproject.toml's project.version (tests/test_packaging.py keeps them equal)

# name -> module that defines it
_EXPORTS = {
    "MegalodonError": "megalodon_jax.errors",
    "ConfigError": "megalodon_jax.errors",
    "MegalodonConfig": "megalodon_jax.config",
    "PRESET_NAMES": "megalodon_jax.config",
    "preset": "megalodon_jax.config",
    "Cache": "megalodon_jax.model",
    "MegalodonLM": "megalodon_jax.model",
}

__all__ = list(_EXPORTS)


def __getattr__(name):
  module = _EXPORTS.get(name)
  if module is None:
    raise AttributeError(f"module 'megalodon_jax' has no attribute {name!r}")
  value = getattr(importlib.import_module(module), name)
  globals()[name] = value  # later lookups skip __getattr__
  return value


def __dir__():
  return sorted(set(globals()) | set(__all__))
