"""Tokens/s, memory and MFU of the jitted train step vs sequence length at a fixed number of tokens per batch.

  python benchmarks/train_step.py                          # small model, 2K..64K tokens per sequence, 64K tokens per step
  python benchmarks/train_step.py --model 1b --seq-lens 4096,32768 --tokens 65536 --dtype bfloat16   # GPU

Megalodon's cost per token should be flat in sequence length (chunked attention + linear CEMA), so tokens/s should
not fall as sequences get longer while the batch shrinks to keep tokens per step fixed. Each case: one compile
(ahead of time; `memory_analysis()` gives the compiled buffer sizes on every backend), one warm-up step, then the
median of `--repeats` timed steps ended by `block_until_ready`. Synthetic uniform token ids; the real optimizer
(AdamW + clip + schedule) and the real train step (megalodon_jax/training/train_step.py), on one device.
With `--isolate` (default on GPU/TPU) each case runs in a fresh process so the allocator's peak is its own.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

# The package may not be pip-installed (e.g. a bare GPU machine): import it from this checkout.
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
  sys.path.insert(0, REPO_ROOT)

import jax  # pylint: disable=wrong-import-position
import jax.numpy as jnp  # pylint: disable=wrong-import-position
import numpy as np  # pylint: disable=wrong-import-position
from flax import nnx  # pylint: disable=wrong-import-position

from benchmarks.common import machine_info, memory_bytes, time_runs  # pylint: disable=wrong-import-position
from megalodon_jax import flops as flops_lib  # pylint: disable=wrong-import-position
from megalodon_jax.config import MegalodonConfig, preset  # pylint: disable=wrong-import-position
from megalodon_jax.model import MegalodonLM  # pylint: disable=wrong-import-position
from megalodon_jax.model_state import split_model  # pylint: disable=wrong-import-position
from megalodon_jax.training import optimizer as opt_lib  # pylint: disable=wrong-import-position
from megalodon_jax.training import train_step as ts  # pylint: disable=wrong-import-position

MODELS = {
    # 1.6M params: small enough for a 2-core CPU, chunk as in the presets so attention work per token is realistic.
    "small": dict(num_layers=2, model_dim=256, z_dim=64, value_dim=512, num_heads=1, ffn_hidden_dim=512,
                  cema_ndim=16, chunk_size=2048, norm_num_groups=32, vocab_size=256),
}


def model_config(args) -> MegalodonConfig:
  execution = dict(dtype=args.dtype, param_dtype="float32", cema_impl=args.cema_impl, remat=args.remat)
  if args.model == "1b":
    return preset("mega1.3B", **execution)
  return MegalodonConfig(**MODELS[args.model], **execution)


def run_case(seq_len: int, args) -> dict:
  cfg = model_config(args)
  batch = args.tokens // seq_len
  result = {"seq_len": seq_len, "batch": batch, "tokens": batch * seq_len}
  graphdef, params, buffers, rng_vars = split_model(MegalodonLM(cfg, rngs=nnx.Rngs(0)))
  tx = opt_lib.make_optimizer(1e-4, 1000, 10)
  state = ts.init_state(params, buffers, tx, jnp.zeros((2,), jnp.uint32))
  step = jax.jit(ts.make_train_step(graphdef, rng_vars, tx, opt_lib.lr_schedule(1e-4, 1000, 10), 1),
                 donate_argnums=0)
  ids = np.random.default_rng(0).integers(0, cfg.vocab_size, (batch, seq_len + 1))
  data = {"inputs": jnp.asarray(ids[:, :-1], jnp.int32), "targets": jnp.asarray(ids[:, 1:], jnp.int32)}
  t0 = time.perf_counter()
  compiled = step.lower(state, data).compile()
  result["compile_s"] = time.perf_counter() - t0
  result["memory"] = memory_bytes(compiled)

  held = {"state": state}

  def one_step():  # the state is donated: each step consumes the previous one's output
    held["state"], held["metrics"] = compiled(held["state"], data)
    return held["metrics"]

  times = time_runs(one_step, args.repeats)
  metrics = held["metrics"]
  step_s = statistics.median(times)
  result.update(times_s=times, step_ms=1e3 * step_s, tokens_per_sec=result["tokens"] / step_s,
                loss=float(metrics["loss"]))
  model_flops = flops_lib.train_step_flops(cfg, batch, seq_len, causal_attention=True)
  result["tflops_per_sec"] = model_flops / step_s / 1e12
  peak = flops_lib.peak_flops(jax.devices()[0].device_kind)
  result["mfu"] = None if peak is None else model_flops / step_s / peak
  stats = jax.devices()[0].memory_stats() or {}
  if "peak_bytes_in_use" in stats:
    result["device_peak_bytes"] = int(stats["peak_bytes_in_use"])
  return result


def run_isolated(seq_len: int, args) -> dict:
  cmd = [sys.executable, os.path.abspath(__file__), "--case", str(seq_len), "--tokens", str(args.tokens),
         "--model", args.model, "--dtype", args.dtype, "--cema-impl", args.cema_impl, "--remat", args.remat,
         "--repeats", str(args.repeats)]
  proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
  lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
  if proc.returncode != 0 or not lines:
    return {"seq_len": seq_len, "status": "error", "error": f"rc={proc.returncode}: {proc.stderr.strip()[-300:]}"}
  return json.loads(lines[-1])


def format_table(results: list[dict]) -> str:
  rows = ["| seq_len | batch | step ms | tokens/s | rel. tokens/s | TFLOP/s | MFU | compiled MiB | device peak MiB |",
          "|---|---|---|---|---|---|---|---|---|"]
  base = next((r["tokens_per_sec"] for r in results if "tokens_per_sec" in r), None)
  for r in results:
    if "tokens_per_sec" not in r:
      rows.append(f"| {r['seq_len']} | - | {r.get('error', 'error')[:60]} | | | | | | |")
      continue
    mem = r["memory"].get("total_bytes")
    peak = r.get("device_peak_bytes")
    mfu = "-" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%"
    rows.append(f"| {r['seq_len']} | {r['batch']} | {r['step_ms']:.1f} | {r['tokens_per_sec']:,.0f} | "
                f"{r['tokens_per_sec'] / base:.2f} | {r['tflops_per_sec']:.3f} | "
                f"{mfu} | "
                f"{'-' if mem is None else f'{mem / 2**20:,.0f}'} | {'-' if peak is None else f'{peak / 2**20:,.0f}'} |")
  return "\n".join(rows)


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--seq-lens", default="2048,4096,8192,16384,32768,65536")
  p.add_argument("--tokens", type=int, default=65536, help="tokens per step (batch = tokens // seq_len)")
  p.add_argument("--model", choices=["small", "1b"], default="small")
  p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
  p.add_argument("--cema-impl", default="auto")
  p.add_argument("--remat", default="none", choices=["none", "full", "dots_saveable"])
  p.add_argument("--repeats", type=int, default=3)
  p.add_argument("--isolate", action=argparse.BooleanOptionalAction, default=None)
  p.add_argument("--out", default="", help="write results + machine info as JSON here")
  p.add_argument("--case", type=int, default=None, help=argparse.SUPPRESS)
  return p.parse_args(argv)


def main(argv=None):
  args = parse_args(argv)
  if args.case is not None:
    print(json.dumps(run_case(args.case, args)))
    return
  lens = [int(x) for x in args.seq_lens.split(",")]
  bad = [n for n in lens if args.tokens % n]
  if bad:
    raise SystemExit(f"--tokens {args.tokens} is not a multiple of seq_len(s) {bad}")
  isolate = args.isolate if args.isolate is not None else jax.devices()[0].platform != "cpu"
  results = []
  for n in lens:
    results.append(run_isolated(n, args) if isolate else run_case(n, args))
    print(f"seq_len {n}: {results[-1].get('step_ms', float('nan')):.1f} ms", file=sys.stderr)
  cfg = model_config(args)
  print(f"model {args.model}: {cfg.num_params():,} params, dtype {args.dtype}, cema {args.cema_impl}, "
        f"remat {args.remat}, {args.tokens} tokens/step, {machine_info()['device_kind']}")
  print(format_table(results))
  if args.out:
    with open(args.out, "w", encoding="utf-8") as f:
      json.dump({"machine": machine_info(), "args": vars(args), "num_params": cfg.num_params(),
                 "results": results}, f, indent=2)


if __name__ == "__main__":
  main()
