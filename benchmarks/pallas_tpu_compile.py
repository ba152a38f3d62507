"""Deviceless TPU compilation of the Pallas kernels: every shipped config, dtype and program, on v4, v5e, v5p, v6e.

Runs on a CPU-only machine: `jax.experimental.topologies` gives abstract TPU devices, and XLA:TPU with Mosaic
(libtpu) compiles for them. Each program is traced under `pallas_kernels.platform.target_platform("tpu")`, so the
kernels are the native Mosaic ones, not interpret mode, and placed on one chip (a one-device mesh, so the kernels
can read the generation from the arguments' sharding). Nothing runs; a row records whether XLA:TPU + Mosaic
accepted the program, how long that took, and the compiled program's HBM temp bytes.

Programs (per config: heads H, chunk C, CEMA width D; head dims dz = 256, dv = 2048; N = 16):
  attn_fwd      chunked_attention forward, (B, L, H, ·)
  attn_fwd_bwd  jax.grad through the custom_vjp (forward with statistics, dq and dk/dv kernels)
  decode_t1     chunked_attention_decode, 1 query against a 2C key frame, traced offset
  decode_tc     chunked_attention_decode, C queries against a 2C key frame
  cema_fwd      cema_scan forward, (B, L, D)
  cema_fwd_bwd  jax.grad of cema_scan wrt x and the five coefficient arrays and omega

Usage: python benchmarks/pallas_tpu_compile.py [--generations v5e v6e] [--configs megalodon_7b] [--dtypes bf16]
  [--programs attn_fwd] [--length 32768] [--batch 1] [--out benchmarks/results/pallas_tpu_compile.json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback

# libtpu refuses a second process holding its lockfile; a deviceless compile touches no TPU, so several may run.
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

import jax  # pylint: disable=wrong-import-position
import jax.numpy as jnp  # pylint: disable=wrong-import-position
import numpy as np  # pylint: disable=wrong-import-position
from jax.experimental import topologies  # pylint: disable=wrong-import-position
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P  # pylint: disable=wrong-import-position

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.common import machine_info  # pylint: disable=wrong-import-position
from pallas_kernels.cema import cema_scan  # pylint: disable=wrong-import-position
from pallas_kernels.chunked_attention import (  # pylint: disable=wrong-import-position
    chunked_attention, chunked_attention_decode)
from pallas_kernels.platform import target_platform  # pylint: disable=wrong-import-position

MiB = 1 << 20
# Smallest topology libtpu accepts per generation (single-chip names fail: "not divisible by chips_per_host_bounds").
TOPOLOGIES = {"v4": "v4:2x2x1", "v5e": "v5e:2x2", "v5p": "v5p:2x2x1", "v6e": "v6e:2x2"}
# Per-head attention shapes and CEMA width of the shipped configs (configs/*.py).
CONFIGS = {
    "mega200m": dict(heads=1, chunk=2048, dim=1024),
    "mega1_3b": dict(heads=2, chunk=2048, dim=2048),
    "megalodon_7b": dict(heads=4, chunk=4096, dim=4096),
}
DZ, DV, NSTATE = 256, 2048, 16
DTYPES = {"bf16": jnp.bfloat16, "f32": jnp.float32}
PROGRAMS = ("attn_fwd", "attn_fwd_bwd", "decode_t1", "decode_tc", "cema_fwd", "cema_fwd_bwd")


def _program(name: str, cfg: dict, dtype, length: int, batch: int):
  """(function, argument shapes) of one program; shapes as (shape, dtype) pairs."""
  h, c, d = cfg["heads"], cfg["chunk"], cfg["dim"]
  f32 = jnp.float32
  if name in ("attn_fwd", "attn_fwd_bwd"):
    shapes = [((batch, length, h, DZ), dtype), ((batch, length, h, DZ), dtype), ((batch, length, h, DV), dtype)]
    fwd = lambda q, k, v: chunked_attention(q, k, v, c)  # pylint: disable=unnecessary-lambda-assignment
    if name == "attn_fwd":
      return fwd, shapes
    return jax.grad(lambda q, k, v: jnp.sum(fwd(q, k, v).astype(f32)), argnums=(0, 1, 2)), shapes
  if name in ("decode_t1", "decode_tc"):
    t = 1 if name == "decode_t1" else c
    shapes = [((batch, t, h, DZ), dtype), ((batch, 2 * c, h, DZ), dtype), ((batch, 2 * c, h, DV), dtype),
              ((), jnp.int32)]
    return lambda q, kf, vf, off: chunked_attention_decode(q, kf, vf, off, c), shapes
  shapes = [((batch, length, d), dtype)] + [((d, NSTATE), f32)] * 5 + [((d,), f32)]
  if name == "cema_fwd":
    return lambda x, *coef: cema_scan(x, *coef)[0], shapes
  return jax.grad(lambda x, *coef: jnp.sum(cema_scan(x, *coef)[0]), argnums=tuple(range(7))), shapes


def compile_one(device, program: str, config: str, dtype_name: str, length: int, batch: int) -> dict:
  """Compiles one program for one chip; returns the result row (never raises)."""
  fn, shapes = _program(program, CONFIGS[config], DTYPES[dtype_name], length, batch)
  sharding = NamedSharding(Mesh(np.array([device]), ("chip",)), P())
  args = [jax.ShapeDtypeStruct(s, d, sharding=sharding) for s, d in shapes]
  row = dict(config=config, dtype=dtype_name, program=program, length=length, batch=batch)
  start = time.perf_counter()
  try:
    with target_platform("tpu"):
      compiled = jax.jit(fn).trace(*args).lower(lowering_platforms=("tpu",)).compile()
    stats = compiled.memory_analysis()
    text = compiled.as_text()
    row.update(compiled=True, temp_mib=round(stats.temp_size_in_bytes / MiB, 1),
               argument_mib=round(stats.argument_size_in_bytes / MiB, 1),
               output_mib=round(stats.output_size_in_bytes / MiB, 1),
               mosaic_kernels=text.count('custom_call_target="tpu_custom_call"'), error=None)
  except Exception as e:  # pylint: disable=broad-exception-caught
    msg = "".join(traceback.format_exception_only(type(e), e)).strip()
    row.update(compiled=False, temp_mib=None, error=" ".join(msg.split())[:400])
  row["compile_s"] = round(time.perf_counter() - start, 2)
  return row


def _table(rows) -> str:
  head = "| generation | config | dtype | program | compiled | compile s | temp MiB | Mosaic kernels | error |"
  lines = [head, "|" + "---|" * 9]
  for r in rows:
    err = (r["error"] or "")[:120].replace("|", "/")
    lines.append(f"| {r['generation']} | {r['config']} | {r['dtype']} | {r['program']} | "
                 f"{'yes' if r['compiled'] else 'NO'} | {r['compile_s']:.1f} | "
                 f"{'' if r['temp_mib'] is None else r['temp_mib']} | {r.get('mosaic_kernels', '')} | {err} |")
  return "\n".join(lines)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--generations", nargs="+", default=list(TOPOLOGIES), choices=list(TOPOLOGIES))
  parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
  parser.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=list(DTYPES))
  parser.add_argument("--programs", nargs="+", default=list(PROGRAMS), choices=list(PROGRAMS))
  parser.add_argument("--length", type=int, default=32768, help="sequence length of the attn_* and cema_* programs")
  parser.add_argument("--batch", type=int, default=1, help="per-chip batch")
  parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                                    "pallas_tpu_compile.json"))
  args = parser.parse_args(argv)
  import libtpu  # pylint: disable=import-outside-toplevel
  rows = []
  for gen in args.generations:
    device = topologies.get_topology_desc(platform="tpu", topology_name=TOPOLOGIES[gen]).devices[0]
    for config in args.configs:
      for dtype_name in args.dtypes:
        for program in args.programs:
          row = dict(generation=gen, device_kind=device.device_kind,
                     **compile_one(device, program, config, dtype_name, args.length, args.batch))
          rows.append(row)
          print(_table([row]).splitlines()[-1], flush=True)
  print()
  print(_table(rows))
  failed = sum(not r["compiled"] for r in rows)
  print(f"\n{len(rows) - failed}/{len(rows)} programs compiled")
  record = dict(machine=machine_info(), libtpu=getattr(libtpu, "__version__", None),
                topologies={g: TOPOLOGIES[g] for g in args.generations}, length=args.length, batch=args.batch,
                head_dims=dict(dz=DZ, dv=DV), cema_state=NSTATE, rows=rows)
  os.makedirs(os.path.dirname(args.out), exist_ok=True)
  with open(args.out, "w", encoding="utf-8") as f:
    json.dump(record, f, indent=1)
  return 1 if failed else 0


if __name__ == "__main__":
  sys.exit(main())
