"""What a training run may use as its workdir, checked before jax starts and before anything is written.

A run writes these entries into its workdir, and nothing else (`layout.RUN_FILES`, `layout.RUN_FOLDERS`):
config.json, shardings.txt, metrics.jsonl, samples.jsonl, tokenizer.model, the lock file of `workdir_lock.py`,
goodput.json, checkpoints/, tensorboard/ and profile/. Other files a user keeps there (notes, scheduler logs) are
never touched.

`with_run_tokenizer` points a resumed run at the run directory's copy of its SentencePiece model when the
original file is gone (a run directory copied to another machine).

Refused, with one ConfigError line naming the path:
  - a workdir that is a file, or that cannot be created or written (read-only file system, no permission);
  - a workdir that is, or lies inside, a checkpoint: a run's checkpoints/ folder or one of its steps, or a
    params-only checkpoint (a `from-pytorch` output), whose files the run would mix with its own;
  - a folder that is not a training run but already holds one of the run's file names (e.g. an exported
    megalodon-hf folder, whose config.json the run would overwrite).
"""

from __future__ import annotations

import errno
import json
import logging
import os
from typing import Any, Optional

from megalodon_jax import paths
from megalodon_jax.checkpoints import layout, tokenizer_copy
from megalodon_jax.errors import ConfigError

log = logging.getLogger("megalodon_jax")

CONFIG_FILE = "config.json"
LOCK_FILE = layout.LOCK_FILE
RUN_ENTRIES = layout.RUN_FILES + layout.RUN_FOLDERS


def _fail(workdir: str, why: str) -> None:
  raise ConfigError(f"--workdir {workdir}: {why}")


def _written_by_a_run(config_file: str) -> bool:
  try:
    saved = json.loads(paths.as_path(config_file).read_text())
  except (OSError, ValueError):
    return False
  return isinstance(saved, dict) and {"model", "optimizer", "data"} <= set(saved)


def is_run_directory(workdir: str) -> bool:
  """Whether `workdir` holds a training run: its lock, its config.json, or checkpoint steps under checkpoints/ (a
  folder merely named checkpoints, e.g. /data/checkpoints holding runs, does not count)."""
  p = paths.as_path(workdir)
  if (p / LOCK_FILE).exists() or _written_by_a_run(os.fspath(p / CONFIG_FILE)):
    return True
  steps = p / layout.CHECKPOINTS_DIR
  return steps.is_dir() and any(e.name.split(".")[0].isdigit() for e in steps.iterdir())


def _is_step(folder: Any) -> bool:
  # Stricter than layout.folder_kind's "step" (a state/ subfolder): any user folder may have one of those.
  return ((folder / layout.STATE / layout.PYTREE_METADATA).exists() and (folder / layout.META).is_dir())


def _enclosing_checkpoint(workdir: str) -> Optional[str]:
  """The checkpoint folder `workdir` is or lies inside, if any (local paths: every ancestor; URLs: the path's own
  ancestors up to the bucket)."""
  path = paths.as_path(paths.abspath(workdir))
  for folder in [path, *path.parents]:
    if not folder.is_dir():
      continue
    kind = layout.folder_kind(folder)
    if kind in ("params", layout.STATE) or (kind == "step" and _is_step(folder)):
      return os.fspath(folder)
    if folder.name == layout.CHECKPOINTS_DIR and folder != path and is_run_directory(os.fspath(folder.parent)):
      return os.fspath(folder)
    if folder.name == layout.CHECKPOINTS_DIR and folder == path and layout.finished_steps(folder):
      return os.fspath(folder)
  return None


def _check_writable(workdir: str) -> None:
  """Local paths: the workdir (or the nearest folder that exists above it) must accept new files."""
  path = os.path.abspath(os.path.expanduser(workdir))
  existing = path
  while not os.path.lexists(existing):
    existing = os.path.dirname(existing)
  if not os.path.isdir(existing):
    _fail(workdir, f"{existing} is a file, not a folder")
  if os.access(existing, os.W_OK | os.X_OK):
    return
  try:
    read_only = bool(os.statvfs(existing).f_flag & os.ST_RDONLY)
  except OSError:
    read_only = False
  reason = os.strerror(errno.EROFS if read_only else errno.EACCES)
  target = "write in it" if existing == path else f"create it in {existing}"
  _fail(workdir, f"cannot {target} ({reason}); choose a writable --workdir")


def check_workdir(workdir: str) -> None:
  """Raises ConfigError when `workdir` cannot hold a training run (see the module docstring); reads only."""
  if not workdir:
    _fail(repr(workdir), "is empty")
  p = paths.as_path(workdir)
  if p.exists() and not p.is_dir():
    _fail(workdir, "exists and is a file; a run needs a folder")
  inside = _enclosing_checkpoint(workdir)
  if inside is not None:
    where = "is" if paths.abspath(inside) == paths.abspath(workdir) else "lies inside"
    _fail(workdir, f"{where} the checkpoint {inside}; a run's files would be mixed into it. Use a new folder "
                   f"(train from that checkpoint with --config.init_from={inside})")
  if not paths.is_remote(workdir):
    _check_writable(workdir)
  if p.is_dir() and not is_run_directory(workdir):
    clash = sorted(e.name for e in p.iterdir() if e.name in RUN_ENTRIES)
    if clash:
      _fail(workdir, f"is not a training run but holds {', '.join(clash)}, which a run would overwrite; use a new "
                     f"or empty folder")


def with_run_tokenizer(cfg: Any, workdir: str) -> Any:
  """`cfg` (a TrainConfig), or a copy reading the run directory's SentencePiece model when `data.tokenizer_path` is
  gone (the run directory was copied to another machine, or the file moved). A path that exists always wins (a different model
  is then refused by `tokenizer_copy.write_copy`); with neither, validation reports the missing file."""
  if cfg.data.tokenizer != "sentencepiece":
    return cfg
  given = cfg.data.tokenizer_path
  if given and paths.as_path(given).is_file():
    return cfg
  copy = paths.join(workdir, tokenizer_copy.TOKENIZER_FILE)
  if not paths.as_path(copy).is_file():
    return cfg
  log.warning("data.tokenizer_path=%r does not exist; using the run directory's copy %s", given, copy)
  return cfg.replace(data=cfg.data.replace(tokenizer_path=copy))


def check_run(cfg: Any, workdir: str) -> tuple[Any, Any, Any]:
  """Everything a training run checks before anything is built (train.py: before jax's backends start), so that a
  typo is reported at once and a refused run creates nothing on disk: the config (model fields included), the
  workdir, `init_from`, the data paths and the tokenizer. Returns (the typed config to train with, a moved run
  reading its workdir's tokenizer copy; the data plan; the tokenizer).

  Raises:
    ConfigError (and the other MegalodonErrors of bad input).
  """
  from megalodon_jax import data  # pylint: disable=import-outside-toplevel  (the data package pulls in TFDS)
  from megalodon_jax.training.train_config import TrainConfig, check_inputs  # pylint: disable=import-outside-toplevel
  cfg = with_run_tokenizer(TrainConfig.of(cfg), workdir)
  check_workdir(workdir)
  plan = check_inputs(cfg)
  tokenizer = data.make_tokenizer(plan)
  cfg.model_config(tokenizer.vocab_size)
  return cfg, plan, tokenizer
