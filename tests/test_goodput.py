"""Goodput: a run's wall time split into compile, data, step, eval, checkpoint, idle and other. The judge is the
wall clock around `train_and_evaluate` (the breakdown must sum to it), timers wrapped around the trainer's own
evaluation and checkpoint calls, and the gap between two attempts of a run."""

import io
import json
import logging
import os
import re
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from megalodon_jax.checkpoints import layout
from megalodon_jax.checkpoints.manager import Checkpointer
from megalodon_jax.training import goodput as goodput_lib
from megalodon_jax.training import run_summary, trainer
from megalodon_jax.training.goodput import CATEGORIES, Goodput, read_goodput
from megalodon_jax.training.metrics import MetricsLogger, read_metrics
from test_metrics import _tensorboard_view
from test_train import small_config

DOWN_S = 100.0  # the simulated time the job was down between its two attempts


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp("tfds"))


class FakeClock:
  def __init__(self):
    self.now = 0.0

  def __call__(self) -> float:
    return self.now


def test_phases_nest_and_the_categories_sum_to_the_wall_time():
  clock = FakeClock()
  g = Goodput(clock=clock, wall_clock=clock)
  clock.now = 1.0  # other (setup)
  with g.phase("checkpoint"):
    clock.now = 3.0
  with g.phase("eval"):
    clock.now = 4.0
    with g.phase("data_wait"):  # the innermost phase gets the time
      clock.now = 4.5
    clock.now = 6.0
  with g.phase("step"):
    clock.now = 10.0
  clock.now = 10.25
  assert g.attempt() == {"compile": 0.0, "data_wait": 0.5, "step": 4.0, "eval": 2.5, "checkpoint": 2.0, "idle": 0.0,
                         "other": 1.25}
  assert sum(g.attempt().values()) == g.wall_s() == 10.25
  metrics = g.metrics()
  assert metrics["goodput"] == 4.0 / 10.25 and metrics["goodput/wall_s"] == 10.25
  assert g.summary() == "goodput 39% of 10.2 s: 4.0 s step, 2.5 s eval, 2.0 s checkpoint, 1.2 s other, 0.5 s data_wait"
  with pytest.raises(ValueError, match="unknown goodput phase"):
    with g.phase("lunch"):
      pass


def test_compilations_inside_a_phase_move_to_compile():
  """jax reports each jit's tracing, lowering and XLA compile through jax.monitoring; that time leaves the phase
  it happened in."""
  clock = FakeClock()
  g = Goodput(clock=clock, wall_clock=clock)
  g.count_compiles()
  try:
    with g.phase("eval"):
      clock.now = 5.0
      jax.monitoring.record_event_duration_secs(goodput_lib.BACKEND_COMPILE_EVENT, 3.0)
    with g.phase("compile"):  # already counted by the phase's own clock
      clock.now = 7.0
      jax.monitoring.record_event_duration_secs(goodput_lib.BACKEND_COMPILE_EVENT, 2.0)
    jax.monitoring.record_event_duration_secs(goodput_lib.BACKEND_COMPILE_EVENT, 0.5)  # outside: was "other"
    clock.now = 8.0
  finally:
    g.close()
  jax.monitoring.record_event_duration_secs(goodput_lib.BACKEND_COMPILE_EVENT, 9.0)  # no longer listening
  assert g.attempt() == {"compile": 5.5, "data_wait": 0.0, "step": 0.0, "eval": 2.0, "checkpoint": 0.0, "idle": 0.0,
                         "other": 0.5}


def test_a_jit_compiled_inside_a_phase_is_charged_to_compile():
  seen = []

  def listener(event, duration, **_):
    if event in goodput_lib.COMPILE_EVENTS:
      seen.append(event)
      spent_compiling[0] += duration
  spent_compiling = [0.0]
  jax.monitoring.register_event_duration_secs_listener(listener)
  g = Goodput()
  g.count_compiles()
  try:
    with g.phase("eval"):
      jax.jit(lambda x: jnp.sin(x) * 3.0 + 1.0)(np.arange(5.0)).block_until_ready()  # a new function
  finally:
    g.close()
    jax.monitoring.unregister_event_duration_listener(listener)
  assert set(seen) == set(goodput_lib.COMPILE_EVENTS)  # traced, lowered and compiled
  spent = g.attempt()
  assert spent["compile"] == pytest.approx(spent_compiling[0], rel=1e-12) and spent["eval"] > 0


def test_the_console_shows_the_goodput_share_only(tmp_path):
  out = io.StringIO()
  logger = MetricsLogger(str(tmp_path), tensorboard=False, stream=out)
  logger.log(5, {"loss": 2.0, "goodput": 0.9312, "goodput/compile_s": 1.0, "goodput/wall_s": 20.0})
  logger.close()
  assert out.getvalue() == "step 5 | loss 2.0000 | goodput 93.1%\n"
  assert read_metrics(str(tmp_path / "metrics.jsonl"))[0]["goodput/compile_s"] == 1.0


def _timed(monkeypatch, owner, name: str, spent: list) -> None:
  """Wraps owner.name to add each call's wall time to spent[0]."""
  original = getattr(owner, name)

  def wrapper(*args, **kwargs):
    t = time.perf_counter()
    try:
      return original(*args, **kwargs)
    finally:
      spent[0] += time.perf_counter() - t
  monkeypatch.setattr(owner, name, wrapper)


def test_a_stopped_and_resumed_run_accounts_for_its_wall_time_and_its_idle_gap(tmp_path, data_dir, monkeypatch,
                                                                             caplog):
  workdir = str(tmp_path / "run")
  cfg = small_config(data_dir, total_steps=6, eval_every=3, eval_batches=1, num_samples=1, sample_len=8,
                     tensorboard=True)
  evaluating, saving = [0.0], [0.0]
  for name in ("_evaluate", "_samples"):
    _timed(monkeypatch, trainer, name, evaluating)
  _timed(monkeypatch, Checkpointer, "save", saving)
  caplog.set_level(logging.INFO, logger="megalodon_jax")

  with pytest.MonkeyPatch.context() as preempt:  # stopped after step 4, as by a SIGTERM
    preempt.setattr(trainer.PreemptionFlag, "check", lambda self, step: step == 4)
    t = time.perf_counter()
    trainer.train_and_evaluate(cfg, workdir, devices=jax.devices()[:1])
    wall = time.perf_counter() - t
  first = read_goodput(workdir)
  spent = first["attempt_s"]
  assert first["attempts"] == 1 and first["totals_s"] == spent and set(spent) == set(CATEGORIES)
  assert sum(spent.values()) == pytest.approx(wall, rel=0.02)
  assert all(spent[c] > 0 for c in ("compile", "data_wait", "step", "eval", "checkpoint", "other")), spent
  assert spent["idle"] == 0
  assert goodput_lib.GOODPUT_FILE in layout.RUN_FILES  # a run's own file (workdir checks, output guards)
  # Measured where it happens: evaluation (less any compile, moved to compile; the eval and sampling programs now
  # compile beside the train step, so allow the phase's own bookkeeping around the calls) and at least the saves.
  assert 0 < spent["eval"] <= evaluating[0] + 0.01 and spent["checkpoint"] >= saving[0] > 0
  assert re.search(r"goodput \d+% of [\d.]+ (s|min): [\d.]+ (s|min) step, ", caplog.text), caplog.text

  records = [r for r in read_metrics(os.path.join(workdir, "metrics.jsonl")) if "loss" in r]
  assert [r["step"] for r in records] == [1, 2, 3, 4]
  for r in records:  # each log step: cumulative seconds that sum to the wall time so far
    assert sum(r[f"goodput/{c}_s"] for c in CATEGORIES) == pytest.approx(r["goodput/wall_s"], rel=1e-9)
    assert r["goodput"] == pytest.approx(r["goodput/step_s"] / r["goodput/wall_s"], rel=1e-9)
  assert all(a["goodput/wall_s"] < b["goodput/wall_s"] for a, b in zip(records, records[1:]))
  assert records[-1]["goodput/wall_s"] < wall

  # The job was down for DOWN_S seconds after its last record (as if preempted and requeued).
  path = os.path.join(workdir, goodput_lib.GOODPUT_FILE)
  with open(path, encoding="utf-8") as f:
    record = json.load(f)
  record["updated_at"] -= DOWN_S
  with open(path, "w", encoding="utf-8") as f:
    json.dump(record, f)
  between = time.time()
  t = time.perf_counter()
  trainer.train_and_evaluate(cfg, workdir, devices=jax.devices()[:1])
  wall2 = time.perf_counter() - t
  second = read_goodput(workdir)
  assert second["attempts"] == 2
  assert sum(second["attempt_s"].values()) == pytest.approx(wall2, rel=0.02)
  idle = second["totals_s"]["idle"]
  assert DOWN_S + (between - first["updated_at"]) <= idle <= DOWN_S + (between - first["updated_at"]) + wall2
  for c in CATEGORIES:  # the totals carry on from the first attempt's
    assert second["totals_s"][c] == pytest.approx(first["totals_s"][c] + second["attempt_s"][c]
                                                  + (idle if c == "idle" else 0.0), abs=1e-9)
  records = [r for r in read_metrics(os.path.join(workdir, "metrics.jsonl")) if "loss" in r]
  scalars, _, _ = _tensorboard_view(workdir)  # TensorBoard gets the same values at the same steps
  for key in ("goodput", "goodput/idle_s", "goodput/step_s"):
    assert scalars[key] == pytest.approx({r["step"]: r[key] for r in records}, rel=1e-6), key
  last = records[-1]
  assert last["step"] == 6 and last["goodput/idle_s"] == pytest.approx(idle, abs=1e-9)
  assert last["goodput/wall_s"] > wall + DOWN_S
  # The command line's last line (run_summary) reads the same totals.
  line = run_summary.summary_line(workdir, start_step=4, end_step=6, total_steps=6, tensorboard=False)
  totals = second["totals_s"]
  assert f"; goodput {totals['step'] / sum(totals.values()) * 100:.0f}% of " in line and " over 2 attempts: " in line
