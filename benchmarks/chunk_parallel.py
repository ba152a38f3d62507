"""Chunk parallelism (`mesh.sequence`): per-device memory and step time vs sequence length, with and without it.

Two parts (both print a markdown table and write JSON):

1. `--part cpu` (default): on 8 simulated CPU devices, forward + backward of the training loss of a small model
   for one sequence of growing length, compiled per-device memory (XLA's memory analysis) and step time, on
   (fsdp=8) (the sequence whole on every device) and on (sequence=8) (a slice of L/8 tokens per device). CPU step
   times of simulated devices share the host's cores: read them as relative, not as hardware speed.

2. `--part planner`: the 7B train step on v5p-128 (64 chips) from the deviceless TPU planner
   (`python -m megalodon_jax.aot`), per-chip peak memory for contexts 32K..1M with 32K tokens per chip: with the
   sequence axis grown with the context (batch_size x seq_len / chips fixed), and without it (batch_size 64, one
   sequence per chip, up to where it stops fitting). Each compile takes minutes; `--rows` picks some.

  python benchmarks/chunk_parallel.py --part cpu
  python benchmarks/chunk_parallel.py --part planner --rows 7b-32k-seq1,7b-128k-seq4
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

# (row, seq_len, mesh.sequence, batch_size): v5p-128 has 64 chips; fsdp = 64 / sequence fills the rest.
PLANNER_ROWS = [
    ("7b-32k-seq1", 32768, 1, 64),
    ("7b-128k-seq4", 131072, 4, 16),
    ("7b-512k-seq16", 524288, 16, 4),
    ("7b-1m-seq32", 1048576, 32, 2),
    ("7b-128k-noseq", 131072, 1, 64),
    ("7b-512k-noseq", 524288, 1, 64),
    ("7b-1m-noseq", 1048576, 1, 64),
]


def cpu_part(lengths: list[int], repeats: int) -> list[dict]:
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  import jax  # pylint: disable=import-outside-toplevel
  jax.config.update("jax_num_cpu_devices", 8)
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  from flax import nnx  # pylint: disable=import-outside-toplevel
  from jax.sharding import AxisType  # pylint: disable=import-outside-toplevel

  from benchmarks.common import compile_and_time  # pylint: disable=import-outside-toplevel
  from megalodon_jax.model_state import split_model  # pylint: disable=import-outside-toplevel
  from megalodon_jax.config import MegalodonConfig  # pylint: disable=import-outside-toplevel
  from megalodon_jax.configs import default  # pylint: disable=import-outside-toplevel
  from megalodon_jax.model import MegalodonLM  # pylint: disable=import-outside-toplevel
  from megalodon_jax.training import sharding as sh  # pylint: disable=import-outside-toplevel
  from megalodon_jax.training import train_step as ts  # pylint: disable=import-outside-toplevel

  cfg = MegalodonConfig(num_layers=2, model_dim=128, z_dim=64, value_dim=256, num_heads=2, ffn_hidden_dim=256,
                        chunk_size=128, vocab_size=256, norm_num_groups=8, cema_ndim=8, cema_impl="chunked")
  graphdef, params, buffers, rng_vars = split_model(MegalodonLM(cfg, rngs=nnx.Rngs(0)))
  rules = sh.check_rules(default.get_config().logical_axis_rules)
  key = jax.random.key(0)

  def grads(p, b, i, t):
    return jax.value_and_grad(lambda p: ts._loss_fn(p, graphdef, b, rng_vars, i, t, key, 2048)[0])(p)  # pylint: disable=protected-access

  results = []
  for length in lengths:
    ids = jnp.asarray(np.random.default_rng(0).integers(0, 256, (1, length)), jnp.int32)
    for name, shape in (("fsdp=8 (no sequence axis)", (1, 1, 8, 1)), ("sequence=8", (1, 8, 1, 1))):
      mesh = jax.make_mesh(shape, sh.MESH_AXES, axis_types=(AxisType.Auto,) * 4)
      with jax.set_mesh(mesh):
        p = jax.device_put(params, sh.state_shardings(params, rules, mesh))
        i = jax.device_put(ids, sh.batch_sharding(mesh))
        row = {"seq_len": length, "mesh": name}
        compile_and_time(grads, (p, buffers, i, i), row, max_bytes=8 << 30, max_seconds=120, repeats=repeats)
      mem = row.get("memory", {})
      row["per_device_mib"] = (mem.get("argument_size_in_bytes", 0) + mem.get("output_size_in_bytes", 0)
                               + mem.get("temp_size_in_bytes", 0) - mem.get("alias_size_in_bytes", 0)) / 2**20
      row["temp_mib"] = mem.get("temp_size_in_bytes", 0) / 2**20
      print(json.dumps({k: v for k, v in row.items() if k not in ("memory", "times_s")}), flush=True)
      results.append(row)
  return results


def cpu_table(rows: list[dict]) -> str:
  lines = ["| seq len | mesh | per-device MiB (args+out+temp) | temp MiB | step ms | compile s |", "|---|---|---|---|---|---|"]
  for r in rows:
    lines.append(f"| {r['seq_len']} | {r['mesh']} | {r['per_device_mib']:.1f} | {r['temp_mib']:.1f} | "
                 f"{r.get('median_ms', float('nan')):.0f} | {r.get('compile_s', float('nan')):.1f} |")
  return "\n".join(lines)


def planner_part(names: list[str]) -> list[dict]:
  out = []
  for name, seq_len, sequence, batch in PLANNER_ROWS:
    if names and name not in names:
      continue
    cmd = [sys.executable, "-m", "megalodon_jax.aot", "--config", "configs/megalodon_7b.py", "--topology", "v5p-128",
           "--programs", "train_step", "--json", f"--config.seq_len={seq_len}", f"--config.batch_size={batch}",
           f"--config.mesh.sequence={sequence}", "--config.mesh.fsdp=-1", "--config.mesh.data=1"]
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, check=False)
    reports = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    report = reports[0] if reports else {"error": "\n".join(proc.stderr.strip().splitlines()[-3:])}
    report.update(row=name, seq_len=seq_len, sequence=sequence, batch_size=batch, exit=proc.returncode,
                  wall_seconds=time.perf_counter() - start)
    print(json.dumps({k: report.get(k) for k in ("row", "peak_gib", "fits", "compiled", "error", "wall_seconds")}),
          flush=True)
    out.append(report)
  return out


def planner_table(rows: list[dict]) -> str:
  lines = ["| row | context | mesh.sequence | batch | tokens/chip | peak GiB/chip (v5p: 95 GiB) | fits |",
           "|---|---|---|---|---|---|---|"]
  for r in rows:
    peak = f"{r['peak_gib']:.2f}" if r.get("compiled") else (f">{r['peak_gib']:.2f}" if r.get("peak_gib") else "error")
    lines.append(f"| {r['row']} | {r['seq_len']} | {r['sequence']} | {r['batch_size']} | "
                 f"{r['seq_len'] * r['batch_size'] // 64} | {peak} | {'yes' if r.get('fits') else 'NO'} |")
  return "\n".join(lines)


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--part", choices=("cpu", "planner"), default="cpu")
  parser.add_argument("--lengths", default="1024,2048,4096,8192,16384")
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--rows", default="", help="planner rows (comma-separated); default all")
  parser.add_argument("--out", default=None, help="JSON output (default benchmarks/results/chunk_parallel_<part>.json)")
  args = parser.parse_args(argv)
  if args.part == "cpu":
    rows = cpu_part([int(x) for x in args.lengths.split(",")], args.repeats)
    print(cpu_table(rows))
  else:
    rows = planner_part([x for x in args.rows.split(",") if x])
    print(planner_table(rows))
  out = args.out or os.path.join(REPO, "benchmarks", "results", f"chunk_parallel_{args.part}.json")
  with open(out, "w", encoding="utf-8") as f:
    json.dump(rows, f, indent=1, default=str)


if __name__ == "__main__":
  main()
