"""Times the Pallas CEMA scan kernel against the best XLA CEMA paths, forward and forward+backward.

  python benchmarks/kernels_cema.py --out cema_kernel.json          # the full sweep on the current backend
  python benchmarks/kernels_cema.py --interpret                     # a tiny CPU run that only proves the script works

Cases: x (B, L, D) bfloat16, N complex states, coefficients computed from the raw parameters inside the jitted
function (as in benchmarks/cema.py), no initial state. "fwd" returns y; "fwd+bwd" is `value_and_grad` of Σ y·c with
respect to the five raw parameters and x. Each case is compiled ahead of time; one whose buffers
(`memory_analysis()`) exceed --max-bytes is reported as "skip" without running. Times are the median of --repeats
runs after a warm-up, each ended with `block_until_ready`; the kernel's forward output is also compared with the
"chunked" path (`max_rel_err_vs_chunked`). On a backend without a native kernel (CPU) the Pallas
kernel runs interpreted: those times say nothing about the kernel, and the JSON records `"interpreted": true`.

`benchmarks/kernels.py` calls `run(args)`; args may be any namespace, missing fields take this script's defaults.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

# The package may not be pip-installed (e.g. a bare GPU machine): import it from this checkout.
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
  sys.path.insert(0, REPO_ROOT)

import jax  # pylint: disable=wrong-import-position
import jax.numpy as jnp  # pylint: disable=wrong-import-position

from benchmarks.cema import make_inputs  # pylint: disable=wrong-import-position
from benchmarks.common import compile_and_time, machine_info  # pylint: disable=wrong-import-position
from megalodon_jax.ops import cema as cema_lib  # pylint: disable=wrong-import-position

KERNEL = "pallas"
XLA_IMPLS = ("fft", "chunked", "associative_scan")
TINY = {"lengths": "64", "dims": "128", "ndim": 4, "repeats": 1}  # --interpret: proves the script runs, on CPU


def parse_args(argv=None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--lengths", default="2048,4096,8192,16384,32768", help="comma-separated sequence lengths L")
  parser.add_argument("--dims", default="1024,2048,4096", help="comma-separated channel counts D")
  parser.add_argument("--ndim", type=int, default=16, help="N, complex states per channel")
  parser.add_argument("--batch", type=int, default=1)
  parser.add_argument("--impls", default=",".join((KERNEL,) + XLA_IMPLS), help="CEMA implementations to time")
  parser.add_argument("--repeats", type=int, default=5, help="timed runs per case (median reported)")
  parser.add_argument("--max-seconds", type=float, default=30.0, help="a case whose warm-up exceeds this runs once")
  parser.add_argument("--max-bytes", type=float, default=None,
                      help="skip cases whose compiled buffers exceed this (default 80%% of device memory, 8 GB on CPU)")
  parser.add_argument("--interpret", action="store_true",
                      help="tiny shapes (L=64, D=128, N=4, 1 repeat) for a CPU smoke run with the interpreted kernel")
  parser.add_argument("--out", default=None, help="write the results and machine info as JSON here")
  return parser.parse_args(argv)


def _options(args) -> argparse.Namespace:
  """This script's defaults, overridden by whatever fields `args` has (it may come from benchmarks/kernels.py)."""
  opts = vars(parse_args([]))
  opts.update({k: v for k, v in vars(args).items() if k in opts})
  if opts["interpret"]:
    opts.update(TINY)
  if opts["max_bytes"] is None:
    stats = jax.devices()[0].memory_stats() or {}
    opts["max_bytes"] = 0.8 * stats["bytes_limit"] if "bytes_limit" in stats else 8e9
  return argparse.Namespace(**opts)


def build(impl: str, mode: str):
  """The CEMA of `impl` from its parameters: forward ("fwd"), or else value and gradients of Σ y·c."""
  def forward(params, x):
    coeffs = cema_lib.cema_coefficients(params["alpha"], params["delta"], params["theta"], params["gamma"])
    return cema_lib.cema(x, coeffs, params["omega"], impl=impl)[0]

  if mode == "fwd":
    return forward
  return jax.value_and_grad(lambda params, x, c: jnp.sum(forward(params, x) * c), argnums=(0, 1))


def run_case(impl: str, length: int, dim: int, mode: str, opts) -> dict:
  """Compiles, checks the memory budget, and times one (implementation, L, D, fwd|bwd) case."""
  params, x = make_inputs(opts.batch, length, dim, opts.ndim)
  x = x.astype(jnp.bfloat16)
  inputs = (params, x) if mode == "fwd" else (params, x, jnp.full(x.shape, 1.0 / x.size, jnp.float32))
  result = {"impl": impl, "length": length, "dim": dim, "mode": mode}
  compiled = compile_and_time(build(impl, mode), inputs, result, max_bytes=opts.max_bytes,
                              max_seconds=opts.max_seconds, repeats=opts.repeats)
  if compiled is None:
    return result
  if impl == KERNEL and mode == "fwd":
    # The kernel has never run on hardware before: a fast wrong answer must not pass as a result.
    y, y_ref = compiled(*inputs), jax.jit(build("chunked", "fwd"))(*inputs)
    result["max_rel_err_vs_chunked"] = float(jnp.max(jnp.abs(y - y_ref)) / jnp.max(jnp.abs(y_ref)))
  return result


def format_table(results: list[dict]) -> str:
  """One row per (D, L): each implementation's fwd and fwd+bwd ms, and the kernel's speed-up over the best XLA."""
  index = {(r["impl"], r["dim"], r["length"], r["mode"]): r for r in results}
  impls = list(dict.fromkeys(r["impl"] for r in results))
  shapes = sorted({(r["dim"], r["length"]) for r in results})

  def ms(impl, dim, length, mode):
    r = index.get((impl, dim, length, mode))
    return r["median_ms"] if r is not None and r.get("status") in ("ok", "slow") else None

  header = ["D", "L"] + [f"{i} {m}" for i in impls for m in ("fwd ms", "f+b ms")] + ["kernel speed-up fwd", "f+b"]
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  for dim, length in shapes:
    row = [str(dim), str(length)]
    for impl in impls:
      for mode in ("fwd", "bwd"):
        value = ms(impl, dim, length, mode)
        row.append("-" if value is None else f"{value:.3g}")
    for mode in ("fwd", "bwd"):
      best = [v for v in (ms(i, dim, length, mode) for i in impls if i != KERNEL) if v is not None]
      kernel = ms(KERNEL, dim, length, mode)
      row.append(f"{min(best) / kernel:.2f}x" if best and kernel else "-")
    lines.append("| " + " | ".join(row) + " |")
  return "\n".join(lines)


def run(args) -> list[dict]:
  """Runs the sweep, prints a table, writes JSON to args.out (if set); returns the per-case results."""
  opts = _options(args)
  info = machine_info()
  interpreted = jax.default_backend() not in ("tpu", "gpu")
  print(json.dumps(info), flush=True)
  print(f"B={opts.batch} N={opts.ndim} x bfloat16, kernel interpreted: {interpreted}", flush=True)
  results = []
  for dim in (int(v) for v in opts.dims.split(",")):
    for length in (int(v) for v in opts.lengths.split(",")):
      for impl in opts.impls.split(","):
        for mode in ("fwd", "bwd"):
          case = run_case(impl, length, dim, mode, opts)
          results.append(case)
          shown = f"{case['median_ms']:.3g} ms" if "median_ms" in case else case.get("reason") or case.get("error")
          if "max_rel_err_vs_chunked" in case:
            shown += f"  (max rel. error vs chunked {case['max_rel_err_vs_chunked']:.2g})"
          print(f"  D={dim:>5} L={length:>6} {impl:>17} {mode}: {case['status']:>5} {shown}", flush=True)
  print()
  print(format_table(results))
  if opts.out:
    with open(opts.out, "w", encoding="utf-8") as f:
      json.dump({"machine": info, "interpreted": interpreted, "config": vars(opts), "argv": sys.argv[1:],
                 "results": results}, f, indent=1)
  return results


def main(argv=None):
  run(parse_args(argv))


if __name__ == "__main__":
  main()
