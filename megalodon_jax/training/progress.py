"""A one-line terminal progress bar with throughput and ETA for the training loop.

On a TTY the bar is a single line redrawn in place with '\\r':

    step 120/1000 [==>                           ] 12% loss 3.214 1.2 steps/s ETA 12:13

Off a TTY (a log file, a batch job) `update` prints nothing: the periodic plain lines of `MetricsLogger` are the
progress record there, and a '\\r'-redrawn line would only fill the log with garbage. No jax import, so the module
is usable without starting a backend.
"""

from __future__ import annotations

import math
import sys
import time
from typing import Callable, Optional, TextIO


def format_eta(seconds: float) -> str:
  """Seconds as "H:MM:SS" (an hour or more) or "M:SS"; "--:--" when unknown (negative, NaN or infinite)."""
  if not math.isfinite(seconds) or seconds < 0:
    return "--:--"
  s = int(round(seconds))
  h, rest = divmod(s, 3600)
  m, s = divmod(rest, 60)
  return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def _isatty(stream: TextIO) -> bool:
  try:
    return bool(stream.isatty())
  except (AttributeError, ValueError):  # no isatty, or a closed stream
    return False


class ProgressBar:
  """Progress over `total_steps` training steps, drawn on `stream` when it is a terminal.

  The rate (and so the ETA) is measured from the first `update` on, not from construction: the first step includes
  the compilation of the train step, which would make early ETAs far too pessimistic.
  """

  def __init__(self, total_steps: int, *, initial_step: int = 0, stream: Optional[TextIO] = None,
               enabled: Optional[bool] = None, width: int = 30, min_interval_s: float = 0.5,
               clock: Callable[[], float] = time.monotonic):
    """Creates the bar; nothing is drawn before the first `update`.

    Args:
      total_steps: The step at which training ends (100%), >= 1.
      initial_step: The step training starts (or resumes) from.
      stream: Where to draw; None means `sys.stderr` at construction time (not import time, so a replaced
        `sys.stderr`, e.g. pytest's capture, is honoured).
      enabled: Draw the bar; None draws it only when `stream.isatty()`.
      width: Number of characters between the brackets.
      min_interval_s: Redraws closer together than this are skipped (the last step is always drawn).
      clock: Monotonic seconds; injectable for tests.
    """
    if isinstance(total_steps, bool) or not isinstance(total_steps, int) or total_steps < 1:
      raise ValueError(f"total_steps must be an int >= 1, got {total_steps!r}")
    if width < 1:
      raise ValueError(f"width must be >= 1, got {width!r}")
    self.total_steps = total_steps
    self.initial_step = initial_step
    self._stream = sys.stderr if stream is None else stream
    self.enabled = _isatty(self._stream) if enabled is None else bool(enabled)
    self._width = width
    self._min_interval_s = min_interval_s
    self._clock = clock
    self._first: Optional[tuple[float, int]] = None  # (time, step) of the first update: the rate's origin
    self._last_draw: Optional[float] = None
    self._line = ""  # the bar text currently on screen, redrawn after `write`
    self._closed = False

  def update(self, step: int, **postfix: float) -> None:
    """Moves the bar to `step` (steps done), showing `postfix` values such as loss=3.2 after the percentage."""
    if not self.enabled or self._closed:
      return
    now = self._clock()
    if self._first is None:
      self._first = (now, step)
    if (self._last_draw is not None and now - self._last_draw < self._min_interval_s
        and step < self.total_steps):
      return  # redrawing every step costs terminal I/O for nothing a human could read
    self._draw(self.render(step, now, **postfix))
    self._last_draw = now

  def render(self, step: int, now: float, **postfix: float) -> str:
    """The bar's text for `step` at clock time `now` (no '\\r'); used by `update`, public for tests and tooling."""
    done = min(max(step, 0), self.total_steps)
    # Integer floor (float 0.29 * 100 is 28.99...): the bar is full and at 100% only when training is done.
    filled = self._width * done // self.total_steps
    if filled >= self._width:
      bar = "=" * self._width
    elif filled == 0:
      bar = " " * self._width
    else:
      bar = "=" * (filled - 1) + ">" + " " * (self._width - filled)
    parts = [f"step {step}/{self.total_steps}", f"[{bar}]", f"{100 * done // self.total_steps}%"]
    parts += [f"{k} {_short(v)}" for k, v in postfix.items()]
    rate = None
    if self._first is not None:
      t0, s0 = self._first
      if step > s0 and now > t0:
        rate = (step - s0) / (now - t0)
    if rate is None:
      parts.append("ETA --:--")
    else:
      # Below one step per second the reciprocal reads better ("4.2 s/step" rather than "0.2 steps/s").
      parts.append(f"{rate:.1f} steps/s" if rate >= 1 else f"{1 / rate:.1f} s/step")
      parts.append(f"ETA {format_eta(max(self.total_steps - step, 0) / rate)}")
    return " ".join(parts)

  def write(self, line: str) -> None:
    """Prints `line` as a full line above the bar: clears the bar, prints the line, redraws the bar.

    With the bar disabled the line is simply printed, so nothing sent here is lost.
    """
    out = self._stream
    if self.enabled and self._line and not self._closed:
      out.write("\r" + " " * len(self._line) + "\r" + line + "\n" + self._line)
    else:
      out.write(line + "\n")
    out.flush()

  def close(self) -> None:
    """Ends the bar's line so later output starts on a fresh line; further updates are ignored."""
    if self.enabled and self._line and not self._closed:
      self._stream.write("\n")
      self._stream.flush()
    self._closed = True

  def _draw(self, line: str) -> None:
    # Pad with spaces so a shorter line fully covers the previous, longer one.
    pad = max(0, len(self._line) - len(line))
    self._stream.write("\r" + line + " " * pad)
    self._stream.flush()
    self._line = line


def _short(value: float) -> str:
  try:
    return f"{float(value):.4g}"
  except (TypeError, ValueError):
    return str(value)
