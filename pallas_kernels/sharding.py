"""Which mesh axes a kernel call runs its `jax.shard_map` over: Mosaic and Triton kernels cannot be partitioned by
XLA, so a sharded caller names the axes that split its arrays' batch and one other dimension (heads, channels)."""

from __future__ import annotations

import math
from typing import Optional, Sequence

import jax


def axes(names: Optional[Sequence[str] | str]) -> tuple[str, ...]:
  """Mesh axis names as a tuple: None -> (), one name -> (name,)."""
  if names is None:
    return ()
  return (names,) if isinstance(names, str) else tuple(names)


def shard_plan(mesh, batch: int, other: int, batch_axes, other_axes, other_name: str):
  """(mesh or None, batch axes, other axes) actually used for arrays with `batch` rows and an `other` dimension.

  Args:
    mesh: a Mesh or AbstractMesh; None: the abstract mesh in context.
    batch_axes, other_axes: the caller's axes (None, a name or a sequence) for the two dimensions.
    other_name: the caller's keyword for `other_axes`, for the error messages.
  Returns:
    Each group of axes whole or not at all: () for a dimension whose size the group's product does not divide
    (it stays replicated: correct, only slower). (None, (), ()) when nothing is split: no shard_map needed.
  Raises:
    ValueError: an axis absent from the mesh, or one named for both dimensions.
  """
  if mesh is None:
    mesh = jax.sharding.get_abstract_mesh()
  batch_axes, other_axes = axes(batch_axes), axes(other_axes)
  if mesh is None or mesh.empty or not (batch_axes or other_axes):
    return None, (), ()
  missing = [a for a in batch_axes + other_axes if a not in mesh.axis_names]
  if missing:
    raise ValueError(f"sharding axes {missing} are not axes of the mesh {tuple(mesh.axis_names)}")
  if set(batch_axes) & set(other_axes):
    raise ValueError(f"batch_axes {batch_axes} and {other_name} {other_axes} must not share a mesh axis")
  size = lambda group: math.prod(mesh.shape[a] for a in group)  # pylint: disable=unnecessary-lambda-assignment
  batch_axes = batch_axes if batch % size(batch_axes) == 0 else ()
  other_axes = other_axes if other % size(other_axes) == 0 else ()
  if size(batch_axes) * size(other_axes) == 1:
    return None, (), ()
  return mesh, batch_axes, other_axes
