"""The optimizer section of the training config (`OptimizerConfig`) and the checks of the optimizer's arguments,
without jax or optax (command lines check a config before jax starts).

Every check raises `FieldError(owner, field, value, why)`: the owner is the caller (`lr_schedule`, `make_optimizer`,
`optimizer`), so a training config reports the error under its command-line key and a library call under its
argument's name.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Optional, Sequence

from megalodon_jax.errors import FieldError

SCHEDULERS = ("linear", "cosine", "constant")
DECAY_MASKS = ("all", "matrices")


def check_int(owner: str, name: str, value: Any, minimum: int) -> None:
  # bool is an int subclass; reject it so `warmup_steps=True` is not silently 1.
  if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
    raise FieldError(owner, name, value, f"must be an int >= {minimum}")


def check_real(owner: str, name: str, value: Any, low: float, high: float = math.inf, low_inclusive: bool = True,
               high_inclusive: bool = True) -> None:
  ok_type = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
  ok_low = ok_type and (value >= low if low_inclusive else value > low)
  ok_high = ok_type and (value <= high if high_inclusive else value < high)
  if not (ok_type and ok_low and ok_high):
    lo = "[" if low_inclusive else "("
    hi = "]" if high_inclusive else ")"
    raise FieldError(owner, name, value, f"must be a finite number in {lo}{low}, {high}{hi}")


def check_choice(owner: str, name: str, value: Any, allowed: Sequence[Any]) -> None:
  if value not in allowed:
    raise FieldError(owner, name, value, f"must be one of {tuple(allowed)}")


def check_warmup(owner: str, warmup_steps: int, total_steps: int, scheduler: str, field: str = "warmup_steps") -> None:
  """The warmup fits in the run: at most total_steps, and strictly less for a schedule that decays after it."""
  if warmup_steps > total_steps:
    raise FieldError(owner, field, warmup_steps, f"must not exceed total_steps ({total_steps})")
  if scheduler != "constant" and warmup_steps == total_steps:
    # The official lambda divides by (total - warmup) at step == warmup; it would raise ZeroDivisionError.
    raise FieldError(owner, field, warmup_steps, f"must be < total_steps ({total_steps}) for the {scheduler!r} "
                     "scheduler, which decays between them")


def check_schedule_fields(owner: str, lr: float, warmup_steps: int, scheduler: str, init_ratio: float,
                          end_ratio: float, cycles: float) -> None:
  """The schedule's own arguments (everything but how they fit `total_steps`)."""
  check_choice(owner, "scheduler", scheduler, SCHEDULERS)
  check_real(owner, "lr", lr, 0.0, low_inclusive=False)
  check_int(owner, "warmup_steps", warmup_steps, 0)
  check_real(owner, "init_ratio", init_ratio, 0.0, 1.0)
  check_real(owner, "end_ratio", end_ratio, 0.0, 1.0)
  check_real(owner, "cycles", cycles, 0.0, low_inclusive=False)


def check_schedule_args(lr: float, total_steps: int, warmup_steps: int, scheduler: str, init_ratio: float,
                        end_ratio: float, cycles: float, owner: str = "lr_schedule") -> None:
  """The arguments of `optimizer.lr_schedule`."""
  check_int(owner, "total_steps", total_steps, 1)
  check_schedule_fields(owner, lr, warmup_steps, scheduler, init_ratio, end_ratio, cycles)
  check_warmup(owner, warmup_steps, total_steps, scheduler)


def check_adamw_args(*, b1: float, b2: float, eps: float, weight_decay: float, clip: Optional[float],
                     decay_mask: str, grad_accum_steps: int = 1, owner: str = "make_optimizer") -> None:
  """The AdamW, clipping and accumulation arguments of `optimizer.make_optimizer` (clip None: no clipping)."""
  check_real(owner, "b1", b1, 0.0, 1.0, high_inclusive=False)
  check_real(owner, "b2", b2, 0.0, 1.0, high_inclusive=False)
  check_real(owner, "eps", eps, 0.0, low_inclusive=False)
  check_real(owner, "weight_decay", weight_decay, 0.0)
  if clip is not None:
    check_real(owner, "clip", clip, 0.0, low_inclusive=False)
  check_choice(owner, "decay_mask", decay_mask, DECAY_MASKS)
  check_int(owner, "grad_accum_steps", grad_accum_steps, 1)


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
  """The `optimizer` section: official AdamW + LambdaLR (training/optimizer.py). How warmup_steps fits the run's
  total_steps is checked by the training config, which holds both."""

  lr: float = 1e-3  # peak learning rate
  warmup_steps: int = 100  # linear warmup steps
  scheduler: str = "cosine"  # linear | cosine | constant: decay after warmup
  init_ratio: float = 1e-4  # lr multiplier at step 0 (official default)
  end_ratio: float = 0.1  # lr multiplier reached at total_steps
  cycles: float = 1.0  # cosine half-periods over the decay
  b1: float = 0.9  # Adam beta1
  b2: float = 0.95  # Adam beta2
  eps: float = 1e-8  # Adam epsilon
  weight_decay: float = 0.1  # decoupled weight decay
  decay_mask: str = "all"  # all (official: every parameter) | matrices (only ndim >= 2)
  clip: float = 1.0  # global gradient-norm clip; 0 disables

  def __post_init__(self):
    owner = type(self).__name__
    check_schedule_fields(owner, self.lr, self.warmup_steps, self.scheduler, self.init_ratio, self.end_ratio,
                          self.cycles)
    check_adamw_args(b1=self.b1, b2=self.b2, eps=self.eps, weight_decay=self.weight_decay, clip=self.clip or None,
                     decay_mask=self.decay_mask, owner=owner)
