"""Tests for megalodon_jax/training/sharding.py on the 8 simulated CPU devices of conftest.py."""

import types

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

from megalodon_jax.configs.default import get_config
from megalodon_jax.config import MegalodonConfig
from megalodon_jax.model import MegalodonLM
from megalodon_jax.training import sharding as sh
from megalodon_jax.training.optimizer import make_optimizer

DEFAULT_RULES = get_config().logical_axis_rules
# vocab 51 is odd: the vocab dims cannot be split over tensor=2 and must fall back to replicated.
TINY = dict(num_layers=2, model_dim=32, z_dim=16, value_dim=32, ffn_hidden_dim=64, chunk_size=8, vocab_size=51,
            norm_num_groups=4, cema_ndim=4, dtype="float32", param_dtype="float32")


def _mesh_cfg(data, fsdp, tensor, sequence=None):
  if sequence is None:  # a config without mesh.sequence (older configs): the axis is 1
    return types.SimpleNamespace(data=data, fsdp=fsdp, tensor=tensor)
  return types.SimpleNamespace(data=data, fsdp=fsdp, tensor=tensor, sequence=sequence)


def _mesh(data, fsdp, tensor, sequence=None):
  return sh.make_mesh(_mesh_cfg(data, fsdp, tensor, sequence))


def _make_model():
  return MegalodonLM(MegalodonConfig(**TINY), rngs=nnx.Rngs(0))


def _path(path):
  return "/".join(str(k) for k in path)


@pytest.fixture(scope="module")
def mesh222():
  return _mesh(2, 2, 2)


@pytest.fixture(scope="module")
def sharded_model(mesh222):
  return sh.sharded_init(_make_model, DEFAULT_RULES, mesh222)


# ---------------- mesh ----------------

# sizes: (data, fsdp, tensor[, sequence]); expected: MESH_AXES order (data, sequence, fsdp, tensor).
@pytest.mark.parametrize("sizes, expected", [
    ((8, 1, 1), (8, 1, 1, 1)), ((2, 4, 1), (2, 1, 4, 1)), ((2, 2, 2), (2, 1, 2, 2)), ((1, -1, 1), (1, 1, 8, 1)),
    ((-1, 2, 2), (2, 1, 2, 2)), ((1, 1, -1), (1, 1, 1, 8)), ((2, 1, 1, 4), (2, 4, 1, 1)),
    ((1, 1, 1, -1), (1, 8, 1, 1)), ((1, 2, 2, 2), (1, 2, 2, 2)),
])
def test_mesh_shape_and_make_mesh(sizes, expected):
  assert sh.mesh_shape(_mesh_cfg(*sizes), 8) == expected
  mesh = _mesh(*sizes)
  assert mesh.axis_names == sh.MESH_AXES == ("data", "sequence", "fsdp", "tensor")
  assert tuple(mesh.shape[a] for a in sh.MESH_AXES) == expected
  assert mesh.axis_types == (AxisType.Auto,) * 4
  assert sorted(d.id for d in mesh.devices.flat) == sorted(d.id for d in jax.devices())


def test_make_mesh_on_a_subset_of_devices():
  devices = jax.devices()[:4]
  mesh = sh.make_mesh(_mesh_cfg(-1, 2, 1), devices)
  assert dict(mesh.shape) == {"data": 2, "sequence": 1, "fsdp": 2, "tensor": 1}
  assert {d.id for d in mesh.devices.flat} == {d.id for d in devices}


def test_make_mesh_from_the_config_dict():
  cfg = get_config()  # data=1, fsdp=-1, tensor=1: all devices on fsdp
  assert dict(sh.make_mesh(cfg.mesh).shape) == {"data": 1, "sequence": 1, "fsdp": 8, "tensor": 1}


@pytest.mark.parametrize("sizes, needles", [
    ((0, 8, 1), ["mesh.data", "0"]),
    ((1, -2, 1), ["mesh.fsdp", "-2"]),
    ((1, 8, 1.5), ["mesh.tensor"]),
    ((1, "8", 1), ["mesh.fsdp"]),
    ((True, 8, 1), ["mesh.data"]),
    ((-1, -1, 1), ["mesh.data", "mesh.fsdp", "-1"]),
    ((2, 2, 1), ["4", "8", "-1"]),
    ((2, 2, 4), ["16", "8"]),
    ((3, -1, 1), ["mesh.fsdp=-1", "3", "8"]),
    ((1, 1, 1, 0), ["mesh.sequence", "0"]),
    ((1, -1, 1, -1), ["mesh.sequence", "mesh.fsdp", "-1"]),
    ((1, 1, 1, 3), ["3", "8", "mesh.sequence"]),
])
def test_mesh_shape_errors_name_the_key(sizes, needles):
  with pytest.raises(sh.ShardingError) as e:
    sh.mesh_shape(_mesh_cfg(*sizes), 8)
  for needle in needles:
    assert needle in str(e.value)
  with pytest.raises(ValueError):  # ShardingError is a ValueError
    sh.make_mesh(_mesh_cfg(*sizes))


# ---------------- rules ----------------

def test_check_rules_normalises_lists_and_tuples():
  assert sh.check_rules(DEFAULT_RULES) == tuple(tuple(r) for r in DEFAULT_RULES)
  # ConfigDict / JSON give lists; a tuple target may arrive as a list too.
  got = sh.check_rules([["embed", "fsdp"], ["vocab", ["data", "tensor"]], ["mlp", None]])
  assert got == (("embed", "fsdp"), ("vocab", ("data", "tensor")), ("mlp", None))
  assert sh.check_rules(get_config().logical_axis_rules) == sh.check_rules(list(map(list, DEFAULT_RULES)))


@pytest.mark.parametrize("rules, needle", [
    ("embed", "pairs"),
    ([("embed",)], "pair"),
    ([("embed", "fsdp", "x")], "pair"),
    ([(1, "fsdp")], "pair"),
    ([("embed", "fsdp"), ("embed", "tensor")], "'embed' is listed twice"),
    ([("embed", "model")], "'model'"),
    ([("embed", ("fsdp", "fsdp"))], "distinct"),
    ([("embed", ())], "target"),
    ([("embed", 3)], "target"),
])
def test_check_rules_errors(rules, needle):
  with pytest.raises(sh.ShardingError) as e:
    sh.check_rules(rules)
  assert "logical_axis_rules" in str(e.value) and needle in str(e.value)


# ---------------- spec_for ----------------

RULES = (("vocab", "tensor"), ("embed", "fsdp"), ("value", "tensor"), ("heads", ("fsdp", "tensor")),
         ("batch", ("data", "fsdp")), ("cema_ndim", None))


@pytest.mark.parametrize("axes, shape, expected", [
    (("embed", "value"), (32, 64), P("fsdp", "tensor")),
    (("value", "embed"), (64, 32), P("tensor", "fsdp")),
    (("embed",), (32,), P("fsdp")),
    (("embed",), (31,), P(None)),  # not divisible by fsdp=2: replicated
    (("vocab", "embed"), (51, 32), P(None, "fsdp")),  # only the odd dim falls back
    (("embed", "embed"), (32, 32), P("fsdp", None)),  # fsdp used once per array
    (("value", "vocab"), (32, 32), P("tensor", None)),  # different names, same mesh axis: later one replicated
    (("embed", "cema_ndim", None), (32, 4, 1), P("fsdp", None, None)),
    (("heads",), (8,), P(("fsdp", "tensor"))),  # a tuple target divides by the product 4
    (("heads",), (6,), P(None)),  # 6 % 4 != 0
    (("embed", "heads"), (32, 8), P("fsdp", None)),  # the tuple would reuse fsdp: whole dim replicated
    (("batch", "value"), (8, 32), P(("data", "fsdp"), "tensor")),
    (("unlisted", "embed"), (32, 32), P(None, "fsdp")),  # names without a rule are replicated
    ((None, None), (3, 5), P(None, None)),
    ((), (), P()),
    (None, (4,), P()),  # Buffers: no logical axes at all
])
def test_spec_for(mesh222, axes, shape, expected):
  assert sh.spec_for(axes, shape, RULES, mesh222) == expected


def test_spec_for_keeps_size_one_axes():
  # tensor has size 1 on (8,1,1): kept in the spec (a no-op split), so specs do not depend on the device count.
  mesh = _mesh(8, 1, 1)
  assert sh.spec_for(("embed", "value"), (32, 31), RULES, mesh) == P("fsdp", "tensor")
  assert sh.spec_for(("embed",), (4,), RULES, _mesh(1, 8, 1)) == P(None)  # 4 % 8 != 0


def test_spec_for_rank_mismatch(mesh222):
  with pytest.raises(sh.ShardingError, match="do not match"):
    sh.spec_for(("embed",), (4, 4), RULES, mesh222)


# ---------------- model params: an independent expectation ----------------

FS, TP = "fsdp", "tensor"
# Hand-written from the layer shapes (TINY: D=32, Z=16, E=32, F=64, N=4, V=51) and the default rules; the layer
# index is stripped from the path. V=51 is odd, so the vocab dims stay replicated.
EXPECTED_PARAM_SPECS = {
    "embed/weight": P(None, FS),  # (V, D)
    "output/kernel": P(FS, None),  # (D, V)
    # Norm scales / biases ("norm") and CEMA parameters ("cema") are small and replicated: sharded like the weight
    # matrices they made XLA gather every chip's partial gradient at once (benchmarks/RESULTS.md).
    "final_norm/weight": P(None), "final_norm/bias": P(None),
    "layers/mega/beta": P(None, TP), "layers/mega/gamma": P(None, TP),  # (2, Z)
    "layers/mega/cema/alpha": P(None, None, None), "layers/mega/cema/delta": P(None, None, None),  # (D, N, 1)
    "layers/mega/cema/gamma": P(None, None, None),  # (D, N, 2)
    "layers/mega/cema/omega": P(None, None), "layers/mega/cema/theta": P(None, None, None),
    "layers/mega/rmsnorm/weight": P(None),
    "layers/mega/timenorm/weight": P(None), "layers/mega/timenorm/bias": P(None),
    "layers/mega/wz/kernel": P(FS, TP), "layers/mega/wz/bias": P(TP),  # (D, Z)
    "layers/mega/wv/kernel": P(FS, TP), "layers/mega/wv/bias": P(TP),  # (D, E)
    "layers/mega/wr/kernel": P(FS, TP), "layers/mega/wr/bias": P(TP),  # (D, E)
    "layers/mega/wh1/kernel": P(FS, TP), "layers/mega/wh1/bias": P(TP),  # (D, D): embed -> embed_out
    "layers/mega/wh2/kernel": P(TP, FS),  # (E, D)
    "layers/nffn/fc1/kernel": P(FS, TP), "layers/nffn/fc2/kernel": P(TP, FS),  # (D, F), (F, D)
    "layers/nffn/norm/weight": P(None), "layers/nffn/norm/bias": P(None),
}


def _strip_layer(path):
  return "/".join(str(k) for k in path if not isinstance(k, int))


def test_sharded_init_places_params_as_expected(sharded_model):
  flat = nnx.to_flat_state(nnx.state(sharded_model))
  seen = set()
  for path, var in flat:
    arr = var.get_raw_value()
    if isinstance(var, nnx.Param):
      key = _strip_layer(path)
      assert arr.sharding.spec == EXPECTED_PARAM_SPECS[key], _path(path)
      seen.add(key)
    else:  # Buffers (RoPE frequencies, TimestepNorm priors): no logical axes, full copy everywhere
      assert isinstance(var, type(sharded_model.rope_freqs)), _path(path)
      assert arr.sharding.is_fully_replicated, _path(path)
  assert seen == set(EXPECTED_PARAM_SPECS)
  # Really split: a (D, E) = (32, 32) kernel on fsdp x tensor = 2 x 2 holds (16, 16) per device.
  kernel = sharded_model.layers[0].mega.wv.kernel.get_raw_value()
  assert {s.data.shape for s in kernel.addressable_shards} == {(16, 16)}
  assert len(kernel.sharding.device_set) == 8


def test_sharded_init_matches_eager_init_and_state_shardings(sharded_model, mesh222):
  # Same values as an unsharded jitted init, bit for bit (the random bits do not depend on the sharding) ...
  ref_jit = jax.jit(lambda: nnx.split(_make_model())[1])()
  for (path, a), b in zip(nnx.to_flat_state(ref_jit), jax.tree.leaves(nnx.state(sharded_model))):
    np.testing.assert_array_equal(np.asarray(a.get_raw_value()), np.asarray(b), err_msg=_path(path))
  # ... and as the eager init up to rounding: XLA fuses the initialisers' erfinv / log differently from eager.
  ref = _make_model()
  for (path, a), b in zip(nnx.to_flat_state(nnx.state(ref)), jax.tree.leaves(nnx.state(sharded_model))):
    np.testing.assert_allclose(np.asarray(a.get_raw_value()), np.asarray(b), rtol=1e-5, atol=1e-6,
                               err_msg=_path(path))
  # logical_axes survive nnx.eval_shape: abstract and concrete states give the same shardings.
  _, abstract = nnx.split(nnx.eval_shape(_make_model))
  from_abstract = sh.state_shardings(abstract, DEFAULT_RULES, mesh222)
  from_concrete = sh.state_shardings(nnx.state(sharded_model), DEFAULT_RULES, mesh222)
  assert jax.tree.leaves(from_abstract) == jax.tree.leaves(from_concrete)
  actual = [x.sharding for x in jax.tree.leaves(nnx.state(sharded_model))]
  assert [s.spec for s in jax.tree.leaves(from_concrete)] == [s.spec for s in actual]
  assert all(isinstance(s, NamedSharding) and s.mesh == mesh222 for s in jax.tree.leaves(from_concrete))


def test_sharded_init_replicates_rng_state(mesh222):
  # With dropout the model holds RNG keys and counts: no logical axes, so replicated.
  def make():
    return MegalodonLM(MegalodonConfig(**{**TINY, "num_layers": 1, "dropout": 0.1}), rngs=nnx.Rngs(1))
  model = sh.sharded_init(make, DEFAULT_RULES, mesh222)
  rng_vars = nnx.to_flat_state(nnx.state(model, nnx.RngState))
  assert len(rng_vars) > 0
  assert all(v.get_raw_value().sharding.is_fully_replicated for _, v in rng_vars)


def test_describe_lists_every_array(sharded_model, mesh222):
  state = nnx.state(sharded_model, nnx.Param)
  text = sh.describe(state, sh.state_shardings(state, DEFAULT_RULES, mesh222))
  lines = text.strip().splitlines()
  assert lines[0].split() == ["path", "shape", "logical", "axes", "spec"]
  assert len(lines) == 1 + len(jax.tree.leaves(state))
  row = next(line for line in lines if line.startswith("layers/0/mega/wv/kernel "))
  assert "(32, 32)" in row and "('embed', 'value')" in row and row.endswith("P('fsdp', 'tensor')")


# ---------------- optimizer state ----------------

def _param_sharding_by_path(params, shardings):
  leaves = jax.tree_util.tree_flatten_with_path(params)[0]
  return {tuple(p): (x.shape, s) for (p, x), s in zip(leaves, jax.tree.leaves(shardings))}


# (name, optimizer, how many copies of each param (all / only matrices) its state holds)
OPTIMIZERS = [
    ("clip", lambda: make_optimizer(1e-3, 10, 2), (2, 0)),
    ("no_clip", lambda: make_optimizer(1e-3, 10, 2, clip=None), (2, 0)),
    ("matrices", lambda: make_optimizer(1e-3, 10, 2, decay_mask="matrices"), (2, 0)),
    ("multisteps", lambda: make_optimizer(1e-3, 10, 2, decay_mask="matrices", grad_accum_steps=3), (3, 0)),
    # A state that really is masked (MaskedNode where the mask is False), unlike adamw's masked decay.
    ("masked_adam", lambda: optax.masked(optax.adam(1e-3), lambda p: jax.tree.map(lambda x: x.ndim >= 2, p)),
     (0, 2)),
]


@pytest.mark.parametrize("make_tx, copies", [o[1:] for o in OPTIMIZERS], ids=[o[0] for o in OPTIMIZERS])
def test_opt_state_shardings(make_tx, copies, sharded_model, mesh222):
  tx = make_tx()
  params = nnx.state(sharded_model, nnx.Param)
  abstract = jax.eval_shape(lambda: params)
  param_sh = sh.state_shardings(abstract, DEFAULT_RULES, mesh222)
  # From the moments' own metadata: they are Params with their parameter's logical_axes. The loop below checks
  # the result against path matching, an independent reading of which leaf mirrors which parameter.
  opt_sh = sh.state_shardings(jax.eval_shape(tx.init, abstract), DEFAULT_RULES, mesh222)
  assert jax.tree.structure(opt_sh) == jax.tree.structure(jax.eval_shape(tx.init, abstract))
  opt_state = jax.jit(tx.init, out_shardings=opt_sh)(params)

  by_path = _param_sharding_by_path(params, param_sh)
  mirrored = 0
  for path, leaf in jax.tree_util.tree_flatten_with_path(opt_state)[0]:
    match = [v for k, v in by_path.items() if tuple(path[-len(k):]) == k]
    if match:  # a moment / accumulator of that param
      assert leaf.shape == match[0][0] and leaf.sharding.spec == match[0][1].spec, jax.tree_util.keystr(path)
      mirrored += 1
    else:  # counts and other scalars
      assert leaf.sharding.is_fully_replicated and leaf.ndim == 0, jax.tree_util.keystr(path)
  n_matrices = sum(len(shape) >= 2 for shape, _ in by_path.values())
  assert mirrored == copies[0] * len(by_path) + copies[1] * n_matrices


# ---------------- batches ----------------

def test_batch_and_replicated_shardings(mesh222):
  assert sh.batch_sharding(mesh222).spec == P(("data", "fsdp"), "sequence")
  assert sh.replicated(mesh222).spec == P()
  batch = jax.device_put(jnp.zeros((8, 16), jnp.int32), sh.batch_sharding(mesh222))
  assert {s.data.shape for s in batch.addressable_shards} == {(2, 16)}  # 8 rows over data x fsdp = 4


def test_check_batch(mesh222):
  sh.check_batch(8, 2, mesh222)  # micro-batch 4 over data x fsdp = 4
  sh.check_batch(4, 1, mesh222)
  with pytest.raises(sh.ShardingError) as e:
    sh.check_batch(8, 3, mesh222)
  assert "batch_size=8" in str(e.value) and "grad_accum_steps=3" in str(e.value)
  with pytest.raises(sh.ShardingError) as e:
    sh.check_batch(8, 4, mesh222)  # micro-batch 2 < 4 shards
  for needle in ("batch_size", "grad_accum_steps", "mesh.data", "mesh.fsdp", "mesh.sequence=1", "= 2 ", "= 4",
                 "nearest valid batch_size values are 16"):
    assert needle in str(e.value)


@pytest.mark.parametrize("seq_len, chunk, sequence, needles", [
    (48, 4, 8, ["mesh.sequence=8", "seq_len=48", "chunk_size=4", "32 and 64", "mesh.sequence values are 6 and 12"]),
    (40, 16, 2, ["mesh.sequence=2", "32 and 64", "not a whole number of chunks"]),
    (64, 16, 8, ["mesh.sequence=8", "128", "mesh.sequence values are 4"]),
])
def test_check_sequence_names_mesh_sequence_and_nearest_values(seq_len, chunk, sequence, needles):
  sh.check_sequence(seq_len, chunk, {"sequence": 1})  # no sequence axis: nothing to check
  sh.check_sequence(sequence * chunk * 3, chunk, {"sequence": sequence})  # 3 whole chunks per shard
  with pytest.raises(sh.ShardingError) as e:
    sh.check_sequence(seq_len, chunk, {"sequence": sequence})
  for needle in needles:
    assert needle in str(e.value), str(e.value)


# ---------------- a sharded forward pass ----------------

def test_sharded_forward_matches_unsharded(sharded_model, mesh222):
  ids = jax.random.randint(jax.random.key(3), (8, 16), 0, TINY["vocab_size"], jnp.int32)
  ref_model = _make_model()
  graphdef, ref_state = nnx.split(ref_model)
  _, state = nnx.split(sharded_model)
  state_sh = sh.state_shardings(state, DEFAULT_RULES, mesh222)

  def forward(state, ids):
    return nnx.merge(graphdef, state)(ids)

  expected = jax.jit(forward)(ref_state, ids)  # everything on one device
  with jax.set_mesh(mesh222):
    sharded = jax.jit(forward, in_shardings=(state_sh, sh.batch_sharding(mesh222)),
                      out_shardings=NamedSharding(mesh222, P(("data", "fsdp"), None, None)))
    got = sharded(state, jax.device_put(ids, sh.batch_sharding(mesh222)))
  assert got.dtype == jnp.float32 and got.shape == (8, 16, TINY["vocab_size"])
  assert got.sharding.spec == P(("data", "fsdp"), None, None)
  np.testing.assert_allclose(np.asarray(got), np.asarray(expected), rtol=1e-5, atol=1e-5)


def test_rows_shared_across_processes_detects_a_sequence_axis_spanning_hosts():
  """Multi-host layout (checked on fake devices; the multi-process path itself runs in-process only here)."""
  dev = lambda p: types.SimpleNamespace(process_index=p)  # noqa: E731
  names = sh.MESH_AXES  # (data, sequence, fsdp, tensor)
  # 2 hosts x 4 chips. data=2 over hosts, sequence=4 within a host: each host holds whole rows.
  within = np.array([[dev(h) for _ in range(4)] for h in range(2)], dtype=object).reshape(2, 4, 1, 1)
  assert not sh.rows_shared_across_processes(within, names)
  # sequence=2 across the hosts, fsdp=4 within: the same rows live on both hosts.
  across = np.array([[dev(h) for _ in range(4)] for h in range(2)], dtype=object).reshape(1, 2, 4, 1)
  assert sh.rows_shared_across_processes(across, names)
  mesh = _mesh(1, 1, 1, 8)  # one process: never shared
  assert not sh.rows_shared_across_processes(mesh.devices, mesh.axis_names)
