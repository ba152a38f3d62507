"""SIGTERM (a preemption notice) as a flag the training loop polls between steps, so it can save and exit."""

from __future__ import annotations

import logging
import signal
from typing import Any

import jax

log = logging.getLogger("megalodon_jax")


class PreemptionFlag:
  """Turns SIGTERM (the preemption notice) into a flag the training loop polls between steps.

  Single process: a SIGTERM handler sets `requested`; `close()` restores the previous handler. Multi-process
  (`jax.distributed`): jax's preemption service owns SIGTERM and picks one step at which every process saves, so no
  handler is installed and `check(step)` must be called by every process at every step.
  """

  def __init__(self):
    self.requested = False
    self._previous: Any = None
    self._installed = False
    self._multiprocess = jax.process_count() > 1
    if self._multiprocess:
      return
    try:
      self._previous = signal.signal(signal.SIGTERM, self._handle)
      self._installed = True
    except ValueError:  # not the main thread: signals cannot be handled here
      log.warning("PreemptionFlag created outside the main thread: SIGTERM is not intercepted")

  def _handle(self, signum: int, frame: Any) -> None:
    del signum, frame
    self.requested = True

  def check(self, step: int) -> bool:
    """True once a preemption was signalled (multi-process: once all processes reached the agreed step)."""
    if not self.requested and self._multiprocess:
      try:
        from jax.experimental import multihost_utils
        self.requested = bool(multihost_utils.reached_preemption_sync_point(step))
      except RuntimeError:  # preemption service disabled (jax_enable_preemption_service=False)
        pass
    return self.requested

  def close(self) -> None:
    if self._installed:
      signal.signal(signal.SIGTERM, self._previous if self._previous is not None else signal.SIG_DFL)
      self._installed = False
