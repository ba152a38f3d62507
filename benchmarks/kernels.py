"""Times the Pallas chunked-attention kernel against the XLA path and cuDNN, forward and forward+backward; then runs
the CEMA kernel benchmark (benchmarks/kernels_cema.py) if it is present, so one command covers both kernels.

  python benchmarks/kernels.py --out kernels.json        # the full sweep on the current backend
  python benchmarks/kernels.py --interpret               # a tiny CPU run that only proves the script works

Attention cases: q, k, v (B, L, H, d) bfloat16 with dz = dv = d, block-diagonal causal attention over chunks of C
(L a multiple of every C). Implementations:
  pallas  pallas_kernels.chunked_attention (Mosaic on TPU, Triton on GPU, interpreted on CPU),
  xla     megalodon_jax.ops.attention.chunked_causal_attention (the model's default path),
  cudnn   jax.nn.dot_product_attention(implementation="cudnn", is_causal=True, scale=1) on the inputs reshaped to
          (B·L/C, C, H, d) chunks; GPU only.
"fwd" returns the output; "fwd+bwd" is `value_and_grad` of Σ o·c with respect to q, k, v. Each case is compiled
ahead of time and skipped if its buffers (`memory_analysis()`) exceed --max-bytes; times are the median of
--repeats runs after a warm-up, each ended with `block_until_ready`. The kernel's forward output is compared with
the XLA path (`max_rel_err_vs_xla`): a fast wrong answer must not pass as a result.

TFLOP/s counts the useful matmul FLOPs of causal chunked attention, B·H·(L/C)·C²·2·(dz + dv) / 2 for the forward
pass (the masked half of each chunk's score block is not counted) and 3x that for forward+backward (the MFU
convention, no recomputation); "% peak" divides by the device's dense bf16 peak (megalodon_jax/flops.py).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys

# The package may not be pip-installed (e.g. a bare GPU machine): import it from this checkout.
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
  sys.path.insert(0, REPO_ROOT)

import jax  # pylint: disable=wrong-import-position
import jax.numpy as jnp  # pylint: disable=wrong-import-position
import numpy as np  # pylint: disable=wrong-import-position

from benchmarks.common import compile_and_time, machine_info  # pylint: disable=wrong-import-position
from megalodon_jax.flops import peak_flops  # pylint: disable=wrong-import-position
from megalodon_jax.ops.attention import chunked_causal_attention  # pylint: disable=wrong-import-position
from pallas_kernels.chunked_attention import BlockSizes, chunked_attention  # pylint: disable=wrong-import-position

IMPLS = ("pallas", "xla", "cudnn")
TINY = {"seq_len": 256, "chunks": "128", "head_dims": "64", "heads": 1, "repeats": 1}  # --interpret


def parse_args(argv=None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--seq-len", type=int, default=16384, help="L, a multiple of every chunk size")
  parser.add_argument("--chunks", default="512,1024,2048,4096", help="comma-separated chunk sizes C")
  parser.add_argument("--head-dims", default="128,256", help="comma-separated head dims d (dz = dv = d)")
  parser.add_argument("--heads", type=int, default=4, help="H")
  parser.add_argument("--batch", type=int, default=1, help="B")
  parser.add_argument("--impls", default=",".join(IMPLS), help=f"attention implementations, from {IMPLS}")
  parser.add_argument("--blocks", default=None,
                      help="kernel tiles block_q,block_k,block_q_bwd,block_k_bwd,block_v (default: per backend)")
  parser.add_argument("--repeats", type=int, default=10, help="timed runs per case (median reported)")
  parser.add_argument("--max-seconds", type=float, default=30.0, help="a case whose warm-up exceeds this runs once")
  parser.add_argument("--max-bytes", type=float, default=None,
                      help="skip cases whose compiled buffers exceed this (default 80%% of device memory, 8 GB on CPU)")
  parser.add_argument("--interpret", action="store_true",
                      help="tiny shapes (L=256, C=128, d=64, H=1, 1 repeat) for a CPU smoke run of both benchmarks")
  parser.add_argument("--skip-cema", action="store_true", help="do not run benchmarks/kernels_cema.py")
  parser.add_argument("--out", default=None, help="write the results and machine info as JSON here")
  return parser.parse_args(argv)


def _options(args: argparse.Namespace) -> argparse.Namespace:
  opts = vars(args).copy()
  if opts["interpret"]:
    opts.update(TINY)
  if opts["max_bytes"] is None:
    stats = jax.devices()[0].memory_stats() or {}
    opts["max_bytes"] = 0.8 * stats["bytes_limit"] if "bytes_limit" in stats else 8e9
  bad = [i for i in opts["impls"].split(",") if i not in IMPLS]
  if bad:
    raise SystemExit(f"--impls: unknown {bad}; choose from {IMPLS}")
  for c in (int(v) for v in opts["chunks"].split(",")):
    if opts["seq_len"] % c:
      raise SystemExit(f"--seq-len {opts['seq_len']} is not a multiple of chunk size {c}")
  return argparse.Namespace(**opts)


def attention_flops(batch: int, seq_len: int, heads: int, chunk: int, dz: int, dv: int) -> float:
  """Useful forward FLOPs of causal chunked attention (half of every chunk's c×c block, see the docstring)."""
  return batch * heads * (seq_len // chunk) * chunk * chunk * 2 * (dz + dv) / 2


def _block_sizes(spec):
  if spec is None:
    return None
  names = ("block_q", "block_k", "block_q_bwd", "block_k_bwd", "block_v")
  return BlockSizes(**dict(zip(names, (int(v) for v in spec.split(",")))))


def _attend(impl: str, chunk: int, blocks=None):
  if impl == "pallas":
    return lambda q, k, v: chunked_attention(q, k, v, chunk, block_sizes=blocks)
  if impl == "xla":
    return lambda q, k, v: chunked_causal_attention(q, k, v, chunk)

  def cudnn(q, k, v):
    b, l, h, _ = q.shape
    split = lambda x: x.reshape(b * (l // chunk), chunk, h, x.shape[-1])  # noqa: E731
    out = jax.nn.dot_product_attention(split(q), split(k), split(v), scale=1.0, is_causal=True,
                                       implementation="cudnn")
    return out.reshape(b, l, h, -1)

  return cudnn


def _build(impl: str, chunk: int, mode: str, blocks=None):
  attend = _attend(impl, chunk, blocks)
  if mode == "fwd":
    return attend
  return jax.value_and_grad(lambda q, k, v, c: jnp.sum(attend(q, k, v).astype(jnp.float32) * c), argnums=(0, 1, 2))


def _inputs(opts, head_dim: int, mode: str):
  rng = np.random.default_rng(0)
  shape = (opts.batch, opts.seq_len, opts.heads, head_dim)
  # Unit-RMS rows scaled by d^-1/4 each, like the model's normalised q/k (logits of order 1).
  q, k = (jnp.asarray(rng.normal(size=shape) * head_dim ** -0.25, jnp.bfloat16) for _ in range(2))
  v = jnp.asarray(rng.normal(size=shape), jnp.bfloat16)
  if mode == "fwd":
    return q, k, v
  return q, k, v, jnp.asarray(rng.normal(size=shape) / np.sqrt(np.prod(shape)), jnp.float32)


def run_case(impl: str, chunk: int, head_dim: int, mode: str, opts) -> dict:
  """Compiles, checks the memory budget, times and (for the kernel) checks one case."""
  result = {"impl": impl, "chunk": chunk, "head_dim": head_dim, "mode": mode}
  if impl == "cudnn" and jax.default_backend() != "gpu":
    result.update(status="n/a", reason="cuDNN attention needs a GPU")
    return result
  inputs = _inputs(opts, head_dim, mode)
  compiled = compile_and_time(_build(impl, chunk, mode, _block_sizes(opts.blocks)), inputs, result,
                              max_bytes=opts.max_bytes, max_seconds=opts.max_seconds, repeats=opts.repeats)
  if compiled is None:
    return result
  flops = attention_flops(opts.batch, opts.seq_len, opts.heads, chunk, head_dim, head_dim) * (1 if mode == "fwd"
                                                                                               else 3)
  result["tflops"] = flops / (result["median_ms"] * 1e-3) / 1e12
  if impl == "pallas" and mode == "fwd":
    got, want = compiled(*inputs), jax.jit(_build("xla", chunk, "fwd"))(*inputs)
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    result["max_rel_err_vs_xla"] = float(np.max(np.abs(got - want)) / np.max(np.abs(want)))
  return result


def format_table(results: list[dict], peak) -> str:
  """One row per (C, d): each implementation's ms and TFLOP/s (% of peak) for fwd and fwd+bwd."""
  index = {(r["impl"], r["chunk"], r["head_dim"], r["mode"]): r for r in results}
  impls = list(dict.fromkeys(r["impl"] for r in results))
  shapes = sorted({(r["chunk"], r["head_dim"]) for r in results})

  def cell(impl, chunk, d, mode):
    r = index.get((impl, chunk, d, mode))
    if r is None or r.get("status") not in ("ok", "slow"):
      return "-" if r is None else r["status"]
    share = f", {100 * r['tflops'] * 1e12 / peak:.0f}%" if peak else ""
    return f"{r['median_ms']:.3g} ms ({r['tflops']:.3g} TF/s{share})"

  header = ["C", "d"] + [f"{i} {m}" for i in impls for m in ("fwd", "fwd+bwd")]
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  for chunk, d in shapes:
    lines.append("| " + " | ".join([str(chunk), str(d)] + [cell(i, chunk, d, m) for i in impls
                                                          for m in ("fwd", "bwd")]) + " |")
  return "\n".join(lines)


def run_attention(opts) -> list[dict]:
  results = []
  for chunk in (int(v) for v in opts.chunks.split(",")):
    for head_dim in (int(v) for v in opts.head_dims.split(",")):
      for impl in opts.impls.split(","):
        for mode in ("fwd", "bwd"):
          case = run_case(impl, chunk, head_dim, mode, opts)
          results.append(case)
          shown = (f"{case['median_ms']:.3g} ms, {case['tflops']:.3g} TFLOP/s" if "median_ms" in case
                   else case.get("reason") or case.get("error"))
          if "max_rel_err_vs_xla" in case:
            shown += f"  (max rel. error vs xla {case['max_rel_err_vs_xla']:.2g})"
          print(f"  C={chunk:>5} d={head_dim:>4} {impl:>7} {mode}: {case['status']:>5} {shown}", flush=True)
  return results


def run_cema(opts) -> list[dict] | None:
  """benchmarks/kernels_cema.py's `run`, when that module exists (its own defaults, our --interpret/--repeats)."""
  if opts.skip_cema or importlib.util.find_spec("benchmarks.kernels_cema") is None:
    return None
  from benchmarks import kernels_cema  # pylint: disable=import-outside-toplevel
  print("\n== CEMA kernel (benchmarks/kernels_cema.py) ==", flush=True)
  return kernels_cema.run(argparse.Namespace(interpret=opts.interpret, max_seconds=opts.max_seconds, out=None,
                                             **({} if opts.interpret else {"repeats": opts.repeats})))


def run(args) -> dict:
  opts = _options(args)
  info = machine_info()
  peak = peak_flops(info["device_kind"])
  interpreted = jax.default_backend() not in ("tpu", "gpu")
  print(json.dumps(info), flush=True)
  print(f"== chunked attention: B={opts.batch} L={opts.seq_len} H={opts.heads} bfloat16, kernel interpreted: "
        f"{interpreted}, peak {peak and peak / 1e12} TFLOP/s ==", flush=True)
  attention = run_attention(opts)
  print()
  print(format_table(attention, peak))
  cema = run_cema(opts)
  report = {"machine": info, "interpreted": interpreted, "peak_flops": peak, "config": vars(opts),
            "argv": sys.argv[1:], "attention": attention, "cema": cema}
  if opts.out:
    with open(opts.out, "w", encoding="utf-8") as f:
      json.dump(report, f, indent=1)
  return report


def main(argv=None):
  run(parse_args(argv))


if __name__ == "__main__":
  main()
