"""The programs the planner compiles, built exactly as the trainer and the generator build them.

`train_step` is `training.trainer._Run`'s jitted step (same mesh from `cfg.mesh`, same parameter, optimizer-state
and batch shardings, donation, remat, micro-batching, loss pieces) traced on abstract arguments. `prefill` and
`decode` are the generator's two programs (a prompt piece, one token) on the same mesh: parameters sharded as in
training, the streaming cache split over the batch.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P

from megalodon_jax import flops as flops_lib
from megalodon_jax.checkpoints.model_state import merge_model
from megalodon_jax.config import MegalodonConfig
from megalodon_jax.inference.generation import DEFAULT_PREFILL_TOKENS
from megalodon_jax.training.trainer import _Run

PROGRAMS = ("train_step", "prefill", "decode")


@dataclasses.dataclass
class Program:
  """A jitted function and the abstract arguments to trace it with.

  name: one of PROGRAMS.  fn: the jitted function.  args: ShapeDtypeStructs carrying shardings.
  analytic_flops: FLOPs per chip from megalodon_jax/flops.py.  shape: what the program processes, for the report
  (batch, sequence length, sequences per chip).
  """
  name: str
  fn: Callable
  args: tuple
  analytic_flops: float
  shape: dict


def _sds(shape, dtype, sharding) -> jax.ShapeDtypeStruct:
  return jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)


def build_run(cfg: Any, devices: list, vocab_size: int) -> _Run:
  """The trainer's run over `devices` (abstract ones are fine), validated; call `run.build()` under its mesh."""
  return _Run(cfg, None, devices, vocab_size=vocab_size)


def train_program(run: _Run) -> Program:
  """The train step of `run` (after `run.build()`), on a (batch_size, seq_len) int32 batch."""
  cfg = run.cfg
  batch = _sds((cfg.batch_size, cfg.seq_len), jnp.int32, run.batch_sharding)
  shards = run.mesh.shape["data"] * run.mesh.shape["fsdp"] * run.mesh.shape.get("sequence", 1)
  chips = len(run.devices)
  flops = flops_lib.train_step_flops(run.model_cfg, cfg.batch_size, cfg.seq_len, causal_attention=True) / chips
  # With a sequence axis a chip holds a slice of a sequence: seqs_per_chip is then a fraction.
  return Program("train_step", run.train_step, (run.abstract_state, {k: batch for k in run.batch_keys}), flops,
                 {"batch": cfg.batch_size, "seq_len": cfg.seq_len, "seqs_per_chip": cfg.batch_size / shards,
                  "grad_accum_steps": cfg.grad_accum_steps})


def _cache_shardings(cache: Any, mesh, batch: int) -> Any:
  """Every cache array split over data x fsdp on its leading (batch) dimension when it divides; scalars replicated."""
  axes = tuple(a for a in ("data", "fsdp") if mesh.shape[a] > 1)
  size = 1
  for a in axes:
    size *= mesh.shape[a]

  def one(x):
    if x.ndim == 0 or not axes or batch % size:
      return NamedSharding(mesh, P())
    return NamedSharding(mesh, P(axes, *([None] * (x.ndim - 1))))

  return jax.tree.map(one, cache)


def inference_programs(run: _Run, batch: Optional[int] = None, prefill_tokens: Optional[int] = None) -> list[Program]:
  """The generator's prefill (a piece of `prefill_tokens`, default its own piece size) and one-token decode step.

  batch: sequences generated at once (default one per chip along data x fsdp).
  """
  model_cfg: MegalodonConfig = run.model_cfg
  mesh = run.mesh
  shards = mesh.shape["data"] * mesh.shape["fsdp"]
  batch = batch or shards
  piece = prefill_tokens or model_cfg.chunk_size * max(1, DEFAULT_PREFILL_TOKENS // model_cfg.chunk_size)
  graphdef, rng_vars = run.graphdef, run.rng_vars
  params = run.abstract_state["params"]
  buffers = run.abstract_state["buffers"]

  def model_of(p, b):
    model = merge_model(graphdef, p, b, rng_vars)
    model.eval()
    return model

  cache_abstract = jax.eval_shape(lambda p, b: model_of(p, b).init_cache(batch), params, buffers)
  cache_sh = _cache_shardings(cache_abstract, mesh, batch)
  cache = jax.tree.map(lambda a, s: _sds(a.shape, a.dtype, s), cache_abstract, cache_sh)
  ids_sh = NamedSharding(mesh, P(("data", "fsdp") if batch % shards == 0 else None, None))
  param_sh = run.state_shardings["params"]
  buffer_sh = run.state_shardings["buffers"]

  def prefill(p, b, c, ids):
    return model_of(p, b)(ids, cache=c)[1]

  def decode(p, b, c, ids):
    logits, c = model_of(p, b)(ids, cache=c)
    return logits[:, -1], c

  logits_sh = NamedSharding(mesh, P(("data", "fsdp") if batch % shards == 0 else None, None))
  prefill_fn = jax.jit(prefill, in_shardings=(param_sh, buffer_sh, cache_sh, ids_sh), out_shardings=cache_sh,
                       donate_argnums=2)
  decode_fn = jax.jit(decode, in_shardings=(param_sh, buffer_sh, cache_sh, ids_sh),
                      out_shardings=(logits_sh, cache_sh), donate_argnums=2)
  chips = len(run.devices)
  out = []
  for name, fn, length in (("prefill", prefill_fn, piece), ("decode", decode_fn, 1)):
    ids = _sds((batch, length), jnp.int32, ids_sh)
    flops = flops_lib.forward_flops(model_cfg, batch, length, causal_attention=True)["matmul"] / chips
    out.append(Program(name, fn, (params, buffers, cache, ids), flops,
                       {"batch": batch, "seq_len": length, "seqs_per_chip": batch / shards}))
  return out
