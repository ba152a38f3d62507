"""Profiler traces of chosen training steps: `--config.profile_steps`.

"START,STOP" traces the steps START to STOP, both included (1 <= START <= STOP <= total_steps; a resumed run traces
the part of that window it runs). "N" traces N steps from the second step this attempt runs (the first one after
the compiled step's warm-up): steps start+2 .. start+1+N, start being the step the run (re)started from.

Each traced step is a `jax.profiler.StepTraceAnnotation("train", step_num=step)`, so XProf / TensorBoard's profile
plugin show per-step times; the trace stops after the window's last step has finished on the device. jax writes
`plugins/profile/<timestamp>/<host>.xplane.pb` (XProf, `tensorboard --logdir <workdir>/profile`), `<host>.trace.json.gz`
and `perfetto_trace.json.gz` (ui.perfetto.dev) under `<workdir>/profile` (`profile/process_<i>` per process when
`profile_all_processes` is set on a multi-process job). jax's exporter and its Perfetto writer take local paths
only, so a remote workdir (gs://...) is traced to a local folder and the files are copied up after the trace.

Only the jax-free parsing runs at config time; jax is imported when a trace starts.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
from typing import Any, Iterator, Optional

from megalodon_jax import paths

log = logging.getLogger("megalodon_jax")

PROFILE_DIR = "profile"


def check_profile_steps(value: Any, total_steps: int) -> Optional[str]:
  """Why `value` (the config's `profile_steps`) is invalid for a run of `total_steps`, or None when it is valid."""
  if not isinstance(value, str):
    return 'must be a string: "" (off), "START,STOP" or a step count "N"'
  text = value.strip()
  if not text:
    return None
  parts = [p.strip() for p in text.split(",")]
  if len(parts) > 2 or not all(p.isdigit() for p in parts):
    return 'must be "" (off), "START,STOP" (steps START to STOP, both traced) or a step count "N"'
  if len(parts) == 1:
    n = int(parts[0])
    if not 1 <= n <= total_steps - 1:
      return (f"a step count must be in [1, total_steps - 1 = {total_steps - 1}]: it traces steps 2 .. N + 1 of a "
              "new run (the first step is left out as warm-up)")
    return None
  first, last = int(parts[0]), int(parts[1])
  if not 1 <= first <= last <= total_steps:
    return f"START,STOP must satisfy 1 <= START <= STOP <= total_steps ({total_steps})"
  return None


def profile_window(value: str, *, start: int, total_steps: int) -> Optional[tuple[int, int]]:
  """(first, last) step to trace (both included) in an attempt that starts after step `start`, or None when
  `profile_steps` is off or its window lies outside the steps this attempt runs. `value` is a valid one."""
  text = value.strip()
  if not text:
    return None
  parts = [int(p) for p in text.split(",")]
  if len(parts) == 1:
    first, last = start + 2, min(start + 1 + parts[0], total_steps)
  else:
    first, last = max(parts[0], start + 1), parts[1]
  return (first, last) if first <= last else None


class StepProfiler:
  """Starts a jax.profiler trace at the window's first step and stops it after its last (see the module doc).

  Usage, per step: `with prof.step(step): ...dispatch...` then `prof.after(step, state)`; `close()` at the end
  (stops a trace a stopped run left open, e.g. SIGTERM inside the window, so its steps are still written).

  Args:
    profile_steps: the config value (valid).
    workdir: the run directory; traces go to `<workdir>/profile`.
    start: the step this attempt starts after.
    total_steps: the run's last step.
    enabled: whether this process traces (process 0, or every process with `profile_all_processes`).
    subdir: a folder below profile/ for this process ("" = none).
    wait: called with the state before the trace stops, to have the device finish the traced steps (the goodput
      timer charges that wait to "step").
  """

  def __init__(self, profile_steps: str, *, workdir: str, start: int, total_steps: int, enabled: bool,
               subdir: str = "", wait: Any = None):
    self.window = profile_window(profile_steps, start=start, total_steps=total_steps) if enabled else None
    self.target = paths.join(workdir, PROFILE_DIR, subdir) if subdir else paths.join(workdir, PROFILE_DIR)
    self._wait = wait
    self._local: Optional[str] = None  # the folder jax writes to while tracing
    if enabled and profile_steps.strip() and self.window is None:
      log.info("profile_steps=%s: no step of it left to run after step %d; not profiling", profile_steps, start)

  @classmethod
  def of_config(cls, cfg: Any, workdir: str, *, start: int, wait: Any = None) -> "StepProfiler":
    """The profiler a TrainConfig asks for: process 0 traces, or every process with `profile_all_processes`
    (each into its own profile/process_<i> when there are several)."""
    import jax  # pylint: disable=import-outside-toplevel
    index, count = jax.process_index(), jax.process_count()
    subdir = f"process_{index}" if cfg.profile_all_processes and count > 1 else ""
    return cls(cfg.profile_steps, workdir=workdir, start=start, total_steps=cfg.total_steps,
               enabled=index == 0 or cfg.profile_all_processes, subdir=subdir, wait=wait)

  @contextlib.contextmanager
  def step(self, step: int) -> Iterator[None]:
    """Traces (and annotates) `step` when it lies in the window; a no-op otherwise."""
    if self.window is None or not self.window[0] <= step <= self.window[1]:
      yield
      return
    import jax  # pylint: disable=import-outside-toplevel
    if step == self.window[0]:
      self._start()
    with jax.profiler.StepTraceAnnotation("train", step_num=step):
      yield

  def after(self, step: int, state: Any) -> None:
    """After `step`'s dispatch: at the window's last step, waits for `state` and stops the trace."""
    if self._local is not None and step == self.window[1]:
      if self._wait is not None:
        self._wait(state)
      self._stop()

  def close(self) -> None:
    if self._local is not None:
      self._stop()

  def _start(self) -> None:
    import jax  # pylint: disable=import-outside-toplevel
    self._local = tempfile.mkdtemp(prefix="megalodon_profile_") if paths.is_remote(self.target) else self.target
    if not paths.is_remote(self.target):
      os.makedirs(self._local, exist_ok=True)
    log.info("profiling steps %d-%d into %s", self.window[0], self.window[1], self.target)
    jax.profiler.start_trace(self._local, create_perfetto_trace=True)

  def _stop(self) -> None:
    import jax  # pylint: disable=import-outside-toplevel
    local, self._local = self._local, None
    jax.profiler.stop_trace()
    if local != self.target:  # a remote workdir: upload what jax wrote locally
      try:
        paths.copy_tree(local, self.target)
      finally:
        shutil.rmtree(local, ignore_errors=True)
    log.info("profile written to %s (tensorboard --logdir %s, or ui.perfetto.dev with its perfetto_trace.json.gz)",
             self.target, self.target)


def trace_files(workdir: str, pattern: str = "*.trace.json.gz") -> list[str]:
  """The trace files under `<workdir>/profile` matching `pattern` (any run and host), sorted."""
  return paths.glob_files(paths.join(workdir, PROFILE_DIR, "**", pattern))
