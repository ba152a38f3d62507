"""Goodput: where a training run's wall time went.

Categories (seconds, measured by the host's clock, `time.perf_counter`):
  compile     the train step's lower+compile, and the compilations (trace, lowering, XLA compile) of every other
              jit (init, eval, samples), moved out of the phase they happen in through jax.monitoring's events
  data_wait   waiting for the next training batch (`next(train_iter)` and its global assembly)
  step        the training steps: dispatching them and waiting for their results (the device is asynchronous, so
              device time shows up where the host waits for it)
  eval        evaluations and generated samples
  checkpoint  checkpoint restore (or `init_from`), saves, and the wait for async saves at the end
  idle        the time between the previous attempt's last record in this workdir and this attempt's start: the job
              was down (preempted, queued, crashed); a killed attempt's time since its last record counts here too
  other       everything else (the mesh and program build, data preparation, logging): the rest of the wall time,
              so the categories sum to it exactly

`goodput` = step / wall time. An attempt's wall time runs from `Goodput()` (the start of `train_and_evaluate`) to
its last `save`. Process 0 writes the totals to `<workdir>/goodput.json` (at log steps, at most every 5 s, at
checkpoints and at the end) and a resumed run starts from them, so the numbers cover every attempt of the run.
No jax import at module level: the compile listener imports it when a phase timer is started.
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
import time
from typing import Any, Callable, Iterator, Optional

from megalodon_jax import paths

log = logging.getLogger("megalodon_jax")

GOODPUT_FILE = "goodput.json"
CATEGORIES = ("compile", "data_wait", "step", "eval", "checkpoint", "idle", "other")
MEASURED = ("compile", "data_wait", "step", "eval", "checkpoint")  # phases; idle comes from the file, other is the rest
_FORMAT = 1
# jax.monitoring's events of one jit compilation (jax/_src/dispatch.py): tracing to a jaxpr (recorded for top-level
# traces only, so never nested), lowering to MLIR, and the XLA compile.
BACKEND_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"
COMPILE_EVENTS = ("/jax/core/compile/jaxpr_trace_duration", "/jax/core/compile/jaxpr_to_mlir_module_duration",
                  BACKEND_COMPILE_EVENT)


class Goodput:
  """A run's wall-time breakdown. `with g.phase("data_wait"): ...` charges the block's time to a category; phases nest
  (the innermost one gets the time). Time outside every phase is "other".

  Args:
    clock: seconds, monotonic (tests may pass a fake).
    wall_clock: seconds since the epoch, for the idle gap between attempts (which may be different machines).
  """

  def __init__(self, *, clock: Callable[[], float] = time.perf_counter,
               wall_clock: Callable[[], float] = time.time):
    self._clock, self._wall_clock = clock, wall_clock
    self._start, self._started_at = clock(), wall_clock()
    self._measured = {c: 0.0 for c in MEASURED}
    self._previous = {c: 0.0 for c in CATEGORIES}  # earlier attempts' totals (goodput.json)
    self._idle = 0.0
    self._stack: list[tuple[str, float]] = []  # (phase, when it last resumed)
    self._thread = threading.get_ident()
    self._workdir: Optional[str] = None
    self._written_at = float("-inf")
    self._listener: Optional[Callable[..., None]] = None
    self.attempts = 1

  # ---- measuring
  @contextlib.contextmanager
  def phase(self, name: str) -> Iterator[None]:
    """Charges the time inside the block to `name` (one of MEASURED), pausing the enclosing phase."""
    if name not in MEASURED:
      raise ValueError(f"unknown goodput phase {name!r}; one of {MEASURED}")
    now = self._clock()
    if self._stack:
      self._charge(now)
    self._stack.append((name, now))
    try:
      yield
    finally:
      now = self._clock()
      self._charge(now)
      self._stack.pop()
      if self._stack:
        self._stack[-1] = (self._stack[-1][0], now)

  def _charge(self, now: float) -> None:
    name, since = self._stack[-1]
    self._measured[name] += now - since

  def count_compiles(self) -> None:
    """Moves the jit compilations (tracing, lowering, XLA compile) that jax reports while another phase runs (this
    thread only: async checkpoint threads compile nothing) into "compile". Call `close` to stop listening."""
    import jax  # pylint: disable=import-outside-toplevel

    def listener(event: str, duration: float, **_: Any) -> None:
      if event not in COMPILE_EVENTS or threading.get_ident() != self._thread:
        return
      current = self._stack[-1][0] if self._stack else None
      if current == "compile":
        return  # the phase's own clock has it
      self._measured["compile"] += duration
      if current is not None:
        self._measured[current] -= duration  # the phase's clock ran through the compile
      # Outside every phase the compile was "other", which is the remainder: nothing to take it from.

    self._listener = listener
    jax.monitoring.register_event_duration_secs_listener(listener)

  def close(self) -> None:
    if self._listener is not None:
      import jax  # pylint: disable=import-outside-toplevel
      jax.monitoring.unregister_event_duration_listener(self._listener)
      self._listener = None

  def block(self, tree: Any) -> None:
    """Waits for the device to finish computing `tree`, charged to "step"."""
    import jax  # pylint: disable=import-outside-toplevel
    with self.phase("step"):
      jax.block_until_ready(tree)

  # ---- totals
  def wall_s(self) -> float:
    """This attempt's wall time so far."""
    return self._clock() - self._start

  def attempt(self) -> dict[str, float]:
    """This attempt's seconds per category ("idle" excluded: 0), summing to `wall_s()`."""
    now = self._clock()
    measured = dict(self._measured)
    if self._stack:  # a phase still open counts up to now
      name, since = self._stack[-1]
      measured[name] += now - since
    out = {**measured, "idle": 0.0}
    out["other"] = (now - self._start) - sum(measured.values())
    return out

  def totals(self, current: Optional[dict[str, float]] = None) -> dict[str, float]:
    """Seconds per category over every attempt of the run (the previous ones from goodput.json), idle included;
    `current` is this attempt's `attempt()` (default: now)."""
    current = self.attempt() if current is None else current
    out = {c: self._previous[c] + current[c] for c in CATEGORIES}
    out["idle"] += self._idle
    return out

  def metrics(self) -> dict[str, float]:
    """What metrics.jsonl gets at a log step: `goodput` (step / wall time, a fraction) and `goodput/<category>_s`
    (cumulative seconds over every attempt), plus `goodput/wall_s`."""
    totals = self.totals()
    wall = sum(totals.values())
    return {"goodput": totals["step"] / wall if wall > 0 else 0.0,
            **{f"goodput/{c}_s": v for c, v in totals.items()}, "goodput/wall_s": wall}

  def summary(self) -> str:
    """The totals as one line (`summary_text`)."""
    return summary_text(self.totals(), attempts=self.attempts)

  # ---- goodput.json
  def resume(self, workdir: str, enabled: bool) -> None:
    """Binds the timer to `workdir` (process 0: `enabled`) and continues the totals of its goodput.json, the gap
    since that file's last write counting as idle. A missing or unreadable file starts from zero."""
    self._workdir = workdir if enabled else None
    if not enabled:
      return
    path = paths.join(workdir, GOODPUT_FILE)
    if not paths.as_path(path).exists():
      return
    try:
      record = json.loads(paths.as_path(path).read_text())
      previous = {c: float(record["totals_s"][c]) for c in CATEGORIES}
      updated_at = float(record["updated_at"])
    except (ValueError, KeyError, TypeError) as e:
      log.warning("%s is unreadable (%s); goodput counts from this attempt", path, e)
      return
    self._previous = previous
    self._idle = max(0.0, self._started_at - updated_at)
    self.attempts = int(record.get("attempts", 1)) + 1
    log.info("goodput: attempt %d of this run; %s idle since the previous one", self.attempts,
             _duration(self._idle))

  def save(self, force: bool = False) -> None:
    """Writes the totals to goodput.json (process 0), at most every 5 s unless forced (an object store takes
    about one write per second per object)."""
    if self._workdir is None or (not force and self._clock() - self._written_at < 5.0):
      return
    self._written_at = self._clock()
    attempt = self.attempt()
    record = {"format": _FORMAT, "updated_at": self._wall_clock(), "attempts": self.attempts,
              "totals_s": self.totals(attempt), "attempt_s": attempt}
    paths.write_text_atomic(paths.join(self._workdir, GOODPUT_FILE), json.dumps(record, indent=2) + "\n")

  def finish(self) -> None:
    """The end of the attempt: stops the compile listener; in process 0, once this attempt has written
    goodput.json (an attempt refused before training leaves the workdir as it was), writes it a last time and logs
    the summary line."""
    self.close()
    if self._workdir is not None and self._written_at > float("-inf"):
      try:
        self.save(force=True)
      except OSError as e:  # runs in a finally block: never hide the run's own outcome
        log.warning("could not write %s: %s", paths.join(self._workdir, GOODPUT_FILE), e)
      log.info("%s", self.summary())


def summary_text(totals: dict[str, float], attempts: int = 1) -> str:
  """"goodput 93% of 1.6 min: 1.5 min step, 4.1 s compile, ...": step's share of the wall time (of every attempt:
  "over 2 attempts"), then step and the other categories of at least 0.05 s, largest first."""
  wall = sum(totals.values())
  share = totals["step"] / wall if wall > 0 else 0.0
  parts = [f"{_duration(v)} {c}" for c, v in sorted(totals.items(), key=lambda kv: (kv[0] != "step", -kv[1]))
           if v >= 0.05 or c == "step"]
  over = f" over {attempts} attempts" if attempts > 1 else ""
  return f"goodput {share * 100:.0f}% of {_duration(wall)}{over}: " + ", ".join(parts)


def workdir_summary(workdir: str) -> Optional[str]:
  """`summary_text` of `workdir`'s goodput.json, or None when it has none (or an unreadable one)."""
  path = paths.join(workdir, GOODPUT_FILE)
  try:
    record = json.loads(paths.as_path(path).read_text()) if paths.as_path(path).exists() else None
    return None if record is None else summary_text({c: float(record["totals_s"][c]) for c in CATEGORIES},
                                                    attempts=int(record.get("attempts", 1)))
  except (OSError, ValueError, KeyError, TypeError):
    return None


def _duration(seconds: float) -> str:
  if seconds < 60:
    return f"{seconds:.1f} s"
  if seconds < 2 * 3600:
    return f"{seconds / 60:.1f} min"
  return f"{seconds / 3600:.1f} h"


def read_goodput(workdir: str) -> dict[str, Any]:
  """The goodput.json of `workdir`: {"format", "updated_at", "attempts", "totals_s": {category: s}, "attempt_s"}."""
  return json.loads(paths.as_path(paths.join(workdir, GOODPUT_FILE)).read_text())
