"""The mesh checks of a training config that need no device and no jax: the mesh sizes (`mesh_shape`), the
logical axis rules (`check_rules`) and how batch and sequence split over the mesh (`check_batch`,
`check_sequence`). Command lines run them before jax starts (sharding.py has the rest); the axis names are
mesh_axes.py's.
"""

from __future__ import annotations

import math
import numbers
from typing import Any

from megalodon_jax.errors import ShardingError
from megalodon_jax.mesh_axes import BATCH_AXES, DATA, FSDP, MESH_AXES, SEQUENCE_AXIS

Rules = tuple[tuple[str, Any], ...]


def mesh_shape(mesh_cfg: Any, num_devices: int) -> tuple[int, int, int, int]:
  """Mesh sizes in MESH_AXES order (data, sequence, fsdp, tensor), a -1 filled with the remaining devices.

  Args:
    mesh_cfg: Anything with int attributes `data`, `fsdp`, `tensor` and optionally `sequence` (default 1): the
      config's `mesh` ConfigDict.
    num_devices: Devices the mesh must use, all of them.
  Returns:
    (data, sequence, fsdp, tensor), positive ints whose product is `num_devices`.
  Raises:
    ShardingError: a size is not an int >= 1 or -1, more than one is -1, or the sizes do not multiply to
      `num_devices`; the message names the `mesh.*` key(s).
  """
  sizes = []
  for axis in MESH_AXES:
    size = getattr(mesh_cfg, axis, 1) if axis == SEQUENCE_AXIS else getattr(mesh_cfg, axis)
    if isinstance(size, bool) or not isinstance(size, numbers.Integral) or (size < 1 and size != -1):
      raise ShardingError(f"mesh.{axis} must be an int >= 1, or -1 for all remaining devices; got {size!r}")
    sizes.append(int(size))
  auto = [a for a, s in zip(MESH_AXES, sizes) if s == -1]
  if len(auto) > 1:
    raise ShardingError(f"only one of mesh.data/mesh.sequence/mesh.fsdp/mesh.tensor may be -1; got -1 for "
                        f"{', '.join('mesh.' + a for a in auto)}")
  fixed = math.prod(s for s in sizes if s != -1)
  shown = " x ".join(f"mesh.{a}={s}" for a, s in zip(MESH_AXES, sizes))
  if auto:
    if num_devices % fixed:
      raise ShardingError(f"mesh.{auto[0]}=-1 needs the other sizes to divide the {num_devices} devices, but "
                          f"{shown} fixes {fixed}; choose sizes whose product divides {num_devices}")
    sizes[MESH_AXES.index(auto[0])] = num_devices // fixed
  elif fixed != num_devices:
    raise ShardingError(f"the mesh {shown} has {fixed} devices but {num_devices} are available; make the product "
                        f"equal {num_devices}, e.g. set one of mesh.data/mesh.sequence/mesh.fsdp/mesh.tensor to -1")
  return tuple(sizes)


def _mesh_target(target: Any) -> Any:
  """None, a mesh-axis name or a non-empty tuple of distinct names; lists (from ConfigDict) become tuples."""
  if target is None or isinstance(target, str):
    names = () if target is None else (target,)
  elif isinstance(target, (list, tuple)) and target and all(isinstance(t, str) for t in target):
    names = tuple(target)
  else:
    raise ShardingError(f"logical_axis_rules: a target must be None, a mesh axis name or a tuple of them; got "
                        f"{target!r}")
  bad = [n for n in names if n not in MESH_AXES]
  if bad or len(set(names)) != len(names):
    raise ShardingError(f"logical_axis_rules: target {target!r} must name distinct mesh axes from {MESH_AXES}")
  return target if target is None or isinstance(target, str) else names


def check_rules(rules: Any) -> Rules:
  """Validates and normalises `logical_axis_rules`: ((logical name, None | mesh axis | tuple of mesh axes), ...).

  Raises:
    ShardingError: not a sequence of pairs, a name listed twice, or a target that is not a mesh axis.
  """
  if isinstance(rules, (str, bytes)) or not isinstance(rules, (list, tuple)):
    raise ShardingError(f"logical_axis_rules must be a sequence of (logical name, mesh axis) pairs; got {rules!r}")
  out, seen = [], set()
  for rule in rules:
    if not isinstance(rule, (list, tuple)) or len(rule) != 2 or not isinstance(rule[0], str):
      raise ShardingError(f"logical_axis_rules: each rule must be a (logical name, mesh axis) pair; got {rule!r}")
    if rule[0] in seen:
      raise ShardingError(f"logical_axis_rules: logical name {rule[0]!r} is listed twice; keep one rule for it")
    seen.add(rule[0])
    out.append((rule[0], _mesh_target(rule[1])))
  return tuple(out)


def _nearest(value: int, valid) -> str:
  """'a and b' (or 'a'): the closest values below and above `value` among `valid` (ascending ints)."""
  below = [v for v in valid if v < value][-1:]
  above = [v for v in valid if v > value][:1]
  return " and ".join(str(v) for v in below + above) or "none"


def check_batch(batch_size: int, grad_accum_steps: int, mesh: Any) -> None:
  """Checks that each micro-batch (batch_size / grad_accum_steps sequences) splits evenly over data x fsdp.

  mesh: a Mesh, or a dict of mesh-axis sizes (`mesh.shape`); a missing `sequence` axis counts as 1.
  Raises:
    ShardingError: naming batch_size, grad_accum_steps and the mesh sizes (mesh.sequence included: it splits the
      length, not the batch), with the nearest valid batch sizes.
  """
  shape = dict(getattr(mesh, "shape", mesh))
  if batch_size % grad_accum_steps:
    raise ShardingError(f"batch_size={batch_size} must be divisible by grad_accum_steps={grad_accum_steps}")
  micro = batch_size // grad_accum_steps
  shards = math.prod(shape[a] for a in BATCH_AXES)
  if micro % shards:
    step = shards * grad_accum_steps
    near = _nearest(batch_size, [step * k for k in range(1, batch_size // step + 2)])
    raise ShardingError(f"batch_size / grad_accum_steps = {batch_size} / {grad_accum_steps} = {micro} sequences "
                        f"per micro-batch must be divisible by mesh.data x mesh.fsdp = {shape[DATA]} x "
                        f"{shape[FSDP]} = {shards} (mesh.sequence={shape.get(SEQUENCE_AXIS, 1)} splits the length, "
                        f"not the batch); the nearest valid batch_size values are {near}; or change grad_accum_steps "
                        f"or the mesh")


def check_sequence(seq_len: int, chunk_size: int, mesh: Any) -> None:
  """Checks that a (B, seq_len) batch splits over `mesh.sequence` into slices of whole attention chunks.

  Attention never crosses a chunk, so chunks must not cross a shard boundary: seq_len must be a multiple of
  mesh.sequence x chunk_size (a sequence no longer than one chunk cannot be split at all).
  mesh: a Mesh or a dict of mesh-axis sizes; no `sequence` axis (or size 1): nothing to check.
  Raises:
    ShardingError: naming mesh.sequence, seq_len and model.chunk_size, with the nearest valid seq_len and
      mesh.sequence values.
  """
  shape = dict(getattr(mesh, "shape", mesh))
  shards = shape.get(SEQUENCE_AXIS, 1)
  if shards == 1 or seq_len % (shards * chunk_size) == 0:
    return
  unit = shards * chunk_size
  lengths = _nearest(seq_len, [unit * k for k in range(1, seq_len // unit + 2)])
  chunks = seq_len // chunk_size if seq_len % chunk_size == 0 else 0
  counts = [s for s in range(1, chunks + 1) if chunks % s == 0]
  sizes = _nearest(shards, counts) if chunks else "none (seq_len is not a whole number of chunks)"
  raise ShardingError(f"mesh.sequence={shards} splits seq_len={seq_len} into {shards} slices that must each hold "
                      f"whole chunks of model.chunk_size={chunk_size} (seq_len a multiple of mesh.sequence x "
                      f"chunk_size = {unit}); the nearest valid seq_len values are {lengths}, the nearest valid "
                      f"mesh.sequence values are {sizes}")
