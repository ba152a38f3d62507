"""Compile targets by name: TPU slices (`v5p-128`, `v5e-8`, `v6e-16`, `v4-32`, `v5p:4x4x4`) and GPU hosts
(`h100-8`, `a100-8`), as abstract devices that the real compilers accept without the hardware being present.

TPU names follow Cloud TPU's: the number after v5p / v4 counts TensorCores (two per chip), after v5e / v6e it
counts chips. The abstract devices come from libtpu through `jax.experimental.topologies`; libtpu installs with
the project's requirements and does nothing on a machine without a TPU. GPU devices need the CUDA plugin
(requirements-cuda.txt) and come from `megalodon_jax.aot.gpu`.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from typing import Optional

from megalodon_jax.errors import TopologyError

GIB = 1024 ** 3


@dataclasses.dataclass(frozen=True)
class TpuGeneration:
  """One TPU generation: its libtpu name, HBM per chip, devices jax makes per chip, and how slices are named."""
  name: str  # libtpu topology prefix: "v4", "v5e", "v5p", "v6e"
  hbm_bytes_per_chip: int
  dims: int  # 3 for the 3D-torus generations (v4, v5p), 2 for v5e / v6e
  counts_cores: bool  # slice names count TensorCores (2 per chip) rather than chips
  aliases: tuple[str, ...] = ()


# HBM per chip, public spec sheets: v4 32 GiB, v5e 16 GiB, v6e 32 GiB; v5p 95.74 GiB, the figure XLA:TPU reports
# as available HBM in its out-of-memory message (spec sheet: 95 GB).
TPU_GENERATIONS = {
    "v4": TpuGeneration("v4", 32 * GIB, 3, True),
    "v5e": TpuGeneration("v5e", 16 * GIB, 2, False, aliases=("v5litepod",)),
    "v5p": TpuGeneration("v5p", int(95.74 * GIB), 3, True),
    "v6e": TpuGeneration("v6e", 32 * GIB, 2, False),
}
# Chip counts of the slices offered per generation (the grid shape follows from the count).
_TPU_CHIP_COUNTS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096)


@dataclasses.dataclass(frozen=True)
class Target:
  """A resolved compile target.

  name: as the user wrote it.  platform: "tpu" or "gpu".  chips: accelerator chips.  devices: the jax devices
  (a v4 chip shows as two).  hbm_bytes: memory of one jax device.  device_kind: jax's `device_kind`.
  topology: the libtpu grid ("v5p:4x4x4") or GPU spec ("h100 x 8").
  """
  name: str
  platform: str
  chips: int
  devices: tuple
  hbm_bytes: int
  device_kind: str
  topology: str


def _grid(chips: int, dims: int) -> str:
  """The chip grid of a slice of `chips` (a power of two): 2D a x b with a <= b <= 2a, 3D as even as possible."""
  if dims == 2:
    a = 1 << (int(math.log2(chips)) // 2)
    return f"{a}x{chips // a}"
  shape = [1, 1, 1]
  for i in range(int(math.log2(chips))):
    shape[2 - (i % 3)] *= 2
  # Conventional spelling: ascending, size-1 axes last (v5p:2x2x1, v5p:2x2x4, v5p:4x4x4).
  ordered = sorted(s for s in shape if s > 1) + [1] * shape.count(1)
  return "x".join(map(str, ordered))


def known_names() -> list[str]:
  """Example names the CLI accepts, for error messages and --help."""
  names = ["v5p-8", "v5p-128", "v5p:4x4x4", "v5e-4", "v5e-8", "v5litepod-16", "v6e-8", "v6e-16", "v4-8", "v4-32"]
  return names + ["h100-8", "a100-8"]


def parse_tpu(name: str) -> tuple[TpuGeneration, str]:
  """(generation, libtpu topology name) for a TPU slice name; raises TopologyError otherwise."""
  text = name.strip().lower()
  by_prefix = {**TPU_GENERATIONS, **{alias: g for g in TPU_GENERATIONS.values() for alias in g.aliases}}
  m = re.fullmatch(r"([a-z0-9]+):(\d+(?:x\d+)+)", text)
  if m and m.group(1) in by_prefix:
    gen = by_prefix[m.group(1)]
    sizes = [int(s) for s in m.group(2).split("x")]
    if len(sizes) != gen.dims or min(sizes) < 1:
      raise TopologyError(f"topology {name!r}: {gen.name} grids have {gen.dims} dimensions, e.g. "
                          f"{gen.name}:{_grid(16, gen.dims)}")
    return gen, f"{gen.name}:{'x'.join(map(str, sizes))}"
  m = re.fullmatch(r"([a-z0-9]+)-(\d+)", text)
  if m and m.group(1) in by_prefix:
    gen, count = by_prefix[m.group(1)], int(m.group(2))
    chips = count // 2 if gen.counts_cores else count
    if (gen.counts_cores and count % 2) or chips not in _TPU_CHIP_COUNTS:
      unit = "TensorCores (2 per chip)" if gen.counts_cores else "chips"
      valid = [c * (2 if gen.counts_cores else 1) for c in _TPU_CHIP_COUNTS[:9]]
      raise TopologyError(f"topology {name!r}: {gen.name}-N counts {unit}; N must be one of {valid}, ...")
    return gen, f"{gen.name}:{_grid(chips, gen.dims)}"
  raise TopologyError(f"unknown topology {name!r}; known names: {', '.join(known_names())} (TPU: <generation>-<N> "
                      f"or <generation>:<grid> for generations {sorted(TPU_GENERATIONS)}; GPU: h100-<N>, a100-<N>)")


def _tpu_target(name: str) -> Target:
  gen, topo_name = parse_tpu(name)
  # libtpu takes a machine-wide lock file by default; a compile-only client needs no exclusive access, and
  # without this a second planner (or a test beside a running benchmark) fails with "libtpu lockfile".
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  # Without a TPU, libtpu asks the environment which slice it is on and prints warnings when nothing answers: saying
  # "this host, one chip" keeps it quiet. The abstract topology is unchanged (v5p:4x4x4 still has 64 devices on 16
  # hosts); on a TPU VM the real values are left alone.
  from megalodon_jax import platforms  # pylint: disable=import-outside-toplevel
  if not platforms.tpu_attached():
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
    os.environ.setdefault("TPU_HOST_BOUNDS", "1,1,1")
  from jax.experimental import topologies  # pylint: disable=import-outside-toplevel
  chips = math.prod(int(s) for s in topo_name.split(":")[1].split("x"))
  kwargs = {"chips_per_host_bounds": (1, 1, 1)} if chips == 1 else {}
  try:
    devices = topologies.get_topology_desc(platform="tpu", topology_name=topo_name, **kwargs).devices
  except Exception as e:  # pylint: disable=broad-except
    raise TopologyError(f"libtpu cannot describe topology {topo_name!r} (from {name!r}): {str(e).splitlines()[0]}. "
                        f"Is libtpu installed (pip install -r requirements.txt)?") from None
  per_chip = max(1, len(devices) // chips)
  return Target(name=name, platform="tpu", chips=chips, devices=tuple(devices),
                hbm_bytes=gen.hbm_bytes_per_chip // per_chip, device_kind=devices[0].device_kind,
                topology=topo_name)


def resolve(name: str) -> Target:
  """The Target for `name` (see the module docstring). Raises TopologyError for an unknown name."""
  m = re.fullmatch(r"(h100|a100)-(\d+)", name.strip().lower())
  if not m:
    return _tpu_target(name)
  kind, count = m.group(1), int(m.group(2))
  if count < 1:
    raise TopologyError(f"topology {name!r}: the GPU count must be >= 1")
  from megalodon_jax.aot import gpu  # pylint: disable=import-outside-toplevel
  ok, why = gpu.cuda_available()
  if not ok:
    raise TopologyError(f"topology {name!r} needs the CUDA plugin: {why}")
  devices = gpu.gpu_devices(kind, count)
  return Target(name=name, platform="gpu", chips=count, devices=tuple(devices), hbm_bytes=gpu.GPU_KINDS[kind].hbm_bytes,
                device_kind=devices[0].device_kind, topology=f"{kind} x {count}")


def is_known(name: str) -> Optional[str]:
  """None if `name` parses as a target name, else the error message (no devices are created)."""
  try:
    if not re.fullmatch(r"(h100|a100)-([1-9]\d*)", name.strip().lower()):
      parse_tpu(name)
  except TopologyError as e:
    return str(e)
  return None
