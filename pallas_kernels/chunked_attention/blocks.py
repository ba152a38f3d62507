"""Tile sizes of the chunked-attention kernels, with per-backend defaults.

None of the defaults has been measured on hardware yet (no TPU or GPU was available when they were written);
they follow the usual constraints: on TPU the q/k tiles are sublane multiples and the score tile's minor dim a
lane multiple (128), the value tile a lane multiple; on GPU (Triton) every tile dim is a power of two, tiles stay
small enough for registers at head dim 256 (64 × 64 forward, 32 × 32 backward, as in jax's reference Triton
attention), and value heads wider than `block_v` are split into groups that share q/k.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

BACKENDS = ("tpu", "gpu")
MIN_BLOCK = 16  # smallest sequence tile: bf16 sublane packing on TPU, the tl.dot minimum on GPU
TPU_LANES = 128


def _is_pow2(n: int) -> bool:
  return n > 0 and n & (n - 1) == 0


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  """Tile sizes (rows of q / k per program, columns of v per program) and Triton launch settings.

  Attributes:
    block_q, block_k: forward query / key tile along the sequence (powers of two ≥ 16).
    block_q_bwd, block_k_bwd: the same for the two backward kernels (dq; dk and dv).
    block_v: value-head tile; a value head of dv > block_v is split into ⌈dv / block_v⌉ groups, each
      recomputing q·kᵀ (exact, since the softmax does not depend on v). Power of two ≥ 16; on TPU a multiple of
      128.
    num_warps, num_stages: Triton launch parameters (GPU only); num_warps None picks 4 for head dims ≤ 64 and 8
      above.
    vmem_limit_bytes: TPU only. None: each kernel checks its estimated VMEM use against the generation's ceiling
      (vmem.py) and raises the scoped limit only when it needs more than the default; an int: the scoped VMEM limit
      to compile every kernel with, and to check the estimate against.
  """
  block_q: int = 128
  block_k: int = 128
  block_q_bwd: int = 64
  block_k_bwd: int = 64
  block_v: int = 512
  num_warps: Optional[int] = None
  num_stages: int = 2
  vmem_limit_bytes: Optional[int] = None

  def __post_init__(self):
    for name in ("block_q", "block_k", "block_q_bwd", "block_k_bwd", "block_v"):
      value = getattr(self, name)
      if not isinstance(value, int) or not _is_pow2(value) or value < MIN_BLOCK:
        raise ValueError(f"BlockSizes.{name}={value!r}: must be a power of two >= {MIN_BLOCK}")
    if self.num_warps is not None and (not isinstance(self.num_warps, int) or not _is_pow2(self.num_warps)):
      raise ValueError(f"BlockSizes.num_warps={self.num_warps!r}: must be None or a power of two")
    if not isinstance(self.num_stages, int) or self.num_stages < 1:
      raise ValueError(f"BlockSizes.num_stages={self.num_stages!r}: must be an int >= 1")
    if self.vmem_limit_bytes is not None and (not isinstance(self.vmem_limit_bytes, int) or
                                              self.vmem_limit_bytes <= 0):
      raise ValueError(f"BlockSizes.vmem_limit_bytes={self.vmem_limit_bytes!r}: must be None or a positive int")

  @classmethod
  def get_default(cls, backend: str) -> "BlockSizes":
    """Defaults for `backend` ("tpu" or "gpu"); unmeasured starting points, see the module docstring."""
    if backend == "tpu":
      # Larger tiles amortise the ~0.35 us per-grid-step overhead; (256, 256) keeps q, k, v double-buffered
      # plus the f32 accumulators well under the 16 MiB default scoped VMEM at dz = 256, block_v = 1024.
      return cls(block_q=256, block_k=256, block_q_bwd=256, block_k_bwd=256, block_v=1024)
    if backend == "gpu":
      return cls(block_q=64, block_k=64, block_q_bwd=32, block_k_bwd=32, block_v=256)
    raise ValueError(f"unknown kernel backend {backend!r}; expected one of {BACKENDS}")

  def check_for(self, backend: str) -> None:
    """Raises ValueError if these tiles cannot lower on `backend`."""
    if backend not in BACKENDS:
      raise ValueError(f"unknown kernel backend {backend!r}; expected one of {BACKENDS}")
    if backend == "tpu" and self.block_v % TPU_LANES:
      raise ValueError(f"BlockSizes.block_v={self.block_v}: on TPU it must be a multiple of {TPU_LANES} lanes")

  def warps(self, head_dim: int) -> int:
    if self.num_warps is not None:
      return self.num_warps
    return 4 if head_dim <= 64 else 8
