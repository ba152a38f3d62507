"""The official Megalodon optimizer in optax: global-norm clip, AdamW and the LambdaLR learning-rate schedule.

Mirrors `megalodon/optim/*.py` (docs/training.md#optimizer):
- `torch.optim.AdamW` over every parameter (no weight-decay exclusions), betas (0.9, 0.98), eps 1e-8, wd 0.1.
- `LambdaLR` multiplier: linear warmup from `init_ratio`, then linear or cosine decay to `end_ratio` at
  `total_steps`, flat `end_ratio` afterwards ("constant" stays at 1 after warmup).
- FSDP `clip_grad_norm_`: grads scaled by max_norm / (norm + 1e-6) only when that is below 1.

Step indexing: torch's `LambdaLR` sets lr = peak * lambda(0) at construction and the training loop calls
`scheduler.step()` after `optimizer.step()`, so the k-th update (0-based) uses lambda(k). optax calls a schedule
with the number of updates already applied, i.e. also k, so `lr_schedule` is the official lambda times `lr`
with no shift.
"""

from __future__ import annotations

from typing import Any, Optional

import jax
import jax.numpy as jnp
import optax

from megalodon_jax.training.optimizer_args import (  # noqa: F401  (SCHEDULERS, DECAY_MASKS: public names here too)
    DECAY_MASKS, SCHEDULERS, OptimizerConfig, check_adamw_args, check_real, check_schedule_args)

# FSDP / torch `clip_grad_norm_` add this to the norm before dividing; optax.clip_by_global_norm does not.
_CLIP_EPS = 1e-6


def lr_schedule(lr: float, total_steps: int, warmup_steps: int, scheduler: str = "linear",
                init_ratio: float = 1e-4, end_ratio: float = 0.01, cycles: float = 1.0) -> optax.Schedule:
  """The official `LambdaLR` learning rate, `lr` times the multiplier of `megalodon/optim/lr_scheduler.py`.

  Multiplier at update `step` (0-based, the count optax passes):
    step < warmup:            init + step * (1 - init) / warmup
    warmup <= step <= total:  s = (step - warmup) / (total - warmup), then
                              linear: s * end + (1 - s);  cosine: end + 0.5 * (1 - end) * (1 + cos(pi * s * cycles))
    step > total:             end
    constant:                 the warmup ramp, then 1 forever.

  Args:
    lr: Base learning rate (the official `lr`), > 0.
    total_steps: Number of optimizer updates the decay spans, >= 1.
    warmup_steps: Length of the linear warmup, 0 <= warmup_steps <= total_steps (strictly less unless "constant").
    scheduler: "linear", "cosine" or "constant".
    init_ratio: Multiplier at step 0, in [0, 1].
    end_ratio: Multiplier at and after `total_steps`, in [0, 1] (unused by "constant").
    cycles: Cosine half-periods over the decay (the official `cycles`), > 0 (cosine only).

  Returns:
    An optax schedule mapping the update count to the learning rate (float32, jit-safe).

  Raises:
    FieldError (a ValueError): an argument is out of range; the message names it.
  """
  check_schedule_args(lr, total_steps, warmup_steps, scheduler, init_ratio, end_ratio, cycles)
  peak, init, end = float(lr), float(init_ratio), float(end_ratio)
  # max(.., 1) only guards the division when warmup is 0: then `step < warmup` never selects the ramp.
  ramp_slope = (1.0 - init) / max(warmup_steps, 1)
  decay_len = float(max(total_steps - warmup_steps, 1))

  def schedule(count: jax.Array) -> jax.Array:
    step = jnp.asarray(count, jnp.float32)
    ramp = init + step * ramp_slope
    if scheduler == "constant":
      ratio = jnp.where(step < warmup_steps, ramp, 1.0)
    else:
      s = (step - warmup_steps) / decay_len
      if scheduler == "linear":
        decay = s * end + (1.0 - s)
      else:
        decay = end + 0.5 * (1.0 - end) * (1.0 + jnp.cos(jnp.pi * s * cycles))
      ratio = jnp.where(step < warmup_steps, ramp, jnp.where(step <= total_steps, decay, end))
    return peak * ratio

  return schedule


def clip_by_global_norm_official(max_norm: float) -> optax.GradientTransformation:
  """Global-norm clipping as FSDP's `clip_grad_norm_`: scale by max_norm / (norm + 1e-6) when that is < 1.

  Differs from `optax.clip_by_global_norm`, which scales by max_norm / norm with no epsilon; the 1e-6 changes
  clipped gradients by a relative ~1e-6 / norm, enough to break tight parity with the official run.

  Args:
    max_norm: Threshold on the global L2 norm of all gradients, > 0.

  Returns:
    A stateless optax transformation.

  Raises:
    ValueError: If `max_norm` is not positive.
  """
  check_real("clip_by_global_norm_official", "max_norm", max_norm, 0.0, low_inclusive=False)

  def init_fn(params: Any) -> optax.EmptyState:
    del params
    return optax.EmptyState()

  def update_fn(updates: Any, state: optax.EmptyState, params: Optional[Any] = None):
    del params
    norm = optax.tree.norm(updates)
    coef = max_norm / (norm + _CLIP_EPS)
    # Scale only when clipping; multiplying by exactly 1 is a no-op, so the where keeps unclipped grads bit-exact.
    scale = jnp.where(coef < 1.0, coef, 1.0)
    updates = jax.tree_util.tree_map(lambda g: (g * scale.astype(g.dtype)).astype(g.dtype), updates)
    return updates, state

  return optax.GradientTransformation(init_fn, update_fn)


def _matrices_mask(params: Any) -> Any:
  # Decay only weight matrices (and higher-rank tensors); norms, biases and CEMA vectors are 1-D or scalars.
  return jax.tree_util.tree_map(lambda p: jnp.ndim(p) >= 2, params)


def make_optimizer(lr: float, total_steps: int, warmup_steps: int, *, scheduler: str = "linear",
                   init_ratio: float = 1e-4, end_ratio: float = 0.01, cycles: float = 1.0, b1: float = 0.9,
                   b2: float = 0.98, eps: float = 1e-8, weight_decay: float = 0.1, clip: Optional[float] = 1.0,
                   decay_mask: str = "all", grad_accum_steps: int = 1) -> optax.GradientTransformation:
  """The official optimizer: global-norm clip, then AdamW with the `LambdaLR` schedule.

  AdamW is torch's: the decay is decoupled and scaled by the scheduled lr, p <- p - lr * (adam + wd * p), which is
  what `optax.adamw` computes (eps outside the square root, no eps_root).

  Args:
    lr: Base learning rate (official `lr`).
    total_steps: Optimizer updates the schedule spans (counts real updates, not micro-batches).
    warmup_steps: Warmup length in optimizer updates.
    scheduler: "linear", "cosine" or "constant"; see `lr_schedule`.
    init_ratio: Schedule multiplier at step 0.
    end_ratio: Schedule multiplier from `total_steps` on.
    cycles: Cosine cycles.
    b1: Adam first-moment decay, in [0, 1).
    b2: Adam second-moment decay, in [0, 1).
    eps: Adam denominator epsilon, > 0.
    weight_decay: Decoupled weight decay, >= 0.
    clip: Global-norm clip threshold, > 0; None disables clipping.
    decay_mask: "all" decays every parameter, as the official code does; "matrices" decays only params with
      ndim >= 2.
    grad_accum_steps: Micro-batches per update, >= 1; above 1 the optimizer is wrapped in `optax.MultiSteps`, which
      averages the gradients and applies one update (returning zero updates in between). Clipping then acts on the
      averaged gradient, like the official clip after accumulation.

  Returns:
    An optax GradientTransformation.

  Raises:
    FieldError (a ValueError): an argument is out of range; the message names it.
  """
  schedule = lr_schedule(lr, total_steps, warmup_steps, scheduler, init_ratio, end_ratio, cycles)
  check_adamw_args(b1=b1, b2=b2, eps=eps, weight_decay=weight_decay, clip=clip, decay_mask=decay_mask,
                   grad_accum_steps=grad_accum_steps)

  mask = None if decay_mask == "all" else _matrices_mask
  adamw = optax.adamw(schedule, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay, mask=mask)
  tx = adamw if clip is None else optax.chain(clip_by_global_norm_official(clip), adamw)
  if grad_accum_steps > 1:
    tx = optax.MultiSteps(tx, every_k_schedule=grad_accum_steps).gradient_transformation()
  return tx


def from_config(o: OptimizerConfig, total_steps: int) -> tuple[optax.Schedule, optax.GradientTransformation]:
  """(lr schedule, optimizer) of the training config's `optimizer` section for a run of `total_steps` updates."""
  schedule_args = dict(scheduler=o.scheduler, init_ratio=o.init_ratio, end_ratio=o.end_ratio, cycles=o.cycles)
  return (lr_schedule(o.lr, total_steps, o.warmup_steps, **schedule_args),
          make_optimizer(o.lr, total_steps, o.warmup_steps, **schedule_args, b1=o.b1, b2=o.b2, eps=o.eps,
                         weight_decay=o.weight_decay, clip=o.clip or None, decay_mask=o.decay_mask))
