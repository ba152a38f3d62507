"""A training run is never lost: one writer per workdir, Ctrl-C saves, a damaged newest step is set aside, and bad
workdirs or init_from paths are refused in one line before anything is created (issue 20).

Each case runs `train.py` as a user does (a subprocess) and is checked against an uninterrupted run of the same
command: losses and final params bit for bit.
"""

import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from cli_harness import REPO, env, run_cli, train_command, tree_digest, wait_for
from megalodon_jax.checkpoints import layout
from megalodon_jax.checkpoints.locate import locate_checkpoint
from megalodon_jax.checkpoints.model_io import load_checkpoint
from megalodon_jax.training.metrics import read_metrics
from megalodon_jax.training.workdir_lock import LOCK_FILE_NAME

OVERRIDES = ("--config.model.num_layers=1", "--config.model.chunk_size=32", "--config.seq_len=64",
             "--config.data.max_documents=60", "--config.total_steps=40", "--config.log_every=1",
             "--config.eval_every=0", "--config.num_samples=0", "--config.checkpoint_every=5",
             "--config.tensorboard=False", "--config.optimizer.warmup_steps=5", "--config.model.dropout=0.1",
             "--config.progress_bar=off")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp("tfds"))


def _cmd(workdir: str, data_dir: str, *extra: str) -> list[str]:
  return train_command("--config=tiny", f"--workdir={workdir}", f"--config.data.data_dir={data_dir}", *OVERRIDES,
                       *extra)


def losses(workdir: str) -> dict[int, float]:
  path = os.path.join(workdir, "metrics.jsonl")
  return {r["step"]: r["loss"] for r in read_metrics(path) if "loss" in r} if os.path.exists(path) else {}


def final_params(workdir: str) -> dict[str, np.ndarray]:
  model, _, step = load_checkpoint(workdir, device=jax.devices("cpu")[0])
  assert step == 40
  from flax import nnx  # pylint: disable=import-outside-toplevel
  leaves = jax.tree_util.tree_flatten_with_path(nnx.state(model, nnx.Param))[0]
  return {jax.tree_util.keystr(p): np.asarray(v) for p, v in leaves}


def assert_same_params(a: dict, b: dict) -> None:
  assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def straight(tmp_path_factory, data_dir):
  """The uninterrupted run: (losses by step, final params)."""
  workdir = str(tmp_path_factory.mktemp("straight"))
  result = run_cli(_cmd(workdir, data_dir))
  assert result.returncode == 0, result.stderr[-3000:]
  assert not os.path.exists(os.path.join(workdir, LOCK_FILE_NAME))  # released at the end
  return losses(workdir), final_params(workdir)


def _start(cmd: list[str]) -> subprocess.Popen:
  return subprocess.Popen(cmd, cwd=REPO, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_ctrl_c_saves_the_step_and_the_rerun_is_bitwise_the_uninterrupted_run(tmp_path, data_dir, straight):
  workdir = str(tmp_path / "run")
  proc = _start(_cmd(workdir, data_dir))
  wait_for(lambda: len(losses(workdir)) >= 12, proc)
  proc.send_signal(signal.SIGINT)
  rc = proc.wait(timeout=120)
  out, err = proc.stdout.read(), proc.stderr.read()
  stopped_at = max(losses(workdir))
  assert stopped_at < 40, "the run finished before the signal: the test proved nothing"
  assert rc == 130, err[-2000:]
  assert "Traceback" not in err and "KeyboardInterrupt" not in err
  assert out.strip().splitlines()[-1].startswith(
      f"preempted at step {stopped_at}: resume by re-running the same command; trained steps 0 -> {stopped_at} of 40")
  assert layout.finished_steps(os.path.join(workdir, "checkpoints"))[-1] == stopped_at
  assert not os.path.exists(os.path.join(workdir, LOCK_FILE_NAME))

  again = run_cli(_cmd(workdir, data_dir))
  assert again.returncode == 0, again.stderr[-3000:]
  assert again.stdout.strip().splitlines()[-1].startswith(f"trained steps {stopped_at} -> 40 of 40 in ")
  assert losses(workdir) == straight[0]  # bitwise, every step once
  assert_same_params(final_params(workdir), straight[1])


def test_a_second_ctrl_c_stops_at_once_without_a_traceback():
  """The flag the training loop polls: the first SIGINT asks for a save, the second releases the lock (the
  callback) and ends the process with status 130 and one line, without unwinding (a save in flight stays in its
  tmp folder, which is never restored: test_checkpointing.test_killed_process_leaves_only_tmp)."""
  script = "\n".join([
      "import os, signal, time",
      "from megalodon_jax import platforms",
      "platforms.skip_absent_tpu()  # as the command lines do",
      "from megalodon_jax.training.preemption import PreemptionFlag",
      "flag = PreemptionFlag(on_second_interrupt=lambda: print('released', flush=True))",
      "os.kill(os.getpid(), signal.SIGINT)",
      "time.sleep(0.2)",
      "print('requested', flag.check(1), flag.interrupted, flush=True)",
      "os.kill(os.getpid(), signal.SIGINT)",
      "time.sleep(5)",
      "print('not reached', flush=True)"])
  proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=env(), capture_output=True, text=True,
                        timeout=60, check=False)
  assert proc.returncode == 130, proc.stderr
  assert proc.stdout.splitlines() == ["requested True True", "released"]
  lines = proc.stderr.strip().splitlines()
  assert "Traceback" not in proc.stderr and len(lines) == 2, proc.stderr
  assert lines[0].startswith("interrupted: saving a checkpoint at the end of this step")
  assert lines[1].startswith("error: interrupted twice: stopped without saving")


def test_a_second_run_on_the_same_workdir_is_refused_and_the_first_is_untouched(tmp_path, data_dir, straight):
  workdir = str(tmp_path / "run")
  first = _start(_cmd(workdir, data_dir))
  wait_for(lambda: os.path.exists(os.path.join(workdir, LOCK_FILE_NAME)), first)
  t0 = time.monotonic()
  second = run_cli(_cmd(workdir, data_dir), timeout=120)
  assert time.monotonic() - t0 < 60
  line = second.one_error_line()  # no libtpu line, no traceback: one line
  assert second.returncode == 2
  assert "in use by another training run" in line and f"pid {first.pid}" in line and "started " in line
  assert first.wait(timeout=600) == 0, first.stderr.read()[-3000:]
  assert losses(workdir) == straight[0]  # each step once: the refused run wrote nothing
  assert sorted(r["step"] for r in read_metrics(os.path.join(workdir, "metrics.jsonl"))) == list(range(1, 41))
  assert_same_params(final_params(workdir), straight[1])


def _truncate_a_data_file(step_dir: str, every: bool = False) -> None:
  """Cuts the largest array data file of a step (or every one) to a third of its size."""
  files = [os.path.join(d, f) for d, _, fs in os.walk(os.path.join(step_dir, "state")) for f in fs
           if os.path.basename(d) == "d"]
  for victim in files if every else [max(files, key=os.path.getsize)]:
    with open(victim, "r+b") as f:
      f.truncate(os.path.getsize(victim) // 3)


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # reads that end after the failure
def test_a_truncated_newest_step_is_set_aside_and_the_run_resumes_from_the_previous(tmp_path, data_dir, straight,
                                                                                    caplog):
  """SIGKILL (the lock stays behind and is taken over), then damage the newest step: readers (generate, evaluate,
  convert) load the previous step instead, and the re-run renames the damaged one aside, resumes from the previous
  step and ends bit for bit like the uninterrupted run."""
  workdir = str(tmp_path / "run")
  ckpt_dir = os.path.join(workdir, "checkpoints")
  proc = _start(_cmd(workdir, data_dir))
  wait_for(lambda: len(layout.finished_steps(ckpt_dir)) >= 2 and len(losses(workdir)) >= 13, proc)
  proc.send_signal(signal.SIGKILL)
  proc.wait(timeout=60)
  steps = layout.finished_steps(ckpt_dir)
  assert steps[-1] < 40 and os.path.exists(os.path.join(workdir, LOCK_FILE_NAME))  # a stale lock
  newest, previous = steps[-1], steps[-2]
  _truncate_a_data_file(os.path.join(ckpt_dir, str(newest)), every=True)
  assert load_checkpoint(workdir, device=jax.devices("cpu")[0])[2] == previous
  assert f"the latest step {newest} of {ckpt_dir} is damaged" in caplog.text
  assert layout.finished_steps(ckpt_dir)[-1] == newest  # a reader renames nothing

  again = run_cli(_cmd(workdir, data_dir))
  assert again.returncode == 0, again.stderr[-3000:]
  assert "took over the lock" in again.stderr
  warning = next(line for line in again.stderr.splitlines() if f"step {newest} in" in line)
  assert "does not restore" in warning and f"resumed from step {previous}" in warning and "spec" not in warning
  aside = [n for n in os.listdir(ckpt_dir) if n.startswith(f"{newest}{layout.DAMAGED_MARK}")]
  assert len(aside) == 1 and os.path.isdir(os.path.join(ckpt_dir, aside[0]))  # kept, never deleted
  assert again.stdout.strip().splitlines()[-1].startswith(f"trained steps {previous} -> 40 of 40 in ")
  assert losses(workdir) == straight[0]  # the data order and the metrics log followed step `previous`
  assert_same_params(final_params(workdir), straight[1])
  assert locate_checkpoint(workdir).step == 40


def test_when_no_step_restores_nothing_is_renamed_and_the_error_is_one_line(tmp_path, data_dir):
  workdir = str(tmp_path / "run")
  ok = run_cli(_cmd(workdir, data_dir, "--config.total_steps=10", "--config.optimizer.warmup_steps=1"))
  assert ok.returncode == 0, ok.stderr[-3000:]
  ckpt_dir = os.path.join(workdir, "checkpoints")
  for step in layout.finished_steps(ckpt_dir):
    _truncate_a_data_file(os.path.join(ckpt_dir, str(step)))
  before = tree_digest(workdir)
  result = run_cli(_cmd(workdir, data_dir, "--config.total_steps=20", "--config.optimizer.warmup_steps=1"))
  assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-3000:]
  line = result.stderr_lines[-1]  # after the run's INFO lines: the problem in one line
  assert line.startswith("error: ")
  assert f"no checkpoint in {ckpt_dir} restores" in line and "OUT_OF_RANGE" in line and "'driver'" not in line
  assert tree_digest(workdir) == before  # nothing renamed, nothing rewritten


# ------------------------------------------------------------------------------------------------ refused runs

def _refused(cmd: list[str], root: str) -> str:
  before = tree_digest(root)
  result = run_cli(cmd, timeout=120)
  assert result.returncode == 2, result.stderr[-3000:]
  assert tree_digest(root) == before  # nothing created or changed
  return result.one_error_line()


def test_init_from_a_workdir_trains_from_its_latest_step(tmp_path, data_dir):
  source = str(tmp_path / "source")
  ok = run_cli(_cmd(source, data_dir, "--config.total_steps=5", "--config.optimizer.warmup_steps=1"))
  assert ok.returncode == 0, ok.stderr[-3000:]
  target = str(tmp_path / "target")
  result = run_cli(_cmd(target, data_dir, "--config.total_steps=1", "--config.optimizer.warmup_steps=0",
                        "--config.optimizer.scheduler=constant", f"--config.init_from={source}"))
  assert result.returncode == 0, result.stderr[-3000:]
  assert f"initialised params from {source}" in result.stderr

  empty = tmp_path / "not_a_run"
  empty.mkdir()
  line = _refused(_cmd(str(tmp_path / "new"), data_dir, f"--config.init_from={empty}"), str(tmp_path))
  assert line.startswith(f"error: --config.init_from='{empty}'") and "holds no checkpoint" in line
  assert not (tmp_path / "new").exists()


def test_workdirs_that_would_swallow_a_checkpoint_or_an_export_are_refused(tmp_path, data_dir):
  source = str(tmp_path / "source")
  ok = run_cli(_cmd(source, data_dir, "--config.total_steps=5", "--config.optimizer.warmup_steps=1"))
  assert ok.returncode == 0, ok.stderr[-3000:]
  for inside in (os.path.join(source, "checkpoints"), os.path.join(source, "checkpoints", "5"),
                 os.path.join(source, "checkpoints", "5", "state"), os.path.join(source, "checkpoints", "new")):
    line = _refused(_cmd(inside, data_dir), str(tmp_path))
    assert "the checkpoint" in line and "--config.init_from=" in line, line
  export = tmp_path / "hf_export"
  export.mkdir()
  (export / "config.json").write_text('{"model_type": "megalodon"}')
  (export / "model.safetensors").write_bytes(b"weights")
  line = _refused(_cmd(str(export), data_dir), str(tmp_path))
  assert "is not a training run but holds config.json" in line
  afile = tmp_path / "a_file"
  afile.write_text("x")
  assert "is a file" in _refused(_cmd(str(afile), data_dir), str(tmp_path))


def test_a_read_only_workdir_is_one_line_before_anything_starts(tmp_path, data_dir):
  """A read-only file system (EROFS), made with a private read-only bind mount in a user + mount namespace. Where
  namespaces are not allowed, sysfs stands in: a folder nobody may create entries in (EPERM, even as root)."""
  ro = tmp_path / "ro"
  (ro / "existing").mkdir(parents=True)
  namespaces = subprocess.run(["unshare", "-rm", "true"], capture_output=True, check=False).returncode == 0
  if namespaces:
    cmd = ["unshare", "-rm", "sh", "-c", f"mount --bind -o ro {ro} {ro} && exec " +
           " ".join(f"'{a}'" for a in _cmd(str(ro / "existing" / "run"), data_dir))]
    reason = "Read-only file system"
  else:
    cmd, reason = _cmd("/sys/megalodon_run", data_dir), "/sys/megalodon_run"
  before = tree_digest(str(tmp_path))
  proc = subprocess.run(cmd, cwd=REPO, env=env(), capture_output=True, text=True, timeout=120, check=False)
  assert proc.returncode == 2, proc.stderr[-3000:]
  lines = [line for line in proc.stderr.splitlines() if line.strip()]
  assert len(lines) == 1 and lines[0].startswith("error: ") and reason in lines[0], proc.stderr
  assert tree_digest(str(tmp_path)) == before
  assert not os.path.exists("/sys/megalodon_run")


def test_ordinary_folders_named_like_checkpoint_parts_are_fine_workdirs(tmp_path):
  """Only real checkpoints refuse a workdir: /data/checkpoints/<run> (a folder of runs) or a project folder that
  happens to hold a state/ folder are accepted, and the check writes nothing."""
  from megalodon_jax.training.workdir import check_workdir  # pylint: disable=import-outside-toplevel
  (tmp_path / "data" / "checkpoints" / "older_run").mkdir(parents=True)
  (tmp_path / "project" / "state").mkdir(parents=True)
  (tmp_path / "project" / "notes.txt").write_text("mine")
  before = tree_digest(str(tmp_path))
  for workdir in (tmp_path / "data" / "checkpoints" / "run1", tmp_path / "project", tmp_path / "project" / "run"):
    check_workdir(str(workdir))
  assert tree_digest(str(tmp_path)) == before
