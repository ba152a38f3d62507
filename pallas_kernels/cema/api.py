"""The CEMA scan kernel's public entry point: input checks, kernel layouts, backend choice and the custom VJP.

`cema_scan` takes plain arrays (no model types) and returns what `reference.cema_scan_reference` returns; the
recurrence and the derivation of its backward are in `recurrence.py`, the kernels in `tpu.py` and `gpu.py`.
Kernel layouts, channels last so they sit on the lanes: coefficients packed as (5, N, D) [p, q_re, q_im, g_re, g_im],
omega (1, D), states (B, 2, N, D) [re, im].
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from pallas_kernels.cema import gpu, tpu
from pallas_kernels.cema import recurrence as rec
from pallas_kernels.platform import current_platform
from pallas_kernels.sharding import shard_plan

BACKENDS = ("tpu", "gpu")


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  """Tiling of the kernels. Defaults are educated guesses, not tuned on hardware (none was available).

  seq_tile: TPU time steps per grid step; a multiple of 16 and of `group`. Large, because each grid step costs
    about 0.35 µs of fixed overhead and one step of a 128-channel tile is only a few dozen vector ops; the
    double-buffered input and output tiles take 4 · seq_tile · channel_tile · 4 bytes of VMEM (2 MiB by default).
  channel_tile: TPU channels per grid step; a multiple of 128 (lanes). D ≤ channel_tile uses one tile of D.
  gpu_channel_tile: GPU channels per program; a power of two (Triton).
  gpu_num_warps: GPU warps per program.
  group: time steps unrolled per loop iteration: 8, 16 or 32 (TPU raises it to 16 for 16-bit inputs, whose
    (16, 128) tiles pack two rows per sublane).
  vmem_limit_bytes: TPU only. None: each kernel checks its estimated VMEM use against the generation's ceiling
    (`pallas_kernels.chunked_attention.vmem`) and raises the scoped limit only when it needs more than the default;
    an int: the scoped VMEM limit to compile with, and to check the estimate against.
  """
  seq_tile: int = 1024
  channel_tile: int = 128
  gpu_channel_tile: int = 32
  gpu_num_warps: int = 2
  group: int = 8
  vmem_limit_bytes: Optional[int] = None

  def __post_init__(self):
    if self.group not in (8, 16, 32):
      raise ValueError(f"group must be 8, 16 or 32, got {self.group}")
    if self.seq_tile <= 0 or self.seq_tile % max(16, self.group):
      raise ValueError(f"seq_tile must be a positive multiple of 16 and of group={self.group}, got {self.seq_tile}")
    if self.channel_tile <= 0 or self.channel_tile % 128:
      raise ValueError(f"channel_tile must be a positive multiple of 128, got {self.channel_tile}")
    if self.gpu_channel_tile <= 0 or self.gpu_channel_tile & (self.gpu_channel_tile - 1):
      raise ValueError(f"gpu_channel_tile must be a power of two, got {self.gpu_channel_tile}")
    if self.gpu_num_warps <= 0 or self.gpu_num_warps & (self.gpu_num_warps - 1):
      raise ValueError(f"gpu_num_warps must be a power of two, got {self.gpu_num_warps}")
    if self.vmem_limit_bytes is not None and (not isinstance(self.vmem_limit_bytes, int) or
                                              self.vmem_limit_bytes <= 0):
      raise ValueError(f"vmem_limit_bytes must be None or a positive int, got {self.vmem_limit_bytes!r}")


class _Plan(NamedTuple):
  """Static kernel configuration (hashable: a `custom_vjp` non-differentiable argument)."""
  backend: str
  interpret: Any
  seq_tile: int
  channel_tile: int
  group: int
  num_warps: int
  vmem_limit_bytes: Optional[int]


def _next_pow2(n: int) -> int:
  return 1 << max(0, (n - 1).bit_length())


def _kernel_forward(plan: _Plan, x, coef, omega, h0, keep):
  if plan.backend == "tpu":
    return tpu.forward(x, coef, omega, h0, seq_tile=plan.seq_tile, channel_tile=plan.channel_tile,
                       group=plan.group, vmem_limit=plan.vmem_limit_bytes, interpret=plan.interpret, keep=keep)
  return gpu.forward(x, coef, omega, h0, channel_tile=plan.channel_tile, group=plan.group,
                     num_warps=plan.num_warps, interpret=plan.interpret, keep=keep)


def _kernel_backward(plan: _Plan, x, dy, coef, omega, s0, keep):
  if plan.backend == "tpu":
    return tpu.backward(x, dy, coef, omega, s0, seq_tile=plan.seq_tile, channel_tile=plan.channel_tile,
                        group=plan.group, vmem_limit=plan.vmem_limit_bytes, interpret=plan.interpret, keep=keep)
  return gpu.backward(x, dy, coef, omega, s0, channel_tile=plan.channel_tile, group=plan.group,
                      num_warps=plan.num_warps, interpret=plan.interpret, keep=keep)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _scan(plan: _Plan, x, coef, omega, h0, keep):
  """keep: None, or (B, L, 1) float32, 0 where a document starts (not differentiated)."""
  return _kernel_forward(plan, x, coef, omega, h0, keep)


def _scan_fwd(plan: _Plan, x, coef, omega, h0, keep):
  return _kernel_forward(plan, x, coef, omega, h0, keep), (x, coef, omega, h0, keep)


def _scan_bwd(plan: _Plan, residuals, cotangents):
  """Gradients from one reverse-time kernel pass (derivation in recurrence.py); the rest is O(B·D·N) algebra."""
  x, coef, omega, h0, keep = residuals
  dy, dlast = cotangents
  dy = dy.astype(jnp.float32)
  s0 = jnp.stack([dlast[:, 0], -dlast[:, 1]], axis=1)  # conj(∂L/∂h_last)
  dx, out = _kernel_backward(plan, x, dy, coef, omega, s0, keep)
  k = rec.BwdCarry(*(out[:, i] for i in range(rec.NUM_BWD_PLANES)))  # each (B, N, D)
  p, h0r, h0i = coef[rec.P], h0[:, 0], h0[:, 1]

  def conj_sum(acc_re, acc_im, st_re, st_im):
    """conj(p·acc + h0·state), summed over the batch: two (N, D) planes."""
    re = p * acc_re + h0r * st_re - h0i * st_im
    im = p * acc_im + h0r * st_im + h0i * st_re
    return jnp.sum(re, axis=0), -jnp.sum(im, axis=0)

  dg_re, dg_im = conj_sum(k.acc_c_re, k.acc_c_im, k.z_re, k.z_im)
  dq_re, dq_im = conj_sum(k.acc_q_re, k.acc_q_im, k.x_re, k.x_im)
  dcoef = jnp.stack([jnp.sum(k.acc_p, axis=0), dq_re, dq_im, dg_re, dg_im])
  # A reduction, not an einsum: on TPU a default-precision dot would round the inputs to bfloat16.
  domega = jnp.sum(dy * x.astype(jnp.float32), axis=(0, 1)).reshape(omega.shape)
  dh0 = jnp.stack([k.s_re, -k.s_im], axis=1)
  return dx, dcoef, domega, dh0, (None if keep is None else jnp.zeros_like(keep))


_scan.defvjp(_scan_fwd, _scan_bwd)


def _check_inputs(x, planes, omega, h0, resets) -> None:
  if x.ndim != 3 or not jnp.issubdtype(x.dtype, jnp.floating):
    raise ValueError(f"x must be a (batch, length, channels) float array, got {x.dtype}{list(x.shape)}")
  batch, length, dim = x.shape
  if length < 1 or batch < 1:
    raise ValueError(f"x must have at least one batch row and one time step, got shape {x.shape}")
  shape = planes[0].shape
  for name, a in zip(("p", "q_re", "q_im", "g_re", "g_im"), planes):
    if a.ndim != 2 or a.shape != shape or a.shape[0] != dim:
      raise ValueError(f"{name} must be (D, N) = ({dim}, N) like p {list(shape)}, got {list(a.shape)}")
  if omega.size != dim:
    raise ValueError(f"omega must have D = {dim} entries, got shape {omega.shape}")
  if h0 is not None and h0.shape != (batch, dim, shape[1], 2):
    raise ValueError(f"h0 must be (B, D, N, 2) = {(batch, dim, shape[1], 2)}, got {h0.shape}")
  if resets is not None and resets.shape != (batch, length):
    raise ValueError(f"resets must be (B, L) = {(batch, length)}, got {resets.shape}")


def _resolve(backend: Optional[str], interpret) -> tuple[str, Any]:
  platform = current_platform()
  if backend is None:
    backend = "gpu" if platform == "gpu" else "tpu"  # CPU: interpret the TPU kernel
  if backend not in BACKENDS:
    raise ValueError(f"backend must be one of {BACKENDS} or None, got {backend!r}")
  if interpret is None:
    interpret = platform != backend
  return backend, interpret


def _scan_local(x, planes, omega, h0, resets, *, bs: BlockSizes, backend: str, interpret):
  """The kernel call on whole (or one shard's) arrays: layouts in, kernel, layouts out."""
  batch, _, dim = x.shape
  # Resets as the decay multiplier a_t (0 at a document start, else 1), one per (row, step): (B, L, 1) float32.
  keep = None if resets is None else jnp.where(resets, 0.0, 1.0).astype(jnp.float32)[..., None]
  nstate = planes[0].shape[1]
  coef = jnp.swapaxes(jnp.stack([a.astype(jnp.float32) for a in planes]), 1, 2)  # (5, N, D)
  om = omega.reshape(1, dim).astype(jnp.float32)
  if h0 is None:
    state = jnp.zeros((batch, 2, nstate, dim), jnp.float32)
  else:
    state = jnp.transpose(h0.astype(jnp.float32), (0, 3, 2, 1))  # (B, 2, N, D)

  if backend == "tpu":
    group = max(bs.group, 16) if x.dtype.itemsize < 4 else bs.group
    plan = _Plan("tpu", interpret, bs.seq_tile, bs.channel_tile, group, 0, bs.vmem_limit_bytes)
    y, last = _scan(plan, x, coef, om, state, keep)
  else:
    # Triton: channels padded to whole tiles, N to a power of two; zero coefficients keep the padding at zero.
    tile = min(bs.gpu_channel_tile, _next_pow2(dim))
    pad_d, pad_n = -dim % tile, _next_pow2(nstate) - nstate
    xp = jnp.pad(x, ((0, 0), (0, 0), (0, pad_d))) if pad_d else x
    plan = _Plan("gpu", interpret, 0, tile, bs.group, bs.gpu_num_warps, None)
    y, last = _scan(plan, xp, jnp.pad(coef, ((0, 0), (0, pad_n), (0, pad_d))), jnp.pad(om, ((0, 0), (0, pad_d))),
                    jnp.pad(state, ((0, 0), (0, 0), (0, pad_n), (0, pad_d))), keep)
    y, last = y[..., :dim], last[:, :, :nstate, :dim]
  return y, jnp.transpose(last, (0, 3, 2, 1))


def cema_scan(x: jax.Array, p: jax.Array, q_re: jax.Array, q_im: jax.Array, g_re: jax.Array, g_im: jax.Array,
              omega: jax.Array, h0: Optional[jax.Array] = None, *, block_sizes: Optional[BlockSizes] = None,
              backend: Optional[str] = None, interpret: Any = None, mesh=None,
              batch_axes: Optional[Sequence[str] | str] = None,
              channel_axes: Optional[Sequence[str] | str] = None,
              resets: Optional[jax.Array] = None) -> tuple[jax.Array, jax.Array]:
  """CEMA over a sequence with a Pallas kernel; differentiable in every float array argument.

  h_t = q h_{t-1} + p u_t,  y_t = Re Σ_n g_n h_{t,n} + ω u_t  per channel (see `reference.cema_scan_reference`);
  with resets, h_t = p u_t where a document starts (the decay into that step is 0, in the backward too).

  Args:
    x: (B, L, D) input, any float dtype (bfloat16 halves the kernel's input traffic); computed in float32.
    p: (D, N) real input weight.  q_re, q_im: (D, N) complex decay.  g_re, g_im: (D, N) complex output weight.
    omega: (D,) or (D, 1) skip weight.
    h0: optional (B, D, N, 2) float32 initial state (real, imag); None means zeros.
    block_sizes: tiling; defaults to `BlockSizes()`.
    backend: "tpu" (Mosaic) or "gpu" (Triton) kernel; None picks by `platform.current_platform()` (the TPU kernel
      on CPU).
    interpret: passed to `pallas_call`: True, False or `pltpu.InterpretParams()`; None interprets exactly when the
      default backend is not the kernel's (e.g. on CPU).
    mesh, batch_axes, channel_axes: run under `jax.shard_map` over these mesh axes (default mesh: the abstract mesh
      in context), batch rows and channels split, the sequence whole on every shard (the recurrence runs along it).
      Mosaic kernels cannot be partitioned by XLA, so a sharded caller must name its axes here. Without axes the
      kernel sees the whole arrays.
    resets: optional (B, L) bool, True where a new document starts at step t; split over the batch axes like x.
      None runs the kernels without the extra input.
  Returns:
    y: (B, L, D) float32 and the state after the last step, (B, D, N, 2) float32.
  """
  planes = (p, q_re, q_im, g_re, g_im)
  _check_inputs(x, planes, omega, h0, resets)
  bs = block_sizes or BlockSizes()
  backend, interpret = _resolve(backend, interpret)
  batch, _, dim = x.shape
  omega = omega.reshape(dim)
  local = functools.partial(_scan_local, bs=bs, backend=backend, interpret=interpret)
  mesh, batch_axes, channel_axes = shard_plan(mesh, batch, dim, batch_axes, channel_axes, "channel_axes")
  if mesh is None:
    return local(x, planes, omega, h0, resets)
  bax, cax = batch_axes or None, channel_axes or None
  seq, plane, state = P(bax, None, cax), P(cax, None), P(bax, cax, None, None)
  # Optional arrays travel as a dict, so an absent one is simply not an argument of the shard_map.
  optional = {k: v for k, v in (("h0", h0), ("resets", resets)) if v is not None}
  specs = {"h0": state, "resets": P(bax, None)}

  def body(x_, planes_, omega_, opt):
    return local(x_, planes_, omega_, opt.get("h0"), opt.get("resets"))

  # Coefficients replicated over the batch axes: shard_map's transpose sums their per-shard cotangents over those
  # axes. check_vma=False: pallas_call carries no varying-manual-axes typing for its outputs.
  return jax.shard_map(body, mesh=mesh, in_specs=(seq, (plane,) * 5, P(cax), {k: specs[k] for k in optional}),
                       out_specs=(seq, state), check_vma=False)(x, planes, omega, optional)
