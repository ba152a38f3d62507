"""Device mesh and shardings from the config: parameters and optimizer state (FSDP / tensor), batches (data).

The mesh has the four named axes of mesh_axes.MESH_AXES (data, sequence, fsdp, tensor), sized by `mesh.data`,
`mesh.sequence`, `mesh.fsdp`, `mesh.tensor` (one may be -1: all remaining devices; `mesh.sequence` defaults to 1
when a config lacks it). The order puts the axes that move the most bytes innermost (tensor: activations every
layer; fsdp: weights every layer) and the data-like axes outermost (sequence: a few small per-layer summaries and
the once-per-step gradient reduction, like data). Every `nnx.Param` carries `logical_axes` metadata, one
logical name (or None) per dimension; the parameter rows of mesh_axes.LOGICAL_AXES, overridden name by name by
the config's `logical_axis_rules`, map each name to a mesh axis, a tuple of mesh axes or None. From those:
- a dimension whose size is not divisible by its mesh-axis size (the product for a tuple) stays replicated;
- a mesh axis shards at most one dimension of an array (a later dimension that would reuse one stays replicated);
- names absent from both, and variables without `logical_axes` (Buffers, RNG state), are replicated;
- mesh axes of size 1 are kept in the specs: a spec depends only on the rules and on divisibility, not on how
  many devices the run has (sharding over a size-1 axis is replication anyway).
Batches (B, L) are split over data x fsdp on B and over `sequence` on L (each shard a contiguous slice of whole
attention chunks; ops/sequence_parallel.py carries the CEMA and TimestepNorm states across the slices).
Parameters are replicated over `sequence` (a data-like axis: their gradients are summed over it by the global
loss mean). The optimizer state follows the params it mirrors: its moments are `nnx.Param`s with the same `logical_axes`
(optax maps over the Variables), so `state_shardings` places them like their parameters.

Use the mesh with `with jax.set_mesh(mesh):` (`jax.sharding.use_mesh` was removed in jax 0.7.1, and the bare
`with mesh:` is deprecated after 0.10). Every sharding built here is a concrete NamedSharding, so jit
in/out_shardings work with or without that context.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Optional, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from megalodon_jax import mesh_axes
from megalodon_jax.errors import ShardingError
from megalodon_jax.training.mesh_checks import (  # noqa: F401  (re-exported: sharding's public names)
    BATCH_AXES, MESH_AXES, SEQUENCE_AXIS, Rules, check_batch, check_rules, check_sequence, mesh_shape)

def make_mesh(mesh_cfg: Any, devices: Optional[Sequence[jax.Device]] = None) -> Mesh:
  """The (data, sequence, fsdp, tensor) mesh over `devices` (default: all of `jax.devices()`), every axis AxisType.Auto.

  Auto (not jax.make_mesh's default, Explicit) because the model is written without sharding annotations: XLA
  propagates the param and batch shardings through it.
  """
  devices = list(jax.devices() if devices is None else devices)
  shape = mesh_shape(mesh_cfg, len(devices))
  return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES), devices=devices)


def spec_for(logical_axes: Optional[Sequence[Optional[str]]], shape: Sequence[int], rules: Any,
             mesh: Mesh) -> P:
  """The PartitionSpec of an array of `shape` whose dimensions carry `logical_axes`.

  Args:
    logical_axes: One logical name (or None) per dimension; None for the whole array (Buffers) replicates it.
    shape: The array's shape, same length as `logical_axes`.
    rules: Logical axis rules (see `check_rules`), laid over mesh_axes.PARAM_RULES.
    mesh: The mesh giving each mesh axis's size.
  Returns:
    A PartitionSpec with one entry per dimension (None = replicated there), or P() if `logical_axes` is None.
  """
  if logical_axes is None:
    return P()
  if len(logical_axes) != len(shape):
    raise ShardingError(f"logical_axes {tuple(logical_axes)} do not match the array's shape {tuple(shape)}")
  table = mesh_axes.param_targets(check_rules(rules))
  used: set[str] = set()
  spec = []
  for name, size in zip(logical_axes, shape):
    target = table.get(name) if name is not None else None
    names = () if target is None else (target,) if isinstance(target, str) else target
    # All-or-nothing per dimension: partly sharding it over the unused axes of a tuple would be a surprise.
    if not names or used.intersection(names) or size % math.prod(mesh.shape[n] for n in names):
      spec.append(None)
      continue
    used.update(names)
    spec.append(target)
  return P(*spec)


def _is_variable(x: Any) -> bool:
  return isinstance(x, nnx.Variable)


def state_shardings(state: Any, rules: Any, mesh: Mesh) -> Any:
  """One NamedSharding per array of `state`, from each Variable's `logical_axes` metadata.

  Args:
    state: An `nnx.State` (concrete arrays or ShapeDtypeStructs, e.g. from `nnx.eval_shape` + `nnx.split`), or any
      pytree of Variables / arrays. Leaves outside a Variable with `logical_axes` are replicated.
  Returns:
    The same structure with each Variable's value replaced by its NamedSharding (Variables and their metadata kept,
    so it matches `state` leaf for leaf in `jax.tree.map` and as jit in/out_shardings).
  """
  rules = check_rules(rules)

  def one(x: Any) -> Any:
    if _is_variable(x):
      value = x.get_raw_value()
      if not jax.tree.leaves(value):  # optax.masked leaves MaskedNode() (no array) where the mask is False
        return x
      return x.replace(NamedSharding(mesh, spec_for(x.get_metadata().get("logical_axes"), np.shape(value), rules,
                                                    mesh)))
    return NamedSharding(mesh, P())

  return jax.tree.map(one, state, is_leaf=_is_variable)


def with_shardings(abstract: Any, shardings: Any) -> Any:
  """`abstract` (ShapeDtypeStructs, e.g. from `jax.eval_shape`) with each leaf's sharding from `shardings`, a tree of
  the same structure (`state_shardings` of it)."""
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Sharding of a (B, L) batch: B split over data x fsdp, L over sequence (a contiguous slice per shard)."""
  return NamedSharding(mesh, P(BATCH_AXES, SEQUENCE_AXIS if SEQUENCE_AXIS in mesh.axis_names else None))


def rows_shared_across_processes(devices: np.ndarray, axis_names: Sequence[str]) -> bool:
  """Whether some batch rows live on devices of more than one process (e.g. a `sequence` axis spanning hosts).

  Each process's data iterator reads whole rows (batch_size / process_count of them); that only fits the batch
  sharding when every group of devices holding the same rows (same data and fsdp coordinates) sits in one process.
  Args:
    devices: the mesh's device array (`mesh.devices`), one dimension per axis; anything with `process_index`.
    axis_names: its axis names.
  """
  devices = np.asarray(devices)
  row_axes = [i for i, a in enumerate(axis_names) if a in BATCH_AXES]
  other = [i for i in range(devices.ndim) if i not in row_axes]
  groups = np.transpose(devices, row_axes + other).reshape(
      math.prod(devices.shape[i] for i in row_axes), -1)
  return any(len({d.process_index for d in group}) > 1 for group in groups)


def replicated(mesh: Mesh) -> NamedSharding:
  """A full copy on every device of the mesh (scalars, step counters, metrics)."""
  return NamedSharding(mesh, P())


def _value(x: Any) -> Any:
  return x.get_raw_value() if _is_variable(x) else x


def describe(state: Any, shardings: Any) -> str:
  """A text table, one row per array: path, shape, logical axes, PartitionSpec (for logs and shardings.txt)."""
  rows = [("path", "shape", "logical axes", "spec")]
  leaves = jax.tree_util.tree_flatten_with_path(state, is_leaf=_is_variable)[0]
  specs = jax.tree_util.tree_leaves(shardings, is_leaf=_is_variable)
  for (path, leaf), sh in zip(leaves, specs):
    axes = leaf.get_metadata().get("logical_axes") if _is_variable(leaf) else None
    name = "/".join(str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in path)
    sh = _value(sh)
    rows.append((name, str(tuple(np.shape(_value(leaf)))), str(axes), str(getattr(sh, "spec", sh))))
  widths = [max(len(r[i]) for r in rows) for i in range(3)]
  return "\n".join("  ".join(c.ljust(w) for c, w in zip(r[:3], widths)) + "  " + r[3] for r in rows) + "\n"


def sharded_init(make_model: Callable[[], nnx.Module], rules: Any, mesh: Mesh) -> nnx.Module:
  """Builds `make_model()` with every variable created directly on its sharding (no full copy on one device).

  The model is traced once abstractly (`nnx.eval_shape`) for its shapes and `logical_axes`, then built inside
  `jax.jit` with those shardings as out_shardings, so each device only ever materialises its own shards.
  `make_model` must be deterministic (seeded Rngs inside), as it runs twice.
  """
  abstract = nnx.eval_shape(make_model)
  graphdef, abstract_state = nnx.split(abstract)
  shardings = state_shardings(abstract_state, rules, mesh)

  def init() -> nnx.State:
    return nnx.split(make_model())[1]

  return nnx.merge(graphdef, jax.jit(init, out_shardings=shardings)())
