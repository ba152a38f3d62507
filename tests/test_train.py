"""End-to-end training runs on CPU: the tiny quickstart, exact resume after SIGTERM and SIGKILL, meshes of 8
simulated devices against one device, restoring onto another mesh, init_from, the NaN stop, and fail-fast errors.

In-process runs call `trainer.train_and_evaluate` with a device subset (conftest gives 8 CPU devices);
`train.py` itself runs as a subprocess where the test is about the command line or about killing the process.
"""

import importlib
import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from cli_harness import wait_for

from megalodon_jax.errors import CheckpointError
from megalodon_jax.checkpoints.manager import Checkpointer
from megalodon_jax.errors import ConfigError
from megalodon_jax.training import trainer
from megalodon_jax.training.program import TrainProgram
from megalodon_jax.training.metrics import read_metrics

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp("tfds"))


def small_config(data_dir: str, **overrides):
  """configs/tiny.py made smaller still: fast steps, every step logged, no eval unless asked."""
  cfg = importlib.import_module("megalodon_jax.configs.tiny").get_config()
  cfg.data.data_dir = data_dir
  cfg.data.max_documents = 60
  cfg.model.num_layers = 1
  cfg.model.chunk_size = 32
  cfg.seq_len = 64
  cfg.batch_size = 8
  cfg.total_steps = 8
  cfg.optimizer.warmup_steps = 2
  cfg.log_every = 1
  cfg.eval_every = 0
  cfg.num_samples = 0
  cfg.checkpoint_every = 4
  cfg.tensorboard = False
  cfg.progress_bar = "off"
  cfg.async_checkpointing = False
  cfg.update_from_flattened_dict(overrides)  # dotted keys: {"model.num_layers": 8}
  return cfg


def losses(workdir: str) -> dict[int, float]:
  return {r["step"]: r["loss"] for r in read_metrics(os.path.join(workdir, "metrics.jsonl")) if "loss" in r}


def _cli(workdir: str, *overrides: str, config: str = "configs/tiny.py") -> list[str]:
  return [sys.executable, os.path.join(REPO, "train.py"), f"--config={os.path.join(REPO, config)}",
          f"--workdir={workdir}", *overrides]


def _env():
  env = dict(os.environ)
  env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
  return env


def test_tiny_config_trains_and_writes_checkpoints_and_metrics(tmp_path, data_dir):
  """The README quickstart command: validation loss must fall well below the untrained model's."""
  workdir = str(tmp_path / "run")
  proc = subprocess.run(_cli(workdir, f"--config.data.data_dir={data_dir}"), cwd=REPO, env=_env(),
                        capture_output=True, text=True, timeout=900, check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  records = read_metrics(os.path.join(workdir, "metrics.jsonl"))
  evals = {r["step"]: r["eval_loss"] for r in records if "eval_loss" in r}
  cfg = importlib.import_module("megalodon_jax.configs.tiny").get_config()
  assert set(evals) == {0, 100, 200} and cfg.total_steps == 200
  assert evals[200] < 0.6 * evals[0], evals  # from ~ln(256) = 5.5 nats to well under 3.3
  last = records[-1]
  for key in ("step", "loss", "bpb", "learning_rate", "grad_norm", "tokens_per_sec", "mfu", "eval_loss", "eval_bpb"):
    assert key in last, key
  assert Checkpointer(os.path.join(workdir, "checkpoints"), save_every=100, keep=3).latest_step() == 200
  assert os.listdir(os.path.join(workdir, "tensorboard"))
  samples = [json.loads(line) for line in open(os.path.join(workdir, "samples.jsonl"))]
  assert {s["step"] for s in samples} == {100, 200}
  summary = proc.stdout.strip().splitlines()[-1]  # the run's last line: what it did and where things are
  assert summary.startswith("trained steps 0 -> 200 of 200 in ") and f"eval_loss {evals[200]:.4g}" in summary
  assert f"TensorBoard {os.path.join(workdir, 'tensorboard')}" in summary


RESUME_OVERRIDES = ("--config.model.num_layers=1", "--config.model.chunk_size=32", "--config.seq_len=64",
                    "--config.data.max_documents=60", "--config.total_steps=40", "--config.log_every=1",
                    "--config.eval_every=0", "--config.num_samples=0", "--config.checkpoint_every=5",
                    "--config.tensorboard=False", "--config.optimizer.warmup_steps=5", "--config.model.dropout=0.1")


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory, data_dir):
  workdir = str(tmp_path_factory.mktemp("straight"))
  proc = subprocess.run(_cli(workdir, f"--config.data.data_dir={data_dir}", *RESUME_OVERRIDES), cwd=REPO, env=_env(),
                        capture_output=True, text=True, timeout=600, check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return losses(workdir)


RESET = ("--config.data.document_boundaries=reset",)


@pytest.fixture(scope="module")
def straight_reset_run(tmp_path_factory, data_dir):
  workdir = str(tmp_path_factory.mktemp("straight_reset"))
  proc = subprocess.run(_cli(workdir, f"--config.data.data_dir={data_dir}", *RESUME_OVERRIDES, *RESET), cwd=REPO,
                        env=_env(), capture_output=True, text=True, timeout=600, check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return losses(workdir)


def test_document_resets_train_differently_and_resume_exactly(tmp_path, data_dir, straight_run, straight_reset_run):
  """document_boundaries=reset: the same tokens give other losses (the model restarts at each document and skips
  first-token targets), and a run killed with SIGKILL resumes bit for bit (the packer's state is unchanged)."""
  assert set(straight_reset_run) == set(straight_run)
  assert straight_reset_run != straight_run
  test_resume_after_kill_is_bitwise_exact(tmp_path, data_dir, straight_reset_run, signal.SIGKILL, extra=RESET)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["sigterm", "sigkill"])
def test_resume_after_kill_is_bitwise_exact(tmp_path, data_dir, straight_run, sig, extra=()):
  workdir = str(tmp_path / "run")
  cmd = _cli(workdir, f"--config.data.data_dir={data_dir}", *RESUME_OVERRIDES, *extra)
  proc = subprocess.Popen(cmd, cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  metrics = os.path.join(workdir, "metrics.jsonl")
  ckpt_dir = os.path.join(workdir, "checkpoints")
  # SIGKILL: after the step-10 checkpoint exists, between saves; SIGTERM: anywhere after step 8.
  need_ckpt = "10" if sig == signal.SIGKILL else None
  wait_for(lambda: os.path.exists(metrics) and len(losses(workdir)) >= 12 and
            (need_ckpt is None or os.path.isdir(os.path.join(ckpt_dir, need_ckpt))), proc)
  proc.send_signal(sig)
  rc = proc.wait(timeout=120)
  stopped_at = max(losses(workdir))
  assert stopped_at < 40, "the run finished before the signal: the test proved nothing"
  if sig == signal.SIGTERM:
    assert rc == 0, proc.stderr.read()[-2000:]
    saved = Checkpointer(ckpt_dir, save_every=5, keep=3).latest_step()
    assert saved == stopped_at  # the preemption save is of the last completed step
    assert proc.stdout.read().strip().splitlines()[-1].startswith(
        f"preempted at step {stopped_at}: resume by re-running the same command; trained steps 0 -> {stopped_at} "
        f"of 40")
  else:
    assert rc == -signal.SIGKILL
  proc2 = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=600, check=False)
  assert proc2.returncode == 0, proc2.stderr[-3000:]
  assert "resumed" in proc2.stderr
  if sig == signal.SIGTERM:
    assert proc2.stdout.strip().splitlines()[-1].startswith(f"trained steps {stopped_at} -> 40 of 40 in ")
  resumed = losses(workdir)
  assert sorted(resumed) == list(range(1, 41))  # each step exactly once after truncating the killed run's tail
  assert resumed == straight_run  # bitwise: same floats, step by step


def _run(cfg, workdir, devices):
  trainer.train_and_evaluate(cfg, str(workdir), devices=devices)
  return losses(str(workdir))


@pytest.fixture(scope="module")
def one_device_losses(tmp_path_factory, data_dir):
  cfg = small_config(data_dir, **{"mesh.data": 1, "mesh.fsdp": 1, "mesh.tensor": 1})
  return _run(cfg, tmp_path_factory.mktemp("one"), jax.devices()[:1])


@pytest.mark.parametrize("mesh", [(8, 1, 1), (2, 4, 1), (2, 2, 2)], ids=str)
def test_meshes_of_8_devices_match_one_device(tmp_path, data_dir, one_device_losses, mesh):
  cfg = small_config(data_dir, **{"mesh.data": mesh[0], "mesh.fsdp": mesh[1], "mesh.tensor": mesh[2]})
  got = _run(cfg, tmp_path, jax.devices())
  assert sorted(got) == sorted(one_device_losses) == list(range(1, 9))
  for step, loss in one_device_losses.items():
    assert abs(got[step] - loss) <= 1e-5 * abs(loss), (step, got[step], loss)


def test_restore_onto_a_different_mesh_continues_the_run(tmp_path, data_dir):
  """4 steps on (8, 1, 1), then resume to 8 steps on (2, 2, 2), against the same two phases on one device.

  (Both phases' configs differ in total_steps, which changes the LR schedule, so the reference must be two-phase.)
  """
  def two_phases(workdir, mesh_a, mesh_b, devices):
    _run(small_config(data_dir, total_steps=4, **dict(zip(("mesh.data", "mesh.fsdp", "mesh.tensor"), mesh_a))),
         workdir, devices)
    return _run(small_config(data_dir, **dict(zip(("mesh.data", "mesh.fsdp", "mesh.tensor"), mesh_b))), workdir,
                devices)

  want = two_phases(tmp_path / "one", (1, 1, 1), (1, 1, 1), jax.devices()[:1])
  got = two_phases(tmp_path / "eight", (8, 1, 1), (2, 2, 2), jax.devices())
  assert sorted(got) == sorted(want) == list(range(1, 9))
  for step, loss in want.items():
    assert abs(got[step] - loss) <= 1e-5 * abs(loss), (step, got[step], loss)


def test_eval_and_sampling_programs_compile_once_beside_the_train_step(tmp_path, data_dir):
  """The trainer compiles the eval step and the sampler in a second thread while the train step compiles; the
  calls at the eval steps must then reuse those programs, not compile them again (the jit cache key includes the
  thread's mesh context). Counted from jax's own compile events, with the persistent cache off so that every
  compile is an event (and a shape no other test uses, so that nothing is in memory already)."""
  import jax.monitoring  # pylint: disable=import-outside-toplevel
  from jax._src import dispatch  # pylint: disable=import-outside-toplevel

  compiled = []

  def listener(event, duration, **kwargs):
    del duration
    if event == dispatch.BACKEND_COMPILE_EVENT:
      compiled.append(kwargs.get("fun_name"))

  cfg = small_config(data_dir, **{"model.value_dim": 96, "eval_every": 4, "eval_batches": 2, "num_samples": 1,
                                  "sample_len": 5})
  enabled = jax.config.jax_enable_compilation_cache
  jax.config.update("jax_enable_compilation_cache", False)
  jax.monitoring.register_event_duration_secs_listener(listener)
  try:
    trainer.train_and_evaluate(cfg, str(tmp_path), devices=jax.devices()[:1])
  finally:
    jax.monitoring.unregister_event_duration_listener(listener)
    jax.config.update("jax_enable_compilation_cache", enabled)
  counts = {name: compiled.count(f"jit({name})") for name in ("train_step", "eval_step", "_prefill", "_decode")}
  # The sample prompts (32 tokens) are fed by decode steps: no prefill program.
  assert counts == {"train_step": 1, "eval_step": 1, "_prefill": 0, "_decode": 1}, (counts, compiled)
  samples = [json.loads(line) for line in open(os.path.join(tmp_path, "samples.jsonl"))]
  assert {s["step"] for s in samples} == {4, 8}  # the warm-up's own samples are not logged


def test_init_from_starts_from_the_saved_params(tmp_path, data_dir):
  source = small_config(data_dir, eval_every=4, eval_batches=2)
  _run(source, tmp_path / "a", jax.devices()[:1])
  final_eval = [r for r in read_metrics(str(tmp_path / "a" / "metrics.jsonl")) if "eval_loss" in r][-1]
  target = small_config(data_dir, eval_every=4, eval_batches=2, total_steps=4,
                        init_from=str(tmp_path / "a" / "checkpoints"))
  _run(target, tmp_path / "b", jax.devices()[:1])
  first_eval = [r for r in read_metrics(str(tmp_path / "b" / "metrics.jsonl")) if "eval_loss" in r][0]
  assert first_eval["step"] == 0
  assert first_eval["eval_loss"] == pytest.approx(final_eval["eval_loss"], rel=1e-6)


def test_non_finite_loss_stops_with_the_step_and_keeps_the_last_good_checkpoint(tmp_path, data_dir):
  cfg = small_config(data_dir, checkpoint_every=1, total_steps=6, **{"optimizer.lr": 1e30,
                                                                     "optimizer.warmup_steps": 0})
  with pytest.raises(trainer.NonFiniteLossError, match=r"at step (\d+)") as err:
    _run(cfg, tmp_path, jax.devices()[:1])
  bad_step = int(err.value.args[0].split("at step ")[1].split()[0])
  ok = losses(str(tmp_path))
  assert all(np.isfinite(v) for s, v in ok.items() if s < bad_step)
  latest = Checkpointer(str(tmp_path / "checkpoints"), save_every=1, keep=3).latest_step()
  assert latest == bad_step - 1


SEQ = {"model.chunk_size": 16, "seq_len": 128, "total_steps": 5}  # 8 chunks: 2 per slice on mesh.sequence=4


def _mesh_keys(data, sequence, fsdp, tensor):
  return {"mesh.data": data, "mesh.sequence": sequence, "mesh.fsdp": fsdp, "mesh.tensor": tensor}


@pytest.fixture(scope="module")
def one_device_sequence_losses(tmp_path_factory, data_dir):
  cfg = small_config(data_dir, **SEQ, **_mesh_keys(1, 1, 1, 1))
  return _run(cfg, tmp_path_factory.mktemp("one_seq"), jax.devices()[:1])


def test_sequence_axis_follows_the_one_device_trajectory(tmp_path, data_dir, one_device_sequence_losses):
  """Five steps on (data=2, sequence=4) against one device: the loss trajectory to 1e-5 relative."""
  got = _run(small_config(data_dir, **SEQ, **_mesh_keys(2, 4, 1, 1)), tmp_path, jax.devices())
  assert sorted(got) == sorted(one_device_sequence_losses) == list(range(1, 6))
  for step, loss in one_device_sequence_losses.items():
    assert abs(got[step] - loss) <= 1e-5 * abs(loss), (step, got[step], loss)
  header = open(tmp_path / "shardings.txt").readline()
  assert "'sequence': 4" in header and "'sequence'" in header.split("batches")[1]


def test_global_batch_when_rows_span_processes(data_dir):
  """The multi-host path for a `sequence` axis spanning hosts (every process reads the whole batch and places its
  slices), exercised in-process: it must build the same global arrays as the per-process-rows path."""
  run = TrainProgram.build(small_config(data_dir, **SEQ, **_mesh_keys(2, 4, 1, 1)), jax.devices(), vocab_size=256)
  assert not run.shared_rows and run.data_split() == (0, 1)
  batch = {"inputs": np.arange(8 * 128).reshape(8, 128) % 256, "targets": np.arange(8 * 128).reshape(8, 128) % 7}
  local = run.global_batch(batch)
  run.shared_rows = True
  shared = run.global_batch(batch)
  for k in batch:
    assert shared[k].sharding == local[k].sharding == run.batch_sharding
    np.testing.assert_array_equal(np.asarray(shared[k]), np.asarray(local[k]))
    assert {s.data.shape for s in shared[k].addressable_shards} == {(4, 32)}


def test_a_sequence_parallel_checkpoint_resumes_on_another_mesh(tmp_path, data_dir):
  """3 steps on (sequence=4, fsdp=2), resumed to 5 on (data=2, sequence=2, tensor=2), against one device."""
  def two_phases(workdir, mesh_a, mesh_b, devices):
    _run(small_config(data_dir, **{**SEQ, "total_steps": 3}, **_mesh_keys(*mesh_a)), workdir, devices)
    return _run(small_config(data_dir, **SEQ, **_mesh_keys(*mesh_b)), workdir, devices)

  want = two_phases(tmp_path / "one", (1, 1, 1, 1), (1, 1, 1, 1), jax.devices()[:1])
  got = two_phases(tmp_path / "eight", (1, 4, 2, 1), (2, 2, 1, 2), jax.devices())
  assert sorted(got) == sorted(want) == list(range(1, 6))
  for step, loss in want.items():
    assert abs(got[step] - loss) <= 1e-5 * abs(loss), (step, got[step], loss)


@pytest.mark.parametrize("overrides, key", [
    ({"seq_len": 100}, "seq_len"),
    ({"batch_size": 6}, "batch_size"),
    ({"mesh.data": 3}, "mesh"),
    ({"mesh.sequence": 4, "mesh.fsdp": 2, "seq_len": 96}, "mesh.sequence"),  # 96 is not 4 slices of whole chunks
    ({"mesh.sequence": 2, "mesh.fsdp": -1, "batch_size": 6}, "mesh.sequence"),  # 6 rows over fsdp = 4
    ({"grad_accum_steps": 3}, "batch_size"),
    ({"eval_every": 7, "log_every": 2}, "eval_every"),
    ({"optimizer.warmup_steps": 50}, "warmup_steps"),
    ({"model.z_dim": 30}, "model.z_dim"),
    ({"data.dataset": "text_files", "data.path": "/nonexistent/*.txt"}, "data.path"),
    ({"init_from": "/nonexistent/ckpt"}, "init_from"),
])
def test_bad_configs_fail_fast_naming_the_key(tmp_path, data_dir, overrides, key):
  cfg = small_config(data_dir, **overrides)
  t0 = time.perf_counter()
  with pytest.raises((ConfigError, ValueError), match=key.replace(".", r"\.")):
    trainer.train_and_evaluate(cfg, str(tmp_path), devices=jax.devices())
  assert time.perf_counter() - t0 < 10  # nothing compiled
  assert not os.path.exists(tmp_path / "checkpoints")


def test_corrupted_checkpoint_directory_fails_fast(tmp_path, data_dir):
  cfg = small_config(data_dir, total_steps=4)
  _run(cfg, tmp_path, jax.devices()[:1])
  step_dir = tmp_path / "checkpoints" / "4"
  victims = [os.path.join(d, f) for d, _, files in os.walk(step_dir) for f in files if "metadata" in f]
  assert victims
  with open(victims[0], "w") as f:
    f.write("{ truncated")
  cfg.total_steps = 8
  with pytest.raises(CheckpointError, match="checkpoints"):
    trainer.train_and_evaluate(cfg, str(tmp_path), devices=jax.devices()[:1])


def test_resume_from_a_version_1_data_state_fails_before_compiling(tmp_path, data_dir, monkeypatch):
  """A checkpoint of the per-process-shard data pipeline cannot continue its data order: a CheckpointError naming
  --config.init_from, raised before the training loop (where the step compiles)."""
  cfg = small_config(data_dir, total_steps=3, checkpoint_every=3)
  _run(cfg, tmp_path, jax.devices()[:1])
  data_file = tmp_path / "checkpoints" / "3" / "data" / "metadata"
  assert "rows" in json.loads(data_file.read_text())
  data_file.write_text(json.dumps({"process_states": [{"version": 1, "data": {}, "position": {"offset": 0}}]}))
  monkeypatch.setattr(trainer, "_loop", lambda *a: pytest.fail("reached the training loop"))
  cfg.total_steps = 6
  ckpt_dir = os.path.join(str(tmp_path), "checkpoints")
  with pytest.raises(CheckpointError, match=rf"version-1 data pipeline.*--config.init_from={ckpt_dir}"):
    trainer.train_and_evaluate(cfg, str(tmp_path), devices=jax.devices()[:1])


def test_cli_reports_bad_flags_and_configs_clearly(tmp_path):
  proc = subprocess.run(_cli(str(tmp_path), "--config.seq_len=100"), cwd=REPO, env=_env(), capture_output=True,
                        text=True, timeout=120, check=False)
  assert proc.returncode == 2
  assert "--config.seq_len=100" in proc.stderr and "chunk_size" in proc.stderr
  proc = subprocess.run(_cli(str(tmp_path), "--config.no_such_key=1"), cwd=REPO, env=_env(), capture_output=True,
                        text=True, timeout=120, check=False)
  assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
      "error: unknown config key --config.no_such_key; every field is in configs/default.py"]
  proc = subprocess.run(_cli(str(tmp_path), "--config.optimizer.lrr=1"), cwd=REPO, env=_env(), capture_output=True,
                        text=True, timeout=120, check=False)
  assert proc.returncode == 2 and "did you mean --config.optimizer.lr?" in proc.stderr
  assert len(proc.stderr.strip().splitlines()) == 1 and not os.listdir(tmp_path)
