"""Activation layouts: sharding constraints that pin where each activation lives on the device mesh.

Parameters carry logical axes (training/sharding.py maps them to mesh axes); activations get theirs here. Without
these pins XLA's sharding propagation is free to follow a parameter's layout into the activations: an LM head
sharded on its input (embed) dimension over `fsdp`, the axis the batch is also split over, leads it to split the
contraction across chips and hand every chip the logits of the whole global batch. The compiled TPU program of
the tiny config showed exactly that (`bf16[8,128,32000]` on each of 4 chips, where 2 sequences belong). So the
model states, at a few points, the layout it wants, in the activation names of mesh_axes.LOGICAL_AXES:

  batch  -> data, fsdp   the devices the batch is split over
  length -> sequence     contiguous slices of whole chunks (chunk parallelism; whole without the axis)
  act_embed, replicated -> whole   activations keep the model width whole; FSDP gathers weights instead
  heads, act_value, act_mlp, act_vocab -> tensor   the widths tensor parallelism splits

A dimension whose size the named axes do not divide stays unconstrained there (XLA chooses), and everything is a
no-op outside a mesh (`jax.set_mesh`), so the model runs unchanged on one device and in tests.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import jax
from jax.sharding import PartitionSpec as P

from megalodon_jax import mesh_axes
from megalodon_jax.mesh_axes import LOGICAL_AXES


def activation_spec(shape: Sequence[int], axes: Sequence[Optional[str]], mesh) -> Optional[P]:
  """The PartitionSpec pinning an activation of `shape` with logical `axes` on `mesh`, or None if nothing to pin.

  Args:
    shape: the array's shape.
    axes: one name per dimension: an activation name of mesh_axes.LOGICAL_AXES, or None = unconstrained.
    mesh: an (abstract) mesh; each dimension takes `mesh_axes.split_axes` of its name's axes, a mesh axis at
      most once per array.
  Returns:
    P(...) with P.UNCONSTRAINED for dimensions left to XLA, or None when no dimension is sharded or replicated
    on purpose (a constraint would only restrict XLA for nothing).
  """
  if len(shape) != len(axes):
    raise ValueError(f"activation axes {tuple(axes)} do not match the shape {tuple(shape)}")
  spec, used, pinned = [], set(), False
  for size, name in zip(shape, axes):
    if name is None:
      spec.append(P.UNCONSTRAINED)
      continue
    row = LOGICAL_AXES.get(name)
    if row is None or row.kind != mesh_axes.ACTIVATION:
      known = sorted(n for n, r in LOGICAL_AXES.items() if r.kind == mesh_axes.ACTIVATION)
      raise ValueError(f"unknown activation axis {name!r}; known: {known}")
    split = mesh_axes.split_axes(mesh, size, row.target, exclude=used)
    used.update(split)
    if split:
      spec.append(split[0] if len(split) == 1 else split)
    else:  # no axes at all: whole on purpose; axes that do not divide the size: left to XLA
      spec.append(None if row.target is None else P.UNCONSTRAINED)
    pinned = pinned or bool(split) or row.target is None
  if not pinned or all(s is None for s in spec):
    return None
  return P(*spec)


def constrain(x: jax.Array, axes: Sequence[Optional[str]]) -> jax.Array:
  """`x` with its layout pinned to `axes` on the ambient mesh (`jax.set_mesh`); unchanged outside a mesh."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or math.prod(mesh.shape.values()) == 1:
    return x
  spec = activation_spec(x.shape, axes, mesh)
  if spec is None:
    return x
  return jax.lax.with_sharding_constraint(x, spec)
