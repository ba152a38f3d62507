"""Test settings: 8 simulated CPU devices (mesh tests) and a persistent compilation cache.

No global matmul precision is set: the parity tests build their models with `matmul_precision="highest"`, as a
float32 user on TPU must (README), and tests that call ops directly use a local `jax.default_matmul_precision`.
"""

import gc
import os
import warnings

import jax
import pytest

from megalodon_jax import platforms

# The suite is dominated by XLA:CPU compiles of tiny programs: LLVM at -O0 halves them (a cache-path test: 62 ->
# 31 s). XLA's own HLO passes are unchanged and there is no fast-math either way; only the vectorisation of loops
# (rounding order within a reduction) differs. Subprocesses inherit it. Set here, before the backend starts.
if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0").strip()

# Before any backend starts: single-device code still runs on device 0, sharding tests get 8 devices in-process.
platforms.skip_absent_tpu()  # no libtpu warnings in the test logs (the command lines do the same)
jax.config.update("jax_num_cpu_devices", 8)
jax.config.update("jax_compilation_cache_dir",
                  os.environ.get("MEGALODON_JAX_CACHE", os.path.expanduser("~/.cache/megalodon-jax/xla")))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


def _memory_map_count() -> int:
  try:
    with open("/proc/self/maps") as f:
      return sum(1 for _ in f)
  except OSError:  # not Linux
    return 0


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs():
  """Drop every compiled program after each test module.

  Each XLA:CPU executable keeps several memory mappings alive, and the jit caches keep the executables. Over the
  whole suite one process reached Linux's default limit of 65530 mappings (`vm.max_map_count`) and XLA segfaulted
  inside a compile (in CI). Clearing the caches per module keeps the count near a module's own need (at most about
  18,000 today); the persistent compilation cache makes the recompiles cheap.
  """
  yield
  jax.clear_caches()
  gc.collect()
  count = _memory_map_count()
  if count > 40_000:
    warnings.warn(f"{count} memory mappings after clearing the jit caches: compiled programs are being leaked "
                  "(Linux stops at 65530)")
