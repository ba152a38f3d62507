"""Chunk parallelism (a `sequence` mesh axis): the sharded ops and the whole model against one device.

8 simulated CPU devices (conftest). The length is split into contiguous slices of whole chunks; CEMA and
TimestepNorm carry their states across the slices with collectives (ops/sequence_parallel.py). Everything here is
float32 and compared to 1e-5 relative (per array: max |a - b| / max |b|).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

from megalodon_jax.config import MegalodonConfig
from megalodon_jax.model import MegalodonLM
from megalodon_jax.model_state import split_model
from megalodon_jax.ops import cema as cema_ops
from megalodon_jax.ops import sequence_parallel as sp
from megalodon_jax.ops import timestep_norm as tsn
from megalodon_jax.training import sharding as sh
from megalodon_jax.training import train_step as ts

RTOL = 1e-5
SMALL = dict(num_layers=2, model_dim=32, z_dim=16, value_dim=32, ffn_hidden_dim=64, chunk_size=4, vocab_size=50,
             norm_num_groups=4, cema_ndim=4, num_heads=2)
# (data, sequence, fsdp, tensor)
MESHES = {"data2-seq4": (2, 4, 1, 1), "seq8": (1, 8, 1, 1), "fsdp2-seq2-tensor2": (1, 2, 2, 2)}


def _mesh(shape):
  return jax.make_mesh(shape, sh.MESH_AXES, axis_types=(AxisType.Auto,) * 4)


def _rel(got, want) -> float:
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  scale = np.max(np.abs(want))
  return float(np.max(np.abs(got - want)) / (scale if scale > 0 else 1.0))


# ---------------------------------------------------------------------------------------------- the ops

def _cema_inputs(b=4, l=48, d=16, n=4):
  k = jax.random.split(jax.random.key(0), 7)
  coeff_args = (jax.random.normal(k[1], (d, n, 1)), jax.random.normal(k[2], (d, n, 1)),
                jax.random.normal(k[3], (d, 1, 1)), jax.random.normal(k[4], (d, n, 2)))
  return (jax.random.normal(k[0], (b, l, d)), *coeff_args, jax.random.normal(k[5], (d, 1)),
          jax.random.normal(k[6], (b, d, n, 2)))


@pytest.mark.parametrize("impl", ["fft", "chunked", "sequential"])
def test_cema_op_matches_one_device_values_state_and_gradients(impl):
  args = _cema_inputs()

  def loss(par, x, alpha, delta, theta, gamma, omega, h0):
    coeffs = cema_ops.cema_coefficients(alpha, delta, theta, gamma)
    y, h = (sp.cema if par else cema_ops.cema)(x, coeffs, omega, h0, impl=impl, return_state=True)
    return jnp.sum(jnp.sin(y)) + jnp.sum(jnp.square(h)), (y, h)

  grad = jax.value_and_grad(loss, argnums=tuple(range(1, 8)), has_aux=True)
  (l0, aux0), g0 = jax.jit(grad, static_argnums=0)(False, *args)
  mesh = _mesh((2, 4, 1, 1))
  with jax.set_mesh(mesh):
    x = jax.device_put(args[0], NamedSharding(mesh, P("data", "sequence")))
    (l1, aux1), g1 = jax.jit(grad, static_argnums=0)(True, x, *args[1:])
  for got, want in [(l1, l0), *zip(aux1, aux0), *zip(g1, g0)]:
    assert _rel(got, want) <= RTOL


@pytest.mark.parametrize("impl", ["chunked", "sequential"])
def test_cema_op_with_document_resets_matches_one_device(impl):
  """Resets split over 4 sequence slices of 12 steps: row 0 resets at a slice start (12) and inside a slice (30),
  row 1 twice inside one slice (25, 27), row 2 at t = 0, row 3 never. Values, final state and gradients (x, the
  raw parameters, h0) equal the one-device run with the same resets."""
  args = _cema_inputs()
  resets = np.zeros((4, 48), bool)
  resets[0, [12, 30]] = resets[1, [25, 27]] = resets[2, 0] = True
  resets = jnp.asarray(resets)

  def loss(par, x, alpha, delta, theta, gamma, omega, h0):
    coeffs = cema_ops.cema_coefficients(alpha, delta, theta, gamma)
    y, h = (sp.cema if par else cema_ops.cema)(x, coeffs, omega, h0, impl=impl, return_state=True, resets=resets)
    return jnp.sum(jnp.sin(y)) + jnp.sum(jnp.square(h)), (y, h)

  grad = jax.value_and_grad(loss, argnums=tuple(range(1, 8)), has_aux=True)
  (l0, aux0), g0 = jax.jit(grad, static_argnums=0)(False, *args)
  mesh = _mesh((2, 4, 1, 1))
  with jax.set_mesh(mesh):
    x = jax.device_put(args[0], NamedSharding(mesh, P("data", "sequence")))
    (l1, aux1), g1 = jax.jit(grad, static_argnums=0)(True, x, *args[1:])
  for got, want in [(l1, l0), *zip(aux1, aux0), *zip(g1, g0)]:
    assert _rel(got, want) <= RTOL
  # The resets matter: without them the one-device output differs.
  y_plain, _ = cema_ops.cema(args[0], cema_ops.cema_coefficients(*args[1:5]), args[5], args[6], impl=impl)
  assert _rel(y_plain, aux0[0]) > 1e-2
  # cema_carry alone: a slice holding a reset (keep 0) passes on only its local state.
  local = jax.random.normal(jax.random.key(1), (3, 2, 2, 2, 2))
  h_in, h_out = sp.cema_carry(jnp.ones((2, 2)), jnp.zeros((2, 2)), local, jnp.ones((2, 2, 2, 2)), jnp.int32(1),
                              keep=jnp.asarray([[1.0, 1.0], [0.0, 1.0], [1.0, 1.0]]))
  np.testing.assert_allclose(h_in, 1.0 + local[0], rtol=1e-6)
  np.testing.assert_allclose(h_out[0], local[1, 0], rtol=1e-6)
  np.testing.assert_allclose(h_out[1], 1.0 + local[0, 1] + local[1, 1], rtol=1e-6)


def test_timestep_norm_op_matches_one_device_with_a_carried_state_and_padding():
  b, l, d, g = 4, 48, 16, 4
  x = jax.random.normal(jax.random.key(1), (b, l, d)) * 3 + 1
  w, bias = jax.random.normal(jax.random.key(2), (d,)) * 0.1, jnp.full((d,), 0.1)
  mask = jnp.zeros((b, l), bool).at[1, 20:30].set(True)  # padding that spans a slice boundary (slices of 12)
  state = tsn.initial_state(b, 5, jnp.full((g,), 0.5), jnp.zeros((g,)))

  def loss(par, x, w, bias):
    y, st = (sp.timestep_norm if par else tsn.timestep_norm)(x, w, bias, state, num_groups=g, eps=1e-5, mask=mask)
    return jnp.sum(jnp.sin(y)) + jnp.sum(st.mean) + jnp.sum(st.var), (y, st)

  grad = jax.value_and_grad(loss, argnums=(1, 2, 3), has_aux=True)
  (l0, (y0, s0)), g0 = jax.jit(grad, static_argnums=0)(False, x, w, bias)
  mesh = _mesh((2, 4, 1, 1))
  with jax.set_mesh(mesh):
    (l1, (y1, s1)), g1 = jax.jit(grad, static_argnums=0)(True, x, w, bias)
  np.testing.assert_array_equal(tsn.total_count(s1), tsn.total_count(s0))
  for got, want in [(l1, l0), (y1, y0), (s1.mean, s0.mean), (s1.var, s0.var), *zip(g1, g0)]:
    assert _rel(got, want) <= RTOL


@pytest.mark.parametrize("padded", [False, True])
def test_timestep_norm_op_with_document_resets_matches_one_device(padded):
  b, l, d, g = 4, 48, 16, 4  # slices of 12 on a sequence axis of 4
  x = jax.random.normal(jax.random.key(3), (b, l, d)) * 2 - 1
  w, bias = jax.random.normal(jax.random.key(4), (d,)) * 0.1, jnp.full((d,), -0.1)
  resets = jnp.zeros((b, l), bool)
  resets = resets.at[0, [0, 12, 30]].set(True)  # a reset at the first step and at a slice start
  resets = resets.at[1, [5, 7, 40]].set(True)  # two in one slice
  resets = resets.at[3, 47].set(True)  # on the very last step; row 2 has none
  mask = jnp.zeros((b, l), bool).at[1, 20:30].set(True) if padded else None
  state = tsn.initial_state(b, 5, jnp.full((g,), 0.5), jnp.zeros((g,)))
  prior = tsn.initial_state(b, 0, jnp.zeros((g,)), jnp.zeros((g,)))

  def loss(par, x, w, bias):
    fn = sp.timestep_norm if par else tsn.timestep_norm
    y, st = fn(x, w, bias, state, num_groups=g, eps=1e-5, mask=mask, resets=resets, prior=prior)
    return jnp.sum(jnp.sin(y)) + jnp.sum(st.mean) + jnp.sum(st.var), (y, st)

  grad = jax.value_and_grad(loss, argnums=(1, 2, 3), has_aux=True)
  (l0, (y0, s0)), g0 = jax.jit(grad, static_argnums=0)(False, x, w, bias)
  with jax.set_mesh(_mesh((2, 4, 1, 1))):
    (l1, (y1, s1)), g1 = jax.jit(grad, static_argnums=0)(True, x, w, bias)
  np.testing.assert_array_equal(tsn.total_count(s1), tsn.total_count(s0))
  for got, want in [(l1, l0), (y1, y0), (s1.mean, s0.mean), (s1.var, s0.var), *zip(g1, g0)]:
    assert _rel(got, want) <= RTOL


def test_the_plain_ops_run_outside_a_sequence_mesh():
  assert sp.sequence_mesh(48) is None
  with jax.set_mesh(_mesh((8, 1, 1, 1))):
    assert sp.sequence_mesh(48) is None
  with jax.set_mesh(_mesh((2, 4, 1, 1))):
    assert sp.sequence_mesh(48) is not None
    assert sp.sequence_mesh(1) is None  # a decoding step is not split


# ---------------------------------------------------------------------------------------------- the model

def _model_parts(**overrides):
  cfg = MegalodonConfig(**{**SMALL, **overrides})
  return split_model(MegalodonLM(cfg, rngs=nnx.Rngs(0)))


def _ids(b=4, l=96, v=50, seed=0):
  ids = np.random.default_rng(seed).integers(0, v, (b, l + 1))
  return jnp.asarray(ids[:, :-1], jnp.int32), jnp.asarray(ids[:, 1:], jnp.int32)


def _loss_and_grads(parts, inputs, targets, mesh=None, loss_piece=8):
  graphdef, params, buffers, rng_vars = parts
  key = jax.random.key(0)

  def loss(p, b, i, t):
    batch = {"inputs": i, "targets": t}
    return ts._loss_fn(p, graphdef, b, rng_vars, batch, key, loss_piece)[0]  # pylint: disable=protected-access

  fn = jax.value_and_grad(loss)
  if mesh is None:
    return jax.jit(fn)(params, buffers, inputs, targets)
  with jax.set_mesh(mesh):
    batch = sh.batch_sharding(mesh)
    param_sh = sh.state_shardings(params, sh.check_rules(sh_rules()), mesh)
    params = jax.device_put(params, param_sh)
    return jax.jit(fn)(params, buffers, jax.device_put(inputs, batch), jax.device_put(targets, batch))


def sh_rules():
  from megalodon_jax.configs import default  # pylint: disable=import-outside-toplevel
  return default.get_config().logical_axis_rules


def _assert_same(got, want):
  (l1, g1), (l0, g0) = got, want
  assert _rel(l1, l0) <= RTOL, (float(l1), float(l0))
  flat0 = dict(jax.tree_util.tree_flatten_with_path(g0)[0])
  worst = max((_rel(g, flat0[path]), jax.tree_util.keystr(path))
              for path, g in jax.tree_util.tree_flatten_with_path(g1)[0])
  assert worst[0] <= RTOL, worst
  return worst


@pytest.fixture(scope="module", params=["fft", "chunked"])
def reference(request):
  parts = _model_parts(cema_impl=request.param)
  inputs, targets = _ids()
  return request.param, parts, inputs, targets, _loss_and_grads(parts, inputs, targets)


@pytest.mark.parametrize("mesh_name", list(MESHES))
def test_model_loss_and_every_gradient_match_one_device(reference, mesh_name):
  """L = 96, chunk 4: 24 chunks, 3 per slice on sequence=8, 6 on 4, 12 on 2; loss pieces of 8 positions."""
  _, parts, inputs, targets, want = reference
  got = _loss_and_grads(parts, inputs, targets, _mesh(MESHES[mesh_name]))
  _assert_same(got, want)


def test_model_with_pallas_attention_matches_one_device():
  """The Pallas attention (interpret mode on CPU) split over batch, heads and the length."""
  parts = _model_parts(cema_impl="chunked", attention_impl="pallas", num_layers=1)
  inputs, targets = _ids(l=32)
  want = _loss_and_grads(parts, inputs, targets)
  got = _loss_and_grads(parts, inputs, targets, _mesh((1, 2, 2, 2)))
  _assert_same(got, want)


# ---------------------------------------------------------------------------------------------- inference

def test_long_prompt_prefill_split_over_sequence_gives_the_one_device_cache():
  """One sequence of 96 tokens prefilled on (sequence=8): the final CEMA / norm states, the last chunk's keys and
  values and the logits equal the single-device prefill; a decoding step after it too."""
  cfg = MegalodonConfig(**{**SMALL, "cema_impl": "chunked"})
  model = MegalodonLM(cfg, rngs=nnx.Rngs(0))
  model.eval()
  graphdef, state = nnx.split(model)
  ids, _ = _ids(b=1, l=96)
  nxt = jnp.asarray([[7]], jnp.int32)

  def prefill_then_step(state, ids, nxt):
    m = nnx.merge(graphdef, state)
    logits, cache = m(ids, cache=m.init_cache(ids.shape[0]))
    step_logits, _ = m(nxt, cache=cache)
    return logits, cache, step_logits

  want = jax.jit(prefill_then_step)(state, ids, nxt)
  mesh = _mesh((1, 8, 1, 1))
  with jax.set_mesh(mesh):
    ids_sharded = jax.device_put(ids, NamedSharding(mesh, P(None, "sequence")))
    got = jax.jit(prefill_then_step)(state, ids_sharded, nxt)
  for (path, g), w in zip(jax.tree_util.tree_flatten_with_path(got)[0], jax.tree_util.tree_leaves(want)):
    if jnp.issubdtype(w.dtype, jnp.integer):
      np.testing.assert_array_equal(np.asarray(g), np.asarray(w), err_msg=jax.tree_util.keystr(path))
    else:
      assert _rel(g, w) <= RTOL, jax.tree_util.keystr(path)
