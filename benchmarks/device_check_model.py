"""The model parts of benchmarks/device_check.py: logits on the device against the CPU, the train step's tokens/s
and MFU, and decode latency / throughput. Same conventions as benchmarks/device_check_kernels.py (`part(opts,
sink)`, one dict per case, `opts.smoke` for tiny CPU shapes, `opts.deadline`)."""

from __future__ import annotations

import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from benchmarks.common import memory_bytes, time_runs
from benchmarks.device_check_kernels import TOL, _check, out_of_time, perturbed, rel_err
from megalodon_jax import flops as flops_lib
from megalodon_jax.config import MegalodonConfig, preset
from megalodon_jax.inference import generation
from megalodon_jax.inference.sampling import Sampler
from megalodon_jax.model import MegalodonLM
from megalodon_jax.model_state import split_model
from megalodon_jax.training import optimizer as opt_lib
from megalodon_jax.training import train_step as ts

# configs/tiny.py's shape: the smoke run's model for every part.
TINY = dict(num_layers=2, model_dim=64, z_dim=32, value_dim=128, num_heads=2, ffn_hidden_dim=128, cema_ndim=8,
            chunk_size=32, norm_num_groups=8, vocab_size=256)
# The numerics model: every kind of layer, two heads, several chunks, small enough to run on the CPU in seconds.
SMALL = dict(num_layers=2, model_dim=128, z_dim=64, value_dim=256, num_heads=2, ffn_hidden_dim=256, cema_ndim=8,
             chunk_size=64, norm_num_groups=16, vocab_size=256)


def logits_numerics(opts, sink) -> None:
  """Float32 logits, matmul precision "highest", of the same parameters: on the default device with the "auto"
  choices and with both Pallas kernels, against the CPU with the pure-JAX paths ("xla" attention, "sequential"
  CEMA). The device side's parameters get the injected perturbation (PERTURB_ENV)."""
  shape = dict(TINY, num_layers=1) if opts.smoke else SMALL
  batch, length = 2, 4 * shape["chunk_size"]
  common = dict(shape, dtype="float32", param_dtype="float32", matmul_precision="highest")
  reference = MegalodonConfig(**common, attention_impl="xla", cema_impl="sequential")
  model = MegalodonLM(reference, rngs=nnx.Rngs(0))
  model.eval()
  graphdef, state = nnx.split(model)
  ids = np.random.default_rng(0).integers(0, shape["vocab_size"], (batch, length)).astype(np.int32)
  cpu = jax.devices("cpu")[0]
  forward = lambda gd: jax.jit(lambda st, x: nnx.merge(gd, st)(x))  # noqa: E731
  want = forward(graphdef)(jax.device_put(state, cpu), jax.device_put(ids, cpu))
  device_state = jax.tree.map(lambda x: perturbed(x) if jnp.issubdtype(x.dtype, jnp.floating) else x, state)
  variants = [("auto", dict(attention_impl="auto", cema_impl="auto"))]
  if not opts.smoke:  # interpreted on a CPU, the kernels inside the model cost the smoke run most of its time
    variants.append(("pallas kernels", dict(attention_impl="pallas", cema_impl="pallas")))
  for name, impls in variants:
    variant = MegalodonLM(MegalodonConfig(**common, **impls), rngs=nnx.Rngs(0))
    variant.eval()
    got = forward(nnx.split(variant)[0])(device_state, jnp.asarray(ids))
    _check(sink, f"logits, {name} on {jax.default_backend()} vs CPU reference (f32)", rel_err(got, want),
           TOL["logits"] if name == "auto" else TOL["f32"], device=str(jax.devices()[0]),
           max_abs_logit=float(np.max(np.abs(np.asarray(want)))))


def numerics(opts, sink) -> None:
  from benchmarks.device_check_kernels import kernel_numerics  # pylint: disable=import-outside-toplevel
  logits_numerics(opts, sink)
  kernel_numerics(opts, sink)


# ---------------------------------------------------------------- train step

def train_cases(opts) -> list[dict]:
  """What is run: the 200M preset whole, the 1.3B preset with `opts.train_layers_1b` of its 24 layers (one compile
  and a few steps must fit the part's budget); bfloat16 compute, float32 parameters, no remat."""
  if opts.smoke:
    return [{"model": "smoke", "config": dict(TINY, num_layers=1), "seq_len": 64, "batch": 2}]
  return [{"model": "200M", "preset": "mega200M", "layers": 12, "seq_len": 8192, "batch": 2},
          {"model": "1.3B", "preset": "mega1.3B", "layers": opts.train_layers_1b, "seq_len": 16384, "batch": 1}]


def _config(case: dict, dtype: str) -> MegalodonConfig:
  execution = dict(dtype=dtype, param_dtype="float32", remat="none")
  if "preset" in case:
    return preset(case["preset"], num_layers=case["layers"], **execution)
  return MegalodonConfig(**case["config"], **execution)


def train(opts, sink) -> None:
  dtype = "float32" if opts.smoke else "bfloat16"
  for spec in train_cases(opts):
    case = {k: v for k, v in spec.items() if k != "config"}
    if out_of_time(opts, sink, case):
      return
    cfg = _config(spec, dtype)
    b, l = spec["batch"], spec["seq_len"]
    graphdef, params, buffers, rng_vars = split_model(MegalodonLM(cfg, rngs=nnx.Rngs(0)))
    tx = opt_lib.make_optimizer(1e-4, 1000, 10)
    state = ts.init_state(params, buffers, tx, jnp.zeros((2,), jnp.uint32))
    step = jax.jit(ts.make_train_step(graphdef, rng_vars, tx, opt_lib.lr_schedule(1e-4, 1000, 10), 1),
                   donate_argnums=0)
    ids = np.random.default_rng(0).integers(0, cfg.vocab_size, (b, l + 1))
    data = {"inputs": jnp.asarray(ids[:, :-1], jnp.int32), "targets": jnp.asarray(ids[:, 1:], jnp.int32)}
    t0 = time.perf_counter()
    compiled = step.lower(state, data).compile()
    held = {"state": state}

    def one_step():  # the state is donated: each step consumes the previous one's output
      held["state"], held["metrics"] = compiled(held["state"], data)
      return held["metrics"]

    times = time_runs(one_step, opts.repeats)
    step_s = statistics.median(times)
    model_flops = flops_lib.train_step_flops(cfg, b, l, causal_attention=True)
    peak = flops_lib.peak_flops(jax.devices()[0].device_kind)
    case.update(status="ok", dtype=dtype, num_params=cfg.num_params(), compile_s=time.perf_counter() - t0 - sum(times),
                step_ms=1e3 * step_s, tokens_per_sec=b * l / step_s, tflops_per_sec=model_flops / step_s / 1e12,
                mfu=None if peak is None else model_flops / step_s / peak, loss=float(held["metrics"]["loss"]),
                memory=memory_bytes(compiled))
    sink.append(case)
    sink.flush()
    del held, state, compiled


# ---------------------------------------------------------------- decode

def decode(opts, sink) -> None:
  """Greedy generation through the public Generator: a warm-up call compiles, then a timed stream; each update is
  one decode block of `block` steps for the whole batch, so latency = block interval / block and throughput =
  batch x block / interval (the first update, which includes the prefill, is reported on its own)."""
  if opts.smoke:
    cfg, batches, prompt, block, blocks = MegalodonConfig(**dict(TINY, num_layers=1), dtype="float32"), (1,), 16, 8, 3
  else:
    cfg = preset("mega200M", dtype="bfloat16", num_layers=opts.decode_layers)
    batches, prompt, block, blocks = (1, 64), 1024, 32, 8
  gen = generation.Generator(MegalodonLM(cfg, rngs=nnx.Rngs(0)), block_size=block)
  greedy = Sampler(temperature=0.0)
  for batch in batches:
    case = {"model": "smoke" if opts.smoke else "200M", "layers": cfg.num_layers, "dtype": cfg.dtype, "batch": batch,
            "prompt": prompt, "block": block, "new_tokens": block * blocks}
    if out_of_time(opts, sink, case):
      return
    prompts = np.random.default_rng(batch).integers(0, cfg.vocab_size, (batch, prompt)).tolist()
    kwargs = dict(max_new_tokens=block * blocks, sampler=greedy)
    t0 = time.perf_counter()
    gen.generate(prompts, **kwargs)  # compiles the prefill pieces and the decode block for these shapes
    case["warmup_s"] = time.perf_counter() - t0
    stamps = [time.perf_counter()]
    for _ in gen.stream(prompts, **kwargs):
      stamps.append(time.perf_counter())
    intervals = np.diff(stamps)
    steady = float(np.median(intervals[1:])) if len(intervals) > 1 else float(intervals[0])
    case.update(status="ok", first_block_s=float(intervals[0]), ms_per_step=1e3 * steady / block,
                tokens_per_sec=batch * block / steady, blocks_timed=len(intervals) - 1)
    sink.append(case)
    sink.flush()
