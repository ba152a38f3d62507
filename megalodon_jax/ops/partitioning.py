"""Activation layouts: sharding constraints that pin where each activation lives on the device mesh.

Parameters carry logical axes (training/sharding.py maps them to mesh axes); activations get theirs here. Without
these pins XLA's sharding propagation is free to follow a parameter's layout into the activations: an LM head
sharded on its input (embed) dimension over `fsdp`, the axis the batch is also split over, leads it to split the
contraction across chips and hand every chip the logits of the whole global batch. The compiled TPU program of
the tiny config showed exactly that (`bf16[8,128,32000]` on each of 4 chips, where 2 sequences belong). So the
model states, at a few points, the layout it wants:

  batch  -> ("data", "fsdp")   the devices the batch is split over
  length -> "sequence"         contiguous slices of whole chunks (chunk parallelism; whole without the axis)
  embed  -> None               activations keep the model width whole; FSDP gathers weights instead
  heads, value, mlp, vocab -> "tensor"   the widths tensor parallelism splits

A dimension whose size the named axes do not divide stays unconstrained there (XLA chooses), and everything is a
no-op outside a mesh (`jax.set_mesh`), so the model runs unchanged on one device and in tests.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import jax
from jax.sharding import PartitionSpec as P

# Logical activation axis -> mesh axes, in mesh-axis order.
ACTIVATION_RULES: dict[str, tuple[str, ...]] = {
    "batch": ("data", "fsdp"),
    "length": ("sequence",),
    "embed": (),
    "heads": ("tensor",),
    "value": ("tensor",),
    "mlp": ("tensor",),
    "vocab": ("tensor",),
}
# A dimension named None is left to XLA; `REPLICATED` forces it whole on every device.
REPLICATED = "replicated"


def activation_spec(shape: Sequence[int], axes: Sequence[Optional[str]], mesh) -> Optional[P]:
  """The PartitionSpec pinning an activation of `shape` with logical `axes` on `mesh`, or None if nothing to pin.

  Args:
    shape: the array's shape.
    axes: one logical name per dimension (keys of ACTIVATION_RULES, REPLICATED, or None = unconstrained).
    mesh: an (abstract) mesh; axes it lacks are dropped, size-1 axes are dropped.
  Returns:
    P(...) with P.UNCONSTRAINED for dimensions left to XLA, or None when no dimension is sharded or replicated
    on purpose (a constraint would only restrict XLA for nothing).
  """
  if len(shape) != len(axes):
    raise ValueError(f"activation axes {tuple(axes)} do not match the shape {tuple(shape)}")
  names = set(mesh.axis_names)
  spec, used, pinned = [], set(), False
  for size, name in zip(shape, axes):
    if name is None:
      spec.append(P.UNCONSTRAINED)
      continue
    if name == REPLICATED:
      spec.append(None)
      pinned = True
      continue
    if name not in ACTIVATION_RULES:
      raise ValueError(f"unknown activation axis {name!r}; known: {sorted(ACTIVATION_RULES)} or {REPLICATED!r}")
    mesh_axes = tuple(a for a in ACTIVATION_RULES[name] if a in names and mesh.shape[a] > 1 and a not in used)
    # Shard over the longest prefix of the axes whose product divides the dimension (batch 2 on data=2 x fsdp=4
    # still splits over data).
    while mesh_axes and size % math.prod(mesh.shape[a] for a in mesh_axes):
      mesh_axes = mesh_axes[:-1]
    if not mesh_axes:
      spec.append(None if not ACTIVATION_RULES[name] else P.UNCONSTRAINED)
      pinned = pinned or not ACTIVATION_RULES[name]
      continue
    used.update(mesh_axes)
    spec.append(mesh_axes[0] if len(mesh_axes) == 1 else mesh_axes)
    pinned = True
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
