"""The programs the planner compiles, built exactly as the trainer and the generator build them.

`train_step` is `training.program.TrainProgram`'s jitted step, the trainer's own (same mesh from `cfg.mesh`, same
parameter, optimizer-state and batch shardings, donation, remat, micro-batching, loss pieces), traced on abstract
arguments. `prefill` and `decode` are the generator's two programs (a prompt piece, one token) on the same mesh:
parameters sharded as in training, the streaming cache split over the batch.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P

from megalodon_jax import mesh_axes
from megalodon_jax.inference.generation import default_prefill_piece
from megalodon_jax.training.program import TrainProgram


@dataclasses.dataclass
class Program:
  """A jitted function and the abstract arguments to trace it with.

  name: "train_step", "prefill" or "decode".  fn: the jitted function.  args: ShapeDtypeStructs carrying shardings.
  analytic_flops: FLOPs per chip from megalodon_jax/flops.py.  shape: what the program processes, for the report
  (batch, sequence length, sequences per chip).
  """
  name: str
  fn: Callable
  args: tuple
  analytic_flops: float
  shape: dict


def _batch_shards(mesh) -> int:
  return math.prod(mesh.shape[a] for a in mesh_axes.BATCH_AXES)


def train_program(run: TrainProgram) -> Program:
  """The train step of `run` on a (batch_size, seq_len) int32 batch."""
  cfg = run.config
  shards = _batch_shards(run.mesh) * run.mesh.shape[mesh_axes.SEQUENCE_AXIS]
  # With a sequence axis a chip holds a slice of a sequence: seqs_per_chip is then a fraction.
  return Program("train_step", run.train_step, (run.abstract_state, run.abstract_batch()),
                 run.train_step_flops() / len(run.devices),
                 {"batch": cfg.batch_size, "seq_len": cfg.seq_len, "seqs_per_chip": cfg.batch_size / shards,
                  "grad_accum_steps": cfg.grad_accum_steps})


def _batch_spec(mesh, batch: int, ndim: int) -> NamedSharding:
  """A (batch, ...) array split over all the batch axes on its first dimension when they divide it, else
  replicated."""
  axes = mesh_axes.BATCH_AXES if batch % _batch_shards(mesh) == 0 else None
  return NamedSharding(mesh, P(axes, *([None] * (ndim - 1))))


def _tree_bytes(tree) -> int:
  return sum(math.prod(x.shape) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def inference_programs(run: TrainProgram, batch: Optional[int] = None,
                       prefill_tokens: Optional[int] = None) -> list[Program]:
  """The generator's prefill (a piece of `prefill_tokens`, default its own piece size) and one-token decode step.

  batch: sequences generated at once (default one per chip along the batch axes).
  """
  model_cfg = run.model_config
  mesh = run.mesh
  shards = _batch_shards(mesh)
  batch = batch or shards
  piece = prefill_tokens or default_prefill_piece(model_cfg.chunk_size)
  params, buffers = run.abstract_state.params, run.abstract_state.buffers
  state_of = lambda p, b: run.abstract_state.replace(params=p, buffers=b)  # noqa: E731

  # A cache that grows with the context (Llama's KV cache) holds the training length (the context the model was
  # trained for), or the prefill piece if that is longer; Megalodon's constant-size cache ignores it.
  context = max(run.config.seq_len, piece)
  cache_abstract = jax.eval_shape(lambda p, b: run.model(state_of(p, b)).init_cache(batch, max_length=context),
                                  params, buffers)
  # Every cache array split over the batch axes on its leading (batch) dimension when they divide it; scalars
  # replicated.
  cache_sh = jax.tree.map(lambda x: _batch_spec(mesh, batch, x.ndim) if x.ndim else NamedSharding(mesh, P()),
                          cache_abstract)
  cache = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), cache_abstract, cache_sh)
  ids_sh = _batch_spec(mesh, batch, 2)
  in_sh = (run.state_shardings.params, run.state_shardings.buffers, cache_sh, ids_sh)

  def prefill(p, b, c, ids):
    return run.model(state_of(p, b))(ids, cache=c)[1]

  def decode(p, b, c, ids):
    logits, c = run.model(state_of(p, b))(ids, cache=c)
    return logits[:, -1], c

  flops_lib = run.config.model_family.flops_module()
  out = []
  for fn, out_sh, length in ((prefill, cache_sh, piece), (decode, (ids_sh, cache_sh), 1)):
    jitted = jax.jit(fn, in_shardings=in_sh, out_shardings=out_sh, donate_argnums=2)
    ids = jax.ShapeDtypeStruct((batch, length), jnp.int32, sharding=ids_sh)
    flops = flops_lib.forward_flops(model_cfg, batch, length, causal_attention=True)["matmul"] / len(run.devices)
    out.append(Program(fn.__name__, jitted, (params, buffers, cache, ids), flops,
                       {"batch": batch, "seq_len": length, "seqs_per_chip": batch / shards,
                        "cache_bytes_per_seq": _tree_bytes(cache_abstract) // batch}))
  return out
