"""SIGTERM (a preemption notice) and Ctrl-C (SIGINT) as a flag the training loop polls between steps, so it can save
and exit.

Ctrl-C behaves like SIGTERM: the first one saves at the next step boundary and stops the run (the trainer then
raises `TrainingInterrupted`, a KeyboardInterrupt, so command lines exit 130 and notebooks see an interrupt). A second
Ctrl-C stops at once without saving: a save in flight is abandoned in its `<step>.orbax-checkpoint-tmp` folder,
which is never restored, so no half-written step ever carries a final step name.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
from typing import Any, Callable, Optional

import jax
import numpy as np

log = logging.getLogger("megalodon_jax")


def _distributed_state() -> Any:
  from jax._src import distributed  # pylint: disable=import-outside-toplevel
  return distributed.global_state


EXIT_INTERRUPTED = 128 + signal.SIGINT  # 130, what a shell reports for a command stopped by Ctrl-C


class TrainingInterrupted(KeyboardInterrupt):
  """Ctrl-C stopped a training run after it saved the checkpoint of `step` (the run resumes from there)."""

  def __init__(self, step: int):
    super().__init__(f"interrupted (Ctrl-C): saved the checkpoint of step {step}")
    self.step = step


class PreemptionFlag:
  """Turns SIGTERM (the preemption notice) and SIGINT (Ctrl-C) into a flag the training loop polls between steps.

  Single process: a SIGTERM handler sets `requested`; `close()` restores the previous handler.
  Several processes must stop at the same step, so `check(step)` must be called by every process at every step:
  - with jax's preemption service (jax.distributed initialised, `jax_enable_preemption_service` on, the default):
    the service owns SIGTERM and picks the step; no handler is installed here;
  - without it: each process catches its own SIGTERM, and every `agree_every` steps the processes exchange their
    flags, through the coordination service's key-value store when jax.distributed runs (host-only messages),
    otherwise with a device all-gather. A warning says so at start, since this can lag up to `agree_every` steps.
  (`multihost_utils.reached_preemption_sync_point` alone would be silent: it answers False forever when
  jax.distributed was not initialised and raises every step when the service is off.)
  SIGINT is always handled here: the first one counts as this process's SIGTERM (with the service, it is re-sent
  as a SIGTERM to this process, which the service then spreads); `interrupted` records it. The second one calls
  `on_second_interrupt` (e.g. releasing the workdir lock), prints one line and ends the process with status 130.
  """

  def __init__(self, agree_every: int = 1, on_second_interrupt: Optional[Callable[[], None]] = None):
    self.requested = False
    self.interrupted = False
    self._previous: Any = None
    self._previous_int: Any = None
    self._installed = False
    self._int_installed = False
    self._local = False
    self._on_second_interrupt = on_second_interrupt
    self._agree_every = max(1, int(agree_every))
    self._mode = "single"
    if jax.process_count() > 1:
      state = _distributed_state()
      if state.client is not None and state.preemption_sync_manager is not None:
        self._mode = "service"
        self._install_sigint()
        return
      self._mode = "kv" if state.client is not None else "allgather"
      self._client = state.client
      self._last_key: Any = None
      log.warning("jax's preemption service is not running (%s): a SIGTERM on any process is agreed on every %d "
                  "step(s) instead", "jax_enable_preemption_service=False" if self._mode == "kv" else
                  "jax.distributed was not initialised; set MEGALODON_DISTRIBUTED=1", self._agree_every)
    try:
      self._previous = signal.signal(signal.SIGTERM, self._handle)
      self._installed = True
    except ValueError:  # not the main thread: signals cannot be handled here
      log.warning("PreemptionFlag created outside the main thread: SIGTERM is not intercepted")
    self._install_sigint()

  def _install_sigint(self) -> None:
    try:
      self._previous_int = signal.signal(signal.SIGINT, self._handle_interrupt)
      self._int_installed = True
    except ValueError:  # not the main thread
      self._int_installed = False

  def _handle(self, signum: int, frame: Any) -> None:
    del signum, frame
    self._local = True
    if self._mode == "single":
      self.requested = True

  def _handle_interrupt(self, signum: int, frame: Any) -> None:
    if self.interrupted:
      self._stop_now()
    self.interrupted = True
    print("interrupted: saving a checkpoint at the end of this step, then stopping (Ctrl-C again stops at once, "
          "without saving)", file=sys.stderr, flush=True)
    if self._mode == "service":
      os.kill(os.getpid(), signal.SIGTERM)  # the service catches it and picks a step every process stops at
    else:
      self._handle(signum, frame)

  def _stop_now(self) -> None:
    try:
      if self._on_second_interrupt is not None:
        self._on_second_interrupt()
    finally:
      print("error: interrupted twice: stopped without saving; re-run the same command to resume from the last "
            "checkpoint", file=sys.stderr, flush=True)
      os._exit(EXIT_INTERRUPTED)  # pylint: disable=protected-access  (no unwinding: nothing waits for a save)

  def check(self, step: int) -> bool:
    """True once a preemption was signalled (several processes: at a step all of them agree on)."""
    if self.requested:
      return True
    if self._mode == "service":
      from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
      self.requested = bool(multihost_utils.reached_preemption_sync_point(step))
    elif self._mode != "single" and step % self._agree_every == 0:
      self.requested = self._agree(step)
    return self.requested

  def _agree(self, step: int) -> bool:
    if self._mode == "allgather":
      from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
      return bool(np.asarray(multihost_utils.process_allgather(np.asarray([self._local], np.int32))).any())
    prefix = f"megalodon_jax/preemption/{step}/"
    key = f"{prefix}{jax.process_index()}"
    self._client.key_value_set(key, "1" if self._local else "0")
    # Everyone's flag is in the store once all processes passed the barrier; a slow step (compile, eval, save)
    # of another process is waited for, as its next collective would be.
    self._client.wait_at_barrier(f"megalodon_jax/preemption/{step}", 3_600_000)
    flags = [value for _, value in self._client.key_value_dir_get(prefix)]
    if self._last_key is not None:
      self._client.key_value_delete(self._last_key)
    self._last_key = key
    return "1" in flags

  def close(self) -> None:
    if self._installed:
      signal.signal(signal.SIGTERM, self._previous if self._previous is not None else signal.SIG_DFL)
      self._installed = False
    if self._int_installed:
      signal.signal(signal.SIGINT, self._previous_int if self._previous_int is not None else signal.default_int_handler)
      self._int_installed = False
