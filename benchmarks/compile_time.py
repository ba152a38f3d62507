"""Compile time of the jitted train step vs depth, with and without `scan_layers`.

  python benchmarks/compile_time.py                       # 2, 4, 8, 16 layers, small blocks
  python benchmarks/compile_time.py --layers 8,32 --out benchmarks/results/compile_time.json

Each case traces, lowers and compiles the real train step (megalodon_jax/training/train_step.py with AdamW) in a
fresh process with the persistent compilation cache off, so every number is a cold compile. With scan_layers the
block is traced once, so compile time should stay flat as layers are added; unrolled it grows with depth.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
  sys.path.insert(0, REPO_ROOT)

BLOCK = dict(model_dim=128, z_dim=64, value_dim=256, num_heads=1, ffn_hidden_dim=256, cema_ndim=8, chunk_size=256,
             norm_num_groups=16, vocab_size=256)


def run_case(num_layers: int, scan: bool, remat: str, seq_len: int) -> dict:
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  from flax import nnx  # pylint: disable=import-outside-toplevel

  from megalodon_jax.model_state import split_model  # pylint: disable=import-outside-toplevel
  from megalodon_jax.config import MegalodonConfig  # pylint: disable=import-outside-toplevel
  from megalodon_jax.model import MegalodonLM  # pylint: disable=import-outside-toplevel
  from megalodon_jax.training import optimizer as opt_lib  # pylint: disable=import-outside-toplevel
  from megalodon_jax.training import train_step as ts  # pylint: disable=import-outside-toplevel

  cfg = MegalodonConfig(**BLOCK, num_layers=num_layers, scan_layers=scan, remat=remat)
  graphdef, params, buffers, rng_vars = split_model(nnx.eval_shape(lambda: MegalodonLM(cfg, rngs=nnx.Rngs(0))))
  tx = opt_lib.make_optimizer(1e-4, 1000, 10)
  step = jax.jit(ts.make_train_step(graphdef, rng_vars, tx, opt_lib.lr_schedule(1e-4, 1000, 10), 1),
                 donate_argnums=0)
  state = jax.eval_shape(lambda: ts.init_state(params, buffers, tx, jnp.zeros((2,), jnp.uint32)))
  batch = {k: jax.ShapeDtypeStruct((1, seq_len), jnp.int32) for k in ("inputs", "targets")}
  t0 = time.perf_counter()
  lowered = step.lower(state, batch)
  t1 = time.perf_counter()
  lowered.compile()
  t2 = time.perf_counter()
  return {"num_layers": num_layers, "scan_layers": scan, "remat": remat, "trace_lower_s": t1 - t0,
          "compile_s": t2 - t1, "total_s": t2 - t0}


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--layers", default="2,4,8,16", help="comma-separated depths")
  p.add_argument("--remat", default="none", choices=["none", "full", "dots_saveable"])
  p.add_argument("--seq-len", type=int, default=512)
  p.add_argument("--out", default=None, help="write a JSON record here")
  p.add_argument("--case", default=None, help=argparse.SUPPRESS)  # internal: "layers,scan" in a child process
  args = p.parse_args()
  if args.case:
    n, scan = args.case.split(",")
    print(json.dumps(run_case(int(n), scan == "1", args.remat, args.seq_len)))
    return

  from benchmarks.common import machine_info  # pylint: disable=import-outside-toplevel
  env = {**os.environ, "JAX_ENABLE_COMPILATION_CACHE": "false"}
  rows = []
  print(f"{'layers':>6} {'scan':>5} {'trace+lower s':>14} {'compile s':>10} {'total s':>8}")
  for n in (int(x) for x in args.layers.split(",")):
    for scan in (False, True):
      out = subprocess.run([sys.executable, __file__, "--case", f"{n},{int(scan)}", "--remat", args.remat,
                            "--seq-len", str(args.seq_len)], env=env, check=True, capture_output=True, text=True)
      row = json.loads(out.stdout.strip().splitlines()[-1])
      rows.append(row)
      print(f"{n:>6} {str(scan):>5} {row['trace_lower_s']:>14.2f} {row['compile_s']:>10.2f} {row['total_s']:>8.2f}")
  if args.out:
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w", encoding="utf-8") as f:
      json.dump({"machine": machine_info(), "args": vars(args), "block": BLOCK, "results": rows}, f, indent=1)


if __name__ == "__main__":
  main()
