"""Profiler traces of chosen steps (`--config.profile_steps`): what jax.profiler writes under workdir/profile, read
back from its Chrome-trace JSON (the file TensorBoard's profile plugin and Perfetto read), locally and on a gs://
workdir (the emulated bucket of gcs_emulator.py); and bad values refused before anything runs."""

import gzip
import json
import os

import jax
import pytest

from cli_harness import run_cli, train_command
from gcs_emulator import _stray_gs_folders, fake_gcs, local_path  # pylint: disable=unused-import
from megalodon_jax.checkpoints import layout
from megalodon_jax.errors import ConfigError
from megalodon_jax.training import profiling, trainer
from megalodon_jax.training.train_config import TrainConfig
from test_train import small_config


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp("tfds"))


def _events(trace_file: str) -> list[dict]:
  opener = gzip.open if trace_file.endswith(".gz") else open
  with opener(trace_file, "rt") as f:
    return json.load(f)["traceEvents"]


def _traced_steps(events: list[dict]) -> list[int]:
  """The step numbers of the StepTraceAnnotation("train", step_num=...) events, in trace order."""
  return [int(e["args"]["step_num"]) for e in events if e.get("name") == "train" and "step_num" in e.get("args", {})]


def test_profile_steps_write_a_trace_of_exactly_those_train_steps(tmp_path, data_dir):
  workdir = str(tmp_path / "run")
  trainer.train_and_evaluate(small_config(data_dir, total_steps=6, profile_steps="2,3"), workdir,
                             devices=jax.devices()[:1])
  traces = profiling.trace_files(workdir)
  assert len(traces) == 1 and traces[0].startswith(os.path.join(workdir, "profile", "plugins", "profile")), traces
  assert profiling.PROFILE_DIR in layout.RUN_FOLDERS  # a run's own folder (workdir checks, output guards)
  folder = os.path.dirname(traces[0])
  assert any(f.endswith(".xplane.pb") for f in os.listdir(folder))  # XProf / TensorBoard's profile plugin
  assert "perfetto_trace.json.gz" in os.listdir(folder)
  events = _events(traces[0])
  assert sorted(_traced_steps(events)) == [2, 3]
  names = {e.get("name", "") for e in events}
  assert any("train_step" in n for n in names), sorted(names)  # the jitted step's dispatch: PjitFunction(...)
  # The Perfetto copy holds the same events.
  assert sorted(_traced_steps(_events(os.path.join(folder, "perfetto_trace.json.gz")))) == [2, 3]


def test_a_step_count_traces_the_steps_after_the_first_one_of_a_resumed_run(tmp_path, data_dir, fake_gcs):
  """"N" counts from the step an attempt starts after; a gs:// workdir gets the files through a local folder."""
  workdir = "gs://b/run"
  cfg = small_config(data_dir, total_steps=6, profile_steps="2")
  with pytest.MonkeyPatch.context() as preempt:  # stopped after step 3, as by a SIGTERM
    preempt.setattr(trainer.PreemptionFlag, "check", lambda self, step: step == 3)
    trainer.train_and_evaluate(cfg, workdir, devices=jax.devices()[:1])
  first = profiling.trace_files(workdir)
  assert len(first) == 1 and sorted(_traced_steps(_events(local_path(fake_gcs, first[0])))) == [2, 3]
  trainer.train_and_evaluate(cfg, workdir, devices=jax.devices()[:1])  # resumes at step 3: traces 5 (and not 7)
  second = [f for f in profiling.trace_files(workdir) if f not in first]
  assert len(second) == 1 and sorted(_traced_steps(_events(local_path(fake_gcs, second[0])))) == [5, 6]
  assert os.listdir(".") == []


@pytest.mark.parametrize("value, why", [
    ("3,2", "1 <= START <= STOP <= total_steps"), ("0,2", "1 <= START"), ("2,9", "total_steps (8)"),
    ("8", "[1, total_steps - 1 = 7]"), ("0", "a step count"), ("two", "START,STOP"), ("1,2,3", "START,STOP"),
    ("-1,3", "START,STOP"),
])
def test_bad_profile_steps_are_a_config_error_naming_the_flag(data_dir, value, why):
  with pytest.raises(ConfigError, match=r"--config\.profile_steps=") as e:
    TrainConfig.of(small_config(data_dir, profile_steps=value))
  assert why in str(e.value)


def test_profile_window():
  assert profiling.profile_window("", start=0, total_steps=10) is None
  assert profiling.profile_window("3,5", start=0, total_steps=10) == (3, 5)
  assert profiling.profile_window("3,5", start=4, total_steps=10) == (5, 5)  # resumed inside the window
  assert profiling.profile_window("3,5", start=5, total_steps=10) is None  # resumed after it
  assert profiling.profile_window("4", start=0, total_steps=10) == (2, 5)
  assert profiling.profile_window("4", start=7, total_steps=10) == (9, 10)  # cut at the end of training
  assert profiling.profile_window("4", start=9, total_steps=10) is None


@pytest.mark.parametrize("index, count, every_process, target", [
    (0, 2, False, "profile"), (1, 2, False, None), (1, 2, True, "profile/process_1"), (0, 1, True, "profile"),
])
def test_who_profiles_and_where(tmp_path, data_dir, monkeypatch, index, count, every_process, target):
  monkeypatch.setattr(jax, "process_index", lambda: index)
  monkeypatch.setattr(jax, "process_count", lambda: count)
  cfg = TrainConfig.of(small_config(data_dir, profile_steps="2,3", profile_all_processes=every_process))
  prof = profiling.StepProfiler.of_config(cfg, str(tmp_path), start=0)
  assert prof.window == (None if target is None else (2, 3))
  if target is not None:
    assert prof.target == str(tmp_path / target)


def test_the_command_line_refuses_a_bad_window_before_training(tmp_path, data_dir):
  workdir = str(tmp_path / "run")
  result = run_cli(train_command("--config=configs/tiny.py", f"--workdir={workdir}",
                                 f"--config.data.data_dir={data_dir}", "--config.profile_steps=50,20"))
  assert result.returncode == 2
  line = result.one_error_line()
  assert line.startswith("error: --config.profile_steps='50,20': ") and "START <= STOP" in line, line
  assert not os.path.exists(workdir)
