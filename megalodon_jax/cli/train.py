"""`megalodon-train` (or `python train.py`): train a Megalodon LM from a config.

  megalodon-train --config tiny
  megalodon-train --config configs/enwik8.py --config.total_steps=20000 --config.optimizer.lr=1e-3 --workdir runs/e8
  python train.py --config configs/tiny.py --config.model.num_layers 4

`--config` is a shipped config's name (tiny, default, enwik8, mega200m, mega1_3b, megalodon_7b) or a path to a
config file; `--config.<key>=<value>` overrides any of its fields (see configs/default.py and cli/config_flags.py).
Re-running the same command resumes from the latest checkpoint in the workdir; a run that already reached
total_steps says so in one line and exits 0. SIGTERM or Ctrl-C saves at the next step boundary and stops (status
0 / 130); a second Ctrl-C stops at once without saving. One run at a time per workdir (a lock; a second run exits 2
naming the holder). Every run ends with one summary line on stdout (steps, final losses,
where the checkpoints, metrics and TensorBoard events are). Bad flags or config: one `error: ...` line on stderr and
status 2, before anything is built; a diverged loss: status 1.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from typing import Optional, Sequence

from tqdm import tqdm

from megalodon_jax.cli import config_flags
from megalodon_jax.cli.args import Parser, prog_name
from megalodon_jax.errors import exit_on_error


def _config_flags() -> list[str]:
  """`--config.<key>` for every field of the default config: hints for a flag that forgot its `config.`."""
  return [config_flags.PREFIX + k for k in config_flags.config_keys(config_flags.load_config("default")[0])]


def build_parser() -> Parser:
  names = ", ".join(config_flags.shipped_config_names())
  shim = os.path.basename(sys.argv[0] if sys.argv else "") == "train.py"
  p = Parser(
      prog="python train.py" if shim else prog_name("megalodon-train", "megalodon_jax.train_cli"),
      extra_hints=_config_flags,
      description="Train (or resume) a Megalodon LM. Re-running the same command resumes from the workdir's latest "
                  "checkpoint.",
      epilog=f"--config.KEY=VALUE (or --config.KEY VALUE) overrides a field of the config, e.g. "
             f"--config.total_steps=1000 --config.model.num_layers=4 --config.optimizer.lr=1e-3; every field and "
             f"its default is in configs/default.py. Shipped configs: {names}.")
  p.add_argument("--config", required=True, metavar="NAME_OR_PATH",
                 help="a shipped config's name (e.g. tiny) or a path to a config .py file defining get_config()")
  p.add_argument("--workdir", default=None,
                 help="run directory: checkpoints/, metrics.jsonl, tensorboard/ (default: runs/<config name>)")
  return p


class _TqdmHandler(logging.StreamHandler):
  """Writes log lines through tqdm, so they go above a drawn progress bar instead of through it."""

  def emit(self, record: logging.LogRecord) -> None:
    try:
      tqdm.write(self.format(record), file=self.stream)
    except Exception:  # pylint: disable=broad-except  (logging must never raise)
      self.handleError(record)


def _setup_logging(jax) -> None:
  """Our INFO lines (process 0; warnings elsewhere) on stderr, once even if main() runs twice in a process."""
  from absl import logging as absl_logging  # pylint: disable=import-outside-toplevel

  absl_logging.set_verbosity(absl_logging.WARNING)  # jax's backend-probing INFO lines are noise here
  ours = logging.getLogger("megalodon_jax")
  if not any(isinstance(h, _TqdmHandler) for h in ours.handlers):
    handler = _TqdmHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S"))
    ours.addHandler(handler)
  ours.propagate = False
  ours.setLevel(logging.INFO if jax.process_index() == 0 else logging.WARNING)


def _start_jax():
  import jax  # pylint: disable=import-outside-toplevel  (after flag parsing, so --help and bad flags are instant)

  from megalodon_jax import platforms  # pylint: disable=import-outside-toplevel
  platforms.skip_absent_tpu()  # no libtpu warnings on a machine without a TPU

  # Persistent compilation cache: a restarted or repeated run skips most of its compile time.
  cache = os.environ.get("MEGALODON_JAX_CACHE", os.path.expanduser("~/.cache/megalodon-jax/xla"))
  if cache:
    jax.config.update("jax_compilation_cache_dir", cache)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
  # Multi-process (TPU pods, multi-host GPU): the launcher's environment says what to connect to (ConfigError when
  # it is malformed).
  from megalodon_jax.training import distributed  # pylint: disable=import-outside-toplevel
  distributed.initialize_from_environment()
  _setup_logging(jax)
  return jax


def check_run(cfg, workdir: str):
  """The typed config to train with, after every check train.py makes before jax starts (`workdir.check_run`)."""
  from megalodon_jax.training import workdir as workdir_lib  # pylint: disable=import-outside-toplevel
  return workdir_lib.check_run(cfg, workdir)[0]


def main(argv: Optional[Sequence[str]] = None) -> int:
  """Runs the command line; returns the exit status (0 done or already finished, 1 diverged, 2 bad input).
  `--help` and flag errors raise SystemExit (0 / 2) as argparse does."""
  argv = sys.argv[1:] if argv is None else list(argv)
  rest, overrides = config_flags.split_overrides(argv)
  args = build_parser().parse_args(rest)

  def body() -> int:
    cfg, path = config_flags.load_config(args.config)  # ConfigError: unknown name, unloadable file, bad key or value
    config_flags.apply_overrides(cfg, overrides)
    workdir = args.workdir or os.path.join("runs", os.path.splitext(os.path.basename(path))[0])
    from megalodon_jax.training import run_summary  # pylint: disable=import-outside-toplevel
    done = run_summary.already_finished(workdir, cfg.total_steps)
    if done is not None:  # before jax.distributed, data preparation and any compile
      print(done, flush=True)
      return 0
    checked = check_run(cfg, workdir)
    jax = _start_jax()
    from megalodon_jax.training import trainer  # pylint: disable=import-outside-toplevel
    from megalodon_jax.training.preemption import (  # pylint: disable=import-outside-toplevel
        EXIT_INTERRUPTED, TrainingInterrupted)
    started = {"step": run_summary.latest_finished_step(workdir) or 0}
    t0 = time.perf_counter()
    status = 0
    try:
      trainer.train_and_evaluate(checked, workdir, on_start=lambda step: started.update(step=step))
    except TrainingInterrupted:
      status = EXIT_INTERRUPTED  # saved: the summary line below says where to resume
    except KeyboardInterrupt:  # Ctrl-C before the first step: nothing trained, nothing to save
      print(f"error: interrupted before training step {started['step'] + 1}; nothing new to save", file=sys.stderr,
            flush=True)
      return EXIT_INTERRUPTED
    if jax.process_index() == 0:
      print(run_summary.summary_line(workdir, start_step=started["step"],
                                     end_step=run_summary.latest_finished_step(workdir), total_steps=cfg.total_steps,
                                     tensorboard=cfg.tensorboard, seconds=time.perf_counter() - t0), flush=True)
    return status

  # Bad config, data, workdir or checkpoint: one `error:` line, status 2; a diverged loss (NonFiniteLossError):
  # status 1; Ctrl-C: status 130 after saving.
  return exit_on_error(body, also=(OSError,))
