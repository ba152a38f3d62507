"""The training loop: `train_and_evaluate(config, workdir)`, used by train.py.

Order of work: validate the config, the data and the checkpoint directory (cheap, fails fast), build the mesh,
prepare the data, restore or initialise the sharded state, compile the step once, then loop. Each step is
dispatched before the previous step's metrics are read, so the host never waits on the device except at
log, eval and save points. The state the loop holds is always a good one (see train_step), so a save never
writes a state poisoned by a non-finite loss.
"""

from __future__ import annotations

import concurrent.futures
import json
import logging
import math
import sys
import time
from typing import Any, Callable, Optional

import jax
import numpy as np
from tqdm import tqdm

from megalodon_jax import data as data_lib
from megalodon_jax import flops as flops_lib
from megalodon_jax import paths
from megalodon_jax.checkpoints import layout as ckpt_layout
from megalodon_jax.checkpoints import tokenizer_copy
from megalodon_jax.checkpoints.manager import Checkpointer
from megalodon_jax.checkpoints.params import load_params
from megalodon_jax.errors import NonFiniteLossError
from megalodon_jax.inference.generation import Generator
from megalodon_jax.inference.sampling import Sampler
from megalodon_jax.training import process_lock
from megalodon_jax.training import workdir as workdir_lib
from megalodon_jax.training import data_state as data_state_lib
from megalodon_jax.training import profiling
from megalodon_jax.training import source_metrics
from megalodon_jax.training import train_step as ts
from megalodon_jax.training.goodput import Goodput
from megalodon_jax.training.metrics import MetricsLogger, loss_metrics, throughput
from megalodon_jax.training.preemption import PreemptionFlag, TrainingInterrupted
from megalodon_jax.training.program import TrainProgram
from megalodon_jax.training.train_config import TrainConfig
from megalodon_jax.training import wandb_run

log = logging.getLogger("megalodon_jax")
SAMPLE_PROMPT_TOKENS = 32  # the default sample prompt: the first tokens of an eval row


class _Run:
  """What one run in a workdir holds beside its program: the tokenizer and the checkpoint directory."""

  def __init__(self, cfg: Any, workdir: str, devices: Optional[list]):
    self.cfg, self.data_plan, self.tokenizer = workdir_lib.check_run(cfg, workdir)
    self.workdir, self.is_main = workdir, jax.process_index() == 0
    # A SentencePiece model's bytes: the run directory and every checkpoint carry a copy (tokenizer_copy.py).
    self.tokenizer_model = (self.tokenizer.model_bytes()
                            if isinstance(self.tokenizer, data_lib.SentencePieceTokenizer) else None)
    self.ckpt_dir = ckpt_layout.checkpoints_dir(workdir)
    self.program = TrainProgram.build(self.cfg, devices, vocab_size=self.tokenizer.vocab_size)

  def check_checkpoints(self) -> None:
    """Checks the checkpoint folder; called with the workdir lock held, so a refused second run says only that the
    workdir is in use, never what it saw of the first run's saves in flight."""
    if paths.as_path(self.ckpt_dir).exists():
      ckpt_layout.check_directory(self.ckpt_dir, check_steps=False)  # damaged steps: see _resume


def train_and_evaluate(cfg: Any, workdir: str, devices: Optional[list] = None, *,
                       on_start: Optional[Callable[[int], None]] = None) -> dict[str, float]:
  """Trains (or resumes) the run described by `cfg` (a TrainConfig or its ConfigDict) in `workdir`; returns the
  last logged metrics.

  devices: the devices of the mesh (default: all of `jax.devices()`); tests use subsets.
  on_start: called with the step training starts from (0, or the step resumed from), before the first step.

  Raises:
    ConfigError, DataError, CheckpointError: bad input (another run holding the workdir included), before any
      compile.
    NonFiniteLossError: the loss became NaN/inf (the last good checkpoint is kept).
    TrainingInterrupted: Ctrl-C (SIGINT) stopped the run after saving its step.
  """
  goodput = Goodput()  # the run's wall time counts from here (training/goodput.py)
  run = _Run(cfg, workdir, devices)
  run.goodput = goodput
  cfg = run.cfg
  # One writer per workdir: process 0 holds the lock for the whole run, the other processes share its outcome.
  lock = process_lock.hold(workdir, run.is_main)
  try:
    run.check_checkpoints()
  except BaseException:
    lock.release()  # refused before anything was written: the workdir stays as it was
    raise
  try:
    goodput.resume(workdir, run.is_main)
    goodput.count_compiles()
    return _train(run, cfg, workdir, lock, on_start)
  finally:
    run.program = None  # frees the compiled programs (a noticeable time) inside the measured wall time
    goodput.finish()  # goodput.json and the summary line, while the lock is held
    lock.release()


def _train(run: _Run, cfg: TrainConfig, workdir: str, lock: Any, on_start: Optional[Callable[[int], None]]
           ) -> dict[str, float]:
  program = run.program
  log.info("model: %s parameters; mesh %s", f"{program.model_config.num_params():,}", dict(program.mesh.shape))
  data_lib.prepare(run.data_plan)
  pidx, pcount = program.data_split()
  train_iter = data_lib.make_train_iterator(run.data_plan, seq_len=cfg.seq_len, batch_size=cfg.batch_size,
                                            seed=cfg.seed, process_index=pidx, process_count=pcount)
  eval_batches = data_lib.make_eval_batches(run.data_plan, seq_len=cfg.seq_len, batch_size=cfg.batch_size,
                                            num_batches=cfg.eval_batches, process_index=pidx,
                                            process_count=pcount) if cfg.eval_every > 0 else []

  with jax.set_mesh(program.mesh):
    ckpt = Checkpointer(run.ckpt_dir, save_every=cfg.checkpoint_every, keep=cfg.checkpoint_keep,
                        async_save=cfg.async_checkpointing, check_steps=False)
    try:
      with run.goodput.phase("checkpoint"):
        resumed = _resume(run, ckpt, train_iter)
      if resumed is not None:
        state, start = resumed
      elif cfg.init_from:
        with run.goodput.phase("checkpoint"):
          params = load_params(paths.abspath(cfg.init_from), program.abstract_state.params)
        state, start = program.from_params(params), 0
        log.info("initialised params from %s", cfg.init_from)
      else:
        state, start = program.fresh_state(), 0
      # Written once the state is known to restore, so a refused resume leaves the run directory as it was.
      if run.is_main:
        if run.tokenizer_model is not None:  # before config.json: a run dir of another tokenizer is refused untouched
          tokenizer_copy.write_copy(workdir, run.tokenizer_model, what=f"the run directory {workdir}")
        paths.as_path(paths.join(workdir, "config.json")).write_text(cfg.to_json(indent=2))
        paths.as_path(paths.join(workdir, "shardings.txt")).write_text(program.shardings_report(state.params))
    except BaseException:
      ckpt.close()  # an open manager's threads would print orbax's shutdown traceback at exit
      raise
    if on_start is not None:
      on_start(start)
    return _loop(run, cfg, workdir, ckpt, state, start, train_iter, eval_batches, lock)


def _resume(run: _Run, ckpt: Checkpointer, train_iter: Any) -> Optional[tuple[ts.TrainState, int]]:
  """(state, step) of the newest step that restores (damaged newer steps are set aside: `restore_newest`), with
  the data iterator moved to that step (the metrics log is cut back to it in `_loop`); None for a new run."""
  resumed = ckpt.restore_newest(run.program.abstract_state.to_tree())
  process_lock.barrier("megalodon_jax/resume")  # every process sees the set-aside folders before anyone saves
  if resumed is None:
    return None
  tree, data_state, _, step = resumed
  state = ts.TrainState.from_tree(tree)
  train_iter.set_state(data_state_lib.restored_data_state(data_state, run.ckpt_dir, step))
  log.info("resumed from %s at step %d", run.ckpt_dir, step)
  return state, step


def _loop(run: _Run, cfg: Any, workdir: str, ckpt: Checkpointer, state: ts.TrainState, start: int,
          train_iter: Any, eval_batches: list, lock: Any) -> dict[str, float]:
  byte_level = run.tokenizer.vocab_size == 256 and run.tokenizer.eos_id is None
  bar = progress_bar(cfg.progress_bar, cfg.total_steps, start) if run.is_main else None
  wandb_sink = wandb_run.sink(cfg, workdir) if run.is_main else None
  logger = MetricsLogger(workdir, enabled=run.is_main, tensorboard=cfg.tensorboard, progress=bar,
                         sinks=[wandb_sink] if wandb_sink is not None else [])
  logger.truncate_after(start)
  if wandb_sink is not None:
    wandb_sink.start(start)  # before compiling: a W&B login problem is reported at once
  program = run.program
  flops_per_step = program.train_step_flops()
  peak = flops_lib.peak_flops(program.devices[0].device_kind)
  tokens_per_step = cfg.batch_size * cfg.seq_len
  # SIGTERM and Ctrl-C save at the next step boundary; without the preemption service the processes agree at log
  # steps. A second Ctrl-C ends the process at once: the lock is released first.
  preempt = PreemptionFlag(agree_every=cfg.log_every, on_second_interrupt=lock.release)
  goodput = run.goodput
  profiler = profiling.StepProfiler.of_config(cfg, workdir, start=start, wait=goodput.block)

  t0 = time.perf_counter()
  with goodput.phase("data_wait"):
    first_batch = program.global_batch(next(train_iter))
  with goodput.phase("compile"):
    # The eval step and the sampling programs compile in a second thread meanwhile: XLA:CPU keeps about 1.6 of 2
    # cores busy with one program. Their jits reuse what the thread compiled (same shapes, shardings and mesh
    # context, which is per thread); the thread's samples (drawn to compile the sampler, from the state before
    # any step, so before the step donates it) are dropped. An error there is raised here, before any step runs.
    def warm_up():
      with jax.set_mesh(program.mesh):
        program.eval_step.lower(state, program.global_batch(eval_batches[0])).compile()
        if cfg.num_samples:
          _draw_samples(run, cfg, state, eval_batches, start)

    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
      warming = pool.submit(warm_up) if eval_batches else None
      compiled = program.train_step.lower(state, first_batch).compile()
      if warming is not None:
        warming.result()
  _log_compile(compiled, time.perf_counter() - t0)
  goodput.save(force=True)  # this attempt's first record: from here on it ends with one (finish)
  last: dict[str, float] = {}
  if start == 0 and eval_batches:  # the untrained model's eval loss: the baseline the run improves on
    with goodput.phase("eval"):
      last = _evaluate(run, state, eval_batches, byte_level)
    logger.log(0, last)
  if bar is not None:
    bar.unpause()  # the rate (and ETA) counts from here: compilation and the baseline eval are not steps

  pending: Optional[tuple[int, Any]] = None  # (step, device metrics) not yet read back
  preempted = False
  interval_start, interval_steps = time.perf_counter(), 0

  def check(pending_metrics: tuple[int, Any]) -> dict[str, float]:
    step_done, m = pending_metrics
    with goodput.phase("step"):  # the host waits for the device here
      host = {k: float(v) for k, v in jax.device_get(m).items()}
    if not math.isfinite(host["loss"]) and cfg.stop_on_nan:
      raise NonFiniteLossError(f"non-finite loss {host['loss']} at step {step_done} (grad_norm {host['grad_norm']}); "
                               f"params were not updated by it and the last checkpoint is kept. Lower "
                               f"--config.optimizer.lr or check the data.")
    return host

  try:
    for step in range(start + 1, cfg.total_steps + 1):
      with profiler.step(step):
        with goodput.phase("data_wait"):
          batch = first_batch if step == start + 1 else program.global_batch(next(train_iter))
        with goodput.phase("step"):
          state, metrics = compiled(state, batch)
      profiler.after(step, state)
      if pending is not None:  # read the previous step's metrics while this one runs
        previous = check(pending)
        if bar is not None:
          _advance(bar, pending[0], previous["loss"])
      pending = (step, metrics)
      interval_steps += 1
      at_end = step == cfg.total_steps
      preempted = preempt.check(step)

      if step % cfg.log_every == 0 or at_end:
        host = check(pending)
        pending = None
        step_time = (time.perf_counter() - interval_start) / interval_steps
        last = {**loss_metrics(host["loss"], byte_level=byte_level), "learning_rate": host["learning_rate"],
                "grad_norm": host["grad_norm"], "step_time": step_time,
                **throughput(step_time_s=step_time, tokens_per_step=tokens_per_step, num_devices=len(program.devices),
                             flops_per_step=flops_per_step, peak_flops_per_device=peak)}
        # eval_every is a multiple of log_every (TrainConfig), so eval steps are log steps: one record per step.
        if eval_batches and (step % cfg.eval_every == 0 or at_end):
          with goodput.phase("eval"):
            last.update(_evaluate(run, state, eval_batches, byte_level))
            _samples(run, cfg, state, eval_batches, logger, step)
        logger.log(step, {**last, **goodput.metrics()})
        goodput.save()
        if bar is not None:
          _advance(bar, step, host["loss"])
        interval_start, interval_steps = time.perf_counter(), 0

      if at_end or preempted or ckpt.should_save(step):
        if pending is not None:  # never save a state before its loss is known to be finite
          check(pending)
          pending = None
        with goodput.phase("checkpoint"):
          ckpt.save(step, state.to_tree(), data_state_lib.gather_data_state(train_iter.get_state()),
                    _meta(run, step), force=at_end or preempted)
          logger.sync()
        goodput.save(force=True)
      if preempted:
        log.warning("%s: saved the checkpoint of step %d; exiting", "interrupted (Ctrl-C)" if preempt.interrupted
                    else "SIGTERM received", step)
        break
  finally:
    profiler.close()
    with goodput.phase("checkpoint"):
      ckpt.wait()
      ckpt.close()
    preempt.close()
    logger.close()
    if bar is not None:
      bar.close()
  if preempt.interrupted and preempted:
    raise TrainingInterrupted(step)
  return last


def progress_bar(mode: str, total_steps: int, start: int) -> tqdm:
  """The loop's tqdm bar on stderr. mode (config `progress_bar`): "on", "off", or "auto" = only on a terminal
  (tqdm's disable=None), so a log file or batch job never gets its '\\r'-redrawn lines."""
  disable = {"auto": None, "on": False, "off": True}[mode]
  return tqdm(total=total_steps, initial=start, unit="step", dynamic_ncols=True, disable=disable, file=sys.stderr)


def _advance(bar: tqdm, step: int, loss: float) -> None:
  bar.set_postfix(loss=f"{loss:.4g}", refresh=False)
  bar.update(step - bar.n)  # steps done so far, as the bar counts increments


def _evaluate(run: _Run, state: ts.TrainState, batches: list, byte_level: bool) -> dict[str, float]:
  """Token-weighted mean loss over the fixed eval batches: eval_loss and eval_bpb or eval_ppl (and per source of a
  data.mixture)."""
  totals = [run.program.eval_step(state, run.program.global_batch(b)) for b in batches]
  loss_sum = sum(float(t["loss_sum"]) for t in totals)
  tokens = sum(float(t["tokens"]) for t in totals)
  return {**loss_metrics(loss_sum / tokens, byte_level=byte_level, prefix="eval_"),
          **source_metrics.per_source_metrics(batches, totals, byte_level=byte_level)}  # data.mixture: per source


def sample_tokens(model: Any, prompts: np.ndarray, *, num_tokens: int, temperature: float,
                  seed: int) -> np.ndarray:
  """The trainer's periodic samples, drawn by `Generator` (one PRNG stream per row, temperature a traced value).

  Args:
    model: put in eval mode (dropout off).
    prompts: (B, P) int token ids, P >= 1.
    num_tokens: tokens generated per row (no stop ids: every row gets exactly this many).
    temperature: 0 = greedy.
    seed: PRNG seed of the draws.
  Returns:
    (B, num_tokens) int32 generated ids (the prompts not included).
  """
  prompts = np.asarray(prompts)
  if prompts.ndim != 2 or prompts.shape[1] < 1:
    raise ValueError(f"prompts must be (batch, length >= 1); got shape {prompts.shape}")
  # Prompts as short as the default one are fed by decode steps: no prefill program to compile for samples drawn
  # a few times in a run.
  generator = Generator(model, min_prefill=2 * SAMPLE_PROMPT_TOKENS)
  out = generator.generate(prompts.tolist(), max_new_tokens=num_tokens, sampler=Sampler(temperature=float(temperature)),
                           seed=seed)
  return np.asarray([c.tokens for c in out], np.int32).reshape(len(out), num_tokens)


def _samples(run: _Run, cfg: Any, state: ts.TrainState, batches: list, logger: MetricsLogger, step: int) -> None:
  if not cfg.num_samples or not batches:
    return
  prompt, out = _draw_samples(run, cfg, state, batches, step)
  for i in range(out.shape[0]):
    text = run.tokenizer.decode(prompt[i]) + " ▶ " + run.tokenizer.decode(out[i])
    logger.log_text(step, f"sample_{i}", text)


def _draw_samples(run: _Run, cfg: Any, state: ts.TrainState, batches: list, step: int) -> tuple[np.ndarray, np.ndarray]:
  """The prompts (num_samples, P) and the tokens drawn after them (num_samples, sample_len) at `step`."""
  if cfg.sample_prompt:
    prompt = np.tile(run.tokenizer.encode(cfg.sample_prompt)[None], (cfg.num_samples, 1))
  else:
    rows = batches[0]["inputs"][:cfg.num_samples]
    prompt = np.asarray(rows[:, :min(SAMPLE_PROMPT_TOKENS, rows.shape[1])])
  model = run.program.model(state)
  seed = int(np.random.SeedSequence([cfg.seed, step]).generate_state(1)[0])  # new draws at every step
  return prompt, sample_tokens(model, prompt, num_tokens=cfg.sample_len, temperature=cfg.sample_temperature,
                               seed=seed)


def _meta(run: _Run, step: int) -> dict[str, Any]:
  meta = {"step": step, "config": json.loads(run.cfg.to_json()), "jax_version": jax.__version__,
          "mesh": {k: int(v) for k, v in run.program.mesh.shape.items()},
          "model": run.program.model_config.official_kwargs()}
  return tokenizer_copy.embed(meta, run.tokenizer_model)


def _log_compile(compiled: Any, seconds: float) -> None:
  mem = compiled.memory_analysis()
  if mem is not None:
    gib = 1024 ** 3
    log.info("train step compiled in %.1f s; per device: arguments %.2f GiB, outputs %.2f GiB, temporaries %.2f GiB",
             seconds, mem.argument_size_in_bytes / gib, mem.output_size_in_bytes / gib, mem.temp_size_in_bytes / gib)
  else:
    log.info("train step compiled in %.1f s", seconds)
