"""A training run's checkpoints: periodic async saves, resume from the latest finished step (layout: layout.py).

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
import sys
import threading
import time
from typing import Any, Optional

import jax
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as ocp_policies

from megalodon_jax.checkpoints import layout, trees
from megalodon_jax.errors import CheckpointDamagedError, CheckpointError

log = logging.getLogger("megalodon_jax")


def _json(value: Any, what: str) -> Any:
  # Checked here, not in orbax's background thread, so a bad value fails at the call site.
  try:
    return json.loads(json.dumps(value))
  except (TypeError, ValueError) as e:
    raise CheckpointError(f"{what} must be JSON-serializable: {e}") from e


def _late_read_error(exc: Any) -> bool:
  text = str(exc)
  return (text == "Event loop is closed" or text.startswith("Encountered error while reading")
          or (text.split(":")[0].isupper() and ("OCDBT" in text or "tensorstore" in text)))


def _ignore_late_read_callbacks() -> None:
  """After a failed restore, the other reads of the step still finish in TensorStore's threads, once orbax has
  closed its event loop; their callbacks then raise "Event loop is closed", and their coroutines are collected with
  their own read errors, which Python prints as a traceback each (through sys.excepthook or sys.unraisablehook)
  after the one-line error. Those, and only those (recognised by their messages), are dropped."""
  if getattr(sys.excepthook, "_megalodon_quiet", False):
    return
  previous_except, previous_unraisable = sys.excepthook, sys.unraisablehook

  def excepthook(kind: Any, value: Any, tb: Any) -> None:
    if not _late_read_error(value):
      previous_except(kind, value, tb)

  def unraisablehook(unraisable: Any) -> None:
    if not _late_read_error(unraisable.exc_value):
      previous_unraisable(unraisable)

  excepthook._megalodon_quiet = True  # type: ignore[attr-defined]
  sys.excepthook, sys.unraisablehook = excepthook, unraisablehook
  # The metadata reads of a damaged step end the same way, in tasks asyncio reports with their whole spec dump, and
  # TensorStore's own futures in asyncio futures whose exception carries no traceback (so asyncio's report ends in
  # a bare "ValueError: OUT_OF_RANGE ..." line after the one-line error).
  logging.getLogger("asyncio").addFilter(_keep_asyncio_record)


def _keep_asyncio_record(record: logging.LogRecord) -> bool:
  message = str(record.msg)
  if message.startswith("Task exception was never retrieved"):
    return False
  if message.startswith("Future exception was never retrieved"):
    return not (record.exc_info and _late_read_error(record.exc_info[1]))
  return True


class Checkpointer:
  """A run's `CheckpointManager`: saves every `save_every` steps, keeps the last `keep`, resumes from the latest.

  Args:
    directory: The run's checkpoint folder (`workdir/checkpoints`).
    save_every: Save at steps that are multiples of this (>= 1); `save(..., force=True)` saves at any step.
    keep: How many of the latest checkpoints to keep (>= 1).
    async_save: Write to disk in a background thread after the device-to-host copy.
    create: Create the directory if it does not exist (else a missing directory is a CheckpointError).
    read_only: Never write or delete (for tools that inspect a live run); unfinished saves are left alone.
    check_steps: Check every finished step's files when opening (False: the caller restores the steps newest first
      and sets damaged ones aside, see `set_aside`).
  """

  def __init__(self, directory: str, *, save_every: int, keep: int, async_save: bool = True, create: bool = True,
               read_only: bool = False, check_steps: bool = True):
    for name, value in (("save_every", save_every), ("keep", keep)):
      if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    self.directory = layout.as_path(directory)
    self.save_every, self.read_only = save_every, read_only
    if not self.directory.exists() and (read_only or not create):
      raise CheckpointError(f"checkpoint directory {self.directory} does not exist.")
    layout.check_directory(str(self.directory), check_steps=check_steps)
    self._primary = jax.process_index() == 0
    self._purger: Optional[threading.Thread] = None
    if not read_only:
      self._purge()  # leftovers of a run killed while deleting an old step
    options = ocp.CheckpointManagerOptions(
        read_only=read_only, create=create and not read_only, enable_async_checkpointing=async_save,
        save_interval_steps=0 if read_only else save_every,  # read_only warns unless it is 0
        save_decision_policy=None if read_only else ocp_policies.FixedIntervalPolicy(save_every),
        preservation_policy=None if read_only else ocp_policies.LatestN(keep),
        cleanup_tmp_directories=not read_only, todelete_subdir=None if read_only else layout.TRASH)
    handlers = {layout.STATE: ocp.StandardCheckpointHandler(), layout.DATA: ocp.JsonCheckpointHandler(),
                layout.META: ocp.JsonCheckpointHandler()}
    self._mgr = ocp.CheckpointManager(self.directory, options=options, item_handlers=handlers)
    self._last_saved = self.latest_step()

  def latest_step(self) -> Optional[int]:
    """The latest step whose save finished (an async save still being written does not count)."""
    finished = set(layout.finished_steps(self.directory))
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
    args = ocp.args.Composite(**{layout.STATE: ocp.args.StandardSave(state), layout.DATA: ocp.args.JsonSave(data_state),
                                 layout.META: ocp.args.JsonSave(meta)})
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
    step_dir, finished = self.directory / str(step), layout.finished_steps(self.directory)
    if step not in finished:
      raise CheckpointError(f"{step_dir} is not a finished checkpoint (finished steps: {finished}).")
    abstract = trees.abstract(abstract_state)
    try:
      layout.check_step_dir(step_dir)
      saved = trees.saved_leaves(step_dir / layout.STATE)
    except CheckpointDamagedError as e:
      _ignore_late_read_callbacks()
      raise CheckpointDamagedError(f"step {step} in {self.directory} does not restore: {e.problem}",
                                   layout.MOVE) from e
    trees.match(saved, trees.leaves(abstract), step_dir, check_dtype=True)  # another model: not damage
    args = ocp.args.Composite(**{layout.STATE: ocp.args.StandardRestore(abstract),
                                 layout.DATA: ocp.args.JsonRestore(), layout.META: ocp.args.JsonRestore()})
    try:
      out = self._mgr.restore(step, args=args)
    except Exception as e:  # tensorstore/orbax errors on damaged data files
      _ignore_late_read_callbacks()
      raise CheckpointDamagedError(f"step {step} in {self.directory} does not restore: {trees.damage(e)}",
                                   layout.MOVE) from e
    return out[layout.STATE], out[layout.DATA], out[layout.META]

  def restore_newest(self, abstract_state: Any) -> Optional[tuple[Any, dict, dict, int]]:
    """(state, data_state, meta, step) of the newest finished step that restores; None when there is none.

    A step whose files are damaged (CheckpointDamagedError: truncated or missing data, unreadable metadata) is
    skipped; once an older step restores, each skipped step is set aside (`set_aside`) with a one-line warning
    naming the file that failed. If no step restores, nothing is renamed and the newest step's problem is raised.
    A step that does not match `abstract_state` (another model) is not damage: that error is raised as it is.
    """
    skipped: list[tuple[int, CheckpointDamagedError]] = []
    for step in reversed(layout.finished_steps(self.directory)):
      try:
        state, data_state, meta = self.restore(step, abstract_state)
      except CheckpointDamagedError as e:
        skipped.append((step, e))
        continue
      for bad, error in skipped:
        moved = self.set_aside(bad)
        log.warning("%s; renamed it %s and resumed from step %d", error.problem, moved, step)
      return state, data_state, meta, step
    if skipped:
      raise CheckpointError(f"no checkpoint in {self.directory} restores (steps {[s for s, _ in skipped]}); the "
                            f"newest: {skipped[0][1].problem}. Move the damaged step folders out of the way, or start a new "
                            f"--workdir (with --config.init_from to reuse weights).")
    return None

  def set_aside(self, step: int) -> str:
    """Renames the finished step `step` to `<step>.corrupt-<UTC time>` (kept, never listed or restored again) and
    returns the new path. Only the primary process renames; every process forgets the step."""
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    target = self.directory / f"{step}{layout.DAMAGED_MARK}{stamp}"
    if self._primary and not self.read_only:
      (self.directory / str(step)).rename(target)
    self._mgr.reload()
    self._last_saved = self.latest_step()
    return str(target)

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
    trash = self.directory / layout.TRASH
    if self._primary and trash.is_dir():
      for entry in trash.iterdir():
        try:
          entry.rmtree() if entry.is_dir() else entry.unlink()
        except OSError as e:  # disk space only: a failed purge is retried on the next save
          log.warning("could not delete %s: %s", entry, e)
