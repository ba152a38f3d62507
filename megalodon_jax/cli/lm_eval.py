"""`megalodon-lm-eval` (or `python -m megalodon_jax.lm_eval`): lm-evaluation-harness's own command line with the
`megalodon` model registered (megalodon_jax/lm_eval/model.py), so any lm_eval task, built in or a local YAML, runs
on a checkpoint of this project:

  python -m megalodon_jax.lm_eval --model megalodon --model_args checkpoint=runs/tiny --tasks lambada_openai \\
      --output_path out/ --limit 100
  python -m megalodon_jax.lm_eval --model_args checkpoint=runs/tiny,batch_size=8 --tasks my_task \\
      --include_path my_tasks/ --log_samples --output_path out/

Every flag is lm_eval's (`lm-eval run --help`); `--model` defaults to `megalodon` (without `--config`) and
`--batch_size` to `auto` (rows of about one segment per call; `--model_args batch_size=N` overrides). The
model's arguments are `megalodon_jax.lm_eval.options.HarnessOptions`. They and the checkpoint (path, step,
tokenizer) are checked before jax starts: bad ones end with one `error: ...` line on stderr and exit status 2.
"""

from __future__ import annotations

import sys
from typing import Optional, Sequence

from megalodon_jax.errors import exit_on_error
from megalodon_jax.lm_eval.options import MODEL_NAME, HarnessOptions


def _parse(argv: list[str]):
  """lm_eval's parser and its parse of `argv` (its `parse_args` reads sys.argv: set for the call, then restored)."""
  from lm_eval._cli import HarnessCLI  # pylint: disable=import-outside-toplevel  (lm_eval only when run)

  cli = HarnessCLI()
  saved = sys.argv
  sys.argv = ["megalodon-lm-eval", *argv]
  try:
    return cli, cli.parse_args()
  finally:
    sys.argv = saved


def run(argv: list[str]) -> int:
  cli, args = _parse(argv)
  if getattr(args, "command", None) == "run":
    if args.model is None and args.config is None:
      args.model = MODEL_NAME
    if args.model == MODEL_NAME:
      if getattr(args, "batch_size", None) is None:  # lm_eval's default is 1 row per call: fill calls instead
        args.batch_size = "auto"
      extra = {"batch_size": args.batch_size, "max_batch_size": args.max_batch_size}
      HarnessOptions.parse({**(args.model_args or {}), **extra}).check()  # no jax yet
    # pylint: disable=import-outside-toplevel,unused-import  (registers the model; imports jax)
    import megalodon_jax.lm_eval.model  # noqa: F401
    from lm_eval.utils import setup_logging

    setup_logging()
  cli.execute(args)
  return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
  """Runs the command line; returns the exit status (0 ok, 2 bad input)."""
  argv = list(sys.argv[1:] if argv is None else argv)
  return exit_on_error(lambda: run(argv), also=(OSError,))
