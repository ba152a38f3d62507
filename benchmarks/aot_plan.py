"""Per-chip memory of the shipped large configs on their target slices, from the real TPU (or GPU) compiler.

Runs `python -m megalodon_jax.aot ... --json` once per row below (each in its own process, one at a time: a 7B
compile takes minutes and GiBs of host memory) and prints the table of benchmarks/RESULTS.md ("Fitting the
hardware"). Compiler-reported memory, not a run on hardware.

  python benchmarks/aot_plan.py                      # every row
  python benchmarks/aot_plan.py --only 7b-32k,7b-4k  # some rows (results of the others in --out are kept)
  python benchmarks/aot_plan.py --out benchmarks/results/aot_plan.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# (row name, config, topology, programs, extra --config overrides)
ROWS = [
    ("7b-32k", "configs/megalodon_7b.py", "v5p-128", "train_step,prefill,decode", []),
    ("7b-4k", "configs/megalodon_7b.py", "v5p-128", "train_step", ["--config.seq_len=4096",
                                                                   "--config.batch_size=1024"]),
    ("1.3b-16k", "configs/mega1_3b.py", "v5p-128", "train_step", []),
    ("200m-8k", "configs/mega200m.py", "v5p-128", "train_step,prefill,decode", []),
    ("7b-64k-1seq", "configs/megalodon_7b.py", "v5p-128", "train_step", ["--config.seq_len=65536",
                                                                         "--config.batch_size=64"]),
    ("7b-128k-1seq", "configs/megalodon_7b.py", "v5p-128", "train_step", ["--config.seq_len=131072",
                                                                          "--config.batch_size=64"]),
    ("7b-256k-1seq", "configs/megalodon_7b.py", "v5p-128", "train_step", ["--config.seq_len=262144",
                                                                          "--config.batch_size=64"]),
    ("7b-32k-reset", "configs/megalodon_7b.py", "v5p-128", "train_step", ["--config.data.document_boundaries=reset"]),
    ("7b-32k-16seq", "configs/megalodon_7b.py", "v5p-128", "train_step", ["--config.batch_size=1024"]),
    ("7b-32k-h100", "configs/megalodon_7b.py", "h100-64", "train_step", ["--config.batch_size=64"]),
]


def run_row(name: str, config: str, topology: str, programs: str, extra: list[str], python: str) -> list[dict]:
  cmd = [python, "-m", "megalodon_jax.aot", "--config", config, "--topology", topology, "--programs", programs,
         "--json", *extra]
  start = time.perf_counter()
  out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, check=False)
  wall = time.perf_counter() - start
  reports = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
  if not reports:
    tail = "\n".join(out.stderr.strip().splitlines()[-3:])
    return [{"row": name, "program": programs, "topology": topology, "error": tail, "exit": out.returncode}]
  for r in reports:
    r.update(row=name, exit=out.returncode, overrides=extra, wall_seconds=wall)
  return reports


def table(rows: list[dict]) -> str:
  head = "| row | program | topology | mesh | seq len | seqs/chip | peak GiB/chip | HBM GiB | fits | compile s | " \
         "XLA TFLOP/chip | analytic TFLOP/chip |"
  lines = [head, "|" + "---|" * (head.count("|") - 1)]
  for r in rows:
    if "peak_gib" not in r:
      lines.append(f"| {r['row']} | {r['program']} | {r['topology']} | | | | error | | | | | |")
      continue
    mesh = " x ".join(f"{k} {v}" for k, v in r["mesh"].items() if v > 1) or "1"
    peak = f"{r['peak_gib']:.1f}" if r["compiled"] else f"> {r['peak_gib']:.1f} (OOM)"
    xla = f"{r['xla_flops'] / 1e12:.1f}" if r.get("xla_flops") else "-"
    lines.append(f"| {r['row']} | {r['program']} | {r['topology']} | {mesh} | {r['shape']['seq_len']} | "
                 f"{r['shape']['seqs_per_chip']:g} | {peak} | {r['hbm_gib']:.1f} | {'yes' if r['fits'] else 'no'} | "
                 f"{r['compile_seconds']:.0f} | {xla} | {r['analytic_flops'] / 1e12:.1f} |")
  return "\n".join(lines)


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--only", default="", help="comma-separated row names to run (default: all)")
  parser.add_argument("--out", default=os.path.join(REPO, "benchmarks", "results", "aot_plan.json"))
  parser.add_argument("--python", default=sys.executable, help="interpreter (the CUDA venv for the GPU rows)")
  args = parser.parse_args()
  only = set(filter(None, args.only.split(",")))
  unknown = only - {r[0] for r in ROWS}
  if unknown:
    parser.error(f"--only: unknown rows {sorted(unknown)}; rows: {[r[0] for r in ROWS]}")
  results = []
  for name, config, topology, programs, extra in ROWS:
    if only and name not in only:
      continue
    print(f"... {name}: {config} on {topology}", file=sys.stderr, flush=True)
    results += run_row(name, config, topology, programs, extra, args.python)
  print(table(results))
  import jax  # pylint: disable=import-outside-toplevel
  import platform  # pylint: disable=import-outside-toplevel
  from importlib import metadata  # pylint: disable=import-outside-toplevel
  meta = {"machine": platform.platform(), "cpus": os.cpu_count(), "jax": jax.__version__,
          "libtpu": metadata.version("libtpu"), "date": time.strftime("%Y-%m-%d")}
  os.makedirs(os.path.dirname(args.out), exist_ok=True)
  previous = []
  if os.path.exists(args.out) and args.only:
    with open(args.out) as f:
      previous = [r for r in json.load(f)["rows"] if r["row"] not in only]
  with open(args.out, "w") as f:
    json.dump({"meta": meta, "rows": previous + results}, f, indent=1)
  return 0


if __name__ == "__main__":
  sys.exit(main())
