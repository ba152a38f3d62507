"""VMEM budgets of the Mosaic kernels: per-generation limits and a check that runs before Mosaic does.

Mosaic reports a tile set that does not fit VMEM as a compiler error deep inside XLA ("CompileTimeScopedVmemOom",
after up to a minute of compiling). The kernels instead estimate their VMEM use from the tiles (double-buffered
blocks, scratch, the largest in-kernel temporaries) and call `vmem_limit_bytes` before building the pallas_call:
it raises a ValueError naming the BlockSizes field to shrink, or returns the `vmem_limit_bytes` to compile with
(None: the compiler's default scoped limit suffices).

Per-TensorCore figures (jax 0.10.2, libtpu 0.0.42.1, measured by deviceless compiles on CPU): physical VMEM is
16 MiB on v4, 64 MiB on v5p and 128 MiB on v5e / v6e (a scratch operand larger than that is rejected); the
default scoped limit for a kernel's pipelined blocks and temporaries is 16 MiB (v5e: "limit 16.00M"), which is
also what we assume when the generation cannot be determined. The usable ceiling is 3/4 of physical VMEM (the
compiler keeps internal scratch beside ours), but never below the default scoped limit.

This module serves both kernel packages (`pallas_kernels.cema` imports it too).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable, Mapping, Optional, Sequence

import jax
import numpy as np

from pallas_kernels.platform import compiling_for_other_platform, current_platform

MiB = 1 << 20
DEFAULT_SCOPED_VMEM = 16 * MiB


@dataclasses.dataclass(frozen=True)
class Generation:
  """VMEM of one TensorCore of a TPU generation."""
  name: str
  capacity: int
  default_scoped: int = DEFAULT_SCOPED_VMEM

  @property
  def ceiling(self) -> int:
    """The most we let a kernel ask for."""
    return max(self.default_scoped, self.capacity * 3 // 4)


# device_kind strings as libtpu reports them (abstract devices of `jax.experimental.topologies` included).
_GENERATIONS = {
    "TPU v4": Generation("v4", 16 * MiB),
    "TPU v4 lite": Generation("v4i", 16 * MiB),
    "TPU v5 lite": Generation("v5e", 128 * MiB),
    "TPU v5e": Generation("v5e", 128 * MiB),
    "TPU v5": Generation("v5p", 64 * MiB),
    "TPU v5p": Generation("v5p", 64 * MiB),
    "TPU v6 lite": Generation("v6e", 128 * MiB),
    "TPU v6e": Generation("v6e", 128 * MiB),
}
UNKNOWN = Generation("unknown TPU generation", DEFAULT_SCOPED_VMEM)


def device_kind(*arrays) -> Optional[str]:
  """The device_kind of the TPU being compiled for, or None where nothing in the trace names it.

  Looked up, in order: the abstract mesh in context (inside `shard_map` it carries the devices' kind), the mesh of
  the arrays' shardings (jit arguments placed on a concrete mesh, e.g. topology devices), and this process's own
  devices when it runs on a TPU and compiles for it.
  """
  found = getattr(jax.sharding.get_abstract_mesh(), "abstract_device", None)
  for x in arrays:
    if found is not None:
      break
    try:
      sharding = jax.typeof(x).sharding
    except (AttributeError, TypeError):
      continue
    found = getattr(getattr(sharding, "mesh", None), "abstract_device", None)
  if found is not None:
    return found.device_kind
  if current_platform() == "tpu" and not compiling_for_other_platform():
    return jax.devices()[0].device_kind
  return None


def generation(kind: Optional[str]) -> Generation:
  return _GENERATIONS.get(kind, UNKNOWN) if kind is not None else UNKNOWN


def tile_bytes(shape: Sequence[int], dtype) -> int:
  """Bytes of a VMEM buffer: the last two dims padded to the native (8·packing, 128) tile."""
  dtype = np.dtype(dtype)
  packing = max(1, 4 // dtype.itemsize)
  dims = list(shape) if len(shape) >= 2 else [1, *shape]
  dims[-1] = -(-dims[-1] // 128) * 128
  dims[-2] = -(-dims[-2] // (8 * packing)) * (8 * packing)
  return math.prod(dims) * dtype.itemsize


def vmem_limit_bytes(kernel: str, estimate: Callable[[Mapping[str, int]], int], tiles: Mapping[str, int],
                     kind: Optional[str], override: Optional[int]) -> Optional[int]:
  """The `vmem_limit_bytes` to compile `kernel` with, or ValueError when its tiles cannot fit.

  Args:
    kernel: the kernel's name, for the message.
    estimate: bytes of VMEM the kernel needs as a function of its tiles (BlockSizes field -> value).
    tiles: the BlockSizes fields that size this kernel, with their (effective) values.
    kind: device_kind (`device_kind()`); None assumes the conservative 16 MiB.
    override: BlockSizes.vmem_limit_bytes: the limit to compile with and check against, in place of the
      generation's ceiling.
  Returns:
    None when the estimate fits the default scoped limit (and no override), else the limit to pass to Mosaic.
  """
  gen = generation(kind)
  need = estimate(tiles)
  limit = override if override is not None else gen.ceiling
  if need > limit:
    # The field whose halving saves the most is the one to shrink.
    def saving(name):
      return need - estimate({**tiles, name: max(1, tiles[name] // 2)})
    culprit = max(tiles, key=saving)
    listed = ", ".join(f"{k}={v}" for k, v in tiles.items())
    where = f"{gen.name} ({kind})" if kind else f"{gen.name}; assumed the default scoped VMEM"
    raise ValueError(
        f"{kernel}: the tiles need about {need / MiB:.1f} MiB of VMEM, over the {limit / MiB:.1f} MiB limit on "
        f"{where}. Reduce BlockSizes.{culprit} (tiles: {listed}), or set BlockSizes.vmem_limit_bytes if the chip "
        f"has more VMEM.")
  if override is not None:
    return override
  if need <= gen.default_scoped:
    return None
  # Headroom for what the estimate leaves out (semaphores, spills); the compiler only reserves what it uses.
  return min(limit, -(-(need + need // 4) // MiB) * MiB)
