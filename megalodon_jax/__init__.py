"""megalodon-jax: Megalodon (Ma et al. 2024) in JAX/Flax NNX, exact to the official PyTorch model."""

from megalodon_jax.config import ConfigError, MegalodonConfig, PRESET_NAMES, preset
from megalodon_jax.model import Cache, MegalodonLM

__all__ = ["ConfigError", "MegalodonConfig", "PRESET_NAMES", "preset", "Cache", "MegalodonLM"]
