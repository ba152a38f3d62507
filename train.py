"""Train a Megalodon LM: `python train.py --config configs/<name>.py [--config.key=value ...] [--workdir DIR]`.

Re-running the same command resumes from the latest checkpoint in the workdir. See configs/default.py for every
field and README.md for examples.
"""

from __future__ import annotations

import logging
import os
import sys

from absl import app, flags
from absl import logging as absl_logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to a config file (configs/*.py).", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (checkpoints, metrics.jsonl, TensorBoard); default "
                               "runs/<config file name>.")
flags.mark_flags_as_required(["config"])


def _default_workdir() -> str:
  config_path = flags.FLAGS["config"].config_filename
  return os.path.join("runs", os.path.splitext(os.path.basename(config_path))[0])


def main(argv: list[str]) -> int:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  import jax  # after flag parsing, so --help is instant

  # Persistent compilation cache: a restarted or repeated run skips most of its compile time.
  cache = os.environ.get("MEGALODON_JAX_CACHE", os.path.expanduser("~/.cache/megalodon-jax/xla"))
  if cache:
    jax.config.update("jax_compilation_cache_dir", cache)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)

  from megalodon_jax.errors import exit_on_error
  from megalodon_jax.training import distributed

  # Multi-process (TPU pods, multi-host GPU): the launcher's environment says what to connect to.
  status = exit_on_error(lambda: distributed.initialize_from_environment() and 0)
  if status:
    return status
  absl_logging.set_verbosity(absl_logging.WARNING)  # jax's backend-probing INFO lines are noise here
  handler = logging.StreamHandler(sys.stderr)
  handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S"))
  ours = logging.getLogger("megalodon_jax")
  ours.addHandler(handler)
  ours.propagate = False
  ours.setLevel(logging.INFO if jax.process_index() == 0 else logging.WARNING)

  from megalodon_jax.training import trainer

  workdir = _WORKDIR.value or _default_workdir()

  def body() -> int:
    trainer.train_and_evaluate(_CONFIG.value, workdir)
    return 0

  # Bad config, data or checkpoint: status 2; a diverged loss (NonFiniteLossError): status 1.
  return exit_on_error(body, one_line=False)


if __name__ == "__main__":
  app.run(main)
