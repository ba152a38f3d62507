"""Test settings: 8 simulated CPU devices (mesh tests) and a persistent compilation cache.

No global matmul precision is set: the parity tests build their models with `matmul_precision="highest"`, as a
float32 user on TPU must (README), and tests that call ops directly use a local `jax.default_matmul_precision`.
"""

import os

import jax

# Before any backend starts: single-device code still runs on device 0, sharding tests get 8 devices in-process.
jax.config.update("jax_num_cpu_devices", 8)
jax.config.update("jax_compilation_cache_dir",
                  os.environ.get("MEGALODON_JAX_CACHE", os.path.expanduser("~/.cache/megalodon-jax/xla")))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
