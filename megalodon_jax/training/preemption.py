"""SIGTERM (a preemption notice) as a flag the training loop polls between steps, so it can save and exit."""

from __future__ import annotations

import logging
import signal
from typing import Any

import jax
import numpy as np

log = logging.getLogger("megalodon_jax")


def _preemption_service_available() -> bool:
  """Whether jax.distributed runs with its preemption sync manager (`jax_enable_preemption_service`, on by default).

  `multihost_utils.reached_preemption_sync_point` answers False forever when jax.distributed was not initialised
  and raises when the service is off; neither may pass silently, so ask the distributed state directly."""
  from jax._src import distributed  # pylint: disable=import-outside-toplevel
  state = distributed.global_state
  return state.client is not None and state.preemption_sync_manager is not None


class PreemptionFlag:
  """Turns SIGTERM (the preemption notice) into a flag the training loop polls between steps.

  Single process: a SIGTERM handler sets `requested`; `close()` restores the previous handler.
  Multi-process with jax's preemption service: the service owns SIGTERM and picks one step at which every process
  saves, so no handler is installed and `check(step)` must be called by every process at every step.
  Multi-process without it (jax.distributed not initialised by us, or the service disabled): each process catches
  its own SIGTERM and every `agree_every` steps all processes all-gather their flags, so they stop at the same
  step; that all-gather waits for the device, which is why it is not done every step. A warning says so at start.
  """

  def __init__(self, agree_every: int = 1):
    self.requested = False
    self._previous: Any = None
    self._installed = False
    self._local = False
    self._agree_every = max(1, int(agree_every))
    multiprocess = jax.process_count() > 1
    self._use_service = multiprocess and _preemption_service_available()
    self._allgather = multiprocess and not self._use_service
    if self._use_service:
      return
    if self._allgather:
      log.warning("jax's preemption service is not running (jax.distributed not initialised by megalodon-jax, or "
                  "jax_enable_preemption_service=False): SIGTERM on any process is agreed on by an all-gather every "
                  "%d step(s) instead", self._agree_every)
    try:
      self._previous = signal.signal(signal.SIGTERM, self._handle)
      self._installed = True
    except ValueError:  # not the main thread: signals cannot be handled here
      log.warning("PreemptionFlag created outside the main thread: SIGTERM is not intercepted")

  def _handle(self, signum: int, frame: Any) -> None:
    del signum, frame
    self._local = True
    if not self._allgather:
      self.requested = True

  def check(self, step: int) -> bool:
    """True once a preemption was signalled (multi-process: at a step on which all processes agree).

    Must be called by every process at every step (the service and the all-gather are collective)."""
    if self.requested:
      return True
    if self._use_service:
      from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
      self.requested = bool(multihost_utils.reached_preemption_sync_point(step))
    elif self._allgather and step % self._agree_every == 0:
      from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
      flags = multihost_utils.process_allgather(np.asarray([self._local], np.int32))
      self.requested = bool(np.asarray(flags).any())
    return self.requested

  def close(self) -> None:
    if self._installed:
      signal.signal(signal.SIGTERM, self._previous if self._previous is not None else signal.SIG_DFL)
      self._installed = False
