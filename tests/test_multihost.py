"""Multi-host training as a pod runs it: two `train.py` processes of 4 CPU devices each, joined by jax.distributed.

The processes find each other through JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID on 127.0.0.1 and
run their collectives over gloo. Reference: the same config trained in this (single) process on its 8 devices.
One test walks the whole life of a pod run, because each launch costs two jax start-ups and compiles:
train, SIGTERM to one process (both must save the same step and exit 0), re-run (resumes), compare every step;
the stopped run also resumes on one process (the data order does not depend on the host count).
"""

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from megalodon_jax.checkpoints.manager import Checkpointer
from megalodon_jax.training import trainer
from megalodon_jax.training.metrics import read_metrics
from tests.test_train import small_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOTAL_STEPS = 8
# Dotted config keys, used both as --config.<key>=<value> flags and in the in-process reference config.
OVERRIDES = {"model.num_layers": 1, "model.chunk_size": 32, "seq_len": 64, "data.max_documents": 60,
             "total_steps": TOTAL_STEPS, "log_every": 1, "eval_every": 0, "num_samples": 0, "checkpoint_every": 5,
             "tensorboard": False, "progress_bar": "off", "optimizer.warmup_steps": 5, "model.dropout": 0.1}
SAVED = re.compile(r"saved the checkpoint of step (\d+)")


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _losses(workdir: str) -> dict[int, float]:
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return {}
  return {r["step"]: r["loss"] for r in read_metrics(path) if "loss" in r}


def _launch(workdir: str, data_dir: str) -> list[subprocess.Popen]:
  port = _free_port()
  flags = [f"--config.{k}={v}" for k, v in OVERRIDES.items()]
  procs = []
  for i in range(2):
    env = dict(os.environ, JAX_NUM_CPU_DEVICES="4", JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
               JAX_NUM_PROCESSES="2", JAX_PROCESS_ID=str(i),
               PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cmd = [sys.executable, os.path.join(REPO, "train.py"), f"--config={os.path.join(REPO, 'configs/tiny.py')}",
           f"--workdir={workdir}", f"--config.data.data_dir={data_dir}", *flags]
    procs.append(subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
  return procs


def _finish(procs: list[subprocess.Popen], timeout: float = 240) -> list[tuple[int, str]]:
  out = []
  for p in procs:
    try:
      _, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
      for q in procs:
        q.kill()
      raise
    out.append((p.returncode, err))
  return out


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp("tfds"))


def test_two_processes_train_like_one_survive_sigterm_and_resume_exactly(tmp_path, data_dir):
  assert len(jax.devices()) == 8
  reference_dir = str(tmp_path / "one_process")
  cfg = small_config(data_dir, **OVERRIDES)
  trainer.train_and_evaluate(cfg, reference_dir)  # prepares the data before the processes start
  reference = _losses(reference_dir)
  assert sorted(reference) == list(range(1, TOTAL_STEPS + 1))

  workdir = str(tmp_path / "pod")
  procs = _launch(workdir, data_dir)
  deadline = time.monotonic() + 240
  while len(_losses(workdir)) < 2:  # SIGTERM once two steps are logged
    if any(p.poll() is not None for p in procs) or time.monotonic() > deadline:
      for p in procs:
        p.kill()
      pytest.fail(f"the pod run ended or hung before step 2: {[p.communicate()[1][-1500:] for p in procs]}")
    time.sleep(0.05)
  procs[1].send_signal(signal.SIGTERM)  # not the process that writes metrics and logs
  results = _finish(procs)
  for rc, err in results:
    assert rc == 0, err[-3000:]
  saved = [SAVED.search(err) for _, err in results]
  assert all(saved), [err[-1500:] for _, err in results]
  steps = {int(m.group(1)) for m in saved}
  assert len(steps) == 1, f"the processes saved different steps: {steps}"
  stopped_at = steps.pop()
  assert stopped_at < TOTAL_STEPS, "the run finished before the signal: the test proved nothing"
  ckpt_dir = os.path.join(workdir, "checkpoints")
  assert Checkpointer(ckpt_dir, save_every=5, keep=3).latest_step() == stopped_at
  # One checkpoint per saved step, written once for both processes (no per-process copies, no leftovers).
  assert sorted(os.listdir(ckpt_dir)) == sorted({"5", str(stopped_at)} - ({"5"} if stopped_at < 5 else set()))

  # The stopped pod run resumes on one process as well (another host count, the same data order).
  single_dir = str(tmp_path / "resumed_on_one_process")
  shutil.copytree(workdir, single_dir)
  trainer.train_and_evaluate(cfg, single_dir)
  resumed_single = _losses(single_dir)

  results = _finish(_launch(workdir, data_dir))
  for rc, err in results:
    assert rc == 0, err[-3000:]
  assert f"resumed from {ckpt_dir} at step {stopped_at}" in results[0][1]
  pod = _losses(workdir)
  assert sorted(pod) == list(range(1, TOTAL_STEPS + 1))  # each step once: the stopped run's tail was truncated
  # Same global batches and updates; only the all-reduce summation order (gloo vs in-process) may differ.
  np.testing.assert_allclose([pod[s] for s in sorted(pod)], [reference[s] for s in sorted(reference)],
                             rtol=2e-5, atol=0)
  assert sorted(resumed_single) == sorted(pod)
  np.testing.assert_allclose([resumed_single[s] for s in sorted(pod)], [pod[s] for s in sorted(pod)],
                             rtol=2e-5, atol=0)
  with open(os.path.join(workdir, "config.json")) as f:
    assert json.load(f)["total_steps"] == TOTAL_STEPS


def test_environment_plans():
  """Which launcher environments start jax.distributed, with which arguments, and the errors of a bad one."""
  from megalodon_jax.errors import ConfigError
  from megalodon_jax.training.distributed import plan
  assert plan({}) is None
  assert plan({"SLURM_NTASKS": "1", "TPU_WORKER_HOSTNAMES": "localhost"}) is None  # one task, one-host TPU VM
  explicit = {"JAX_COORDINATOR_ADDRESS": "10.0.0.2:1234", "JAX_NUM_PROCESSES": "4", "JAX_PROCESS_ID": "3"}
  assert plan(explicit) == {"coordinator_address": "10.0.0.2:1234", "num_processes": 4, "process_id": 3}
  assert plan({"SLURM_NTASKS": "16"}) == {}  # jax's cluster detection fills everything in
  assert plan({"TPU_WORKER_HOSTNAMES": "t0,t1,t2,t3"}) == {}
  assert plan({"MEGALODON_DISTRIBUTED": "1"}) == {}
  with pytest.raises(ConfigError, match="JAX_PROCESS_ID='x'"):
    plan(dict(explicit, JAX_PROCESS_ID="x"))
  with pytest.raises(ConfigError, match="JAX_PROCESS_ID=4 is not below JAX_NUM_PROCESSES=4"):
    plan(dict(explicit, JAX_PROCESS_ID="4"))
  with pytest.raises(ConfigError, match="JAX_NUM_PROCESSES=''"):
    plan({"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_PROCESS_ID": "0"})
