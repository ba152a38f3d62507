"""Deviceless compilation for NVIDIA GPUs (megalodon_jax/aot/gpu.py) on a CPU-only machine.

The compile tests need the jax CUDA plugin, which CI does not install (requirements.txt only): they skip with the
reason `gpu.cuda_available()` gives. Run them in the CUDA venv:
  .venv-cuda/bin/python -m pytest -q tests/test_aot_gpu.py
They compile in a subprocess, because the environment gpu.prepare_environment() sets must be in place before jax
discovers its plugins, and this pytest process (conftest.py, other tests) may already have started jax's CPU backend.
What compiles is checked with the compiler (Triton kernels present as kernels, memory_analysis filled), not run.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from megalodon_jax.aot import gpu

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CUDA_OK, CUDA_WHY = gpu.cuda_available()
needs_cuda = pytest.mark.skipif(not CUDA_OK, reason=CUDA_WHY)

# Compiles each case for abstract H100s and prints one JSON line {case: {"ok", "triton", "temp", "error"}}.
# "triton": names of the Pallas kernels that became Triton custom calls (interpret mode would leave none).
_SCRIPT = r"""
import json, sys
from megalodon_jax.aot import gpu
gpu.prepare_environment()
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from pallas_kernels import platform
from pallas_kernels.cema import cema_scan
from pallas_kernels.chunked_attention import chunked_attention, chunked_attention_decode

one = gpu.gpu_devices("h100", 1)
rep = NamedSharding(Mesh(np.array(one), ("x",)), P())
S = lambda shape, dtype=jnp.bfloat16: jax.ShapeDtypeStruct(shape, dtype, sharding=rep)
H, DZ, DV, C, L = 4, 256, 2048, 4096, 8192  # megalodon_7b heads, bfloat16
D, N = 4096, 16
qkv = (S((1, L, H, DZ)), S((1, L, H, DZ)), S((1, L, H, DV)))
coef = S((D, N), jnp.float32)
cema_args = (S((1, L, D)), coef, coef, coef, coef, coef, S((D,), jnp.float32))
attn_loss = lambda q, k, v: jnp.sum(chunked_attention(q, k, v, C).astype(jnp.float32))
cases = {
    "attention_fwd": (lambda q, k, v: chunked_attention(q, k, v, C), qkv),
    "attention_fwd_bwd": (jax.grad(attn_loss, argnums=(0, 1, 2)), qkv),
    "attention_decode": (lambda q, kf, vf, t: chunked_attention_decode(q, kf, vf, t, C),
                         (S((1, 1, H, DZ)), S((1, C, H, DZ)), S((1, C, H, DV)), S((), jnp.int32))),
    # Document ids (data.document_boundaries="reset"): the masks inside the same kernels.
    "attention_segments_fwd_bwd": (jax.grad(lambda q, k, v, ids: jnp.sum(chunked_attention(
        q, k, v, C, segment_ids=ids).astype(jnp.float32)), argnums=(0, 1, 2)), qkv + (S((1, L), jnp.int32),)),
    "attention_segments_decode": (
        lambda q, kf, vf, t, qi, ki: chunked_attention_decode(q, kf, vf, t, C, q_segment_ids=qi, kv_segment_ids=ki),
        (S((1, 1, H, DZ)), S((1, C, H, DZ)), S((1, C, H, DV)), S((), jnp.int32), S((1, 1), jnp.int32),
         S((1, C), jnp.int32))),
    "cema_fwd": (lambda *a: cema_scan(*a), cema_args),
    "cema_fwd_bwd": (jax.grad(lambda *a: jnp.sum(cema_scan(*a)[0]), argnums=tuple(range(7))), cema_args),
}
eight = gpu.gpu_devices("h100", 8)
mesh = Mesh(np.array(eight), ("data",))
x = jax.ShapeDtypeStruct((64, 1024), jnp.bfloat16, sharding=NamedSharding(mesh, P("data")))
w = jax.ShapeDtypeStruct((1024, 1024), jnp.bfloat16, sharding=NamedSharding(mesh, P()))
cases["mesh8_jnp"] = (lambda x, w: jnp.mean(jnp.tanh(x @ w).astype(jnp.float32) ** 2), (x, w))

out = {}
for name, (fn, args) in cases.items():
  try:
    with platform.target_platform("gpu"):
      lowered = jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",))
    compiled = lowered.compile()
    text = compiled.as_text()
    kernels = sorted({k for line in text.splitlines() if "xla.gpu.triton" in line
                      for k in ("chunked_attention_fwd", "chunked_attention_dq", "chunked_attention_dkv",
                                "cema_scan_fwd", "cema_scan_bwd") if k in line})
    mem = compiled.memory_analysis()
    out[name] = {"ok": True, "triton": kernels, "argument": int(mem.argument_size_in_bytes),
                 "temp": int(mem.temp_size_in_bytes), "kind": one[0].device_kind}
  except Exception as e:
    out[name] = {"ok": False, "error": f"{type(e).__name__}: {str(e)[:500]}"}
print(json.dumps(out))
"""


def _run(code: str, env_extra: dict, timeout: int = 900) -> subprocess.CompletedProcess:
  env = {k: v for k, v in os.environ.items() if k not in ("JAX_SKIP_CUDA_CONSTRAINTS_CHECK", "CUDA_VISIBLE_DEVICES",
                                                          "JAX_PLATFORMS", "XLA_FLAGS")}
  env.update(env_extra)
  env["PYTHONPATH"] = REPO_ROOT + os.pathsep + env.get("PYTHONPATH", "")
  return subprocess.run([sys.executable, "-c", code], env=env, cwd=REPO_ROOT, capture_output=True, text=True,
                        timeout=timeout, check=False)


@pytest.fixture(scope="module")
def compiled_cases():
  # No environment variables given: prepare_environment() inside the child sets them, as a user script would.
  proc = _run(_SCRIPT, {})
  assert proc.returncode == 0, proc.stderr[-4000:]
  return json.loads(proc.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------------------------- no plugin needed

def test_topology_names():
  assert gpu.topology_name(1) == "1x1x1"
  assert gpu.topology_name(8) == "1x1x8"
  assert gpu.topology_name(16) == "2x1x8"
  assert gpu.topology_name(12, gpus_per_host=4) == "3x1x4"
  with pytest.raises(ValueError):
    gpu.topology_name(12)
  with pytest.raises(ValueError):
    gpu.topology_name(0)


def test_gpu_kinds_match_their_target_configs():
  for name, spec in gpu.GPU_KINDS.items():
    assert gpu.gpu_kind(name.upper()) is spec
    text = gpu.target_config(name)
    assert f"device_memory_size: {spec.hbm_bytes}\n" in text
    assert f'device_description_str: "{spec.device_kind}"' in text
    major, minor = spec.compute_capability
    assert f"major: {major}\n    minor: {minor}\n" in text
    assert 'platform_name: "CUDA"' in text
    assert 79 * 2**30 < spec.hbm_bytes < 80 * 2**30  # an "80 GB" part as CUDA reports it
  assert gpu.GPU_KINDS["h100"].compute_capability == (9, 0) and gpu.GPU_KINDS["a100"].compute_capability == (8, 0)
  with pytest.raises(ValueError):
    gpu.gpu_kind("v100")


def test_cuda_available_gives_a_reason():
  ok, why = gpu.cuda_available()
  assert isinstance(ok, bool) and why
  if not ok:
    assert "requirements-cuda.txt" in why


# ---------------------------------------------------------------------------------------------- with the plugin

@needs_cuda
@pytest.mark.parametrize("case, kernels", [
    ("attention_fwd", ["chunked_attention_fwd"]),
    ("attention_fwd_bwd", ["chunked_attention_dkv", "chunked_attention_dq", "chunked_attention_fwd"]),
    ("attention_decode", ["chunked_attention_fwd"]),
    ("attention_segments_fwd_bwd", ["chunked_attention_dkv", "chunked_attention_dq", "chunked_attention_fwd"]),
    ("attention_segments_decode", ["chunked_attention_fwd"]),
    ("cema_fwd", ["cema_scan_fwd"]),
    # The gradient needs none of the forward kernel's outputs (its residuals are the inputs): XLA drops it.
    ("cema_fwd_bwd", ["cema_scan_bwd"]),
])
def test_triton_kernels_compile_for_h100(compiled_cases, case, kernels):
  """The 7B head shape (H=4, dz=256, dv=2048, chunk 4096, L=8192, bf16) and CEMA (D=4096, N=16) compile natively."""
  result = compiled_cases[case]
  assert result["ok"], result.get("error")
  assert result["kind"] == gpu.GPU_KINDS["h100"].device_kind
  assert result["triton"] == kernels  # Triton kernels, not the interpreter's HLO loops


@needs_cuda
def test_jnp_program_compiles_on_eight_gpus(compiled_cases):
  result = compiled_cases["mesh8_jnp"]
  assert result["ok"], result.get("error")
  # x (64, 1024) bf16 split over 8 GPUs plus the replicated w (1024, 1024) bf16, per GPU.
  assert result["argument"] == 64 * 1024 * 2 // 8 + 1024 * 1024 * 2


@needs_cuda
def test_devices_for_several_hosts():
  code = ("from megalodon_jax.aot import gpu\ngpu.prepare_environment()\n"
          "d = gpu.gpu_devices('a100', 16)\n"
          "assert gpu.gpu_devices('a100', 16)[3] is d[3]\n"
          "print(len(d), d[0].device_kind, sorted({x.process_index for x in d}), d[0].platform)")
  proc = _run(code, {})
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert proc.stdout.split("\n")[-2] == "16 NVIDIA A100-SXM4-80GB [0, 1] gpu"


@needs_cuda
def test_prepare_environment_after_jax_started_is_an_error():
  """Without the variables jax's plugin check fails on a driverless machine and the CUDA plugin never registers:
  prepare_environment() must say so instead of letting get_topology_desc fail obscurely later."""
  code = ("import jax\njax.devices()\nfrom megalodon_jax.aot import gpu\n"
          "try:\n  gpu.prepare_environment()\nexcept RuntimeError as e:\n  print('too late:', e)\n"
          "else:\n  print('registered')")
  proc = _run(code, {})
  assert proc.returncode == 0, proc.stderr[-3000:]
  last = proc.stdout.strip().splitlines()[-1]
  # On a machine with a working GPU driver the plugin registers anyway, and that is fine too.
  assert last.startswith("too late: jax already initialised") or last == "registered"


@needs_cuda
def test_planner_cli_compiles_the_train_step_for_h100_8():
  """`python -m megalodon_jax.aot --topology h100-8`: the tiny config's train step and decode step compile for 8
  abstract H100s, each GPU holding its own sequence (fsdp 8), and fit."""
  cmd = [sys.executable, "-m", "megalodon_jax.aot", "--config", "configs/tiny.py", "--topology", "h100-8",
         "--programs", "train_step,decode", "--json"]
  env = {k: v for k, v in os.environ.items() if k not in ("JAX_PLATFORMS", "XLA_FLAGS")}
  env["PYTHONPATH"] = REPO_ROOT
  proc = subprocess.run(cmd, env=env, cwd=REPO_ROOT, capture_output=True, text=True, timeout=900, check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  reports = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
  assert [r["program"] for r in reports] == ["train_step", "decode"]
  for r in reports:
    assert r["compiled"] and r["fits"] and r["chips"] == 8 and r["mesh"]["fsdp"] == 8
    assert 70 < r["hbm_gib"] < 80 and r["peak_gib"] > 0
