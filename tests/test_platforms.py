"""libtpu stays silent on a machine without a TPU (megalodon_jax/platforms.py), and TPU compiles still work."""

import subprocess
import sys

import pytest

from cli_harness import REPO, env
from megalodon_jax import platforms

_PROBE = "import jax; from megalodon_jax import platforms; print(platforms.skip_absent_tpu()); print(jax.devices())"


def _run(code: str, **extra_env: str) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env(extra_env), capture_output=True, text=True,
                        timeout=120, check=False)


@pytest.mark.skipif(platforms.tpu_attached(), reason="a TPU is attached: its backend must start")
def test_no_libtpu_output_and_the_cpu_backend_without_a_tpu():
  quiet = _run(_PROBE)
  assert quiet.returncode == 0 and quiet.stderr == "", quiet.stderr
  assert quiet.stdout.splitlines() == ["True", "[CpuDevice(id=0)]"]  # the TPU backend was turned off, quietly


def test_a_user_choice_of_platforms_is_left_alone():
  chosen = _run(_PROBE, JAX_PLATFORMS="cpu")
  assert chosen.returncode == 0 and chosen.stdout.splitlines()[0] == "False", chosen.stderr


@pytest.mark.skipif(platforms.tpu_attached(), reason="a TPU is attached")
def test_deviceless_tpu_topologies_still_compile_after_the_guard():
  code = ("import jax, jax.numpy as jnp; from megalodon_jax import platforms; platforms.skip_absent_tpu(); "
          "from megalodon_jax.aot import topology; t = topology.resolve('v5e-4'); print(t.chips, t.device_kind); "
          "print(jax.jit(lambda x: x * 2).trace(jnp.ones(4)).lower(lowering_platforms=('tpu',)).as_text()[:6])")
  result = _run(code)
  assert result.returncode == 0, result.stderr[-2000:]
  assert result.stdout.splitlines()[0] == "4 TPU v5 lite" and result.stderr == "", result.stderr
