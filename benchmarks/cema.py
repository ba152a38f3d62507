"""Times the CEMA implementations (megalodon_jax/ops/cema/) forward and forward+backward, and reports their memory.

  python benchmarks/cema.py --lengths 1024,4096 --dim 256 --ndim 16 --backward --out results.json

Each case is jitted and compiled ahead of time; the compiled executable's `memory_analysis()` (works on every
backend) gives the buffer sizes, and a case whose arguments + outputs + temporaries exceed `--max-bytes` is reported
as "skip" without running. Times are the median of `--repeats` runs after one warm-up run, each ended with
`block_until_ready`. With `--isolate` (the default on GPU/TPU) every case runs in a fresh subprocess, so the device
allocator's `peak_bytes_in_use` belongs to that case alone. An implementation may be given as "name:K": the block
size of "chunked" or the unroll of "sequential".
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import subprocess
import sys

# The package may not be pip-installed (e.g. a bare GPU machine): import it from this checkout.
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
  sys.path.insert(0, REPO_ROOT)

import jax  # pylint: disable=wrong-import-position
import jax.numpy as jnp  # pylint: disable=wrong-import-position
import numpy as np  # pylint: disable=wrong-import-position

from benchmarks.common import compile_and_time, machine_info  # pylint: disable=wrong-import-position
from megalodon_jax.ops import cema as cema_lib  # pylint: disable=wrong-import-position

DEFAULT_IMPLS = "fft,associative_scan,sequential,chunked"


def resolve_impl(spec: str):
  """"name" or "name:K" → a callable with the common CEMA signature."""
  name, _, arg = spec.partition(":")
  if name == "auto":
    return lambda x, coeffs, omega: cema_lib.cema(x, coeffs, omega, impl="auto")
  impl = cema_lib.IMPLEMENTATIONS[name]
  if arg:
    key = {"chunked": "block_size", "sequential": "unroll"}.get(name)
    if key is None:
      raise ValueError(f"{name} takes no ':K' argument")
    impl = functools.partial(impl, **{key: int(arg)})
  return lambda x, coeffs, omega: impl(x, coeffs, omega)


def make_inputs(batch: int, length: int, dim: int, ndim: int, seed: int = 0):
  """Parameters like the official initialisation (docs/model.md#initialisation), so |q| ≈ 0.75 and the angles
  are spread, and a standard-normal input."""
  rng = np.random.default_rng(seed)
  f = np.exp(-np.arange(1, dim + 1) * math.log(dim) / dim)[rng.permutation(dim)]
  params = {
      "alpha": rng.normal(0.0, 0.2, (dim, ndim, 1)),
      "delta": rng.normal(0.0, 0.2, (dim, ndim, 1)),
      "theta": np.log(f / (1 - f)).reshape(dim, 1, 1),
      "gamma": np.stack([rng.normal(size=(dim, ndim)), np.zeros((dim, ndim))], axis=-1),
      "omega": np.clip(rng.normal(0.0, 0.25, (dim, 1)), -1, 1),
  }
  params = {k: jnp.asarray(v, jnp.float32) for k, v in params.items()}
  x = jnp.asarray(rng.normal(size=(batch, length, dim)), jnp.float32)
  return params, x


def build(spec: str, mode: str):
  """The function to time: "fwd" returns y; "bwd" returns the loss Σ y·c and its gradients w.r.t. params and x."""
  impl = resolve_impl(spec)

  def forward(params, x):
    coeffs = cema_lib.cema_coefficients(params["alpha"], params["delta"], params["theta"], params["gamma"])
    return impl(x, coeffs, params["omega"])[0]

  if mode == "fwd":
    return forward

  def loss(params, x, cotangent):
    return jnp.sum(forward(params, x) * cotangent)

  return jax.value_and_grad(loss, argnums=(0, 1))


def run_case(spec: str, length: int, mode: str, args) -> dict:
  """Compiles, checks the memory budget, and times one (implementation, length, fwd|bwd) case."""
  params, x = make_inputs(args.batch, length, args.dim, args.ndim)
  inputs = (params, x) if mode == "fwd" else (params, x, jnp.ones_like(x) / x.size)
  result = {"impl": spec, "length": length, "mode": mode}
  # --max-seconds is the time budget of the case: the timed runs are capped to fit it.
  if compile_and_time(build(spec, mode), inputs, result, max_bytes=args.max_bytes, max_seconds=args.max_seconds,
                      repeats=args.repeats, fit_repeats=True) is not None:
    stats = jax.devices()[0].memory_stats() or {}
    if "peak_bytes_in_use" in stats:
      result["device_peak_bytes"] = int(stats["peak_bytes_in_use"])
  return result


def run_isolated(spec: str, length: int, mode: str, args) -> dict:
  """Runs one case in a fresh interpreter so the allocator's peak belongs to it alone."""
  cmd = [sys.executable, os.path.abspath(__file__), "--case", json.dumps([spec, length, mode]),
         "--batch", str(args.batch), "--dim", str(args.dim), "--ndim", str(args.ndim),
         "--repeats", str(args.repeats), "--max-bytes", str(args.max_bytes), "--max-seconds", str(args.max_seconds)]
  proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
  lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
  if proc.returncode != 0 or not lines:
    # Typically an out-of-memory kill: keep the sweep going and record why.
    return {"impl": spec, "length": length, "mode": mode, "status": "error",
            "error": f"rc={proc.returncode}: {proc.stderr.strip()[-300:]}"}
  return json.loads(lines[-1])


def _cell(case: dict | None, key: str = "median_ms") -> str:
  if case is None:
    return "-"
  if case.get("status") in ("skip", "error"):
    return case["status"]
  value = f"{case[key]:.2f}" if case[key] < 100 else f"{case[key]:.0f}"
  return value + ("*" if case.get("status") == "slow" else "")


def _mib(case: dict | None) -> str:
  if case is None or "memory" not in case:
    return "-"
  peak = case.get("device_peak_bytes")
  return f"{(peak or case['memory']['total_bytes']) / 2**20:.0f}"


def format_table(results: list[dict], modes: list[str]) -> str:
  index = {(r["impl"], r["length"], r["mode"]): r for r in results}
  impls = list(dict.fromkeys(r["impl"] for r in results))
  lengths = sorted({r["length"] for r in results})
  header = ["impl", "L", "fwd ms", "fwd MiB"] + (["fwd+bwd ms", "fwd+bwd MiB"] if "bwd" in modes else [])
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  for impl in impls:
    for length in lengths:
      row = [impl, str(length)]
      for mode in modes:
        case = index.get((impl, length, mode))
        row += [_cell(case), _mib(case)]
      lines.append("| " + " | ".join(row) + " |")
  return "\n".join(lines)


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--lengths", default="1024,2048,4096,8192,16384,32768", help="comma-separated sequence lengths")
  parser.add_argument("--batch", type=int, default=1)
  parser.add_argument("--dim", type=int, default=256, help="D, channels")
  parser.add_argument("--ndim", type=int, default=16, help="N, complex states per channel")
  parser.add_argument("--impls", default=DEFAULT_IMPLS, help="comma-separated; 'chunked:K' sets the block size")
  parser.add_argument("--backward", action="store_true", help="also time forward+backward (grads of params and x)")
  parser.add_argument("--repeats", type=int, default=5, help="timed runs per case (median reported)")
  parser.add_argument("--max-bytes", type=float, default=None,
                      help="skip cases whose compiled buffers exceed this (default 8 GB on CPU, 80%% of device memory)")
  parser.add_argument("--max-seconds", type=float, default=30.0,
                      help="time budget per case; a case whose warm-up run exceeds it is reported once, marked '*'")
  parser.add_argument("--isolate", action=argparse.BooleanOptionalAction, default=None,
                      help="one subprocess per case (default: on for GPU/TPU, off for CPU)")
  parser.add_argument("--out", default=None, help="write the results and machine info as JSON here")
  parser.add_argument("--case", default=None, help=argparse.SUPPRESS)  # internal: run one case, print JSON
  args = parser.parse_args(argv)
  if args.max_bytes is None:
    stats = jax.devices()[0].memory_stats() or {}
    args.max_bytes = 0.8 * stats["bytes_limit"] if "bytes_limit" in stats else 8e9
  return args


def main(argv=None):
  args = parse_args(argv)
  if args.case is not None:
    spec, length, mode = json.loads(args.case)
    print(json.dumps(run_case(spec, length, mode, args)))
    return
  isolate = args.isolate if args.isolate is not None else jax.default_backend() != "cpu"
  lengths = [int(v) for v in args.lengths.split(",")]
  specs = args.impls.split(",")
  modes = ["fwd", "bwd"] if args.backward else ["fwd"]
  info = machine_info()
  print(json.dumps(info), flush=True)
  print(f"B={args.batch} D={args.dim} N={args.ndim} max_bytes={args.max_bytes:.3g} isolate={isolate}", flush=True)
  results = []
  for length in lengths:
    for spec in specs:
      for mode in modes:
        case = (run_isolated if isolate else run_case)(spec, length, mode, args)
        results.append(case)
        print(f"  {spec:>20} L={length:>6} {mode}: {case['status']:>5} {_cell(case):>8} ms  {_mib(case):>6} MiB"
              + (f"  ({case.get('reason') or case.get('error')})" if case["status"] in ("skip", "error") else ""),
              flush=True)
  print()
  print(format_table(results, modes))
  if args.out:
    with open(args.out, "w", encoding="utf-8") as f:
      json.dump({"machine": info, "config": {"batch": args.batch, "dim": args.dim, "ndim": args.ndim,
                                             "repeats": args.repeats, "max_bytes": args.max_bytes,
                                             "isolate": isolate, "argv": sys.argv[1:]},
                 "results": results}, f, indent=1)


if __name__ == "__main__":
  main()
