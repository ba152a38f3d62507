"""Abstract NVIDIA GPUs (H100, A100) for deviceless compilation on a CPU-only machine.

With the jax CUDA plugin installed (`pip install -r requirements-cuda.txt`, in a separate venv such as .venv-cuda),
`jax.experimental.topologies.get_topology_desc(platform="cuda", target_config=..., topology=...)` returns compile-only
GPU devices described by a `GpuTargetConfig` text proto (gpu_specs/*.txtpb: SM count, shared memory, HBM size, compute
capability, ...). Programs traced with shardings over those devices and lowered with `lowering_platforms=("cuda",)`
compile for real: XLA's GPU pipeline, Triton for Pallas kernels, ptxas from the nvidia wheels. Nothing runs; the
numbers one gets (`compiled.memory_analysis()`) are compiler-reported buffer sizes per GPU, not a measured run.

Order of operations (the environment must be set before jax discovers its plugins):

  from megalodon_jax.aot import gpu
  gpu.prepare_environment()              # before the first jax.devices() / jit / array creation in this process
  devices = gpu.gpu_devices("h100", 8)   # 8 abstract "NVIDIA H100 80GB HBM3"
  mesh = jax.sharding.Mesh(np.array(devices).reshape(...), axis_names)
  with pallas_kernels.platform.target_platform("gpu"):  # Pallas kernels build native Triton, not interpret mode
    compiled = jax.jit(f).trace(*abstract_args).lower(lowering_platforms=("cuda",)).compile()

Why the environment: jax discovers the CUDA plugin once per process, on the first backend use or topology request.
Without a GPU driver the plugin's start-up check (CUDA library versions, which needs cuInit) fails and the plugin is
not registered, after which every CUDA topology request ends in "topology not implemented for cuda" for the rest of
the process. `JAX_SKIP_CUDA_CONSTRAINTS_CHECK=1` skips that check (the plugin then registers; the CUDA *backend* still
fails quietly to start and jax falls back to CPU), and `CUDA_VISIBLE_DEVICES=-1` keeps a machine that does have GPUs
from initialising them, so the process behaves the same everywhere. (`JAX_PLATFORMS=cpu` also skips the check.)

Topologies: get_topology_desc takes "<partitions>x<hosts per partition>x<GPUs per host>" (a bare "8" or "2x8" is
rejected). One host of N GPUs is "1x1xN"; for more than one host we use one partition per host ("Hx1x8", each 8-GPU
node its own NVLink domain). jax 0.10.2 accepts 1x1x16, 2x1x8, 1x2x8, 4x1x8 alike (devices of host h get
process_index h) and compiles the same program for each.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.metadata
import importlib.util
import os
from typing import Optional

SPECS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "gpu_specs")
LOWERING_PLATFORM = "cuda"  # jax platform name for `lower(lowering_platforms=...)`
GPUS_PER_HOST = 8
INSTALL_HINT = "pip install -r requirements-cuda.txt (in a separate venv, e.g. .venv-cuda; see that file)"
_ENV = {"JAX_SKIP_CUDA_CONSTRAINTS_CHECK": "1", "CUDA_VISIBLE_DEVICES": "-1"}


@dataclasses.dataclass(frozen=True)
class GpuKind:
  """One GPU model as the compiler sees it.

  Attributes:
    name: our key ("h100", "a100").
    target_config: path of its `GpuTargetConfig` text proto (gpu_specs/).
    hbm_bytes: device memory per GPU in bytes as CUDA reports it (`device_memory_size` of the target config; what an
      "80 GB" part really has, before jax's preallocation fraction).
    device_kind: jax `Device.device_kind` of the abstract (and of a real) device.
    peak_bf16_flops: dense bf16 FLOP/s per GPU (no sparsity), spec-sheet value as in megalodon_jax/flops.py.
    compute_capability: (major, minor).
  """
  name: str
  target_config: str
  hbm_bytes: int
  device_kind: str
  peak_bf16_flops: float
  compute_capability: tuple[int, int]


GPU_KINDS: dict[str, GpuKind] = {
    "h100": GpuKind("h100", os.path.join(SPECS_DIR, "h100_sxm.txtpb"), 84978434048, "NVIDIA H100 80GB HBM3",
                    989e12, (9, 0)),
    "a100": GpuKind("a100", os.path.join(SPECS_DIR, "a100_sxm_80.txtpb"), 85100068864, "NVIDIA A100-SXM4-80GB",
                    312e12, (8, 0)),
}


def gpu_kind(kind: str) -> GpuKind:
  """The `GpuKind` for "h100" / "a100" (case-insensitive)."""
  try:
    return GPU_KINDS[kind.lower()]
  except KeyError:
    raise ValueError(f"unknown GPU kind {kind!r}; expected one of {sorted(GPU_KINDS)}") from None


def target_config(kind: str) -> str:
  """The `GpuTargetConfig` text proto of `kind`, as `get_topology_desc(target_config=...)` takes it."""
  with open(gpu_kind(kind).target_config, encoding="utf-8") as f:
    return f.read()


def cuda_available() -> tuple[bool, str]:
  """(True, versions) if this Python has the jax CUDA 12 plugin matching its jax, else (False, one-line reason).

  Looks at installed packages only: imports nothing from jax, so it is safe before `prepare_environment()`.
  """
  if importlib.util.find_spec("jax_plugins") is None or importlib.util.find_spec("jax_plugins.xla_cuda12") is None:
    return False, f"the jax CUDA plugin (jax-cuda12-plugin) is not installed in this Python; {INSTALL_HINT}"
  try:
    jax_version = importlib.metadata.version("jax")
    plugin = importlib.metadata.version("jax-cuda12-plugin")
    pjrt = importlib.metadata.version("jax-cuda12-pjrt")
  except importlib.metadata.PackageNotFoundError as e:
    return False, f"jax CUDA plugin incomplete ({e.name} missing); {INSTALL_HINT}"
  if not plugin == pjrt == jax_version:
    return False, (f"jax {jax_version} with jax-cuda12-plugin {plugin} / jax-cuda12-pjrt {pjrt}: versions must match; "
                   f"{INSTALL_HINT}")
  return True, f"jax {jax_version}, jax-cuda12-plugin {plugin}, jax-cuda12-pjrt {pjrt}"


def _plugin_state() -> tuple[bool, bool]:
  """(jax has already run its plugin discovery, the CUDA topology factory is registered). Private jax state, read
  defensively: an unknown layout reads as (False, False), i.e. "not yet discovered"."""
  import sys  # pylint: disable=import-outside-toplevel
  xb = sys.modules.get("jax._src.xla_bridge")
  if xb is None:  # jax not imported yet: nothing can have been discovered
    return False, False
  discovered = bool(getattr(xb, "_plugins_registered", False)) or bool(getattr(xb, "_backends", {}))
  return discovered, "cuda" in getattr(xb, "_topology_factories", {})


def prepare_environment() -> dict[str, str]:
  """Sets JAX_SKIP_CUDA_CONSTRAINTS_CHECK=1 and CUDA_VISIBLE_DEVICES=-1 unless already set; checks it is not too late.

  Call it before anything starts a jax backend in this process (jax.devices(), jit, creating an array); importing
  jax is fine. Idempotent.
  Returns:
    The variables this call set (empty when all were already set).
  Raises:
    RuntimeError: jax already discovered its plugins without registering the CUDA one (the start-up check failed
      because the variables came too late): set them in the shell, or call this first thing in the process.
  """
  set_now = {name: value for name, value in _ENV.items() if name not in os.environ}
  os.environ.update(set_now)
  discovered, cuda_registered = _plugin_state()
  if discovered and not cuda_registered:
    raise RuntimeError(
        "jax already initialised its backends without the CUDA plugin (its start-up check needs a GPU driver unless "
        "JAX_SKIP_CUDA_CONSTRAINTS_CHECK=1 is set first), so no CUDA topology can be made in this process. Call "
        "megalodon_jax.aot.gpu.prepare_environment() before any jax.devices()/jit/array creation, or run with "
        "JAX_SKIP_CUDA_CONSTRAINTS_CHECK=1 CUDA_VISIBLE_DEVICES=-1 set in the environment.")
  return set_now


def topology_name(count: int, gpus_per_host: int = GPUS_PER_HOST) -> str:
  """get_topology_desc's topology string for `count` GPUs: "1x1xN" up to one host, else "Hx1x{gpus_per_host}"."""
  if count < 1:
    raise ValueError(f"count must be >= 1, got {count}")
  if count <= gpus_per_host:
    return f"1x1x{count}"
  if count % gpus_per_host:
    raise ValueError(f"{count} GPUs: more than one host needs a multiple of {gpus_per_host} GPUs per host")
  return f"{count // gpus_per_host}x1x{gpus_per_host}"


@functools.lru_cache(maxsize=None)
def _topology_devices(kind: str, topology: str) -> tuple:
  from jax.experimental import topologies  # pylint: disable=import-outside-toplevel
  try:
    desc = topologies.get_topology_desc(platform=LOWERING_PLATFORM, target_config=target_config(kind),
                                        topology=topology)
  except NotImplementedError as e:  # gpu_devices checked that the plugin is installed: it did not register
    raise RuntimeError(f"no abstract CUDA devices ({e}); the CUDA plugin did not register: call prepare_environment() "
                       "before jax starts its backends") from e
  return tuple(desc.devices)


def gpu_devices(kind: str, count: int, *, gpus_per_host: int = GPUS_PER_HOST,
                topology: Optional[str] = None) -> list:
  """`count` abstract (compile-only) GPUs of `kind` ("h100" | "a100"), ids 0..count-1.

  Args:
    kind: a key of GPU_KINDS.
    count: number of GPUs; up to `gpus_per_host` is one host, more must be whole hosts (devices of host h have
      process_index h).
    topology: explicit "<partitions>x<hosts per partition>x<GPUs per host>" instead of `topology_name(count)`.
  Returns:
    A list of jax devices (device_kind `GPU_KINDS[kind].device_kind`, platform "gpu"); repeated calls with the same
    arguments return the same objects, so meshes built from them mix.
  """
  spec = gpu_kind(kind)
  ok, why = cuda_available()
  if not ok:
    raise RuntimeError(why)
  prepare_environment()
  devices = _topology_devices(spec.name, topology or topology_name(count, gpus_per_host))
  if len(devices) != count:
    raise ValueError(f"topology {topology!r} has {len(devices)} devices, not {count}")
  return list(devices)
