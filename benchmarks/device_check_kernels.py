"""The kernel parts of benchmarks/device_check.py: kernel numerics against pure-JAX references, the attention
implementations at the shipped head shapes and the CEMA implementations at 4K-32K tokens.

Every part is `part(opts, sink)`: it appends one dict per case to the list `sink` and calls `sink.flush()` after
each, so a part stopped at its deadline keeps what it measured. `opts.smoke` swaps in tiny shapes (CPU, Pallas
interpreted); `opts.deadline` (time.time() seconds) makes a part record its remaining cases as "skipped".
Errors are max |got - want| / max |want| (one number per array, the worst over a tree of gradients).
"""

from __future__ import annotations

import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.cema import make_inputs
from benchmarks.common import compile_and_time
from benchmarks.kernels_cema import build as build_cema
from megalodon_jax.config import preset
from megalodon_jax.ops import cema as cema_lib
from megalodon_jax.ops.attention import chunked_causal_attention
from pallas_kernels.chunked_attention import chunked_attention
from pallas_kernels.chunked_attention.reference import chunked_attention_reference

PERTURB_ENV = "MEGALODON_DEVICE_CHECK_PERTURB"  # "1": the device side of every numerics check gets wrong inputs
# Tolerances on the relative error. float32 checks: the Pallas kernels may use TF32 tiles on a GPU. bfloat16
# benchmark cases: one bf16 rounding of outputs and gradients. A wrong kernel is off by O(1).
TOL = {"f32": 1e-2, "logits": 1e-3, "bf16_fwd": 2e-2, "bf16_bwd": 5e-2, "cema": 2e-3}
# Head shapes of the shipped configs (configs/mega200m.py, mega1_3b.py, megalodon_7b.py).
HEAD_PRESETS = (("200M", "mega200M"), ("1.3B", "mega1.3B"), ("7B", "megalodon_7b"))
ATTENTION_IMPLS = ("xla", "pallas", "cudnn")  # xla first: the others are checked against its outputs
CEMA_IMPLS = ("sequential", "chunked", "pallas", "fft", "associative_scan")  # sequential first: the reference


def rel_err(got, want) -> float:
  worst = 0.0
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
    g, w = np.asarray(g, np.float64), np.asarray(w, np.float64)
    worst = max(worst, float(np.max(np.abs(g - w)) / max(np.max(np.abs(w)), 1e-30)))
  return worst


def perturbed(x: jax.Array) -> jax.Array:
  """x, or x plus noise of its own scale when PERTURB_ENV is set (the CI test's injected mismatch)."""
  if os.environ.get(PERTURB_ENV) != "1":
    return x
  noise = jax.random.normal(jax.random.key(1), x.shape, jnp.float32) * jnp.std(x.astype(jnp.float32))
  return (x.astype(jnp.float32) + noise).astype(x.dtype)


def out_of_time(opts, sink, case: dict) -> bool:
  if time.time() < opts.deadline:
    return False
  sink.append({**case, "status": "skipped", "reason": "part budget spent"})
  sink.flush()
  return True


def _check(sink, name: str, err: float, tol: float, **extra) -> None:
  sink.append({"check": name, "rel_err": err, "tol": tol, "ok": bool(np.isfinite(err) and err <= tol), **extra})
  sink.flush()


# ---------------------------------------------------------------- numerics (the model's check is device_check_model)

def kernel_numerics(opts, sink) -> None:
  """The Pallas attention and CEMA kernels, forward and gradients, in float32, against pure-JAX references."""
  b, l, h, dz, dv, c = (1, 64, 2, 16, 32, 32) if opts.smoke else (2, 1024, 2, 128, 256, 256)
  keys = jax.random.split(jax.random.key(0), 4)
  q, k = (jax.random.normal(kk, (b, l, h, dz), jnp.float32) * dz ** -0.25 for kk in keys[:2])
  v = jax.random.normal(keys[2], (b, l, h, dv), jnp.float32)
  cot = jax.random.normal(keys[3], (b, l, h, dv), jnp.float32)

  def vjp(fn):
    def run(q, k, v):
      out, pull = jax.vjp(fn, q, k, v)
      return out, pull(cot)
    return jax.jit(run)

  with jax.default_matmul_precision("highest"):
    want = vjp(lambda q, k, v: chunked_attention_reference(q, k, v, c))(q, k, v)
    got = vjp(lambda q, k, v: chunked_attention(q, k, v, c))(perturbed(q), k, v)
  _check(sink, "pallas attention fwd vs reference (f32)", rel_err(got[0], want[0]), TOL["f32"], shape=[b, l, h, dz, dv])
  _check(sink, "pallas attention grads vs reference (f32)", rel_err(got[1], want[1]), TOL["f32"])

  length, dim, ndim = (64, 32, 4) if opts.smoke else (1024, 256, 16)
  params, x = make_inputs(2, length, dim, ndim)
  yc = jax.random.normal(jax.random.key(2), x.shape, jnp.float32)

  def cema_vjp(impl):
    def fwd(params, x):
      coeffs = cema_lib.cema_coefficients(params["alpha"], params["delta"], params["theta"], params["gamma"])
      return cema_lib.cema(x, coeffs, params["omega"], impl=impl)[0]
    return jax.jit(lambda p, x: (fwd(p, x), jax.vjp(fwd, p, x)[1](yc)))

  want = cema_vjp("sequential")(params, x)
  got = cema_vjp("pallas")(params, perturbed(x))
  _check(sink, "pallas CEMA fwd vs sequential (f32)", rel_err(got[0], want[0]), TOL["f32"], shape=[2, length, dim])
  _check(sink, "pallas CEMA grads vs sequential (f32)", rel_err(got[1], want[1]), TOL["f32"])


# ---------------------------------------------------------------- attention

def attention_shapes(opts) -> list[dict]:
  if opts.smoke:
    return [{"model": "smoke", "heads": 1, "dz": 16, "dv": 32, "chunk": 32, "seq_len": 128, "batch": 1}]
  out = []
  for name, preset_name in HEAD_PRESETS:
    cfg = preset(preset_name)
    out.append({"model": name, "heads": cfg.num_heads, "dz": cfg.z_head_dim, "dv": cfg.value_dim // cfg.num_heads,
                "chunk": cfg.chunk_size, "seq_len": 16384, "batch": 1})
  return out


def _cudnn(chunk: int):
  """cuDNN's fused attention over chunks. It needs one head size for q, k and v (at most 256), and Megalodon's value
  heads are wider (dv = 8 dz at every shipped shape): v is split into dv/dz slices run as extra heads, q and k
  repeated for each (so the score work is done dv/dz times; the FLOP count stays the useful one)."""
  def attend(q, k, v):
    b, l, h, dz = q.shape
    s = v.shape[-1] // dz
    chunks = lambda x, heads: x.reshape(b * (l // chunk), chunk, heads, dz)  # noqa: E731
    out = jax.nn.dot_product_attention(chunks(jnp.repeat(q, s, axis=2), h * s), chunks(jnp.repeat(k, s, axis=2), h * s),
                                       chunks(v, h * s), scale=1.0, is_causal=True, implementation="cudnn")
    return out.reshape(b, l, h, s * dz)
  return attend


def _attention_fn(impl: str, chunk: int, mode: str):
  attend = {"xla": lambda q, k, v: chunked_causal_attention(q, k, v, chunk),
            "pallas": lambda q, k, v: chunked_attention(q, k, v, chunk), "cudnn": _cudnn(chunk)}[impl]
  if mode == "fwd":
    return attend
  return jax.value_and_grad(lambda q, k, v, c: jnp.sum(attend(q, k, v).astype(jnp.float32) * c), argnums=(0, 1, 2))


def attention(opts, sink) -> None:
  """Each shape x implementation x (fwd, fwd+bwd) in bfloat16: time, TFLOP/s, error against the XLA path."""
  for shape in attention_shapes(opts):
    b, l, h, dz, dv, c = (shape[k] for k in ("batch", "seq_len", "heads", "dz", "dv", "chunk"))
    rng = np.random.default_rng(0)
    q, k = (jnp.asarray(rng.normal(size=(b, l, h, dz)) * dz ** -0.25, jnp.bfloat16) for _ in range(2))
    v = jnp.asarray(rng.normal(size=(b, l, h, dv)), jnp.bfloat16)
    cot = jnp.asarray(rng.normal(size=(b, l, h, dv)) / np.sqrt(b * l * h * dv), jnp.float32)
    useful = b * h * (l // c) * c * c * 2 * (dz + dv) / 2  # half of each chunk's score block (benchmarks/kernels.py)
    for mode in ("fwd", "bwd"):
      inputs, want = (q, k, v) if mode == "fwd" else (q, k, v, cot), None
      for impl in ATTENTION_IMPLS:
        case = {**shape, "impl": impl, "mode": mode}
        if out_of_time(opts, sink, case):
          return
        if impl == "cudnn" and (jax.default_backend() != "gpu" or dz > 256 or dv % dz):
          sink.append({**case, "status": "n/a", "reason": "cuDNN attention needs a GPU and dz <= 256 dividing dv"})
          sink.flush()
          continue
        compiled = compile_and_time(_attention_fn(impl, c, mode), inputs, case, max_bytes=opts.max_bytes,
                                    max_seconds=opts.max_seconds, repeats=opts.repeats,
                                    fit_repeats=True)
        if compiled is not None:
          case["tflops"] = useful * (1 if mode == "fwd" else 3) / (case["median_ms"] * 1e-3) / 1e12
          got = compiled(*inputs) if impl == "xla" else compiled(perturbed(q), *inputs[1:])
          if impl == "xla":
            want = got
          elif want is not None:
            case["rel_err_vs_xla"] = rel_err(got, want)
            case["tol"] = TOL["bf16_fwd" if mode == "fwd" else "bf16_bwd"]
            case["numerics_ok"] = case["rel_err_vs_xla"] <= case["tol"]
          case.pop("times_s", None)
        sink.append(case)
        sink.flush()


# ---------------------------------------------------------------- CEMA


def cema(opts, sink) -> None:
  """Every CEMA implementation at each length (x bfloat16 (1, L, D), N 16), fwd and fwd+bwd; the forward output
  of each is checked against "sequential" (the plain recurrence)."""
  lengths, dims, ndim = ((64,), (32,), 4) if opts.smoke else ((4096, 8192, 16384, 32768), opts.cema_dims, 16)
  for dim in dims:
    for length in lengths:
      params, x = make_inputs(1, length, dim, ndim)
      x = x.astype(jnp.bfloat16)
      want = None
      for mode in ("fwd", "bwd"):
        inputs = (params, x) if mode == "fwd" else (params, x, jnp.full(x.shape, 1.0 / x.size, jnp.float32))
        for impl in CEMA_IMPLS:
          case = {"impl": impl, "length": length, "dim": dim, "ndim": ndim, "mode": mode}
          if out_of_time(opts, sink, case):
            return
          compiled = compile_and_time(build_cema(impl, mode), inputs, case, max_bytes=opts.max_bytes,
                                      max_seconds=opts.max_seconds, repeats=opts.repeats,
                                    fit_repeats=True)
          if compiled is not None and mode == "fwd":
            got = compiled(*inputs) if impl == "sequential" else compiled(params, perturbed(x))
            want = got if impl == "sequential" else want
            if impl != "sequential" and want is not None:
              case.update(rel_err_vs_sequential=rel_err(got, want), tol=TOL["cema"])
              case["numerics_ok"] = case["rel_err_vs_sequential"] <= TOL["cema"]
          case.pop("times_s", None)
          sink.append(case)
          sink.flush()
