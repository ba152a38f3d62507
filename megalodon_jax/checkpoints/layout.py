"""Where things are in this project's Orbax checkpoints, and file-level checks that read no arrays.

A train.py run keeps `WORKDIR/checkpoints/<step>/` with three orbax items:
  state/  pytree item (`_METADATA`, `manifest.ocdbt`, array data): step, params, buffers, optimizer state, rng
  data/   JSON item (`metadata`): the data iterator's state
  meta/   JSON item (`metadata`): config, versions, mesh shape, step, so tools can inspect a checkpoint without
          building the model
and orbax's `_CHECKPOINT_METADATA`. A save in progress is written to `<step>.orbax-checkpoint-tmp` and renamed
when complete; old steps are moved into `_to_delete/` before they are removed. A step that fails to restore when
training resumes is renamed `<step>.corrupt-<UTC time>` (kept for inspection, never listed as a step again).

A params-only checkpoint (`params.save_params`) is one pytree item at the folder's root; written by
`model_io.save_params_checkpoint` it also holds the sidecar `megalodon_config.json`.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any, Optional

from etils import epath

from megalodon_jax import paths
from megalodon_jax.errors import CheckpointDamagedError, CheckpointError

log = logging.getLogger("megalodon_jax")

STATE, DATA, META = "state", "data", "meta"
ITEMS = (STATE, DATA, META)
PARAMS_KEY = "params"  # the params subtree of the state item
CHECKPOINTS_DIR = "checkpoints"  # of a train.py workdir
LOCK_FILE = ".megalodon-lock.json"  # a running training's lock (training/workdir_lock.py)
# Everything a training run writes into its workdir (files, then folders); anything else there is the user's.
RUN_FILES = ("config.json", "shardings.txt", "metrics.jsonl", "samples.jsonl", "tokenizer.model", LOCK_FILE,
             "wandb_run_id", "goodput.json")
RUN_FOLDERS = (CHECKPOINTS_DIR, "tensorboard", "profile")
PYTREE_METADATA = "_METADATA"
STEP_METADATA = "_CHECKPOINT_METADATA"
OCDBT_MANIFEST = "manifest.ocdbt"
JSON_ITEM_FILE = "metadata"
TMP_MARK = ".orbax-checkpoint-tmp"  # orbax's TMP_DIR_SUFFIX (tests/test_checkpointing.py keeps them equal)
COMMIT_FILE = "commit_success.txt"  # orbax's COMMIT_SUCCESS_FILE: a finished save on gs://
TRASH = "_to_delete"
DAMAGED_MARK = ".corrupt-"  # a step folder set aside by training: `<step>.corrupt-<UTC time>`, never restored
CONFIG_FILE = "megalodon_config.json"
PARAMS_FORMAT = "megalodon-jax params-only checkpoint"
MOVE = "Move that step folder out of the way to resume from the previous step, or use a new workdir."


def as_path(directory: Any) -> epath.Path:
  # orbax wants absolute paths; URLs such as gs:// are left alone.
  return epath.Path(paths.abspath(directory))


def checkpoints_dir(workdir: str) -> str:
  """A train.py workdir's checkpoint folder."""
  return paths.join(workdir, CHECKPOINTS_DIR)


def meta_file(step_dir: Any) -> str:
  """The JSON file of a step folder's meta item."""
  return os.fspath(as_path(step_dir) / META / JSON_ITEM_FILE)


def folder_kind(folder: Any) -> str:
  """What `folder` holds, judged from its entries alone (nothing is read).

  Returns:
    "params": a pytree item at its root (a params-only checkpoint, or a copied state item);
    "state": the state item of a run's step folder (its sibling meta/ exists);
    "step": a run's step folder (`<step>/{state,data,meta}`);
    "workdir": a train.py workdir (it holds checkpoints/);
    "steps": anything else: a run's checkpoints/ folder if it holds finished step folders (see `finished_steps`).
  """
  path = as_path(folder)
  if (path / PYTREE_METADATA).is_file():
    return STATE if path.name == STATE and (path.parent / META).is_dir() else "params"
  if (path / STATE).is_dir():
    return "step"
  if (path / CHECKPOINTS_DIR).is_dir():
    return "workdir"
  return "steps"


def is_finalized(step_dir: epath.Path) -> bool:
  """Whether a step folder is a finished save, by orbax's own rule for its default atomicity (orbax 0.12): on gs://
  (no folder renames) the folder holds `commit_success.txt`; elsewhere a save is renamed from its tmp name when
  complete. Written out rather than asked of orbax, which imports jax: command lines list a run's steps before jax
  starts (tests/test_checkpointing.py compares this with orbax's `is_path_finalized`)."""
  if os.fspath(step_dir).startswith("gs://"):
    return (step_dir / COMMIT_FILE).exists() and step_dir.is_dir()
  return TMP_MARK not in step_dir.name and step_dir.is_dir()


def finished_steps(root: Any) -> list[int]:
  """The steps of a checkpoints/ folder whose save finished, ascending; tmp folders of unfinished saves never count."""
  path = as_path(root)
  if not path.is_dir():
    return []
  return sorted(int(p.name) for p in path.iterdir()
                if p.name.isdigit() and p.is_dir() and is_finalized(p))


def read_json(path: epath.Path, what: str) -> Any:
  try:
    return json.loads(path.read_text())
  except FileNotFoundError:
    raise CheckpointDamagedError(f"{path} ({what}) is missing: the checkpoint is corrupted", MOVE) from None
  except (OSError, ValueError) as e:  # ValueError covers truncated JSON and bad UTF-8
    raise CheckpointDamagedError(f"{path} ({what}) is unreadable or truncated: {e}", MOVE) from e


def check_item(item_dir: epath.Path) -> None:
  """Cheap file-level validation of one orbax item folder (no jax, no tensorstore)."""
  if not item_dir.is_dir():
    raise CheckpointDamagedError(f"{item_dir} is missing: the checkpoint is incomplete or corrupted", MOVE)
  if item_dir.name == STATE or (item_dir / PYTREE_METADATA).exists():
    meta = read_json(item_dir / PYTREE_METADATA, "pytree metadata")
    if not isinstance(meta, dict) or not isinstance(meta.get("tree_metadata"), dict):
      raise CheckpointDamagedError(f"{item_dir / PYTREE_METADATA} has no tree metadata: the checkpoint is corrupted",
                                   MOVE)
    if meta.get("use_ocdbt", False) and not (item_dir / OCDBT_MANIFEST).exists():
      raise CheckpointDamagedError(f"{item_dir / OCDBT_MANIFEST} is missing: the array data is gone", MOVE)
  else:
    read_json(item_dir / JSON_ITEM_FILE, "JSON item")


def check_step_dir(step_dir: epath.Path) -> None:
  if (step_dir / STEP_METADATA).exists():
    read_json(step_dir / STEP_METADATA, "step metadata")
  for item in ITEMS:
    check_item(step_dir / item)


def check_directory(directory: str, *, check_steps: bool = True) -> None:
  """Fails fast, before anything is compiled, when a run's checkpoint directory cannot be trusted.

  A missing directory is fine (a fresh run). Unfinished saves (`<step>.orbax-checkpoint-tmp`) and the `_to_delete/`
  folder are ignored: they are never restored.

  check_steps: also check every finalized step's files (False: the trainer, which tries the steps newest first
    and sets damaged ones aside).

  Raises:
    CheckpointError: the path is not a directory, an entry named like a step is not a directory, or (check_steps) a
      finalized step folder lacks an item or has unreadable metadata.
  """
  root = as_path(directory)
  if not root.exists():
    return
  if not root.is_dir():
    raise CheckpointError(f"{root} should be a checkpoint directory but is a file: remove it or use a new workdir.")
  for entry in sorted(root.iterdir(), key=lambda p: p.name):
    if TMP_MARK in entry.name:
      log.warning("ignoring %s: a save that did not finish (it is never restored)", entry)
    elif entry.name.isdigit():
      if not entry.is_dir():
        raise CheckpointError(f"{entry} is named like a checkpoint step but is not a directory: remove it.")
      if check_steps and is_finalized(entry):  # commit-file filesystems (GCS): unmarked = unfinished
        check_step_dir(entry)


def params_item(path: Any) -> tuple[epath.Path, Optional[str]]:
  """Where the params of a checkpoint folder are: (orbax item folder, key of the params subtree or None).

  Accepts a params-only checkpoint or a state/ item (the item itself), a run's step folder (its state item, key
  "params"), a run's checkpoints/ folder or a train.py workdir (their latest finished step). Reads file metadata
  only, so callers can check a path before anything is built.

  Raises:
    CheckpointError: the path does not exist or holds no params; a step's files are missing or unreadable.
  """
  root = as_path(path)
  if not root.exists():
    raise CheckpointError(f"{root} does not exist: expected a params checkpoint, a train.py workdir, its "
                          f"checkpoints/ folder or one of its step folders.")
  kind = folder_kind(root)
  if kind in ("params", STATE):
    item_dir, prefix = root, None
  elif kind == "step":
    check_step_dir(root)
    item_dir, prefix = root / STATE, PARAMS_KEY
  else:
    steps_dir = root / CHECKPOINTS_DIR if kind == "workdir" else root
    check_directory(str(steps_dir))
    steps = finished_steps(steps_dir)
    if not steps:
      raise CheckpointError(f"{root} holds no checkpoint (no _METADATA, state/ or finished step folders"
                            f"{' under checkpoints/' if kind == 'workdir' else ''}).")
    check_step_dir(steps_dir / str(steps[-1]))
    item_dir, prefix = steps_dir / str(steps[-1]) / STATE, PARAMS_KEY
  check_item(item_dir)
  return item_dir, prefix

