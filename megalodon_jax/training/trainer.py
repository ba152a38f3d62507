"""The training loop: `train_and_evaluate(config, workdir)`, used by train.py.

Order of work: validate the config, the data and the checkpoint directory (cheap, fails fast), build the mesh,
prepare the data, restore or initialise the sharded state, compile the step once, then loop. Each step is
dispatched before the previous step's metrics are read, so the host never waits on the device except at
log, eval and save points. The state the loop holds is always a good one (see train_step), so a save never
writes a state poisoned by a non-finite loss.
"""

from __future__ import annotations

import json
import logging
import math
import sys
import time
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm import tqdm

from megalodon_jax import data as data_lib
from megalodon_jax import flops as flops_lib
from megalodon_jax import paths
from megalodon_jax.checkpoints import layout as ckpt_layout
from megalodon_jax.checkpoints import tokenizer_copy
from megalodon_jax.checkpoints.manager import Checkpointer
from megalodon_jax.checkpoints.model_state import split_model
from megalodon_jax.checkpoints.params import load_params
from megalodon_jax.errors import NonFiniteLossError
from megalodon_jax.inference.generation import Generator
from megalodon_jax.inference.sampling import Sampler
from megalodon_jax.model import MegalodonLM
from megalodon_jax.training import config_lib, process_lock, sharding
from megalodon_jax.training import workdir as workdir_lib
from megalodon_jax.training import data_state as data_state_lib
from megalodon_jax.training import optimizer as opt_lib
from megalodon_jax.training import train_step as ts
from megalodon_jax.training.metrics import MetricsLogger, loss_metrics, throughput
from megalodon_jax.training.preemption import PreemptionFlag, TrainingInterrupted

log = logging.getLogger("megalodon_jax")


def _with_shardings(abstract: Any, shardings: Any) -> Any:
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)


class _Run:
  """Everything one training run builds once: model split, optimizer, shardings, compiled functions."""

  def __init__(self, cfg: Any, workdir: Optional[str], devices: Optional[list] = None, *,
               vocab_size: Optional[int] = None):
    """workdir None and a `vocab_size`: a run that is only compiled (the planner), with no data, tokenizer or
    checkpoint directory touched; `vocab_size` stands in for the tokenizer's."""
    self.cfg, self.workdir = cfg, workdir
    self.is_main = jax.process_index() == 0
    self.devices = list(devices) if devices is not None else jax.devices()
    config_lib.validate(cfg, len(self.devices), check_inputs=workdir is not None)
    self.tokenizer = data_lib.make_tokenizer(cfg.data) if vocab_size is None else None
    # A SentencePiece model's bytes: the run directory and every checkpoint carry a copy (tokenizer_copy.py).
    self.tokenizer_model = (self.tokenizer.model_bytes()
                            if isinstance(self.tokenizer, data_lib.SentencePieceTokenizer) else None)
    self.model_cfg = config_lib.model_config(cfg, vocab_size or self.tokenizer.vocab_size)
    self.ckpt_dir = ckpt_layout.checkpoints_dir(workdir) if workdir is not None else None
    if self.ckpt_dir is not None and paths.as_path(self.ckpt_dir).exists():
      ckpt_layout.check_directory(self.ckpt_dir, check_steps=False)  # damaged steps: see _resume
    self.mesh = sharding.make_mesh(cfg.mesh, self.devices)
    # Rows shared by several processes (a `sequence` or `tensor` axis spanning hosts): every process then reads the
    # whole global batch (token ids: a few MiB) and places the parts its devices hold; otherwise each reads its rows.
    self.shared_rows = sharding.rows_shared_across_processes(self.mesh.devices, self.mesh.axis_names)
    self.batch_sharding = sharding.batch_sharding(self.mesh)
    self.rules = sharding.check_rules(cfg.logical_axis_rules)
    o = cfg.optimizer
    opt_kwargs = dict(scheduler=o.scheduler, init_ratio=o.init_ratio, end_ratio=o.end_ratio, cycles=o.cycles)
    self.schedule = opt_lib.lr_schedule(o.lr, cfg.total_steps, o.warmup_steps, **opt_kwargs)
    self.tx = opt_lib.make_optimizer(o.lr, cfg.total_steps, o.warmup_steps, **opt_kwargs, b1=o.b1, b2=o.b2,
                                     eps=o.eps, weight_decay=o.weight_decay, clip=o.clip or None,
                                     decay_mask=o.decay_mask)

  def build(self) -> None:
    """Abstract model and state with target shardings, and the jitted init / train / eval functions."""
    cfg, mesh = self.cfg, self.mesh
    model_cfg, seed = self.model_cfg, cfg.seed
    abstract_model = nnx.eval_shape(lambda: MegalodonLM(model_cfg, rngs=nnx.Rngs(seed)))
    self.graphdef, abs_params, abs_buffers, abs_rngs = split_model(abstract_model)
    repl = sharding.replicated(mesh)
    self.param_shardings = sharding.state_shardings(abs_params, self.rules, mesh)
    self.state_shardings = {
        "step": repl, "params": self.param_shardings,
        "buffers": sharding.state_shardings(abs_buffers, self.rules, mesh),
        "opt_state": sharding.opt_state_shardings(self.tx, abs_params, self.param_shardings, mesh), "rng": repl}
    self.abstract_state = _with_shardings(
        jax.eval_shape(lambda p, b: ts.init_state(p, b, self.tx, jnp.zeros((2,), jnp.uint32)), abs_params,
                       abs_buffers), self.state_shardings)
    # Dropout RNG variables are rebuilt from the seed at every step; only their structure matters here.
    self.rng_vars = jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype) if a.dtype == jnp.uint32
                                 else jax.random.key(0), abs_rngs)
    batch_sh = {k: self.batch_sharding for k in self.batch_keys}
    self.train_step = jax.jit(ts.make_train_step(self.graphdef, self.rng_vars, self.tx, self.schedule,
                                                 cfg.grad_accum_steps, cfg.loss_piece),
                              in_shardings=(self.state_shardings, batch_sh), out_shardings=(self.state_shardings, repl),
                              donate_argnums=0)
    self.eval_step = jax.jit(ts.make_eval_step(self.graphdef, self.rng_vars, cfg.loss_piece),
                             in_shardings=(self.state_shardings, batch_sh), out_shardings=repl)

  def fresh_state(self) -> ts.TrainState:
    """Step-0 state, each array created directly with its sharding (no full copy on one device first)."""
    model_cfg, seed, tx = self.model_cfg, self.cfg.seed, self.tx

    def init():
      _, params, buffers, _ = split_model(MegalodonLM(model_cfg, rngs=nnx.Rngs(seed)))
      return ts.init_state(params, buffers, tx, jax.random.key_data(jax.random.key(seed + 1)))

    return jax.jit(init, out_shardings=self.state_shardings)()

  def from_params(self, params: Any) -> ts.TrainState:
    """Step-0 state around given params (init_from): fresh buffers, optimizer state and rng."""
    state = self.fresh_state()
    tx = self.tx
    state["params"] = params
    state["opt_state"] = jax.jit(tx.init, out_shardings=self.state_shardings["opt_state"])(params)
    return state

  def data_split(self) -> tuple[int, int]:
    """(process_index, process_count) the data iterators split the batch rows by."""
    return (0, 1) if self.shared_rows else (jax.process_index(), jax.process_count())

  @property
  def batch_keys(self) -> tuple[str, ...]:
    """The (B, L) int32 arrays a step takes: tokens and targets, and with document_boundaries="reset" the document
    positions (the model restarts where they are 0) and the target mask (data/pipeline.py)."""
    if self.cfg.data.get("document_boundaries", "carry") == "reset":
      return ("inputs", "targets", "positions", "target_mask")
    return ("inputs", "targets")

  def global_batch(self, batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
    """The (B, L) global arrays from this process's rows (or, with shared rows, from the whole global batch)."""
    batch = {k: batch[k] for k in self.batch_keys}  # the packer's segment_ids are derived again in the model
    if self.shared_rows:
      return {k: jax.make_array_from_callback(np.shape(v), self.batch_sharding,
                                              lambda index, v=np.asarray(v, np.int32): v[index])
              for k, v in batch.items()}
    return {k: jax.make_array_from_process_local_data(self.batch_sharding, np.asarray(v, np.int32))
            for k, v in batch.items()}


def train_and_evaluate(cfg: Any, workdir: str, devices: Optional[list] = None, *,
                       on_start: Optional[Callable[[int], None]] = None) -> dict[str, float]:
  """Trains (or resumes) the run described by `cfg` in `workdir`; returns the last logged metrics.

  devices: the devices of the mesh (default: all of `jax.devices()`); tests use subsets.
  on_start: called with the step training starts from (0, or the step resumed from), before the first step.

  Raises:
    config_lib.ConfigError, data_lib.DataError, CheckpointError: bad input (another run holding the workdir
      included), before any compile.
    NonFiniteLossError: the loss became NaN/inf (the last good checkpoint is kept).
    TrainingInterrupted: Ctrl-C (SIGINT) stopped the run after saving its step.
  """
  cfg = workdir_lib.with_run_tokenizer(cfg, workdir)
  workdir_lib.check_workdir(workdir)
  run = _Run(cfg, workdir, devices)
  # One writer per workdir: process 0 holds the lock for the whole run, the other processes share its outcome.
  lock = process_lock.hold(workdir, run.is_main)
  try:
    return _train(run, cfg, workdir, lock, on_start)
  finally:
    lock.release()


def _train(run: _Run, cfg: Any, workdir: str, lock: Any, on_start: Optional[Callable[[int], None]]
           ) -> dict[str, float]:
  log.info("model: %s parameters; mesh %s", f"{run.model_cfg.num_params():,}", dict(run.mesh.shape))
  data_lib.prepare(cfg.data)
  pidx, pcount = run.data_split()
  train_iter = data_lib.make_train_iterator(cfg.data, seq_len=cfg.seq_len, batch_size=cfg.batch_size, seed=cfg.seed,
                                            process_index=pidx, process_count=pcount)
  eval_batches = data_lib.make_eval_batches(cfg.data, seq_len=cfg.seq_len, batch_size=cfg.batch_size,
                                            num_batches=cfg.eval_batches, process_index=pidx,
                                            process_count=pcount) if cfg.eval_every > 0 else []

  with jax.set_mesh(run.mesh):
    run.build()
    ckpt = Checkpointer(run.ckpt_dir, save_every=cfg.checkpoint_every, keep=cfg.checkpoint_keep,
                        async_save=cfg.async_checkpointing, check_steps=False)
    try:
      resumed = _resume(run, ckpt, train_iter)
      if resumed is not None:
        state, start = resumed
      elif cfg.init_from:
        params = load_params(paths.abspath(cfg.init_from), run.abstract_state["params"])
        state, start = run.from_params(params), 0
        log.info("initialised params from %s", cfg.init_from)
      else:
        state, start = run.fresh_state(), 0
      # Written once the state is known to restore, so a refused resume leaves the run directory as it was.
      if run.is_main:
        if run.tokenizer_model is not None:  # before config.json: a run dir of another tokenizer is refused untouched
          tokenizer_copy.write_copy(workdir, run.tokenizer_model, what=f"the run directory {workdir}")
        paths.as_path(paths.join(workdir, "config.json")).write_text(cfg.to_json_best_effort(indent=2))
        paths.as_path(paths.join(workdir, "shardings.txt")).write_text(
            f"# mesh {dict(run.mesh.shape)}; batches (B, L): {run.batch_sharding.spec} (B over data x fsdp, "
            f"L over sequence: {cfg.seq_len // run.mesh.shape['sequence']} tokens per slice)\n"
            + sharding.describe(state["params"], run.param_shardings))
    except BaseException:
      ckpt.close()  # an open manager's threads would print orbax's shutdown traceback at exit
      raise
    if on_start is not None:
      on_start(start)
    return _loop(run, cfg, workdir, ckpt, state, start, train_iter, eval_batches, lock)


def _resume(run: _Run, ckpt: Checkpointer, train_iter: Any) -> Optional[tuple[ts.TrainState, int]]:
  """(state, step) of the newest step that restores (damaged newer steps are set aside: `restore_newest`), with
  the data iterator moved to that step (the metrics log is cut back to it in `_loop`); None for a new run."""
  resumed = ckpt.restore_newest(run.abstract_state)
  process_lock.barrier("megalodon_jax/resume")  # every process sees the set-aside folders before anyone saves
  if resumed is None:
    return None
  state, data_state, _, step = resumed
  train_iter.set_state(data_state_lib.restored_data_state(data_state, run.ckpt_dir, step))
  log.info("resumed from %s at step %d", run.ckpt_dir, step)
  return state, step


def _loop(run: _Run, cfg: Any, workdir: str, ckpt: Checkpointer, state: ts.TrainState, start: int,
          train_iter: Any, eval_batches: list, lock: Any) -> dict[str, float]:
  byte_level = run.tokenizer.vocab_size == 256 and run.tokenizer.eos_id is None
  bar = progress_bar(cfg.progress_bar, cfg.total_steps, start) if run.is_main else None
  logger = MetricsLogger(workdir, enabled=run.is_main, tensorboard=cfg.tensorboard, progress=bar)
  logger.truncate_after(start)
  flops_per_step = flops_lib.train_step_flops(run.model_cfg, cfg.batch_size, cfg.seq_len, causal_attention=True)
  peak = flops_lib.peak_flops(run.devices[0].device_kind)
  tokens_per_step = cfg.batch_size * cfg.seq_len
  # SIGTERM and Ctrl-C save at the next step boundary; without the preemption service the processes agree at log
  # steps. A second Ctrl-C ends the process at once: the lock is released first.
  preempt = PreemptionFlag(agree_every=cfg.log_every, on_second_interrupt=lock.release)

  t0 = time.perf_counter()
  first_batch = run.global_batch(next(train_iter))
  compiled = run.train_step.lower(state, first_batch).compile()
  _log_compile(compiled, time.perf_counter() - t0)
  last: dict[str, float] = {}
  if start == 0 and eval_batches:  # the untrained model's eval loss: the baseline the run improves on
    last = _evaluate(run, state, eval_batches, byte_level)
    logger.log(0, last)
  if bar is not None:
    bar.unpause()  # the rate (and ETA) counts from here: compilation and the baseline eval are not steps

  pending: Optional[tuple[int, Any]] = None  # (step, device metrics) not yet read back
  preempted = False
  interval_start, interval_steps = time.perf_counter(), 0

  def check(pending_metrics: tuple[int, Any]) -> dict[str, float]:
    step_done, m = pending_metrics
    host = {k: float(v) for k, v in jax.device_get(m).items()}
    if not math.isfinite(host["loss"]) and cfg.stop_on_nan:
      raise NonFiniteLossError(f"non-finite loss {host['loss']} at step {step_done} (grad_norm {host['grad_norm']}); "
                               f"params were not updated by it and the last checkpoint is kept. Lower "
                               f"--config.optimizer.lr or check the data.")
    return host

  try:
    for step in range(start + 1, cfg.total_steps + 1):
      batch = first_batch if step == start + 1 else run.global_batch(next(train_iter))
      state, metrics = compiled(state, batch)
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
                **throughput(step_time_s=step_time, tokens_per_step=tokens_per_step, num_devices=len(run.devices),
                             flops_per_step=flops_per_step, peak_flops_per_device=peak)}
        # eval_every is a multiple of log_every (config_lib), so eval steps are log steps: one record per step.
        if eval_batches and (step % cfg.eval_every == 0 or at_end):
          last.update(_evaluate(run, state, eval_batches, byte_level))
          _samples(run, cfg, state, eval_batches, logger, step)
        logger.log(step, last)
        if bar is not None:
          _advance(bar, step, host["loss"])
        interval_start, interval_steps = time.perf_counter(), 0

      if at_end or preempted or ckpt.should_save(step):
        if pending is not None:  # never save a state before its loss is known to be finite
          check(pending)
          pending = None
        ckpt.save(step, state, data_state_lib.gather_data_state(train_iter.get_state()), _meta(run, step),
                  force=at_end or preempted)
        logger.sync()
      if preempted:
        log.warning("%s: saved the checkpoint of step %d; exiting", "interrupted (Ctrl-C)" if preempt.interrupted
                    else "SIGTERM received", step)
        break
  finally:
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
  """Token-weighted mean loss over the fixed eval batches: eval_loss and eval_bpb or eval_ppl."""
  totals = [run.eval_step(state, run.global_batch(b)) for b in batches]
  loss_sum = sum(float(t["loss_sum"]) for t in totals)
  tokens = sum(float(t["tokens"]) for t in totals)
  return loss_metrics(loss_sum / tokens, byte_level=byte_level, prefix="eval_")


def sample_tokens(model: MegalodonLM, prompts: np.ndarray, *, num_tokens: int, temperature: float,
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
  out = Generator(model).generate(prompts.tolist(), max_new_tokens=num_tokens,
                                  sampler=Sampler(temperature=float(temperature)), seed=seed)
  return np.asarray([c.tokens for c in out], np.int32).reshape(len(out), num_tokens)


def _samples(run: _Run, cfg: Any, state: ts.TrainState, batches: list, logger: MetricsLogger, step: int) -> None:
  if not cfg.num_samples or not batches:
    return
  if cfg.sample_prompt:
    prompt = np.tile(run.tokenizer.encode(cfg.sample_prompt)[None], (cfg.num_samples, 1))
  else:
    rows = batches[0]["inputs"][:cfg.num_samples]
    prompt = np.asarray(rows[:, :min(32, rows.shape[1])])
  model = nnx.merge(run.graphdef, state["params"], state["buffers"], run.rng_vars)
  seed = int(np.random.SeedSequence([cfg.seed, step]).generate_state(1)[0])  # new draws at every step
  out = sample_tokens(model, prompt, num_tokens=cfg.sample_len, temperature=cfg.sample_temperature, seed=seed)
  for i in range(out.shape[0]):
    text = run.tokenizer.decode(prompt[i]) + " ▶ " + run.tokenizer.decode(out[i])
    logger.log_text(step, f"sample_{i}", text)


def _meta(run: _Run, step: int) -> dict[str, Any]:
  meta = {"step": step, "config": json.loads(run.cfg.to_json_best_effort()), "jax_version": jax.__version__,
          "mesh": {k: int(v) for k, v in run.mesh.shape.items()}, "model": run.model_cfg.official_kwargs()}
  return tokenizer_copy.embed(meta, run.tokenizer_model)


def _log_compile(compiled: Any, seconds: float) -> None:
  mem = compiled.memory_analysis()
  if mem is not None:
    gib = 1024 ** 3
    log.info("train step compiled in %.1f s; per device: arguments %.2f GiB, outputs %.2f GiB, temporaries %.2f GiB",
             seconds, mem.argument_size_in_bytes / gib, mem.output_size_in_bytes / gib, mem.temp_size_in_bytes / gib)
  else:
    log.info("train step compiled in %.1f s", seconds)
