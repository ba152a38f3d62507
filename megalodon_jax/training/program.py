"""`TrainProgram`: everything a training run compiles, built once from a config and a set of devices.

The trainer loop, the planner (`megalodon-aot`, on abstract TPU topologies) and the tests all build it with
`TrainProgram.build(config, devices, vocab_size)`: the mesh, the model's graph, the abstract `TrainState` carrying
its target shardings, and the jitted init, train and eval steps. Nothing here touches a workdir, the data or a
checkpoint.

Shardings come from one place: every parameter carries `logical_axes` metadata, and so do the optimizer's moments
(optax maps over the parameters' `nnx.Param` Variables, which keep their metadata), so one call of
`sharding.state_shardings` over the abstract state places params, buffers, optimizer state, step and rng alike.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding

from megalodon_jax import mesh_axes
from megalodon_jax.model_state import merge_model, split_model
from megalodon_jax.training import optimizer, sharding
from megalodon_jax.training import train_step as ts
from megalodon_jax.training.train_config import TrainConfig


def _batch_keys(config: TrainConfig) -> tuple[str, ...]:
  """The (B, L) int32 arrays a step takes: tokens and targets, and with document_boundaries="reset" the document
  positions (the model restarts where they are 0) and the target mask (data/pipeline.py)."""
  reset = config.data.document_boundaries == "reset"
  return ("inputs", "targets") + (("positions", "target_mask") if reset else ())


@dataclasses.dataclass
class TrainProgram:
  """A built training program (see the module docstring). Build it with `TrainProgram.build`.

  config: the validated training config.  model_config: the family's model config (vocab_size set).
  mesh: the (data, sequence, fsdp, tensor) mesh.  graphdef / rng_vars: the model's static graph and its dropout RNG
  variables (rebuilt from the seed at every step; only their structure matters).  tx: the optax optimizer.  abstract_state: a `TrainState` of ShapeDtypeStructs with their target
  shardings.  state_shardings: the same tree of NamedShardings (Variables kept around those of params and moments).
  batch_sharding: (B, L) split over the batch axes and the sequence axis.  train_step / eval_step: jitted, with
  those in/out shardings (the train step donates its state).
  """

  config: TrainConfig
  model_config: Any
  devices: list
  mesh: Mesh
  rules: tuple
  graphdef: Any
  rng_vars: Any
  tx: Any
  abstract_state: ts.TrainState
  state_shardings: ts.TrainState
  batch_sharding: NamedSharding
  shared_rows: bool
  train_step: Any
  eval_step: Any

  @classmethod
  def build(cls, config: Any, devices: Optional[Sequence[Any]] = None, *, vocab_size: int) -> "TrainProgram":
    """The program of `config` (a TrainConfig or its ConfigDict) over `devices` (default all of jax.devices();
    abstract devices of a TPU topology are fine); `vocab_size` is the tokenizer's (the model's is taken from it when
    `model.vocab_size` is -1). Validates first: a bad config raises ConfigError before anything is traced."""
    config = TrainConfig.of(config)
    devices = list(jax.devices() if devices is None else devices)
    config.check_devices(len(devices))
    family = config.model_family
    model_config = config.model_config(vocab_size)
    mesh = sharding.make_mesh(config.mesh, devices)
    rules = sharding.check_rules(config.logical_axis_rules)
    schedule, tx = optimizer.from_config(config.optimizer, config.total_steps)
    with jax.set_mesh(mesh):
      abstract_model = nnx.eval_shape(lambda: family.build(model_config, nnx.Rngs(config.seed)))
      graphdef, abs_params, abs_buffers, abs_rngs = split_model(abstract_model)
      abstract = jax.eval_shape(lambda p, b: ts.init_state(p, b, tx, jnp.zeros((2,), jnp.uint32)), abs_params,
                                abs_buffers)
      state_shardings = sharding.state_shardings(abstract, rules, mesh)
      rng_vars = jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype) if a.dtype == jnp.uint32 else jax.random.key(0),
                              abs_rngs)
    batch_sharding = sharding.batch_sharding(mesh)
    batch_sh = {k: batch_sharding for k in _batch_keys(config)}
    repl = sharding.replicated(mesh)
    train_step = jax.jit(ts.make_train_step(graphdef, rng_vars, tx, schedule, config.grad_accum_steps,
                                            config.loss_piece),
                         in_shardings=(state_shardings, batch_sh), out_shardings=(state_shardings, repl),
                         donate_argnums=0)
    eval_step = jax.jit(ts.make_eval_step(graphdef, rng_vars, config.loss_piece),
                        in_shardings=(state_shardings, batch_sh), out_shardings=repl)
    return cls(config=config, model_config=model_config, devices=devices, mesh=mesh, rules=rules, graphdef=graphdef,
               rng_vars=rng_vars, tx=tx,
               abstract_state=sharding.with_shardings(abstract, state_shardings), state_shardings=state_shardings,
               batch_sharding=batch_sharding,
               # Rows shared by several processes (a `sequence` or `tensor` axis spanning hosts): every process then
               # reads the whole global batch (token ids: a few MiB) and places the parts its devices hold.
               shared_rows=sharding.rows_shared_across_processes(mesh.devices, mesh.axis_names),
               train_step=train_step, eval_step=eval_step)

  @property
  def batch_keys(self) -> tuple[str, ...]:
    return _batch_keys(self.config)

  def fresh_state(self) -> ts.TrainState:
    """Step-0 state, each array created directly with its sharding (no full copy on one device first)."""
    config, tx, family, model_config = self.config, self.tx, self.config.model_family, self.model_config

    def init():
      _, params, buffers, _ = split_model(family.build(model_config, nnx.Rngs(config.seed)))
      return ts.init_state(params, buffers, tx, jax.random.key_data(jax.random.key(config.seed + 1)))

    with jax.set_mesh(self.mesh):
      return jax.jit(init, out_shardings=self.state_shardings, compiler_options=self._run_once_options())()

  def _run_once_options(self) -> Optional[dict[str, Any]]:
    """XLA options of a program that runs once (the init): on CPU, LLVM at -O0, which compiles faster and costs
    the one run little (benchmarks/RESULTS.md, "Quickstart: where the cold start goes"); elsewhere the defaults."""
    return {"xla_backend_optimization_level": 0} if self.devices[0].platform == "cpu" else None

  def from_params(self, params: Any) -> ts.TrainState:
    """Step-0 state around given params (init_from): fresh buffers, optimizer state and rng."""
    state = self.fresh_state()
    with jax.set_mesh(self.mesh):
      opt_state = jax.jit(self.tx.init, out_shardings=self.state_shardings.opt_state,
                          compiler_options=self._run_once_options())(params)
    return state.replace(params=params, opt_state=opt_state)

  def model(self, state: ts.TrainState) -> Any:
    """The model holding `state`'s parameters, in eval mode (dropout off): for samples and generation."""
    model = merge_model(self.graphdef, state.params, state.buffers, self.rng_vars)
    model.eval()
    return model

  def data_split(self) -> tuple[int, int]:
    """(process_index, process_count) the data iterators split the batch rows by."""
    return (0, 1) if self.shared_rows else (jax.process_index(), jax.process_count())

  def global_batch(self, batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
    """The (B, L) global arrays from this process's rows (or, with shared rows, from the whole global batch)."""
    batch = {k: batch[k] for k in self.batch_keys}  # the packer's segment_ids are derived again in the model
    if self.shared_rows:
      return {k: jax.make_array_from_callback(np.shape(v), self.batch_sharding,
                                              lambda index, v=np.asarray(v, np.int32): v[index])
              for k, v in batch.items()}
    return {k: jax.make_array_from_process_local_data(self.batch_sharding, np.asarray(v, np.int32))
            for k, v in batch.items()}

  def abstract_batch(self) -> dict[str, jax.ShapeDtypeStruct]:
    """The global batch as ShapeDtypeStructs with its sharding (to lower the train step without data)."""
    shape = (self.config.batch_size, self.config.seq_len)
    return {k: jax.ShapeDtypeStruct(shape, jnp.int32, sharding=self.batch_sharding) for k in self.batch_keys}

  def shardings_report(self, params: Any) -> str:
    """`shardings.txt` of a run: the mesh and batch layout, the logical-axis table on this mesh, and one row per
    parameter of `params` (`sharding.describe`)."""
    slice_len = self.config.seq_len // self.mesh.shape[mesh_axes.SEQUENCE_AXIS]
    return (f"# mesh {dict(self.mesh.shape)}; batches (B, L): {self.batch_sharding.spec} (B over the batch axes, L "
            f"over the sequence axis: {slice_len} tokens per slice)\n\n"
            + mesh_axes.logical_axes_table(self.mesh, self.rules) + "\n"
            + sharding.describe(params, self.state_shardings.params))

  def train_step_flops(self) -> float:
    """Analytic FLOPs of one train step (all chips), causal attention counted at half: the MFU numerator."""
    return self.config.model_family.flops_module().train_step_flops(
        self.model_config, self.config.batch_size, self.config.seq_len, causal_attention=True)
