"""Test settings: 8 simulated CPU devices (mesh tests), full float32 matmuls (parity tests need them) and a
persistent compilation cache."""

import os

import jax

# Before any backend starts: single-device code still runs on device 0, sharding tests get 8 devices in-process.
jax.config.update("jax_num_cpu_devices", 8)
jax.config.update("jax_default_matmul_precision", "highest")
jax.config.update("jax_compilation_cache_dir",
                  os.environ.get("MEGALODON_JAX_CACHE", os.path.expanduser("~/.cache/megalodon-jax/xla")))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
