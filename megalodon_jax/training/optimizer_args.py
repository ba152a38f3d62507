"""The optimizer's arguments, checked without jax or optax (command lines check a config before jax starts).

Every check raises ValueError whose message starts with the argument's name (`peak_lr must be ...`), which
`config_lib.validate` maps to the config key.
"""

from __future__ import annotations

import math
from typing import Any, Optional

SCHEDULERS = ("linear", "cosine", "constant")
DECAY_MASKS = ("all", "matrices")


def check_int(name: str, value: Any, minimum: int) -> None:
  # bool is an int subclass; reject it so `warmup_steps=True` is not silently 1.
  if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
    raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")


def check_real(name: str, value: Any, low: float, high: float = math.inf, low_inclusive: bool = True,
               high_inclusive: bool = True) -> None:
  ok_type = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
  ok_low = ok_type and (value >= low if low_inclusive else value > low)
  ok_high = ok_type and (value <= high if high_inclusive else value < high)
  if not (ok_type and ok_low and ok_high):
    lo = "[" if low_inclusive else "("
    hi = "]" if high_inclusive else ")"
    raise ValueError(f"{name} must be a finite number in {lo}{low}, {high}{hi}, got {value!r}")


def check_schedule_args(peak_lr: float, total_steps: int, warmup_steps: int, scheduler: str, init_ratio: float,
                        end_ratio: float, cycles: float) -> None:
  """The arguments of `optimizer.lr_schedule`."""
  if scheduler not in SCHEDULERS:
    raise ValueError(f"scheduler must be one of {SCHEDULERS}, got {scheduler!r}")
  check_real("peak_lr", peak_lr, 0.0, low_inclusive=False)
  check_int("total_steps", total_steps, 1)
  check_int("warmup_steps", warmup_steps, 0)
  if warmup_steps > total_steps:
    raise ValueError(f"warmup_steps ({warmup_steps}) must not exceed total_steps ({total_steps})")
  if scheduler != "constant" and warmup_steps == total_steps:
    # The official lambda divides by (total - warmup) at step == warmup; it would raise ZeroDivisionError.
    raise ValueError(f"warmup_steps ({warmup_steps}) must be < total_steps ({total_steps}) for the "
                     f"{scheduler!r} scheduler, which decays between them")
  check_real("init_ratio", init_ratio, 0.0, 1.0)
  check_real("end_ratio", end_ratio, 0.0, 1.0)
  check_real("cycles", cycles, 0.0, low_inclusive=False)


def check_adamw_args(*, b1: float, b2: float, eps: float, weight_decay: float, clip: Optional[float],
                     decay_mask: str, grad_accum_steps: int) -> None:
  """The AdamW, clipping and accumulation arguments of `optimizer.make_optimizer`."""
  check_real("b1", b1, 0.0, 1.0, high_inclusive=False)
  check_real("b2", b2, 0.0, 1.0, high_inclusive=False)
  check_real("eps", eps, 0.0, low_inclusive=False)
  check_real("weight_decay", weight_decay, 0.0)
  if clip is not None:
    check_real("clip", clip, 0.0, low_inclusive=False)
  if decay_mask not in DECAY_MASKS:
    raise ValueError(f"decay_mask must be one of {DECAY_MASKS}, got {decay_mask!r}")
  check_int("grad_accum_steps", grad_accum_steps, 1)
