"""The sharding vocabulary: the device mesh's four axes, one table of logical axes, and which mesh axes split a
dimension.

The mesh axes, outermost first (training/sharding.py builds the mesh):

  data      batch rows (pure data parallelism)
  sequence  contiguous slices of whole attention chunks (chunk parallelism, ops/sequence_parallel.py)
  fsdp      batch rows, and the weights' model width (fully sharded data parallelism)
  tensor    the widths tensor parallelism splits (heads, values, FFN hidden, vocabulary)

Every dimension the code shards carries a logical name, and LOGICAL_AXES maps each name to the mesh axes that may
split it. A name means one thing: parameter names are those of `nnx.Param` `logical_axes` metadata (the names of
the config's `logical_axis_rules` and of a checkpoint's shardings.txt); activation names are those of
`ops.partitioning.constrain`. An activation dimension that a weight also has is prefixed `act_` ("embed" is a
weight's model width, split over fsdp; "act_embed" is an activation's, kept whole, since FSDP gathers weights).
The two kinds are applied differently:

  param       all or nothing per dimension, size-1 axes kept in the spec (it then depends only on the rules and on
              divisibility); a dimension the axes do not divide is replicated (training/sharding.spec_for). The
              config's `logical_axis_rules` override these entries.
  activation  the longest prefix of the axes whose product divides the size, absent, size-1 and manual axes
              dropped (`split_axes`); a dimension no axis divides is left to XLA (ops/partitioning.py).

Nothing here imports jax: training/mesh_checks.py validates configs against these names before jax starts. The
functions take any mesh-like object: a `jax.sharding.Mesh` or `AbstractMesh` (`.axis_names`, `.shape` and, when
present, `.manual_axes`).
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple, Optional, Sequence, Union

# The only place in megalodon_jax where these names are written out (tests/test_import_graph.py checks).
DATA, SEQUENCE, FSDP, TENSOR = "data", "sequence", "fsdp", "tensor"
# Mesh order: the axes that move the most bytes innermost (tensor: activations every layer; fsdp: weights every
# layer), the data-like ones outermost.
MESH_AXES = (DATA, SEQUENCE, FSDP, TENSOR)
# The axes a batch's rows are split over, and the one its length is split over.
BATCH_AXES = (DATA, FSDP)
SEQUENCE_AXIS = SEQUENCE

PARAM, ACTIVATION = "param", "activation"
# The activation name that pins a dimension whole on every device (a None name leaves it to XLA).
REPLICATED = "replicated"


Target = Union[None, str, tuple[str, ...]]


class LogicalAxis(NamedTuple):
  """One row of LOGICAL_AXES: the kind of array the name labels (PARAM or ACTIVATION) and its mesh axes in the form
  of a `logical_axis_rules` target: None (whole on every device), one mesh axis, or a tuple of them in mesh order."""
  kind: str
  target: Target


LOGICAL_AXES: dict[str, LogicalAxis] = {
    # Parameters (nnx.Param logical_axes).
    "vocab": LogicalAxis(PARAM, TENSOR),
    "embed": LogicalAxis(PARAM, FSDP),
    "embed_out": LogicalAxis(PARAM, TENSOR),
    "value": LogicalAxis(PARAM, TENSOR),
    "qk": LogicalAxis(PARAM, TENSOR),
    "mlp": LogicalAxis(PARAM, TENSOR),
    "cema_ndim": LogicalAxis(PARAM, None),
    # Small; sharding them over fsdp makes XLA gather all chips' partial gradients at once.
    "cema": LogicalAxis(PARAM, None),
    "norm": LogicalAxis(PARAM, None),
    # Activations (ops.partitioning.constrain).
    "batch": LogicalAxis(ACTIVATION, BATCH_AXES),
    "length": LogicalAxis(ACTIVATION, SEQUENCE),
    "act_embed": LogicalAxis(ACTIVATION, None),
    "heads": LogicalAxis(ACTIVATION, TENSOR),
    "act_value": LogicalAxis(ACTIVATION, TENSOR),
    "act_mlp": LogicalAxis(ACTIVATION, TENSOR),
    "act_vocab": LogicalAxis(ACTIVATION, TENSOR),
    REPLICATED: LogicalAxis(ACTIVATION, None),
}
# The parameter rows as the config's default `logical_axis_rules`.
PARAM_RULES: tuple[tuple[str, Target], ...] = tuple(
    (name, row.target) for name, row in LOGICAL_AXES.items() if row.kind == PARAM)


def param_targets(rules: Sequence[tuple[str, Target]] = ()) -> dict[str, Target]:
  """{parameter name: target}: PARAM_RULES with already validated `rules` (mesh_checks.check_rules) laid over it.

  A rule may also name something outside the table; it then applies to parameters of that name.
  """
  return {**dict(PARAM_RULES), **dict(rules)}


def axes_of(names: Union[Target, Sequence[str]]) -> tuple[str, ...]:
  """Mesh axes as a tuple, from a logical name of LOGICAL_AXES (its target) or a target: None, a mesh axis name or
  a sequence of them."""
  if isinstance(names, str) and names in LOGICAL_AXES:
    names = LOGICAL_AXES[names].target
  return () if names is None else (names,) if isinstance(names, str) else tuple(names)


def split_axes(mesh: Any, size: int, axes: Union[str, Sequence[str]], *, exclude: Sequence[str] = ()
               ) -> tuple[str, ...]:
  """The mesh axes that actually split a dimension of `size`.

  Args:
    mesh: a Mesh or AbstractMesh (`jax.sharding.get_abstract_mesh()`, empty outside a mesh), or None (no mesh).
    size: the dimension's size.
    axes: the candidates, first preferred: a logical name of LOGICAL_AXES (its axes, in mesh order), a mesh axis
      name or a sequence of them.
    exclude: mesh axes already taken (by another dimension of the same array).
  Returns:
    The longest prefix of the candidates, once those absent from the mesh, of size 1, manual (inside a shard_map)
    or excluded are dropped, whose product divides `size` (batch 2 on data=2 x fsdp=4 splits over data only);
    () when none does.
  """
  names, manual = getattr(mesh, "axis_names", ()), getattr(mesh, "manual_axes", ())
  used = tuple(a for a in axes_of(axes) if a in names and mesh.shape[a] > 1 and a not in manual and a not in exclude)
  while used and size % math.prod(mesh.shape[a] for a in used):
    used = used[:-1]
  return used


def sequence_axis(mesh: Any, length: int, chunk_size: int = 1) -> Optional[str]:
  """SEQUENCE_AXIS when it splits a dimension of `length` into slices of whole `chunk_size` chunks, else None.

  None outside a mesh, without the axis or with size 1, inside a shard_map that made it manual, and when the slices
  would cut a chunk (a decoding step of one token, say).
  """
  whole = length % chunk_size == 0 and split_axes(mesh, length // chunk_size, SEQUENCE_AXIS)
  return SEQUENCE_AXIS if whole else None


def logical_axes_table(mesh: Any, rules: Sequence[tuple[str, Target]] = ()) -> str:
  """LOGICAL_AXES as text on `mesh`, one row per logical name: kind, mesh axes and their sizes on the mesh.

  Args:
    mesh: a Mesh, an AbstractMesh or a dict {mesh axis: size} (an absent axis counts as size 1).
    rules: the config's validated `logical_axis_rules`; they replace the parameter rows they name (names outside
      the table get a row of their own).
  Returns:
    Aligned columns with a header line, newline-terminated. The sizes show what the axes can split before
    divisibility (a parameter dimension they do not divide stays whole).
  """
  shape = dict(getattr(mesh, "shape", mesh))
  params = param_targets(rules)
  rows = [("logical axis", "kind", "mesh axes", "sizes")]
  for name in {**LOGICAL_AXES, **params}:
    kind = LOGICAL_AXES[name].kind if name in LOGICAL_AXES else PARAM
    axes = axes_of(params[name] if kind == PARAM else LOGICAL_AXES[name].target)
    sizes = [shape.get(a, 1) for a in axes]
    count = " x ".join(map(str, sizes)) + (f" = {math.prod(sizes)}" if len(sizes) > 1 else "")
    rows.append((name, kind, ", ".join(axes) or "(whole)", count or "1"))
  widths = [max(len(r[i]) for r in rows) for i in range(3)]
  return "\n".join("  ".join(c.ljust(w) for c, w in zip(r[:3], widths)) + "  " + r[3] for r in rows) + "\n"
