"""Compile time of the jitted train step vs depth, with and without `scan_layers`.

  python benchmarks/compile_time.py                       # 2, 4, 8, 16 layers, small blocks
  python benchmarks/compile_time.py --layers 8,32 --out benchmarks/results/compile_time.json
  python benchmarks/compile_time.py --config tiny --runs 3  # the trainer's own step of a shipped config

Each case traces, lowers and compiles the real train step (megalodon_jax/training/train_step.py with AdamW) in a
fresh process with the persistent compilation cache off, so every number is a cold compile. With scan_layers the
block is traced once, so compile time should stay flat as layers are added; unrolled it grows with depth.

`--config NAME` instead compiles the step `train.py --config NAME` compiles (TrainProgram: the config's optimizer,
clipping, loss pieces, mesh over the local devices), `--runs` times, each in a fresh process, for each checkout
of `--repos` (default this one; e.g. a `git worktree` of an older commit for a before/after, alternated run by run).
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


def _compile_seconds(step, *args) -> dict:
  """Traces + lowers, then XLA-compiles the jitted `step` for `args` (arrays or abstract values): the seconds."""
  t0 = time.perf_counter()
  lowered = step.lower(*args)
  t1 = time.perf_counter()
  lowered.compile()
  t2 = time.perf_counter()
  return {"trace_lower_s": t1 - t0, "compile_s": t2 - t1, "total_s": t2 - t0}


def _in_child(argv: list[str]) -> dict:
  """This file run with `argv` in a fresh process with the persistent compilation cache off: its JSON record."""
  env = {**os.environ, "JAX_ENABLE_COMPILATION_CACHE": "false"}
  out = subprocess.run([sys.executable, __file__, *argv], env=env, check=True, capture_output=True, text=True)
  return json.loads(out.stdout.strip().splitlines()[-1])


def _write(path: str, record: dict) -> None:
  from benchmarks.common import machine_info  # pylint: disable=import-outside-toplevel
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, "w", encoding="utf-8") as f:
    json.dump({"machine": machine_info(), **record}, f, indent=1)


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
  return {"num_layers": num_layers, "scan_layers": scan, "remat": remat, **_compile_seconds(step, state, batch)}


def run_config(name: str) -> dict:
  import jax  # pylint: disable=import-outside-toplevel

  from megalodon_jax.cli.config_flags import load_config  # pylint: disable=import-outside-toplevel
  from megalodon_jax.training.program import TrainProgram  # pylint: disable=import-outside-toplevel

  cfg, _ = load_config(name)
  # The model's vocabulary is the tokenizer's when the config leaves it at -1: bytes (256) for the built-in corpus.
  vocab = cfg.model.vocab_size if cfg.model.vocab_size > 0 else 256
  program = TrainProgram.build(cfg, vocab_size=vocab)
  seconds = _compile_seconds(program.train_step, program.abstract_state, program.abstract_batch())
  import megalodon_jax  # pylint: disable=import-outside-toplevel
  package = os.path.dirname(megalodon_jax.__file__)
  rev = subprocess.run(["git", "-C", package, "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                       check=False).stdout.strip()
  return {"config": name, "package": package, "commit": rev, "devices": len(jax.devices()), **seconds}


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--layers", default="2,4,8,16", help="comma-separated depths")
  p.add_argument("--remat", default="none", choices=["none", "full", "dots_saveable"])
  p.add_argument("--seq-len", type=int, default=512)
  p.add_argument("--out", default=None, help="write a JSON record here")
  p.add_argument("--config", default=None, help="a shipped config's name: its trainer step instead of the sweep")
  p.add_argument("--runs", type=int, default=3, help="fresh processes per checkout with --config")
  p.add_argument("--repos", default=REPO_ROOT, help="comma-separated checkouts whose package compiles (--config)")
  p.add_argument("--case", default=None, help=argparse.SUPPRESS)  # internal: "layers,scan" in a child process
  args = p.parse_args()
  if args.case and args.config:
    sys.path.insert(0, args.repos)  # the child's one checkout, ahead of this file's own
    print(json.dumps(run_config(args.config)))
    return
  if args.config:
    rows = []
    for run in range(args.runs):
      for repo in args.repos.split(","):
        rows.append(_in_child(["--config", args.config, "--case", "config", "--repos", os.path.abspath(repo)]))
        print(f"{args.config} run {run}: trace+lower {rows[-1]['trace_lower_s']:.2f} s, compile "
              f"{rows[-1]['compile_s']:.2f} s ({rows[-1]['commit']} {rows[-1]['package']})", flush=True)
    if args.out:
      _write(args.out, {"args": vars(args), "results": rows})
    return
  if args.case:
    n, scan = args.case.split(",")
    print(json.dumps(run_case(int(n), scan == "1", args.remat, args.seq_len)))
    return

  rows = []
  print(f"{'layers':>6} {'scan':>5} {'trace+lower s':>14} {'compile s':>10} {'total s':>8}")
  for n in (int(x) for x in args.layers.split(",")):
    for scan in (False, True):
      row = _in_child(["--case", f"{n},{int(scan)}", "--remat", args.remat, "--seq-len", str(args.seq_len)])
      rows.append(row)
      print(f"{n:>6} {str(scan):>5} {row['trace_lower_s']:>14.2f} {row['compile_s']:>10.2f} {row['total_s']:>8.2f}")
  if args.out:
    _write(args.out, {"args": vars(args), "block": BLOCK, "results": rows})


if __name__ == "__main__":
  main()
