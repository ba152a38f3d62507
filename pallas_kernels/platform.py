"""The platform kernels are built for: the default JAX backend, or a compile target named by the caller.

Ahead-of-time compilation for a TPU or GPU runs in a CPU process (abstract devices from
`jax.experimental.topologies`), where `jax.default_backend()` says "cpu". Code that picks a kernel family or an
implementation by platform asks `current_platform()` instead, and the compiler of such a program wraps the trace
in `with target_platform("tpu"):` so the choices are the ones a real TPU process would make.
"""

from __future__ import annotations

import contextlib
import contextvars
from typing import Iterator, Optional

import jax

PLATFORMS = ("cpu", "tpu", "gpu")
_ALIASES = {"cuda": "gpu", "rocm": "gpu"}
_TARGET: contextvars.ContextVar[Optional[str]] = contextvars.ContextVar("pallas_kernels_target_platform",
                                                                         default=None)


def normalize(platform: str) -> str:
  """"cpu" | "tpu" | "gpu" for a JAX platform name ("cuda" and "rocm" are "gpu")."""
  name = _ALIASES.get(platform, platform)
  if name not in PLATFORMS:
    raise ValueError(f"unknown platform {platform!r}; expected one of {PLATFORMS} (or cuda / rocm)")
  return name


def current_platform() -> str:
  """The platform programs are being built for: the innermost `target_platform`, else the default backend."""
  target = _TARGET.get()
  return target if target is not None else normalize(jax.default_backend())


def compiling_for_other_platform() -> bool:
  """True inside `target_platform(p)` when p is not this process's own backend (a deviceless compile)."""
  target = _TARGET.get()
  return target is not None and target != normalize(jax.default_backend())


@contextlib.contextmanager
def target_platform(platform: str) -> Iterator[None]:
  """Within the block, `current_platform()` is `platform`: kernels compile natively for it (not interpreted)."""
  token = _TARGET.set(normalize(platform))
  try:
    yield
  finally:
    _TARGET.reset(token)
