"""The package's exceptions: one base class, one class per domain, and how the command lines report them.

Every error the package raises on purpose derives from `MegalodonError`, and its message names what is wrong
and how to fix it. The domain classes also derive from the builtin type their callers have always caught
(`ValueError` for bad input; `CheckpointError` keeps `RuntimeError` too, as the training checkpoint code raised
it before), so `except ValueError` keeps working.

Command lines run their body through `exit_on_error`: a `MegalodonError` becomes one `error: ...` line on stderr
and the class's `exit_status` (2, bad input; 1 for a training run whose loss diverged).

Nothing here imports jax: the pure-PyTorch runtime (`megalodon_jax.pytorch`) uses these classes too.
"""

from __future__ import annotations

import difflib
import sys
from typing import Any, Callable, Iterable, TextIO

EXIT_BAD_INPUT = 2


class MegalodonError(Exception):
  """Base of the package's errors; `exit_status` is what a command line returns for it."""

  exit_status = EXIT_BAD_INPUT


class ConfigError(MegalodonError, ValueError):
  """A model or training config value is invalid; the message names the field (or `--config.<key>`) and the fix."""


class FieldError(ConfigError):
  """One config field's value is invalid, raised by the config class that owns the field.

  Reads `<owner>.<field>=<value!r>: <why>`; `field`, `value` and `why` stay apart so that a training config reports
  it under the command-line key it walked to (`--config.model.z_dim=30: ...`, `typed_config.from_mapping`).
  """

  def __init__(self, owner: str, field: str, value: Any, why: str):
    super().__init__(f"{owner}.{field}={value!r}: {why}")
    self.field, self.value, self.why = field, value, why


class CheckpointError(MegalodonError, ValueError, RuntimeError):
  """A checkpoint, checkpoint directory or state dict cannot be used; the message names the path or keys."""


class CheckpointDamagedError(CheckpointError):
  """A checkpoint's files are missing, truncated or unreadable (not merely a different model or config): training
  sets such a step aside and resumes from the previous one.

  `problem` is what is wrong, alone, for callers that quote it in their own message; the error reads
  "<problem>. <advice>" (just the problem without advice)."""

  def __init__(self, problem: str, advice: str = ""):
    super().__init__(f"{problem}. {advice}" if advice else problem)
    self.problem = problem


def did_you_mean(word: str, candidates: Iterable[str], prefix: str = "") -> str:
  """" (did you mean <prefix>X?)" for the closest of `candidates` to `word` (difflib), or "" when none is close.

  Leading dashes are left out of the comparison (and `prefix` is only shown): a prefix every candidate shares
  would make unrelated names look similar ("--no_such_key" vs "--log_every").
  """
  bare = {c.lstrip("-"): c for c in sorted(set(candidates))}
  close = difflib.get_close_matches(word.lstrip("-"), list(bare), n=1, cutoff=0.6)
  return f" (did you mean {prefix}{bare[close[0]]}?)" if close else ""


class ShardingError(MegalodonError, ValueError):
  """The mesh, the logical axis rules or the batch do not fit; the message names the config key and the fix."""


class DataError(MegalodonError, ValueError):
  """A bad data setting or missing data; the message names the config key (e.g. `data.path`) and the fix."""


class ConvertError(MegalodonError, ValueError):
  """Bad converter input or output path; the message says which path and what to do."""


class StateDictError(MegalodonError, ValueError):
  """An official state dict does not match the config; the message lists every offending key."""


class InferenceError(MegalodonError, ValueError):
  """Bad input to generation or evaluation (prompt, token ids, flags, files); the message says what to fix."""


class TopologyError(MegalodonError, ValueError):
  """An unknown or malformed compile target name; the message lists the known ones."""


class NonFiniteLossError(MegalodonError, RuntimeError):
  """The training loss became NaN or infinite; the message names the step."""

  exit_status = 1  # not bad input: the run itself diverged


def exit_on_error(body: Callable[[], int], *, also: tuple[type[BaseException], ...] = (),
                  one_line: bool = True, stream: TextIO | None = None) -> int:
  """Runs a command line's `body` and returns its exit status.

  A `MegalodonError` (or one of the `also` types, e.g. OSError for tools that read user-named files) is printed as
  `error: <message>` on stderr, with its whitespace runs collapsed to single spaces when `one_line`, and turns
  into the class's `exit_status` (2 for anything but MegalodonError subclasses that say otherwise).
  """
  try:
    return body()
  except (MegalodonError, *also) as e:
    text = " ".join(str(e).split()) if one_line else str(e)
    print(f"error: {text}", file=stream or sys.stderr)
    return getattr(e, "exit_status", EXIT_BAD_INPUT)
