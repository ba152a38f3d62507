"""One writer per workdir: `WorkdirLock` keeps a second training run out, takes over the locks of dead runs (on this
host by pid and /proc start time, on any host by heartbeat age), heartbeats, and works on gs:// (the emulated
bucket of `gcs_emulator.fake_gcs`)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

from gcs_emulator import fake_gcs, local_path  # pylint: disable=unused-import
from megalodon_jax.errors import CheckpointError, ConfigError
from megalodon_jax.training import workdir_lock
from megalodon_jax.training.workdir_lock import LOCK_FILE_NAME, WorkdirLock

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", "")}
HAS_PROC = os.path.exists("/proc/self/stat")


def _lock_file(workdir) -> str:
  return os.path.join(str(workdir), LOCK_FILE_NAME)


def _write_record(path: str, **fields) -> dict:
  record = {"format": 1, "host": socket.gethostname(), "pid": os.getpid(), "proc_start_ticks": None,
            "started_at": "2026-12-06T14:10:03Z", "run_id": "0" * 32, "heartbeat": time.time(), **fields}
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w") as f:
    json.dump(record, f)
  return record


def _read(path: str) -> dict:
  with open(path) as f:
    return json.load(f)


def _wait_for(predicate, timeout_s: float = 5.0) -> bool:
  deadline = time.monotonic() + timeout_s
  while time.monotonic() < deadline:
    if predicate():
      return True
    time.sleep(0.01)
  return predicate()


def _dead_pid() -> int:
  proc = subprocess.Popen([sys.executable, "-c", "pass"])
  proc.wait()
  return proc.pid


def _took_over(caplog) -> list[str]:
  return [r.getMessage() for r in caplog.records if "took over the lock" in r.getMessage()]


def test_acquire_refuse_release_reacquire(tmp_path):
  workdir = str(tmp_path / "runs" / "tiny")  # created by acquire
  with WorkdirLock(workdir) as lock:
    record = _read(_lock_file(workdir))
    assert record["host"] == socket.gethostname() and record["pid"] == os.getpid()
    assert record["run_id"] == lock.run_id and len(record["run_id"]) == 32
    assert record["started_at"].endswith("Z") and abs(record["heartbeat"] - time.time()) < 5
    assert record["proc_start_ticks"] == (workdir_lock.proc_start_ticks(os.getpid()) if HAS_PROC else None)
    assert lock.holder() == record
    with pytest.raises(CheckpointError) as e:
      WorkdirLock(workdir).acquire()
    message = str(e.value)
    assert "\n" not in message and f"workdir {workdir} is in use by another training run" in message
    assert f"host {record['host']}" in message and f"pid {os.getpid()}" in message
    assert f"started {record['started_at']}" in message and "use another --workdir" in message
    assert lock.acquire() is lock and lock.run_id == record["run_id"]  # a no-op while held
  assert not os.path.exists(_lock_file(workdir)) and not lock.held
  lock.release()  # idempotent
  with WorkdirLock(workdir) as again:
    assert again.holder()["run_id"] == again.run_id != record["run_id"]
  assert os.listdir(workdir) == []  # no temporary or stale files left behind


def test_heartbeat_must_be_shorter_than_staleness(tmp_path):
  with pytest.raises(ConfigError, match="heartbeat_s < stale_after_s"):
    WorkdirLock(str(tmp_path), stale_after_s=10, heartbeat_s=10)


def test_lock_of_a_dead_process_on_this_host_is_taken_over(tmp_path, caplog):
  pid = _dead_pid()
  _write_record(_lock_file(tmp_path), pid=pid)
  with caplog.at_level("WARNING", logger="megalodon_jax"):
    with WorkdirLock(str(tmp_path)) as lock:
      assert _read(_lock_file(tmp_path))["run_id"] == lock.run_id
  (message,) = _took_over(caplog)
  assert f"pid {pid}" in message and f"process {pid} is no longer running" in message and "\n" not in message


@pytest.mark.skipif(not HAS_PROC, reason="pid reuse is detected through /proc")
def test_reused_pid_with_another_start_time_is_stale(tmp_path, caplog):
  ticks = workdir_lock.proc_start_ticks(os.getpid())
  _write_record(_lock_file(tmp_path), pid=os.getpid(), proc_start_ticks=ticks - 1)
  with caplog.at_level("WARNING", logger="megalodon_jax"):
    WorkdirLock(str(tmp_path)).acquire().release()
  (message,) = _took_over(caplog)
  assert f"pid {os.getpid()} now belongs to another process" in message
  _write_record(_lock_file(tmp_path), pid=os.getpid(), proc_start_ticks=ticks)  # the same process: held
  with pytest.raises(CheckpointError, match="in use by another training run"):
    WorkdirLock(str(tmp_path)).acquire()


HOLDER = """
import sys, time
from megalodon_jax.training.workdir_lock import WorkdirLock
WorkdirLock(sys.argv[1], heartbeat_s=0.2, stale_after_s=60).acquire()
print("ready", flush=True)
time.sleep(600)
"""


def test_live_holder_in_another_process_then_killed(tmp_path, caplog):
  workdir = str(tmp_path)
  proc = subprocess.Popen([sys.executable, "-c", HOLDER, workdir], stdout=subprocess.PIPE, text=True, env=ENV)
  try:
    assert proc.stdout.readline().strip() == "ready"
    with pytest.raises(CheckpointError) as e:
      WorkdirLock(workdir).acquire()
    assert f"pid {proc.pid}" in str(e.value) and "\n" not in str(e.value)
  finally:
    proc.send_signal(signal.SIGKILL)
    proc.wait()
  with caplog.at_level("WARNING", logger="megalodon_jax"):
    with WorkdirLock(workdir) as lock:
      assert lock.holder()["pid"] == os.getpid()
  (message,) = _took_over(caplog)
  assert f"pid {proc.pid}" in message


def test_another_hosts_lock_is_held_until_its_heartbeat_is_stale(tmp_path, caplog):
  path = _lock_file(tmp_path)
  _write_record(path, host="some-other-host", pid=1, heartbeat=time.time() - 50)
  with pytest.raises(CheckpointError, match=r"host some-other-host, pid 1, .*last heartbeat 5\d s ago"):
    WorkdirLock(str(tmp_path), stale_after_s=60).acquire()
  _write_record(path, host="some-other-host", pid=1, heartbeat=time.time() - 120)
  with caplog.at_level("WARNING", logger="megalodon_jax"):
    WorkdirLock(str(tmp_path), stale_after_s=60).acquire().release()
  (message,) = _took_over(caplog)
  assert "host some-other-host" in message and "no heartbeat for 12" in message


def test_unreadable_lock_is_held_while_fresh_and_stale_when_old(tmp_path, caplog):
  path = _lock_file(tmp_path)
  with open(path, "w") as f:
    f.write('{"host": "h1", "pi')  # what a reader may see while the holder writes it
  with pytest.raises(CheckpointError, match="is being written .*unreadable") as e:
    WorkdirLock(str(tmp_path), stale_after_s=60).acquire()
  assert "\n" not in str(e.value)
  old = time.time() - 120
  os.utime(path, (old, old))
  with caplog.at_level("WARNING", logger="megalodon_jax"):
    WorkdirLock(str(tmp_path), stale_after_s=60).acquire().release()
  (message,) = _took_over(caplog)
  assert "unreadable lock file" in message


def test_heartbeat_advances_and_a_lost_lock_is_not_deleted(tmp_path, caplog):
  path = _lock_file(tmp_path)
  lock = WorkdirLock(str(tmp_path), heartbeat_s=0.05, stale_after_s=5).acquire()
  first = _read(path)["heartbeat"]
  assert _wait_for(lambda: _read(path)["heartbeat"] > first)
  assert not lock.lost
  with caplog.at_level("WARNING", logger="megalodon_jax"):
    other = _write_record(path, run_id="f" * 32)
    assert _wait_for(lambda: lock.lost)
    time.sleep(0.2)  # no more beats: the other run's record stays as written
    assert _read(path) == other
  assert sum("took over this run's lock" in r.getMessage() for r in caplog.records) == 1
  lock.release()
  assert _read(path) == other


def _race(locks: list[WorkdirLock]) -> list[str]:
  """Every lock acquires at once (one thread each); their outcomes, sorted."""
  barrier, outcomes = threading.Barrier(len(locks)), []

  def take(lock):
    barrier.wait()
    try:
      lock.acquire()
      outcomes.append("won")
    except CheckpointError:
      outcomes.append("refused")

  threads = [threading.Thread(target=take, args=(lock,)) for lock in locks]
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  return sorted(outcomes)


def test_simultaneous_takers_of_one_stale_lock_one_wins(tmp_path):
  path = _lock_file(tmp_path)
  for _ in range(10):
    _write_record(path, host="gone-host", heartbeat=time.time() - 1000)
    locks = [WorkdirLock(str(tmp_path), stale_after_s=60) for _ in range(4)]
    assert _race(locks) == ["refused"] * 3 + ["won"]
    (winner,) = [lock for lock in locks if lock.held]
    assert _read(path)["run_id"] == winner.run_id
    winner.release()
  assert os.listdir(tmp_path) == []


RACER = """
import sys, time
from megalodon_jax.errors import CheckpointError
from megalodon_jax.training.workdir_lock import WorkdirLock
time.sleep(max(0.0, float(sys.argv[2]) - time.time()))
try:
  print("won", WorkdirLock(sys.argv[1], stale_after_s=60).acquire().run_id, flush=True)
except CheckpointError:
  print("refused", flush=True)
sys.stdin.read()  # alive until every racer has answered: a winner that exited would be a dead holder
"""


def test_simultaneous_taker_processes_one_wins(tmp_path):
  path = _lock_file(tmp_path)
  _write_record(path, pid=_dead_pid())
  start = f"{time.time() + 1.0:.3f}"
  procs = [subprocess.Popen([sys.executable, "-c", RACER, str(tmp_path), start], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True, env=ENV) for _ in range(3)]
  try:
    outs = [p.stdout.readline().split() for p in procs]
  finally:
    for p in procs:
      p.communicate(timeout=30)
  won = [o for o in outs if o[0] == "won"]
  assert len(won) == 1 and outs.count(["refused"]) == 2
  assert _read(path)["run_id"] == won[0][1]


def test_takeover_removes_only_the_bytes_it_judged_and_waits_for_another_taker(tmp_path, monkeypatch):
  path = _lock_file(tmp_path)
  fresh = _write_record(path, run_id="a" * 32)
  lock = WorkdirLock(str(tmp_path), stale_after_s=60)
  assert lock._take_over(b'{"judged": "stale"}') is False  # pylint: disable=protected-access
  assert _read(path) == fresh and os.listdir(tmp_path) == [LOCK_FILE_NAME]  # the break file is gone too

  _write_record(path, host="gone-host", heartbeat=time.time() - 120)
  with open(path + workdir_lock.BREAK_SUFFIX, "w") as f:
    f.write("another taker")  # in the middle of a takeover
  monkeypatch.setattr(workdir_lock, "CONTENDED_S", 0.2)
  with pytest.raises(CheckpointError, match="other processes keep taking it over") as e:
    lock.acquire()
  assert "\n" not in str(e.value) and _read(path)["host"] == "gone-host"
  old = time.time() - 120
  os.utime(path + workdir_lock.BREAK_SUFFIX, (old, old))  # that taker died: its break file is stale
  with lock:
    assert _read(path)["run_id"] == lock.run_id
  assert os.listdir(tmp_path) == []


def test_gcs_exclusive_acquire_refusal_takeover_and_release(fake_gcs, caplog):
  workdir = "gs://b/runs/tiny"
  path = local_path(fake_gcs, f"{workdir}/{LOCK_FILE_NAME}")
  lock = WorkdirLock(workdir, heartbeat_s=0.05, stale_after_s=60).acquire()
  assert _read(path)["run_id"] == lock.run_id
  assert not lock._create(lock.path, b"{}")  # pylint: disable=protected-access  # the exclusive create refuses
  with pytest.raises(CheckpointError, match=f"workdir {workdir} is in use by another training run"):
    WorkdirLock(workdir).acquire()
  first = _read(path)["heartbeat"]
  assert _wait_for(lambda: _read(path)["heartbeat"] > first)  # heartbeats through whole-object writes
  lock.release()
  assert not os.path.exists(path)

  _write_record(path, host="gone-host", heartbeat=time.time() - 120)
  with caplog.at_level("WARNING", logger="megalodon_jax"):
    with WorkdirLock(workdir, stale_after_s=60) as taker:
      assert taker.holder()["run_id"] == taker.run_id == _read(path)["run_id"]
  (message,) = _took_over(caplog)
  assert "host gone-host" in message
  assert not os.path.exists(path)


def test_gcs_simultaneous_takers_one_wins(fake_gcs):
  workdir = "gs://b/run"
  path = local_path(fake_gcs, f"{workdir}/{LOCK_FILE_NAME}")
  for _ in range(3):
    _write_record(path, host="gone-host", heartbeat=time.time() - 1000)
    locks = [WorkdirLock(workdir, stale_after_s=60) for _ in range(3)]
    assert _race(locks) == ["refused", "refused", "won"]
    (winner,) = [lock for lock in locks if lock.held]
    assert _read(path)["run_id"] == winner.run_id
    winner.release()
  assert os.listdir(os.path.dirname(path)) == []
