"""The argparse pieces every command line shares: one flag convention, one-line errors with a hint, `--help` with
defaults.

Convention: flags are snake_case (`--max_new_tokens`, like the config fields they often mirror) and every flag also
accepts its kebab-case spelling (`--max-new-tokens`): `Parser` rewrites the name part of each `--flag` argument
before parsing, so `--help` lists one spelling. A bad argument ends the program with ONE line on stderr,

    error: unrecognized arguments: --max_new_token (did you mean --max_new_tokens?) (see megalodon-generate --help)

and exit status 2 (`errors.EXIT_BAD_INPUT`), before any expensive work. No jax import: `--help` stays instant.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Callable, Iterable, NoReturn, Optional, Sequence, Union

from megalodon_jax.errors import EXIT_BAD_INPUT, did_you_mean


def canonical_flag(arg: str) -> str:
  """`--max-new-tokens=5` -> `--max_new_tokens=5`: the name of a `--flag` argument in snake_case, its value (after
  `=`) untouched; anything else (values, `-h`, subcommand names, `--config.key=...` overrides) is returned as is."""
  if not arg.startswith("--") or arg == "--" or arg.startswith("--config."):
    return arg
  name, eq, value = arg.partition("=")
  return "--" + name[2:].replace("-", "_") + eq + value


def canonical_argv(argv: Sequence[str]) -> list[str]:
  """`canonical_flag` over an argument list, up to a bare `--` (what follows it is positional text)."""
  end = argv.index("--") if "--" in argv else len(argv)
  return [canonical_flag(arg) for arg in argv[:end]] + list(argv[end:])


def prog_name(script: str, module: str) -> str:
  """The name `--help` and errors show: the console script when run as one, else `python -m <module>`."""
  return script if os.path.basename(sys.argv[0] if sys.argv else "") == script else f"python -m {module}"


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
  """Adds "(default: X)" to a flag's help when it has a meaningful default (not None, not an empty list, not a
  required flag, not an on/off switch, and not already stated in the help text); keeps the description's line
  breaks."""

  def _get_help_string(self, action: argparse.Action) -> str:
    text = action.help or ""
    default = action.default
    if (action.option_strings and not action.required and action.nargs != 0 and default is not None
        and default is not argparse.SUPPRESS and default != [] and "default" not in text.lower()):
      text += f" (default: {default})" if text else f"default: {default}"
    return text


class Parser(argparse.ArgumentParser):
  """argparse with the package's conventions.

  - kebab-case spellings of every flag are accepted (`canonical_argv` runs before parsing);
  - errors are one `error: ...` line on stderr and exit status 2, an unknown flag with the closest known one;
  - `--help` shows defaults (`HelpFormatter`);
  - no abbreviations: `--max_new` is an unknown flag, not `--max_new_tokens` (an abbreviation that works today
    would break, or change meaning, when a flag with the same prefix is added).

  `extra_hints`: more names an unknown flag may be matched against (e.g. train's `--config.<key>` fields), or a
  function returning them, called only when a flag is unknown.
  """

  def __init__(self, *args, extra_hints: Union[Iterable[str], Callable[[], Iterable[str]]] = (), **kwargs):
    kwargs.setdefault("formatter_class", HelpFormatter)
    kwargs.setdefault("allow_abbrev", False)
    super().__init__(*args, **kwargs)
    self.extra_hints = extra_hints

  def parse_known_args(self, args: Optional[Sequence[str]] = None, namespace=None):
    return super().parse_known_args(canonical_argv(sys.argv[1:] if args is None else args), namespace)

  def parse_args(self, args: Optional[Sequence[str]] = None, namespace=None) -> argparse.Namespace:
    ns, extras = self.parse_known_args(args, namespace)
    if extras:
      self.error(self.unrecognized(extras, ns))
    return ns

  def unrecognized(self, extras: Sequence[str], ns: Optional[argparse.Namespace] = None) -> str:
    """The message for arguments no flag took (argparse's wording), with the known flag closest to the first unknown
    one: the parser's, the chosen subcommand's (in `ns`), or an extra hint."""
    message = f"unrecognized arguments: {' '.join(extras)}"
    first = next((a for a in extras if a.startswith("-")), None)
    if first is None:
      return message
    hints = self.extra_hints() if callable(self.extra_hints) else self.extra_hints
    return message + did_you_mean(first.partition("=")[0], [*self.known_flags(ns), *hints])

  def known_flags(self, ns: Optional[argparse.Namespace] = None) -> list[str]:
    """Every `--flag` of this parser, plus those of the subcommand chosen in `ns`."""
    flags = [s for s in self._option_string_actions if s.startswith("--")]
    for action in self._actions:
      if isinstance(action, argparse._SubParsersAction) and ns is not None:  # pylint: disable=protected-access
        chosen = action.choices.get(getattr(ns, action.dest, None) or "")
        if isinstance(chosen, Parser):
          flags += chosen.known_flags()
    return flags

  def error(self, message: str) -> NoReturn:
    print(f"error: {' '.join(message.split())} (see {self.prog} --help)", file=sys.stderr)
    sys.exit(EXIT_BAD_INPUT)
