"""One training run per workdir: a lock file the run holds from start to end.

Two runs in one workdir corrupt it (one deletes the other's in-progress `*.orbax-checkpoint-tmp` folder,
metrics.jsonl gets every step twice). `WorkdirLock` keeps the second out with the file `LOCK_FILE_NAME` in the
workdir, one JSON object:

  {"format": 1, "host": "h1", "pid": 1234, "proc_start_ticks": 5188393, "started_at": "2026-12-06T14:10:03Z",
   "run_id": "<uuid4 hex>", "heartbeat": 1796566203.25}

`proc_start_ticks` (/proc/<pid>/stat field 22, clock ticks after boot; null without /proc) tells a reused pid from
the holder. `heartbeat` (the holder's clock, unix seconds) is rewritten every `heartbeat_s` by a daemon thread.

Exclusive create: locally O_CREAT | O_EXCL; on gs:// fsspec's `open(url, "xb")`, which gcsfs uploads with
`ifGenerationMatch=0` (GCS answers 412 if the object exists; gcsfs raises FileExistsError) and which the tests'
emulated bucket (fsspec's local filesystem) opens with O_EXCL. Not `pipe_file(mode="create")`: conditional in gcsfs
too, but fsspec's generic version (the emulator's) checks `exists()`, then writes.

A dead holder's lock is taken over, with a warning. Dead: on this host, its pid runs no more (or is a zombie, or
has another start time); on any host, no heartbeat for `stale_after_s`. An unreadable lock file is stale once
unchanged for `stale_after_s`; a fresh one is being written and counts as held. A taker removes a stale lock only
while it holds the break file (LOCK_FILE_NAME + BREAK_SUFFIX, created exclusively), and only if the lock still holds
the bytes it judged; then it creates its own exclusively. Of simultaneous takers one wins, and none removes the lock
a winner created; the same steps work on gs:// (no rename needed).

Races that remain:
  - a taker that dies holding the break file (a window of milliseconds) blocks takeovers for `stale_after_s`; two
    takers that then clear that break file at once could both remove locks.
  - the heartbeat (and `release`) check the run id, then rewrite (delete) the file: a takeover in between (possible
    only once we missed heartbeats for `stale_after_s`) is overwritten (deleted); the taker's heartbeat reports
    it `lost`.
  - heartbeats of another host are read with this host's clock: skew beyond `stale_after_s` breaks the check.

Multi-host: the processes of one run share the lock held by its process 0; only process 0 calls acquire/release.
Nothing here imports jax (usable before jax starts) and nothing global is registered (no atexit): the
caller releases in a `finally`.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import socket
import threading
import time
import uuid
from typing import Any, Optional

from etils.epath import backend as epath_backend

from megalodon_jax import paths
from megalodon_jax.checkpoints import layout
from megalodon_jax.errors import CheckpointError, ConfigError

LOCK_FILE_NAME = layout.LOCK_FILE  # ".megalodon-lock.json"
DEFAULT_STALE_AFTER_S = 300.0
DEFAULT_HEARTBEAT_S = 30.0
FORMAT = 1
BREAK_SUFFIX = ".break"  # LOCK_FILE_NAME + this: held (exclusively created) while a stale lock is removed
CONTENDED_S = 30.0  # acquire gives up after this long losing to other takers
_ADVICE = "wait for it to finish, stop it, or use another --workdir"

_LOG = logging.getLogger("megalodon_jax")


def _proc_stat(pid: int) -> Optional[list[str]]:
  """/proc/<pid>/stat from field 3 (state) on; None when the process does not exist (or there is no /proc)."""
  try:
    with open(f"/proc/{pid}/stat", "rb") as f:
      text = f.read().decode("ascii", "replace")
  except OSError:
    return None
  return text[text.rfind(")") + 2:].split()  # field 2, the command name, may hold spaces and ")"


def proc_start_ticks(pid: int) -> Optional[int]:
  """Process `pid`'s start time in clock ticks after boot (/proc/<pid>/stat field 22); None without /proc."""
  stat = _proc_stat(pid)
  return int(stat[19]) if stat is not None and len(stat) > 19 else None


def _death_on_this_host(pid: int, ticks: Optional[int]) -> Optional[str]:
  """Why process `pid` (started at `ticks`) of this host is dead, or None while it runs."""
  if os.path.exists("/proc/self/stat"):
    stat = _proc_stat(pid)
    if stat is None or stat[0] in ("Z", "X"):
      return f"process {pid} is no longer running"
    if ticks is not None and len(stat) > 19 and int(stat[19]) != ticks:
      return f"pid {pid} now belongs to another process"
    return None
  try:  # no /proc: existence only
    os.kill(pid, 0)
  except ProcessLookupError:
    return f"process {pid} is no longer running"
  except PermissionError:  # exists, owned by another user
    pass
  return None


def _parse(raw: bytes) -> Optional[dict[str, Any]]:
  """The lock record in `raw`, or None if it is not one (garbled, half written, another format)."""
  try:
    record = json.loads(raw.decode("utf-8"))
  except (UnicodeDecodeError, ValueError):
    return None
  if not isinstance(record, dict):
    return None
  types = {"host": str, "pid": int, "run_id": str, "heartbeat": (int, float)}
  if any(not isinstance(record.get(k), t) or isinstance(record.get(k), bool) for k, t in types.items()):
    return None
  if record["pid"] <= 0:  # os.kill(0 or -n, 0) would probe process groups
    return None
  if not isinstance(record.get("proc_start_ticks"), int):
    record["proc_start_ticks"] = None
  return record


def _describe(holder: Optional[dict[str, Any]], now: float) -> str:
  if holder is None:
    return "unreadable lock file"
  age = max(0, round(now - holder["heartbeat"]))
  return (f"host {holder['host']}, pid {holder['pid']}, started {holder.get('started_at', '?')}, "
          f"last heartbeat {age} s ago")


class WorkdirLock:
  """The lock of one training run on `workdir` (local or gs://); a context manager too (acquire, then release).

  Args:
    workdir: The training workdir; created by `acquire` if missing.
    stale_after_s: A holder silent (no heartbeat) this long is dead, whatever its host; also the age after which
      an unreadable lock file is stale. Must exceed `heartbeat_s`.
    heartbeat_s: How often the holder rewrites its heartbeat.
  """

  def __init__(self, workdir: paths.PathLike, *, stale_after_s: float = DEFAULT_STALE_AFTER_S,
               heartbeat_s: float = DEFAULT_HEARTBEAT_S):
    if not 0 < heartbeat_s < stale_after_s:
      raise ConfigError(f"workdir lock: need 0 < heartbeat_s < stale_after_s (got {heartbeat_s} and "
                        f"{stale_after_s}), or a live run looks dead")
    self.workdir = os.fspath(workdir)
    self.path = paths.join(self.workdir, LOCK_FILE_NAME)
    self._break_path = self.path + BREAK_SUFFIX
    self.stale_after_s, self.heartbeat_s = float(stale_after_s), float(heartbeat_s)
    self._remote = paths.is_remote(self.workdir)
    self._record: Optional[dict[str, Any]] = None
    self._thread: Optional[threading.Thread] = None
    self._stop = threading.Event()
    self._lost = False

  # ------------------------------------------------------------------------------------------------ public
  @property
  def held(self) -> bool:
    """Whether `acquire` succeeded and `release` has not run (true even once `lost`)."""
    return self._record is not None

  @property
  def lost(self) -> bool:
    """Whether the heartbeat found another run's lock in place of ours (it then stops heartbeating)."""
    return self._lost

  @property
  def run_id(self) -> Optional[str]:
    """Our run id while held."""
    return None if self._record is None else self._record["run_id"]

  def holder(self) -> Optional[dict[str, Any]]:
    """The current lock record (ours or another run's); None when there is no lock file or it is unreadable."""
    found = self._read()
    return None if found is None or found[1] is None else dict(found[1])

  def acquire(self) -> "WorkdirLock":
    """Takes the lock (taking over a dead holder's, with a warning) and starts the heartbeat; a no-op while held.

    Raises:
      CheckpointError: another live run holds the workdir (one line naming it), or its lock file is being written.
    """
    if self._record is not None:
      return self
    paths.makedirs(self.workdir)
    now = time.time()
    record = {"format": FORMAT, "host": socket.gethostname(), "pid": os.getpid(),
              "proc_start_ticks": proc_start_ticks(os.getpid()),
              "started_at": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
              "run_id": uuid.uuid4().hex, "heartbeat": now}
    data, took_over = json.dumps(record).encode("utf-8"), None
    deadline = time.monotonic() + CONTENDED_S
    while True:
      if time.monotonic() > deadline:
        raise CheckpointError(
            f"workdir {self.workdir}: could not take its lock file {self.path} within {CONTENDED_S:.0f} s: other "
            f"processes keep taking it over (one that died doing so leaves {self._break_path}, ignored after "
            f"{self.stale_after_s:.0f} s); {_ADVICE}")
      self._create(self.path, data)
      found = self._read()  # also after our own create: on gs:// it may have been retried after a lost reply
      if found is None:
        continue  # released or taken over in between: create again
      raw, holder, mtime = found
      if holder is not None and holder["run_id"] == record["run_id"]:
        break
      now = time.time()
      reason = self._stale_reason(holder, mtime, now)
      if reason is None:
        raise CheckpointError(self._held_message(holder, mtime, now))
      removed = self._take_over(raw)
      if removed:
        took_over = f"{_describe(holder, now)}: {reason}"
      elif removed is None:
        time.sleep(0.02)  # another process is taking it over (milliseconds)
    if took_over is not None:
      _LOG.warning("workdir %s: took over the lock of a training run that stopped (%s)", self.workdir, took_over)
    self._record, self._lost = record, False
    self._stop = threading.Event()
    self._thread = threading.Thread(target=self._beat, args=(dict(record), self._stop),
                                    name="megalodon-workdir-lock-heartbeat", daemon=True)
    self._thread.start()
    return self

  def release(self) -> None:
    """Stops the heartbeat and deletes the lock file if it still holds our run id. Idempotent; storage errors
    are logged, not raised (it runs in `finally` blocks), and leave a lock that turns stale after stale_after_s."""
    record, self._record = self._record, None
    if record is None:
      return
    self._stop.set()
    if self._thread is not None:
      self._thread.join(timeout=self.heartbeat_s + 60.0)  # a beat may be in a slow remote write
      self._thread = None
    try:
      found = self._read()
      if found is not None and found[1] is not None and found[1]["run_id"] == record["run_id"]:
        self._delete(self.path)
    except OSError as e:
      _LOG.warning("workdir %s: could not remove the lock file %s (%s); the next run takes it over after %.0f s",
                   self.workdir, self.path, e, self.stale_after_s)

  def __enter__(self) -> "WorkdirLock":
    return self.acquire()

  def __exit__(self, *exc) -> None:
    self.release()

  # ------------------------------------------------------------------------------------------------ judging
  def _stale_reason(self, holder: Optional[dict[str, Any]], mtime: float, now: float) -> Optional[str]:
    """Why the lock (`holder`, None if unreadable; file modified at `mtime`) is stale, or None if it is held."""
    if holder is None:
      age = now - mtime
      return f"unreadable and unchanged for {age:.0f} s" if age > self.stale_after_s else None
    if holder["host"] == socket.gethostname():
      death = _death_on_this_host(holder["pid"], holder["proc_start_ticks"])
      if death is not None:
        return death
    age = now - holder["heartbeat"]
    return f"no heartbeat for {age:.0f} s" if age > self.stale_after_s else None

  def _held_message(self, holder: Optional[dict[str, Any]], mtime: float, now: float) -> str:
    if holder is None:
      return (f"workdir {self.workdir} is in use by another training run: its lock file {self.path} is being "
              f"written (unreadable, modified {max(0, round(now - mtime))} s ago; taken over once unchanged for "
              f"{self.stale_after_s:.0f} s); {_ADVICE}")
    return f"workdir {self.workdir} is in use by another training run ({_describe(holder, now)}); {_ADVICE}"

  # ------------------------------------------------------------------------------------------------ storage
  def _fs(self):
    """The fsspec filesystem epath uses for our (remote) path."""
    return epath_backend.fsspec_backend.fs(self.path)

  def _create(self, path: str, data: bytes) -> bool:
    """Creates the file `path` holding `data` unless it exists; whether it did."""
    if self._remote:
      try:
        with self._fs().open(path, "xb") as f:
          f.write(data)
      except FileExistsError:
        return False
      except (ValueError, NotImplementedError) as e:  # a filesystem without exclusive create
        raise CheckpointError(f"workdir {self.workdir}: cannot create the lock file {path} exclusively ({e}); "
                              "use a local or gs:// workdir") from e
      return True
    try:
      fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
      return False
    try:
      view = memoryview(data)
      while view:
        view = view[os.write(fd, view):]
      os.fsync(fd)
    finally:
      os.close(fd)
    return True

  def _read_bytes(self, path: str) -> Optional[bytes]:
    try:
      if self._remote:
        return self._fs().cat_file(path)  # one GET: no size taken from a possibly stale listing cache
      with open(path, "rb") as f:
        return f.read()
    except FileNotFoundError:
      return None

  def _mtime(self, path: str) -> Optional[float]:
    try:
      if self._remote:
        fs = self._fs()
        fs.invalidate_cache(path)
        return fs.modified(path).timestamp()
      return os.stat(path).st_mtime
    except FileNotFoundError:
      return None

  def _delete(self, path: str) -> bool:
    try:
      if self._remote:
        self._fs().rm_file(path)
      else:
        os.unlink(path)
    except FileNotFoundError:
      return False
    return True

  def _read(self) -> Optional[tuple[bytes, Optional[dict[str, Any]], float]]:
    """(bytes, record or None if unreadable, modification time) of the lock file; None when there is none."""
    raw = self._read_bytes(self.path)
    if raw is None:
      return None
    record = _parse(raw)
    if record is not None:
      return raw, record, record["heartbeat"]  # the time only matters for unreadable files
    mtime = self._mtime(self.path)
    return None if mtime is None else (raw, None, mtime)

  def _take_over(self, raw: bytes) -> Optional[bool]:
    """Removes the lock file if it still holds `raw` (judged stale). True: removed; False: it changed, judge it
    again; None: another process holds the break file, retry shortly."""
    if not self._create(self._break_path, f"{socket.gethostname()} {os.getpid()}".encode("utf-8")):
      mtime = self._mtime(self._break_path)
      if mtime is None:
        return False
      if time.time() - mtime > self.stale_after_s:  # its taker died in the middle (a window of milliseconds)
        self._delete(self._break_path)
        return False
      return None
    try:
      return self._read_bytes(self.path) == raw and self._delete(self.path)
    finally:
      self._delete(self._break_path)

  # ------------------------------------------------------------------------------------------------ heartbeat
  def _beat(self, record: dict[str, Any], stop: threading.Event) -> None:
    """Rewrites `record`'s heartbeat every heartbeat_s until `stop`, while the lock file still holds our run id."""
    failing = False
    while not stop.wait(self.heartbeat_s):
      try:
        found = self._read()
        if found is None or found[1] is None or found[1]["run_id"] != record["run_id"]:
          self._lost = True
          current = _describe(found[1], time.time()) if found is not None else "no lock file"
          _LOG.warning("workdir %s: another training run took over this run's lock (%s); heartbeat stopped, two "
                       "runs may now write this workdir", self.workdir, current)
          return
        record["heartbeat"] = time.time()
        paths.write_text_atomic(self.path, json.dumps(record))
        failing = False
      except Exception as e:  # pylint: disable=broad-except  # a dead thread would stop heartbeats silently
        if not failing:
          _LOG.warning("workdir %s: lock heartbeat failed (%s: %s); retrying every %.0f s", self.workdir,
                       type(e).__name__, e, self.heartbeat_s)
        failing = True
