"""Tests for megalodon_jax/mesh_axes.py: the mesh vocabulary, `split_axes` / `sequence_axis`, the table printout."""

import importlib
import itertools
import math
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import AbstractMesh, AxisType, PartitionSpec as P

from megalodon_jax import mesh_axes as ma
from megalodon_jax.ops.partitioning import activation_spec
from megalodon_jax.training import sharding as sh
from pallas_kernels.sharding import shard_plan

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
D, S, F, T = ma.MESH_AXES


def _abstract(sizes, manual=()):
  """An AbstractMesh over MESH_AXES with `sizes` (data, sequence, fsdp, tensor); `manual` axes of type Manual."""
  types = tuple(AxisType.Manual if a in manual else AxisType.Auto for a in ma.MESH_AXES)
  return AbstractMesh(tuple(sizes), ma.MESH_AXES, axis_types=types)


# ---------------- the vocabulary ----------------

def test_the_vocabulary():
  assert ma.MESH_AXES == ("data", "sequence", "fsdp", "tensor")
  assert ma.BATCH_AXES == (ma.DATA, ma.FSDP) and ma.SEQUENCE_AXIS == ma.SEQUENCE
  # A string given to split_axes is a logical name or a mesh axis name, never both.
  assert not set(ma.MESH_AXES) & set(ma.LOGICAL_AXES)
  assert all(row.kind in (ma.PARAM, ma.ACTIVATION) for row in ma.LOGICAL_AXES.values())
  rows = {name: ma.axes_of(name) for name in ma.LOGICAL_AXES}
  assert rows["batch"] == (D, F) and rows["length"] == (S,) and rows["embed"] == (F,) and rows["act_embed"] == ()
  assert all(set(axes) <= set(ma.MESH_AXES) for axes in rows.values())
  # Mesh order inside every row, so a prefix drops the innermost axes first.
  assert all(list(axes) == sorted(axes, key=ma.MESH_AXES.index) for axes in rows.values())
  assert ma.axes_of(None) == () and ma.axes_of(T) == (T,) and ma.axes_of([F, T]) == (F, T)


def test_param_rules_are_the_default_config_rules():
  default = importlib.import_module("megalodon_jax.configs.default")
  rules = sh.check_rules(default.get_config().logical_axis_rules)
  assert sh.check_rules(ma.PARAM_RULES) == ma.PARAM_RULES == rules


def test_param_targets_lay_the_config_rules_over_the_table():
  table = ma.param_targets(sh.check_rules((("vocab", None), ("extra", (F, T)))))
  assert table["vocab"] is None and table["extra"] == (F, T)
  assert table["embed"] == F and table["mlp"] == T and table["norm"] is None
  assert "batch" not in table  # activation rows are not parameter rules


def test_spec_for_reads_the_table_under_the_config_rules():
  mesh = sh.make_mesh(type("M", (), dict(data=1, fsdp=2, tensor=4))())
  assert sh.spec_for(("embed", "mlp"), (32, 64), (), mesh) == P(F, T)
  assert sh.spec_for(("embed", "mlp"), (32, 64), (("mlp", None),), mesh) == P(F, None)
  assert sh.spec_for(("vocab", "embed"), (51, 32), (("vocab", None),), mesh) == P(None, F)
  # Activation names are not parameter names: without a rule they leave a parameter whole.
  assert sh.spec_for(("batch", "act_mlp"), (8, 64), (), mesh) == P(None, None)


def test_mesh_axes_imports_no_jax():
  # A fresh interpreter (this one has jax loaded): the config checks run before jax starts.
  script = ("import sys, megalodon_jax.mesh_axes, megalodon_jax.training.mesh_checks; "
            "print(sorted(m for m in sys.modules if m == 'jax' or m.startswith('jax.')))")
  env = {**os.environ, "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", "")}
  out = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=env, capture_output=True, text=True,
                       timeout=120, check=False)
  assert out.returncode == 0, out.stderr[-2000:]
  assert out.stdout.strip() == "[]"


# ---------------- split_axes ----------------

@pytest.mark.parametrize("sizes, manual, size, axes, exclude, expected", [
    ((2, 1, 4, 2), (), 8, "batch", (), (D, F)),
    ((2, 1, 4, 2), (), 2, "batch", (), (D,)),  # 2 rows on data=2 x fsdp=4: data only
    ((2, 1, 4, 2), (), 4, "batch", (), (D,)),  # 4 % 8: the prefix (data) divides, (fsdp) alone is not a prefix
    ((2, 1, 4, 2), (), 3, "batch", (), ()),
    ((1, 1, 4, 2), (), 4, "batch", (), (F,)),  # data of size 1 dropped, fsdp is then the first
    ((2, 1, 4, 2), (D,), 8, "batch", (), (F,)),  # data manual (inside a shard_map over it)
    ((2, 1, 4, 2), (D, F), 8, "batch", (), ()),
    ((2, 1, 4, 2), (), 8, "batch", (D,), (F,)),  # data taken by another dimension
    ((2, 1, 4, 2), (), 6, "heads", (), (T,)),
    ((2, 1, 4, 2), (), 5, "heads", (), ()),
    ((2, 1, 4, 2), (), 16, (T, F), (), (T, F)),  # explicit axes, in the caller's order
    ((2, 1, 4, 2), (), 2, (T, F), (), (T,)),
    ((1, 4, 2, 1), (), 12, "length", (), (S,)),
    ((1, 4, 2, 1), (), 6, "length", (), ()),
    ((1, 4, 2, 1), (), 12, S, (), (S,)),  # a mesh axis name
    ((1, 4, 2, 1), (), 12, "act_embed", (), ()),  # a row without axes
    ((1, 4, 2, 1), (S,), 12, "length", (), ()),
])
def test_split_axes_hand_worked(sizes, manual, size, axes, exclude, expected):
  assert ma.split_axes(_abstract(sizes, manual), size, axes, exclude=exclude) == expected


def test_split_axes_without_a_mesh():
  assert ma.split_axes(None, 8, "batch") == ()
  assert ma.split_axes(jax.sharding.get_abstract_mesh(), 8, "batch") == ()  # empty outside jax.set_mesh
  assert ma.split_axes(AbstractMesh((2, 2), (D, "other")), 4, "batch") == (D,)  # fsdp absent


def _expected(sizes, manual, size, cands, exclude):
  """split_axes from its specification, by enumeration: of all order-preserving selections of the candidates, the
  longest one that is a prefix of the usable candidates (on the mesh, size > 1, automatic, not excluded) and whose
  product divides `size`."""
  shape = dict(zip(ma.MESH_AXES, sizes))
  usable = [a for a in cands if shape.get(a, 1) > 1 and a in shape and a not in manual and a not in exclude]
  best = ()
  for k in range(len(cands) + 1):
    for pick in itertools.combinations(cands, k):
      if list(pick) == usable[:k] and size % math.prod(shape[a] for a in pick) == 0 and len(pick) > len(best):
        best = pick
  return best


def test_split_axes_against_enumeration():
  checked = 0
  for sizes in [(2, 1, 4, 2), (1, 2, 2, 2), (4, 2, 1, 1), (1, 1, 1, 8), (2, 2, 2, 1), (3, 1, 2, 1)]:
    for manual in [(), (D,), (F,), (S, T)]:
      mesh = _abstract(sizes, manual)
      for cands in [ma.BATCH_AXES, (T,), (F, T), (D, S, F, T), (S,), (T, D)]:
        for exclude in [(), (D,), (T,)]:
          for size in range(1, 25):
            assert ma.split_axes(mesh, size, cands, exclude=exclude) == _expected(sizes, manual, size, cands,
                                                                                  exclude), (sizes, manual, cands)
            checked += 1
  assert checked > 10000


def test_split_axes_sees_the_manual_axes_of_a_shard_map():
  mesh = jax.make_mesh((2, 1, 2, 2), ma.MESH_AXES, axis_types=(AxisType.Auto,) * 4)
  seen = {}

  def body(x):
    inner = jax.sharding.get_abstract_mesh()
    seen["batch"] = ma.split_axes(inner, 8, "batch")
    seen["heads"] = ma.split_axes(inner, 8, "heads")
    return x

  with jax.set_mesh(mesh):
    seen["outside"] = ma.split_axes(jax.sharding.get_abstract_mesh(), 8, "batch")
    jax.jit(jax.shard_map(body, in_specs=P(D), out_specs=P(D), axis_names={D}))(jnp.zeros((8,)))
  assert seen == {"outside": (D, F), "batch": (F,), "heads": (T,)}
  assert ma.split_axes(mesh, 8, "batch") == (D, F)  # a concrete Mesh works too


# ---------------- sequence_axis ----------------

@pytest.mark.parametrize("sizes, manual, length, chunk, expected", [
    ((1, 4, 2, 1), (), 16, 1, S),
    ((1, 4, 2, 1), (), 16, 4, S),  # 4 slices of one chunk
    ((1, 4, 2, 1), (), 16, 8, None),  # a slice would hold half a chunk
    ((1, 4, 2, 1), (), 18, 1, None),
    ((1, 4, 2, 1), (), 18, 4, None),  # not a whole number of chunks
    ((1, 4, 2, 1), (), 1, 1, None),  # a decoding step
    ((1, 4, 2, 1), (S,), 16, 1, None),  # inside the chunk-parallel shard_map
    ((8, 1, 1, 1), (), 16, 1, None),  # sequence of size 1
])
def test_sequence_axis(sizes, manual, length, chunk, expected):
  assert ma.sequence_axis(_abstract(sizes, manual), length, chunk) == expected


def test_sequence_axis_without_the_axis():
  assert ma.sequence_axis(AbstractMesh((8,), (D,)), 16) is None
  assert ma.sequence_axis(None, 16) is None


# ---------------- activation_spec on the table ----------------

@pytest.mark.parametrize("sizes, shape, axes, expected", [
    ((2, 1, 4, 2), (8, 16, 32), ("batch", "length", "act_embed"), P((D, F), P.UNCONSTRAINED, None)),
    ((2, 1, 4, 2), (2, 16, 32), ("batch", "length", "act_embed"), P(D, P.UNCONSTRAINED, None)),
    ((2, 1, 4, 2), (8, 16, 51), ("batch", "length", "act_vocab"), P((D, F), P.UNCONSTRAINED, P.UNCONSTRAINED)),
    ((1, 2, 2, 2), (4, 16, 4, 8), ("batch", "length", "heads", None), P(F, S, T, P.UNCONSTRAINED)),
    ((1, 2, 2, 2), (4, 16, 64), ("batch", "length", "act_mlp"), P(F, S, T)),
    ((2, 1, 4, 2), (3, 16, 32), ("batch", None, "replicated"), P(P.UNCONSTRAINED, P.UNCONSTRAINED, None)),
    ((2, 1, 4, 2), (3, 5), ("batch", "heads"), None),  # nothing divides: nothing to pin
    ((2, 1, 4, 2), (3, 5), (None, "act_embed"), P(P.UNCONSTRAINED, None)),
    ((2, 1, 4, 2), (3, 5), ("replicated", "act_embed"), None),  # every dimension whole: no constraint
])
def test_activation_spec(sizes, shape, axes, expected):
  assert activation_spec(shape, axes, _abstract(sizes)) == expected


@pytest.mark.parametrize("name", ["embed", "vocab", "mlp", "nonsense"])
def test_activation_spec_rejects_parameter_and_unknown_names(name):
  with pytest.raises(ValueError, match="unknown activation axis"):
    activation_spec((8, 8), ("batch", name), _abstract((2, 1, 4, 2)))


# ---------------- the table as text ----------------

def test_logical_axes_table():
  mesh = jax.make_mesh((2, 1, 2, 2), ma.MESH_AXES, axis_types=(AxisType.Auto,) * 4)
  text = ma.logical_axes_table(mesh, sh.check_rules((("vocab", None), ("extra", (F, T)))))
  rows = {line.split()[0]: line.split()[1:] for line in text.splitlines()[1:]}
  assert text.splitlines()[0].split()[:3] == ["logical", "axis", "kind"]
  assert set(rows) == set(ma.LOGICAL_AXES) | {"extra"}
  assert rows["embed"] == ["param", F, "2"]
  assert rows["vocab"] == ["param", "(whole)", "1"]  # overridden by the rules
  assert rows["extra"] == ["param", "fsdp,", "tensor", "2", "x", "2", "=", "4"]
  assert rows["batch"] == ["activation", "data,", "fsdp", "2", "x", "2", "=", "4"]
  assert rows["length"] == ["activation", S, "1"]
  assert ma.logical_axes_table(dict(mesh.shape)) == ma.logical_axes_table(mesh)


# ---------------- the kernels' shard plan (pallas_kernels/sharding.py) ----------------

def test_shard_plan_takes_each_group_whole_or_not_at_all():
  mesh = AbstractMesh((2, 2, 2), (D, F, T))
  assert shard_plan(mesh, 4, 2, (D, F), T, "head_axes") == (mesh, (D, F), (T,))
  assert shard_plan(mesh, 2, 3, (D, F), T, "head_axes") == (None, (), ())  # neither divides: no shard_map
  assert shard_plan(mesh, 2, 4, (D, F), T, "head_axes") == (mesh, (), (T,))
  assert shard_plan(mesh, 4, 4, None, None, "head_axes") == (None, (), ())
  with pytest.raises(ValueError, match="not axes of the mesh"):
    shard_plan(mesh, 4, 4, "batch", None, "head_axes")
  with pytest.raises(ValueError, match="channel_axes"):
    shard_plan(mesh, 4, 4, (D, T), T, "channel_axes")
