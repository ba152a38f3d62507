"""The Pallas CEMA scan kernel (pallas_kernels/cema), in interpret mode on CPU, against independent references:
its own pure-JAX reference run in float64 (values and `jax.grad`), megalodon_jax's `cema(impl="sequential")`, the
official model fixtures, and the Mosaic/Triton lowerings (which run on CPU without a TPU or GPU)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.sharding import AxisType, PartitionSpec as P

import fixtures
from megalodon_jax import MegalodonConfig
from megalodon_jax.convert import from_official_state_dict
from megalodon_jax.ops import cema as cema_lib
from megalodon_jax.ops.cema.sequential import cema_sequential
from pallas_kernels.cema import BlockSizes, cema_scan, cema_scan_reference
from pallas_kernels.cema import gpu as cema_gpu
from pallas_kernels.cema import tpu as cema_tpu

F32_TOL = 1e-5  # max abs error relative to the reference's max abs value (issue 6)
BF16_TOL = 2e-2
SMALL = BlockSizes(seq_tile=16, channel_tile=128, gpu_channel_tile=16)  # many tiles at small shapes


def _random_planes(rng, dim, nstate):
  """Kernel arguments p, q_re, q_im, g_re, g_im (D, N) and omega (D,), float32; |q| up to 0.99 (long memory)."""
  mag = rng.uniform(0.3, 0.99, (dim, nstate))
  phase = rng.uniform(-np.pi, np.pi, (dim, nstate))
  arrays = (rng.uniform(0.05, 1.0, (dim, nstate)), mag * np.cos(phase), mag * np.sin(phase),
            rng.normal(size=(dim, nstate)), rng.normal(size=(dim, nstate)), rng.normal(size=(dim,)))
  return tuple(jnp.asarray(a, jnp.float32) for a in arrays)


def _loss(fn, cot_y, cot_h):
  """Σ y·c + Σ h_last·c' for fixed random cotangents, so every output and the final state carry gradient; the
  outputs (y, h_last) come back as auxiliary data."""
  def loss(x, planes, h0):
    y, h = fn(x, *planes, h0)
    return jnp.sum(y * cot_y) + jnp.sum(h * cot_h), (y, h)
  return loss


def _values_and_grads(fn, x, planes, h0, cot_y, cot_h):
  """((y, h_last), (dx, dplanes, dh0)) of `fn` under one `jax.jit`."""
  grad = jax.grad(_loss(fn, cot_y, cot_h), argnums=(0, 1, 2), has_aux=True)
  grads, out = jax.jit(grad)(x, planes, h0)
  return out, grads


def _rel_err(got, want):
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  return float(np.max(np.abs(got - want)) / max(np.max(np.abs(want)), 1e-30))


def _reference_f64(x, planes, h0, cot_y, cot_h):
  """Values and gradients (x, planes, h0) of the plain-array reference, in float64."""
  with jax.enable_x64(True):
    f64 = lambda a: jnp.asarray(np.asarray(a, np.float64))  # pylint: disable=unnecessary-lambda-assignment
    args = (f64(x), tuple(f64(a) for a in planes), f64(h0))
    ref = functools.partial(cema_scan_reference, dtype=jnp.float64)
    return jax.tree.map(np.asarray, _values_and_grads(ref, *args, f64(cot_y), f64(cot_h)))


# (backend, B, L, D, N, with h0): partial last sequence tile and partial channel tile (TPU), channel and N padding
# (GPU: D = 40 → 48 with 16-channel tiles, N = 3 → 4), no initial state. Whole sequence tiles and 16-step groups are
# covered by the bfloat16 test, a decoding step (L = 1) by its own test. Interpret mode starts every output buffer as
# NaN, so an element a kernel never writes fails these comparisons (test_unwritten_output_would_show_as_nan).
CASES = {
    "tpu_partial_tiles": ("tpu", 2, 37, 160, 4, True),
    "gpu_padded": ("gpu", 2, 21, 40, 3, True),
    "tpu_zero_h0": ("tpu", 1, 19, 16, 16, False),
}


@pytest.mark.parametrize("case", list(CASES))
def test_values_and_gradients_match_float64_reference(case):
  backend, batch, length, dim, nstate, with_h0 = CASES[case]
  rng = np.random.default_rng(list(CASES).index(case))
  x = jnp.asarray(rng.normal(size=(batch, length, dim)), jnp.float32)
  planes = _random_planes(rng, dim, nstate)
  h0 = jnp.asarray(rng.normal(size=(batch, dim, nstate, 2)) if with_h0 else np.zeros((batch, dim, nstate, 2)),
                   jnp.float32)
  cot_y = jnp.asarray(rng.normal(size=x.shape), jnp.float32)
  cot_h = jnp.asarray(rng.normal(size=h0.shape), jnp.float32)

  def kernel(x, *args):
    return cema_scan(x, *args[:-1], args[-1] if with_h0 else None, block_sizes=SMALL, backend=backend)

  (y, h), grads = _values_and_grads(kernel, x, planes, h0, cot_y, cot_h)
  (y_ref, h_ref), grads_ref = _reference_f64(x, planes, h0, cot_y, cot_h)
  assert y.dtype == jnp.float32 and y.shape == x.shape and h.shape == (batch, dim, nstate, 2)
  assert _rel_err(y, y_ref) <= F32_TOL and _rel_err(h, h_ref) <= F32_TOL
  names = ["x", "p", "q_re", "q_im", "g_re", "g_im", "omega", "h0"][:7 + with_h0]
  for name, g, g_ref in zip(names, jax.tree.leaves(grads)[:len(names)], jax.tree.leaves(grads_ref)):
    assert g.shape == g_ref.shape
    err = _rel_err(g, g_ref)
    assert err <= F32_TOL, f"{case}: d{name} relative error {err:.3g}"


@pytest.mark.parametrize("backend", ["tpu", "gpu"])
def test_document_resets_match_float64_reference(backend):
  """resets (B, L): at t = 0, at a sequence-tile start (16), inside tiles, consecutive steps and the last step;
  values, final state and every gradient (the backward kernel stops the adjoint at a reset) against the float64
  reference's autodiff with the same resets. Row 1 has none, so h0 reaches it."""
  rng = np.random.default_rng(50 + len(backend))
  batch, length, dim, nstate = 2, 37, 40, 3
  x = jnp.asarray(rng.normal(size=(batch, length, dim)), jnp.float32)
  planes = _random_planes(rng, dim, nstate)
  h0 = jnp.asarray(rng.normal(size=(batch, dim, nstate, 2)), jnp.float32)
  cot_y = jnp.asarray(rng.normal(size=x.shape), jnp.float32)
  cot_h = jnp.asarray(rng.normal(size=h0.shape), jnp.float32)
  resets = np.zeros((batch, length), bool)
  resets[0, [0, 16, 21, 22, 23, 36]] = True
  kernel = functools.partial(cema_scan, block_sizes=SMALL, backend=backend, resets=jnp.asarray(resets))
  (y, h), grads = _values_and_grads(kernel, x, planes, h0, cot_y, cot_h)
  with jax.enable_x64(True):
    f64 = lambda a: jnp.asarray(np.asarray(a, np.float64))  # pylint: disable=unnecessary-lambda-assignment
    ref = functools.partial(cema_scan_reference, dtype=jnp.float64, resets=jnp.asarray(resets))
    want = jax.tree.map(np.asarray, _values_and_grads(ref, f64(x), tuple(f64(a) for a in planes), f64(h0),
                                                      f64(cot_y), f64(cot_h)))
  (y_ref, h_ref), grads_ref = want
  assert _rel_err(y, y_ref) <= F32_TOL and _rel_err(h, h_ref) <= F32_TOL
  names = ["x", "p", "q_re", "q_im", "g_re", "g_im", "omega", "h0"]
  for name, g, g_ref in zip(names, jax.tree.leaves(grads), jax.tree.leaves(grads_ref)):
    err = _rel_err(g, g_ref)
    assert err <= F32_TOL, f"{backend}: d{name} relative error {err:.3g}"
  assert not np.any(np.asarray(grads[2])[0]) and np.any(np.asarray(grads[2])[1])  # h0 cut off by the reset at 0
  # The reference itself restarts: a state entering step 16 of row 0 does not reach it.
  y_plain, _ = cema_scan_reference(x, *planes, h0)
  assert _rel_err(y_plain, y_ref) > 1e-2


def test_sharded_scan_with_resets_equals_unsharded():
  """resets split over the batch axes like x under shard_map (interpret mode), values and gradients."""
  mesh = jax.make_mesh((2, 2, 2), ("data", "fsdp", "tensor"), axis_types=(AxisType.Auto,) * 3)
  rng = np.random.default_rng(43)
  batch, length, dim, nstate = 4, 24, 256, 4
  planes = _random_planes(rng, dim, nstate)
  x = jnp.asarray(rng.normal(size=(batch, length, dim)), jnp.float32)
  h0 = jnp.asarray(rng.normal(size=(batch, dim, nstate, 2)), jnp.float32)
  cot_y = jnp.asarray(rng.normal(size=x.shape), jnp.float32)
  cot_h = jnp.asarray(rng.normal(size=h0.shape), jnp.float32)
  resets = jnp.asarray(rng.uniform(size=(batch, length)) < 0.2)
  fn = functools.partial(cema_scan, block_sizes=SMALL, resets=resets)
  want = _values_and_grads(fn, x, planes, h0, cot_y, cot_h)
  with jax.set_mesh(mesh):
    got = _values_and_grads(functools.partial(fn, mesh=mesh, batch_axes=("data", "fsdp"), channel_axes="tensor"),
                            x, planes, h0, cot_y, cot_h)
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    assert _rel_err(g, w) <= 1e-6
  with pytest.raises(ValueError, match=r"resets must be \(B, L\)"):
    cema_scan(x, *planes, resets=resets[:, 1:])


@pytest.mark.parametrize("backend", ["tpu", "gpu"])
def test_bfloat16_input_within_2e_2(backend):
  """bfloat16 x (TPU: 16-step groups for the packed (16, 128) tiles, whole sequence tiles, a partial channel tile)."""
  rng = np.random.default_rng(10 + len(backend))
  batch, length, dim, nstate = 2, 32, 136, 4
  x = jnp.asarray(rng.normal(size=(batch, length, dim)), jnp.bfloat16)
  planes = _random_planes(rng, dim, nstate)
  h0 = jnp.asarray(rng.normal(size=(batch, dim, nstate, 2)), jnp.float32)
  cot_y = jnp.asarray(rng.normal(size=x.shape), jnp.float32)
  cot_h = jnp.asarray(rng.normal(size=h0.shape), jnp.float32)
  kernel = functools.partial(cema_scan, block_sizes=SMALL, backend=backend)
  (y, h), grads = _values_and_grads(kernel, x, planes, h0, cot_y, cot_h)
  (y_ref, h_ref), grads_ref = _reference_f64(x.astype(jnp.float32), planes, h0, cot_y, cot_h)
  assert y.dtype == jnp.float32 and grads[0].dtype == jnp.bfloat16
  assert _rel_err(y, y_ref) <= BF16_TOL and _rel_err(h, h_ref) <= BF16_TOL
  for g, g_ref in zip(jax.tree.leaves(grads), jax.tree.leaves(grads_ref)):
    assert _rel_err(g, g_ref) <= BF16_TOL


def test_outputs_fully_written_under_tpu_simulator():
  """The TPU interpreter fills fresh buffers with NaN, checks every read against the buffer bounds and visits the
  "parallel" grid axes in random order: no NaN may survive in y, the state or any gradient."""
  rng = np.random.default_rng(20)
  batch, length, dim, nstate = 1, 21, 136, 4  # 2 sequence tiles (16 + 5 steps) × 2 channel tiles (128 + 8)
  x = jnp.asarray(rng.normal(size=(batch, length, dim)), jnp.float32)
  planes = _random_planes(rng, dim, nstate)
  h0 = jnp.asarray(rng.normal(size=(batch, dim, nstate, 2)), jnp.float32)
  sim = pltpu.InterpretParams(random_seed=7, uninitialized_memory="nan")
  kernel = functools.partial(cema_scan, block_sizes=SMALL, backend="tpu", interpret=sim)
  (y, h), grads = _values_and_grads(kernel, x, planes, h0, jnp.ones_like(x), jnp.ones_like(h0))
  for a in (y, h, *jax.tree.leaves(grads)):
    assert np.all(np.isfinite(np.asarray(a)))
  y_ref, h_ref = cema_scan_reference(x, *planes, h0)
  assert _rel_err(y, y_ref) <= F32_TOL and _rel_err(h, h_ref) <= F32_TOL


def test_single_decoding_step():
  """L = 1, as in token-by-token decoding: one step from a given state."""
  rng = np.random.default_rng(25)
  x = jnp.asarray(rng.normal(size=(3, 1, 8)), jnp.float32)
  planes = _random_planes(rng, 8, 2)
  h0 = jnp.asarray(rng.normal(size=(3, 8, 2, 2)), jnp.float32)
  y, h = jax.jit(cema_scan)(x, *planes, h0)
  y_ref, h_ref = cema_scan_reference(x, *planes, h0)
  assert _rel_err(y, y_ref) <= F32_TOL and _rel_err(h, h_ref) <= F32_TOL


def test_unwritten_output_would_show_as_nan():
  """The sentinel the tests above rely on: an output block a kernel never writes comes back NaN in interpret mode."""
  def skip_odd_rows(x_ref, o_ref):
    @pl.when(pl.program_id(0) % 2 == 0)
    def _():
      o_ref[...] = x_ref[...]

  out = pl.pallas_call(skip_odd_rows, grid=(4,), in_specs=[pl.BlockSpec((8, 128), lambda i: (i, 0))],
                       out_specs=pl.BlockSpec((8, 128), lambda i: (i, 0)),
                       out_shape=jax.ShapeDtypeStruct((32, 128), jnp.float32), interpret=True)(jnp.ones((32, 128)))
  rows = np.isnan(np.asarray(out)).all(axis=1)
  assert rows.tolist() == [(r // 8) % 2 == 1 for r in range(32)]


def _raw_params(rng, dim, nstate):
  return {"alpha": rng.normal(size=(dim, nstate, 1)), "delta": rng.normal(size=(dim, nstate, 1)) - 1.0,
          "theta": rng.normal(size=(dim, 1, 1)), "gamma": rng.normal(size=(dim, nstate, 2)),
          "omega": rng.normal(size=(dim, 1))}


def test_dispatch_matches_sequential_with_gradients():
  """cema(impl="pallas") against megalodon_jax's sequential scan: values, final state, and gradients w.r.t. x, the
  raw parameters (through the coefficients) and h0. (unroll=1: the default unroll=8 takes 6x longer to compile.)"""
  rng = np.random.default_rng(30)
  batch, length, dim, nstate = 2, 13, 24, 4
  params = {k: jnp.asarray(v, jnp.float32) for k, v in _raw_params(rng, dim, nstate).items()}
  x = jnp.asarray(rng.normal(size=(batch, length, dim)), jnp.float32)
  h0 = jnp.asarray(rng.normal(size=(batch, dim, nstate, 2)), jnp.float32)
  cot_y = jnp.asarray(rng.normal(size=x.shape), jnp.float32)
  cot_h = jnp.asarray(rng.normal(size=h0.shape), jnp.float32)

  def run(impl):
    def loss(params, x, h0):
      coeffs = cema_lib.cema_coefficients(params["alpha"], params["delta"], params["theta"], params["gamma"])
      y, h = impl(x, coeffs, params["omega"], h0)
      return jnp.sum(y * cot_y) + jnp.sum(h * cot_h), (y, h)
    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(params, x, h0)

  (_, (y, h)), grads = run(functools.partial(cema_lib.cema, impl="pallas", return_state=True))
  (_, (y_seq, h_seq)), grads_seq = run(functools.partial(cema_sequential, return_state=True, unroll=1))
  assert _rel_err(y, y_seq) <= F32_TOL and _rel_err(h, h_seq) <= F32_TOL
  for (path, g), g_seq in zip(jax.tree_util.tree_leaves_with_path(grads), jax.tree.leaves(grads_seq)):
    err = _rel_err(g, g_seq)
    assert err <= F32_TOL, f"{jax.tree_util.keystr(path)}: relative error {err:.3g}"


def test_auto_never_picks_pallas():
  for backend in ("cpu", "gpu", "tpu"):
    for length in (1, 512, 8192, 32768):
      assert cema_lib.default_impl(length, backend) != "pallas"


@functools.cache
def _fixture(name):
  return fixtures.load(name)


@nnx.jit
def _forward(model, ids):
  return model(ids)


@pytest.mark.parametrize("name", fixtures.CASES)
def test_model_with_pallas_cema_reproduces_official_logits(name):
  fx = _fixture(name)
  model = from_official_state_dict(fx.state_dict, MegalodonConfig.from_official(fx.conf, cema_impl="pallas"))
  logits = _forward(model, jnp.asarray(fx.input_ids))
  err = float(np.max(np.abs(np.asarray(logits, np.float64) - fx.logits)))
  assert err <= 2e-5, f"{name}: max abs error {err:.3g}"


def _abstract(shape, dtype=jnp.float32):
  return jax.ShapeDtypeStruct(shape, dtype)


@pytest.mark.parametrize("backend,platform", [("tpu", "tpu"), ("gpu", "cuda")])
def test_kernels_lower_to_mosaic_and_triton(backend, platform):
  """Forward and backward pass Pallas's Mosaic (TPU) and Triton (GPU) lowerings: block-shape rules, supported ops.
  Compilation by libtpu / the Triton compiler happens on a device and is not covered."""
  batch, length, dim, nstate = 2, 300, 384, 16  # TPU: 3 sequence tiles, the last partial; 3 channel tiles
  args = (_abstract((batch, length, dim), jnp.bfloat16), [_abstract((dim, nstate))] * 5, _abstract((dim,)),
          _abstract((batch, dim, nstate, 2)))

  def grads(x, planes, omega, h0, resets=None):
    fn = functools.partial(cema_scan, block_sizes=BlockSizes(seq_tile=128), backend=backend, interpret=False,
                           resets=resets)
    return jax.grad(lambda *a: jnp.sum(fn(a[0], *a[1], *a[2:])[0]), argnums=(0, 1, 2, 3))(x, planes, omega, h0)

  target = "tpu_custom_call" if backend == "tpu" else "__gpu$xla.gpu.triton"
  for extra in [(), (_abstract((batch, length), jnp.bool_),)]:  # without and with document resets
    text = jax.jit(grads).trace(*args, *extra).lower(lowering_platforms=(platform,)).as_text()
    assert text.count(f"@{target}") == 2  # the forward and the backward kernel


def test_lowering_rejects_illegal_blocks():
  """The lowering check above can fail: a 64-lane TPU block and a 48-wide (not a power of two) Triton load."""
  with pytest.raises(ValueError, match="divisible by 8 and 128"):
    jax.jit(functools.partial(cema_tpu.forward, seq_tile=32, channel_tile=64, group=8, interpret=False)).trace(
        _abstract((1, 64, 256)), _abstract((5, 16, 256)), _abstract((1, 256)), _abstract((1, 2, 16, 256))
    ).lower(lowering_platforms=("tpu",))
  with pytest.raises(ValueError, match="power of 2"):
    jax.jit(functools.partial(cema_gpu.forward, channel_tile=48, group=8, num_warps=2, interpret=False)).trace(
        _abstract((1, 64, 96)), _abstract((5, 16, 96)), _abstract((1, 96)), _abstract((1, 2, 16, 96))
    ).lower(lowering_platforms=("cuda",))


def test_sharded_scan_equals_unsharded_with_gradients():
  """shard_map over batch and channel axes of the 8-device CPU mesh (interpret mode): values, final state and the
  gradients w.r.t. x, the coefficients (summed over batch shards by shard_map's transpose), omega and h0 are those
  of the unsharded call. An indivisible batch stays replicated; an axis the mesh lacks is an error."""
  mesh = jax.make_mesh((2, 2, 2), ("data", "fsdp", "tensor"), axis_types=(AxisType.Auto,) * 3)
  rng = np.random.default_rng(41)
  batch, length, dim, nstate = 4, 24, 256, 4
  planes = _random_planes(rng, dim, nstate)
  x = jnp.asarray(rng.normal(size=(batch, length, dim)), jnp.float32)
  h0 = jnp.asarray(rng.normal(size=(batch, dim, nstate, 2)), jnp.float32)
  cot_y = jnp.asarray(rng.normal(size=x.shape), jnp.float32)
  cot_h = jnp.asarray(rng.normal(size=h0.shape), jnp.float32)
  fn = functools.partial(cema_scan, block_sizes=SMALL)
  want, want_grads = _values_and_grads(fn, x, planes, h0, cot_y, cot_h)
  sharded = functools.partial(fn, mesh=mesh, batch_axes=("data", "fsdp"), channel_axes="tensor")
  with jax.set_mesh(mesh):
    got, grads = _values_and_grads(sharded, x, planes, h0, cot_y, cot_h)
    y_odd = jax.jit(lambda x_: sharded(x_, *planes)[0])(x[:3])  # 3 rows over 4 batch shards: batch replicated
  for g, w in zip(jax.tree.leaves((got, grads)), jax.tree.leaves((want, want_grads))):
    assert _rel_err(g, w) <= 1e-6
  assert _rel_err(y_odd, fn(x[:3], *planes)[0]) <= 1e-6
  with pytest.raises(ValueError, match="not axes of the mesh"):
    cema_scan(x, *planes, mesh=mesh, batch_axes="batch")


def test_model_cema_pallas_shards_over_data_axes_only(monkeypatch):
  """cema(impl="pallas") under a ("data", "sequence") mesh passes the batch axis, never "sequence" (the scan runs
  along the sequence), and matches the unsharded result."""
  import pallas_kernels.cema as cema_pkg  # pylint: disable=import-outside-toplevel
  seen = []
  real = cema_pkg.cema_scan

  def spy(*args, **kwargs):
    seen.append(kwargs.get("batch_axes"))
    return real(*args, **kwargs)

  monkeypatch.setattr(cema_pkg, "cema_scan", spy)
  rng = np.random.default_rng(42)
  batch, length, dim, nstate = 4, 16, 16, 4
  params = {k: jnp.asarray(v, jnp.float32) for k, v in _raw_params(rng, dim, nstate).items()}
  coeffs = cema_lib.cema_coefficients(params["alpha"], params["delta"], params["theta"], params["gamma"])
  x = jnp.asarray(rng.normal(size=(batch, length, dim)), jnp.float32)
  run = jax.jit(lambda x_: cema_lib.cema(x_, coeffs, params["omega"], impl="pallas")[0])
  want = run(x)
  mesh = jax.make_mesh((4, 2), ("data", "sequence"), axis_types=(AxisType.Auto,) * 2)
  with jax.set_mesh(mesh):
    got = run(jax.device_put(x, jax.NamedSharding(mesh, P("data"))))
  assert seen == [(), ("data",)]
  assert _rel_err(got, want) <= 1e-6


def test_bad_inputs_are_rejected_with_clear_errors():
  planes = _random_planes(np.random.default_rng(0), 8, 2)
  x = jnp.zeros((1, 5, 8))
  with pytest.raises(ValueError, match=r"\(batch, length, channels\) float"):
    cema_scan(jnp.zeros((5, 8)), *planes)
  with pytest.raises(ValueError, match=r"\(batch, length, channels\) float"):
    cema_scan(jnp.zeros((1, 5, 8), jnp.int32), *planes)
  with pytest.raises(ValueError, match="q_im must be"):
    cema_scan(x, *planes[:2], planes[2][:, :1], *planes[3:])
  with pytest.raises(ValueError, match="omega must have D = 8"):
    cema_scan(x, *planes[:5], jnp.zeros(7))
  with pytest.raises(ValueError, match=r"h0 must be \(B, D, N, 2\)"):
    cema_scan(x, *planes, jnp.zeros((1, 8, 2)))
  with pytest.raises(ValueError, match="backend must be"):
    cema_scan(x, *planes, backend="cuda")
  with pytest.raises(ValueError, match="channel_tile must be a positive multiple of 128"):
    BlockSizes(channel_tile=96)
  with pytest.raises(ValueError, match="seq_tile must be"):
    BlockSizes(seq_tile=24)
