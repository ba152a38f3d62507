"""Orbax checkpoints for training runs: periodic async saves, resume, preemption and params-only exports.

A run's `workdir/checkpoints/<step>/` holds three orbax items: "state" (the train-state pytree: step, params,
buffers, optimizer state, rng key data), "data" (the data iterator's JSON state) and "meta" (JSON: config, versions,
mesh shape, step) so tools can inspect a checkpoint without building the model.

Safety (orbax 0.12.8, local filesystem):
- A save is written to `<step>.orbax-checkpoint-tmp` and renamed to `<step>` only once every item is on disk, so a
  killed save leaves a tmp folder that is never listed, restored or validated; a writing `Checkpointer` removes such
  folders when it opens the directory.
- Old steps are renamed into `_to_delete/` (atomic) before being removed, so a kill during deletion never leaves a
  half-deleted folder under a step name.
- `save()` returns after the device-to-host copy of every array (orbax's blocking phase), so the caller may donate
  the saved arrays to the next jitted step right away; the write to disk runs in the background.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import threading
import time
from typing import Any, Optional

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from orbax.checkpoint import checkpoint_managers as ocp_policies

from megalodon_jax.errors import CheckpointError

log = logging.getLogger("megalodon_jax")

ITEMS = ("state", "data", "meta")
_TMP_MARK = ocp.path.atomicity_types.TMP_DIR_SUFFIX  # ".orbax-checkpoint-tmp"
_TRASH = "_to_delete"
_MAX_LISTED = 8
_MOVE = "Move that step folder out of the way to resume from the previous step, or use a new workdir."


def _path(directory: Any) -> epath.Path:
  text = os.fspath(directory)
  # orbax wants absolute paths; URLs such as gs:// are left alone.
  return epath.Path(text if "://" in text else os.path.abspath(os.path.expanduser(text)))


def _read_json(path: epath.Path, what: str) -> Any:
  try:
    return json.loads(path.read_text())
  except FileNotFoundError:
    raise CheckpointError(f"{path} ({what}) is missing: the checkpoint is corrupted. {_MOVE}") from None
  except (OSError, ValueError) as e:  # ValueError covers truncated JSON and bad UTF-8
    raise CheckpointError(f"{path} ({what}) is unreadable or truncated: {e}. {_MOVE}") from e


def _check_item(item_dir: epath.Path) -> None:
  """Cheap file-level validation of one orbax item folder (no jax, no tensorstore)."""
  if not item_dir.is_dir():
    raise CheckpointError(f"{item_dir} is missing: the checkpoint is incomplete or corrupted. {_MOVE}")
  if item_dir.name == "state" or (item_dir / "_METADATA").exists():
    meta = _read_json(item_dir / "_METADATA", "pytree metadata")
    if not isinstance(meta, dict) or not isinstance(meta.get("tree_metadata"), dict):
      raise CheckpointError(f"{item_dir / '_METADATA'} has no tree metadata: the checkpoint is corrupted. {_MOVE}")
    if meta.get("use_ocdbt", False) and not (item_dir / "manifest.ocdbt").exists():
      raise CheckpointError(f"{item_dir / 'manifest.ocdbt'} is missing: the array data is gone. {_MOVE}")
  else:
    _read_json(item_dir / "metadata", "JSON item")


def _check_step_dir(step_dir: epath.Path) -> None:
  if (step_dir / "_CHECKPOINT_METADATA").exists():
    _read_json(step_dir / "_CHECKPOINT_METADATA", "step metadata")
  for item in ITEMS:
    _check_item(step_dir / item)


def _finalized_steps(root: epath.Path) -> list[int]:
  """Steps whose folder is complete: tmp folders of unfinished saves never count."""
  if not root.is_dir():
    return []
  return sorted(int(p.name) for p in root.iterdir()
                if p.name.isdigit() and p.is_dir() and ocp.path.step.is_path_finalized(p))


def check_directory(directory: str) -> None:
  """Fails fast, before anything is compiled, when a run's checkpoint directory cannot be trusted.

  A missing directory is fine (a fresh run). Unfinished saves (`<step>.orbax-checkpoint-tmp`) and the `_to_delete/`
  folder are ignored: they are never restored.

  Raises:
    CheckpointError: the path is not a directory, an entry named like a step is not a directory, or a finalized step
      folder lacks an item or has unreadable metadata.
  """
  root = _path(directory)
  if not root.exists():
    return
  if not root.is_dir():
    raise CheckpointError(f"{root} should be a checkpoint directory but is a file: remove it or use a new workdir.")
  for entry in sorted(root.iterdir(), key=lambda p: p.name):
    if _TMP_MARK in entry.name:
      log.warning("ignoring %s: a save that did not finish (it is never restored)", entry)
    elif entry.name.isdigit():
      if not entry.is_dir():
        raise CheckpointError(f"{entry} is named like a checkpoint step but is not a directory: remove it.")
      if ocp.path.step.is_path_finalized(entry):  # commit-file filesystems (GCS): unmarked means unfinished
        _check_step_dir(entry)


def _key(path: tuple) -> str:
  parts = []
  for k in path:
    # DictKey/FlattenedIndexKey, GetAttrKey (namedtuples: orbax saves them as dicts), SequenceKey; int dict keys
    # (nnx layer lists) are saved as strings, so everything is compared as a string.
    attr = next((a for a in ("key", "name", "idx") if hasattr(k, a)), None)
    parts.append(str(getattr(k, attr)) if attr else str(k))
  return "/".join(parts)


def _leaves(tree: Any) -> dict[str, Any]:
  return {_key(p): v for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _saved_leaves(item_dir: epath.Path) -> dict[str, Any]:
  try:
    return _leaves(ocp.PyTreeCheckpointHandler().metadata(item_dir).tree)
  except Exception as e:  # orbax/tensorstore raise many types for damaged metadata
    raise CheckpointError(f"cannot read the array metadata of {item_dir}: {_short(e)}. {_MOVE}") from e


def _describe(x: Any) -> str:
  shape, dtype = getattr(x, "shape", None), getattr(x, "dtype", None)
  return f"{tuple(shape) if shape is not None else '?'} {np.dtype(dtype).name if dtype is not None else '?'}"


def _match(saved: dict[str, Any], expected: dict[str, Any], where: epath.Path, check_dtype: bool) -> None:
  problems = [f"{k}: expected {_describe(expected[k])}, not in the checkpoint" for k in expected if k not in saved]
  problems += [f"{k}: saved {_describe(saved[k])}, not expected" for k in saved if k not in expected]
  for k in expected.keys() & saved.keys():
    s, e = saved[k], expected[k]
    bad_shape = tuple(getattr(s, "shape", ())) != tuple(e.shape)
    if bad_shape or (check_dtype and np.dtype(getattr(s, "dtype", e.dtype)) != np.dtype(e.dtype)):
      problems.append(f"{k}: saved {_describe(s)}, expected {_describe(e)}")
  if problems:
    listed = "\n  ".join(sorted(problems)[:_MAX_LISTED])
    raise CheckpointError(f"{where} does not match the model/optimizer being restored ({len(problems)} mismatching "
                          f"keys, first {min(len(problems), _MAX_LISTED)}):\n  {listed}\nIt was written with a "
                          f"different config (e.g. another model size with the same workdir): use a new workdir or "
                          f"the config it was written with.")


def _abstract(tree: Any) -> Any:
  default = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)
                                                     or default), tree)


def _short(e: Exception, limit: int = 400) -> str:
  # tensorstore errors embed their whole JSON spec; the head names the file and the problem.
  text = f"{type(e).__name__}: {e}"
  return text if len(text) <= limit else text[:limit] + " ..."


def _json(value: Any, what: str) -> Any:
  # Checked here, not in orbax's background thread, so a bad value fails at the call site.
  try:
    return json.loads(json.dumps(value))
  except (TypeError, ValueError) as e:
    raise CheckpointError(f"{what} must be JSON-serializable: {e}") from e


class Checkpointer:
  """A run's `CheckpointManager`: saves every `save_every` steps, keeps the last `keep`, resumes from the latest.

  Args:
    directory: The run's checkpoint folder (`workdir/checkpoints`).
    save_every: Save at steps that are multiples of this (>= 1); `save(..., force=True)` saves at any step.
    keep: How many of the latest checkpoints to keep (>= 1).
    async_save: Write to disk in a background thread after the device-to-host copy.
    create: Create the directory if it does not exist (else a missing directory is a CheckpointError).
    read_only: Never write or delete (for tools that inspect a live run); unfinished saves are left alone.
  """

  def __init__(self, directory: str, *, save_every: int, keep: int, async_save: bool = True, create: bool = True,
               read_only: bool = False):
    for name, value in (("save_every", save_every), ("keep", keep)):
      if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    self.directory = _path(directory)
    self.save_every, self.read_only = save_every, read_only
    if not self.directory.exists() and (read_only or not create):
      raise CheckpointError(f"checkpoint directory {self.directory} does not exist.")
    check_directory(str(self.directory))
    self._primary = jax.process_index() == 0
    self._purger: Optional[threading.Thread] = None
    if not read_only:
      self._purge()  # leftovers of a run killed while deleting an old step
    options = ocp.CheckpointManagerOptions(
        read_only=read_only, create=create and not read_only, enable_async_checkpointing=async_save,
        save_interval_steps=0 if read_only else save_every,  # read_only warns unless it is 0
        save_decision_policy=None if read_only else ocp_policies.FixedIntervalPolicy(save_every),
        preservation_policy=None if read_only else ocp_policies.LatestN(keep),
        cleanup_tmp_directories=not read_only, todelete_subdir=None if read_only else _TRASH)
    handlers = {"state": ocp.StandardCheckpointHandler(), "data": ocp.JsonCheckpointHandler(),
                "meta": ocp.JsonCheckpointHandler()}
    self._mgr = ocp.CheckpointManager(self.directory, options=options, item_handlers=handlers)
    self._last_saved = self.latest_step()

  def latest_step(self) -> Optional[int]:
    """The latest step whose save finished (an async save still being written does not count)."""
    finished = set(_finalized_steps(self.directory))
    steps = [s for s in self._mgr.all_steps() if s in finished]
    return max(steps) if steps else None

  def should_save(self, step: int) -> bool:
    """Whether `save(step, ...)` without force would save: a multiple of `save_every` after the last save."""
    return (not self.read_only and step % self.save_every == 0
            and (self._last_saved is None or step > self._last_saved))

  def save(self, step: int, state: Any, data_state: dict, meta: dict, *, force: bool = False) -> bool:
    """Starts saving `state`, `data_state` and `meta` as step `step`; returns whether a save was started.

    Returns once the arrays are copied to host memory, so `state` may be donated right after. The checkpoint
    becomes visible to `latest_step` (and to a restarted run) only when the background write has finished.
    A step that already has a checkpoint is not saved again (returns False).
    """
    if self.read_only or not (force or self.should_save(step)):
      return False
    if step in self._mgr.all_steps():
      log.info("step %d already has a checkpoint in %s; not saving it again", step, self.directory)
      return False
    data_state = _json(data_state, "data_state")
    meta = _json({**meta, "step": int(step), "jax_version": jax.__version__, "orbax_version": ocp.__version__,
                  "process_count": jax.process_count(), "saved_at_unix": time.time()}, "meta")
    self._join_purge()
    args = ocp.args.Composite(state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state),
                              meta=ocp.args.JsonSave(meta))
    saved = bool(self._mgr.save(step, args=args, force=True))
    if saved:
      self._last_saved = step
      # orbax's save waited for the previous save, which has moved the step it replaced into the trash by now.
      if self._primary:
        self._purger = threading.Thread(target=self._purge, name="checkpoint-purge", daemon=True)
        self._purger.start()
    return saved

  def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict, dict]:
    """Restores step `step` onto the shardings of `abstract_state` (any mesh, not necessarily the saving one).

    Args:
      step: A finalized step (see `latest_step`).
      abstract_state: Pytree of `jax.ShapeDtypeStruct` (or arrays) with the target `.sharding`; leaves without one
        go to the first local device.

    Returns:
      (state, data_state, meta).

    Raises:
      CheckpointError: the step does not exist or did not finish, is corrupted, or its shapes/dtypes/keys differ
        from `abstract_state`.
    """
    step_dir, finished = self.directory / str(step), _finalized_steps(self.directory)
    if step not in finished:
      raise CheckpointError(f"{step_dir} is not a finished checkpoint (finished steps: {finished}).")
    _check_step_dir(step_dir)
    abstract = _abstract(abstract_state)
    _match(_saved_leaves(step_dir / "state"), _leaves(abstract), step_dir, check_dtype=True)
    args = ocp.args.Composite(state=ocp.args.StandardRestore(abstract), data=ocp.args.JsonRestore(),
                              meta=ocp.args.JsonRestore())
    try:
      out = self._mgr.restore(step, args=args)
    except Exception as e:  # tensorstore/orbax errors on damaged data files
      raise CheckpointError(f"restoring {step_dir} failed: {_short(e)}. {_MOVE}") from e
    return out["state"], out["data"], out["meta"]

  def wait(self) -> None:
    """Blocks until every started save is on disk (and old steps are deleted); re-raises a failed save."""
    self._mgr.wait_until_finished()
    self._join_purge()
    if not self.read_only:
      self._purge()

  def close(self) -> None:
    self.wait()
    self._mgr.close()

  def _join_purge(self) -> None:
    if self._purger is not None:
      self._purger.join()
      self._purger = None

  def _purge(self) -> None:
    trash = self.directory / _TRASH
    if self._primary and trash.is_dir():
      for entry in trash.iterdir():
        try:
          entry.rmtree() if entry.is_dir() else entry.unlink()
        except OSError as e:  # disk space only: a failed purge is retried on the next save
          log.warning("could not delete %s: %s", entry, e)


def save_params(path: str, params: Any, *, overwrite: bool = False) -> None:
  """Writes a params-only checkpoint (for `--config.init_from` and export); synchronous and atomic.

  Raises:
    CheckpointError: `path` exists and `overwrite` is False.
  """
  target = _path(path)
  if target.exists() and not overwrite:
    raise CheckpointError(f"{target} already exists: choose another path or pass overwrite=True.")
  ckptr = ocp.Checkpointer(ocp.StandardCheckpointHandler())
  try:
    ckptr.save(target, args=ocp.args.StandardSave(params), force=overwrite)
  finally:
    ckptr.close()


def load_params(path: str, abstract_params: Any) -> Any:
  """Loads params onto the shardings of `abstract_params` (dtypes are cast to the abstract ones).

  Args:
    path: A params-only checkpoint (`save_params`), a run's step folder (its state["params"] is used) or a run's
      checkpoints/ folder (its latest finished step).
    abstract_params: Pytree of `jax.ShapeDtypeStruct` (or arrays) with target shardings.

  Raises:
    CheckpointError: the path does not exist, holds no params, is corrupted, or its shapes/keys differ.
  """
  root = _path(path)
  if not root.exists():
    raise CheckpointError(f"{root} does not exist: init_from needs a params checkpoint, a run's step folder or a "
                          f"run's checkpoints/ folder.")
  prefix: Optional[str] = "params"
  if (root / "_METADATA").is_file():
    item_dir, prefix = root, None
  elif (root / "state").is_dir():
    _check_step_dir(root)
    item_dir = root / "state"
  else:
    check_directory(str(root))
    steps = _finalized_steps(root)
    if not steps:
      raise CheckpointError(f"{root} holds no checkpoint (no _METADATA, state/ or finished step folders).")
    item_dir = root / str(steps[-1]) / "state"
    _check_step_dir(item_dir.parent)
  _check_item(item_dir)
  abstract = _abstract(abstract_params)
  expected, saved = _leaves(abstract), _saved_leaves(item_dir)
  if prefix is None and saved and all(k.startswith("params/") for k in saved) and not any(
      k.startswith("params/") for k in expected):
    prefix = "params"  # a run's state/ item folder given directly
  if prefix is not None:
    saved = {k[len(prefix) + 1:]: v for k, v in saved.items() if k.startswith(prefix + "/")}
  if not saved:
    raise CheckpointError(f"{item_dir} holds no params.")
  _match(saved, expected, item_dir, check_dtype=False)
  target = abstract if prefix is None else {prefix: abstract}
  args = ocp.args.PyTreeRestore(item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
                                partial_restore=prefix is not None)
  ckptr = ocp.Checkpointer(ocp.PyTreeCheckpointHandler())
  try:
    out = ckptr.restore(item_dir, args=args)
  except Exception as e:  # tensorstore/orbax errors on damaged data files
    raise CheckpointError(f"loading params from {item_dir} failed: {_short(e)}") from e
  finally:
    ckptr.close()
  return out if prefix is None else out[prefix]


class PreemptionFlag:
  """Turns SIGTERM (the preemption notice) into a flag the training loop polls between steps.

  Single process: a SIGTERM handler sets `requested`; `close()` restores the previous handler. Multi-process
  (`jax.distributed`): jax's preemption service owns SIGTERM and picks one step at which every process saves, so no
  handler is installed and `check(step)` must be called by every process at every step.
  """

  def __init__(self):
    self.requested = False
    self._previous: Any = None
    self._installed = False
    self._multiprocess = jax.process_count() > 1
    if self._multiprocess:
      return
    try:
      self._previous = signal.signal(signal.SIGTERM, self._handle)
      self._installed = True
    except ValueError:  # not the main thread: signals cannot be handled here
      log.warning("PreemptionFlag created outside the main thread: SIGTERM is not intercepted")

  def _handle(self, signum: int, frame: Any) -> None:
    del signum, frame
    self.requested = True

  def check(self, step: int) -> bool:
    """True once a preemption was signalled (multi-process: once all processes reached the agreed step)."""
    if not self.requested and self._multiprocess:
      try:
        from jax.experimental import multihost_utils
        self.requested = bool(multihost_utils.reached_preemption_sync_point(step))
      except RuntimeError:  # preemption service disabled (jax_enable_preemption_service=False)
        pass
    return self.requested

  def close(self) -> None:
    if self._installed:
      signal.signal(signal.SIGTERM, self._previous if self._previous is not None else signal.SIG_DFL)
      self._installed = False
