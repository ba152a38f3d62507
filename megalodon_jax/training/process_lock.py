"""The workdir lock across the processes of one run: process 0 holds it (workdir_lock.py), the others share it.

A run of several processes (a TPU pod slice, a multi-host GPU job) is one writer: process 0 takes the lock, and
the outcome (taken, or refused with the holder's description) reaches every process through jax.distributed's
key-value store, so a refused run stops on all processes with the same one-line error instead of leaving the other
processes waiting at their first collective.
"""

from __future__ import annotations

from typing import Optional

import jax

from megalodon_jax.errors import CheckpointError, MegalodonError
from megalodon_jax.training.workdir_lock import WorkdirLock

_TIMEOUT_MS = 600_000  # process 0 may be slow to reach the lock (data preparation runs before it elsewhere)
_calls = {"n": 0}  # keys and barrier names are used once: the processes of a run count their calls alike


def _unique(name: str) -> str:
  _calls["n"] += 1
  return f"{name}/{_calls['n']}"


class Held:
  """The lock of this process's run: `release()` frees it (process 0) or does nothing (other processes)."""

  def __init__(self, lock: Optional[WorkdirLock]):
    self._lock = lock

  def release(self) -> None:
    if self._lock is not None:
      self._lock.release()


def _client():
  from jax._src import distributed  # pylint: disable=import-outside-toplevel
  return distributed.global_state.client


def hold(workdir: str, is_main: bool) -> Held:
  """Takes `workdir`'s lock in process 0 and shares the outcome with every process of the run.

  Raises:
    CheckpointError: (in every process) another run holds the lock; the message names its host, pid and start.
  """
  lock, refused = None, ""
  if is_main:
    try:
      lock = WorkdirLock(workdir).acquire()
    except MegalodonError as e:
      refused = str(e) or "the workdir lock could not be taken"
    except OSError as e:  # e.g. no permission to create files in the workdir
      refused = f"cannot take the lock of workdir {workdir}: {e}"
  if jax.process_count() > 1:
    refused = _share(workdir, refused, is_main)
  if refused:
    raise CheckpointError(refused)
  return Held(lock)


def _share(workdir: str, refused: str, is_main: bool) -> str:
  client = _client()
  if client is None:  # several processes without jax.distributed: a device collective carries one flag
    from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
    import numpy as np  # pylint: disable=import-outside-toplevel
    ok = multihost_utils.broadcast_one_to_all(np.asarray(0 if refused else 1, np.int32))
    return "" if int(ok) else (refused or f"workdir {workdir} is in use by another training run")
  key = _unique(f"megalodon_jax/workdir_lock/{workdir}")
  if is_main:
    client.key_value_set(key, "refused:" + refused if refused else "held")
    return refused
  value = client.blocking_key_value_get(key, _TIMEOUT_MS)
  return value[len("refused:"):] if value.startswith("refused:") else ""


def barrier(name: str) -> None:
  """Waits until every process of the run gets here (nothing to wait for with one process)."""
  if jax.process_count() == 1:
    return
  client = _client()
  if client is not None:
    client.wait_at_barrier(_unique(name), _TIMEOUT_MS)
  else:
    from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
    multihost_utils.sync_global_devices(name)
