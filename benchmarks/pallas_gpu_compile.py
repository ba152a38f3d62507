"""Compiles the Pallas Triton kernels for NVIDIA H100 and A100 on a CPU-only machine (deviceless, no GPU needed).

  .venv-cuda/bin/python benchmarks/pallas_gpu_compile.py                      # full sweep, writes benchmarks/results/
  .venv-cuda/bin/python benchmarks/pallas_gpu_compile.py --gpus h100 --dtypes bfloat16 --configs megalodon_7b

Needs the jax CUDA plugin (`pip install -r requirements-cuda.txt`, a separate venv such as .venv-cuda); abstract
devices come from megalodon_jax/aot/gpu.py. Each program is traced inside `pallas_kernels.platform.target_platform
("gpu")`, so the kernels are built as native Triton (not interpret mode), lowered for "cuda" and compiled by XLA's
GPU pipeline down to a cubin (Triton -> PTX -> ptxas). Nothing runs: "temp MiB" is the compiler-reported scratch of
the whole program (memory_analysis), not a measurement, and "seconds" is trace + lower + compile on this CPU.

Cases, B = 1, at the shipped model shapes:
  attention (q, k: (1, L, H, dz); v: (1, L, H, dv); L = 2 chunks):  mega200m H=1, mega1_3b H=2 (dz 256, dv 2048,
    chunk 2048); megalodon_7b H=4 (dz 256, dv 2048, chunk 4096). Programs: fwd (chunked_attention), fwd+bwd
    (grad of Σ o w.r.t. q, k, v: the fwd, dq and dk/dv kernels), decode (chunked_attention_decode, 1 query at a
    traced offset in a one-chunk frame); each again with document ids (segment_ids, "+seg": the kernels of
    data.document_boundaries="reset").
  CEMA (x: (1, 8192, D); N = 16): D = 1024 / 2048 / 4096 for the three configs. Programs: fwd (cema_scan) and
    fwd+bwd (grad w.r.t. every input). No decode: a CEMA decoding step is the "sequential" jnp step, not a kernel.
  dtypes: bfloat16 and float32 inputs (the kernels compute in float32 either way).
For every Pallas kernel in the compiled program the table adds its launch (threads, shared memory, from XLA's thunk
sequence) and ptxas's register count and spill bytes (ptxas -v on the PTX XLA produced), unless --no-ptxas.
"""

from __future__ import annotations

import argparse
import dataclasses
import glob
import importlib.util
import json
import os
import re
import subprocess
import sys
import tempfile
import time

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
  sys.path.insert(0, REPO_ROOT)

from megalodon_jax.aot import gpu  # pylint: disable=wrong-import-position

# Before jax starts a backend (benchmarks.common and the kernels import jax, which is fine; devices are not touched).
if gpu.cuda_available()[0]:
  gpu.prepare_environment()

import jax  # pylint: disable=wrong-import-position
import jax.numpy as jnp  # pylint: disable=wrong-import-position
import numpy as np  # pylint: disable=wrong-import-position

from benchmarks.common import machine_info, memory_bytes  # pylint: disable=wrong-import-position
from pallas_kernels import platform  # pylint: disable=wrong-import-position
from pallas_kernels.cema import cema_scan  # pylint: disable=wrong-import-position
from pallas_kernels.chunked_attention import (chunked_attention,  # pylint: disable=wrong-import-position
                                              chunked_attention_decode)

# config -> attention (heads, dz, dv, chunk) and CEMA channels D.
ATTENTION = {"mega200m": (1, 256, 2048, 2048), "mega1_3b": (2, 256, 2048, 2048), "megalodon_7b": (4, 256, 2048, 4096)}
CEMA_DIM = {"mega200m": 1024, "mega1_3b": 2048, "megalodon_7b": 4096}
CEMA_NSTATE = 16
CEMA_LEN = 8192
PROGRAMS = {"attention": ("fwd", "fwd+bwd", "decode", "fwd+seg", "fwd+bwd+seg", "decode+seg"),
            "cema": ("fwd", "fwd+bwd")}
KERNEL_PREFIXES = ("chunked_attention_", "cema_scan_")
RESULTS = os.path.join(REPO_ROOT, "benchmarks", "results")


@dataclasses.dataclass
class Case:
  gpu: str
  config: str
  kernel: str  # "attention" | "cema"
  dtype: str
  program: str
  shapes: str = ""
  compiled: bool = False
  seconds: float = 0.0
  memory: dict = dataclasses.field(default_factory=dict)
  kernels: list = dataclasses.field(default_factory=list)
  error: str = ""


def _abstract(devices):
  """ShapeDtypeStruct factory replicated over a 1-GPU mesh of abstract devices."""
  mesh = jax.sharding.Mesh(np.array(devices[:1]), ("x",))
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  return lambda shape, dtype: jax.ShapeDtypeStruct(shape, dtype, sharding=replicated)


def attention_program(config: str, dtype, program: str, spec):
  """(fn, abstract args, shape text) of one attention case; q, k (1, L, H, dz), v (1, L, H, dv), L = 2 chunks.
  Programs ending in "+seg" also take (1, L) int32 document ids (data.document_boundaries="reset")."""
  heads, dz, dv, chunk = ATTENTION[config]
  base, segments = program.removesuffix("+seg"), program.endswith("+seg")
  if base == "decode":
    args = (spec((1, 1, heads, dz), dtype), spec((1, chunk, heads, dz), dtype), spec((1, chunk, heads, dv), dtype),
            spec((), jnp.int32))
    shapes = f"T=1 frame={chunk} H={heads} dz={dz} dv={dv}"
    if not segments:
      return (lambda q, kf, vf, offset: chunked_attention_decode(q, kf, vf, offset, chunk)), args, shapes
    args += (spec((1, 1), jnp.int32), spec((1, chunk), jnp.int32))
    return (lambda q, kf, vf, offset, q_ids, kv_ids: chunked_attention_decode(
        q, kf, vf, offset, chunk, q_segment_ids=q_ids, kv_segment_ids=kv_ids)), args, shapes + " segments"
  length = 2 * chunk
  args = (spec((1, length, heads, dz), dtype), spec((1, length, heads, dz), dtype),
          spec((1, length, heads, dv), dtype))
  shapes = f"L={length} C={chunk} H={heads} dz={dz} dv={dv}"
  if segments:
    args += (spec((1, length), jnp.int32),)
    shapes += " segments"
  attend = lambda q, k, v, *ids: chunked_attention(q, k, v, chunk, segment_ids=ids[0] if ids else None)  # noqa: E731
  if base == "fwd":
    return attend, args, shapes
  loss = lambda q, k, v, *ids: jnp.sum(attend(q, k, v, *ids).astype(jnp.float32))  # noqa: E731
  return jax.grad(loss, argnums=(0, 1, 2)), args, shapes


def cema_program(config: str, dtype, program: str, spec):
  """(fn, abstract args, shape text) of one CEMA case; x (1, L, D) in `dtype`, coefficients (D, N) float32."""
  dim = CEMA_DIM[config]
  coef = spec((dim, CEMA_NSTATE), jnp.float32)
  args = (spec((1, CEMA_LEN, dim), dtype), coef, coef, coef, coef, coef, spec((dim,), jnp.float32))
  shapes = f"L={CEMA_LEN} D={dim} N={CEMA_NSTATE}"
  if program == "fwd":
    return (lambda *a: cema_scan(*a)), args, shapes
  loss = lambda *a: jnp.sum(cema_scan(*a)[0])
  return jax.grad(loss, argnums=tuple(range(len(args)))), args, shapes


def ptxas_path():
  """The ptxas of the nvidia-cuda-nvcc wheel (what XLA itself uses here), or None."""
  spec = importlib.util.find_spec("nvidia.cuda_nvcc")
  for root in (spec.submodule_search_locations or []) if spec else []:
    path = os.path.join(root, "bin", "ptxas")
    if os.path.exists(path):
      return path
  return None


_THUNK = re.compile(r"kCustomKernel .*?\] (\S+) grid: \[([\d, ]+)\] threads: \[([\d, ]+)\]\s+"
                    r"shared_memory: (\d+) bytes")


def kernel_report(dump_dir: str, ptxas) -> list[dict]:
  """Launch and ptxas facts of the Pallas kernels in an XLA dump: name, grid, threads, smem bytes, registers, spills."""
  kernels = {}
  for path in glob.glob(os.path.join(dump_dir, "*thunk_sequence.txt")):
    with open(path, encoding="utf-8") as f:
      for m in _THUNK.finditer(f.read()):
        if m.group(1).startswith(KERNEL_PREFIXES):
          kernels[m.group(1)] = {"name": m.group(1), "grid": m.group(2), "threads": int(m.group(3).split(",")[0]),
                                 "smem": int(m.group(4))}
  if ptxas:
    for path in glob.glob(os.path.join(dump_dir, "*.ptx")):
      with open(path, encoding="utf-8") as f:
        text = f.read()
      names = [n for n in kernels if f".entry {n}(" in text]
      target = re.search(r"^\.target (\S+)", text, re.M)
      if not names or not target:
        continue
      # ptxas of a PTX file prints per entry: "Compiling entry function 'X'", then its stack/spill line and its
      # "Used N registers" line.
      out = subprocess.run([ptxas, f"-arch={target.group(1)}", "-v", path, "-o", os.devnull], capture_output=True,
                           text=True, check=False).stderr
      for block in out.split("Compiling entry function")[1:]:
        name = block.split("'")[1]
        if name not in kernels:
          continue
        regs = re.search(r"Used (\d+) registers", block)
        spill = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", block)
        kernels[name]["registers"] = int(regs.group(1)) if regs else None
        kernels[name]["spill_bytes"] = int(spill.group(1)) + int(spill.group(2)) if spill else None
  return sorted(kernels.values(), key=lambda k: k["name"])


def compile_case(case: Case, devices, ptxas) -> Case:
  """Traces, lowers and compiles one case for its GPU; fills compiled / seconds / memory / kernels / error."""
  build = attention_program if case.kernel == "attention" else cema_program
  fn, args, case.shapes = build(case.config, jnp.dtype(case.dtype), case.program, _abstract(devices))
  with tempfile.TemporaryDirectory() as dump:
    t0 = time.perf_counter()
    try:
      with platform.target_platform("gpu"):
        lowered = jax.jit(fn).trace(*args).lower(lowering_platforms=(gpu.LOWERING_PLATFORM,))
      # The dump (per compile, not process-wide XLA_FLAGS) holds the thunk sequence and the PTX for ptxas -v.
      compiled = lowered.compile(compiler_options={"xla_dump_to": dump})
    except Exception as e:  # pylint: disable=broad-except
      # e.g. Triton shared-memory or register limits, an op the Triton lowering lacks: record it, keep sweeping.
      case.seconds = time.perf_counter() - t0
      lines = [line for line in str(e).splitlines() if line.strip()]
      case.error = f"{type(e).__name__}: {lines[0] if lines else ''}"[:300]
      return case
    case.seconds = time.perf_counter() - t0
    case.compiled = True
    case.memory = memory_bytes(compiled)
    case.kernels = kernel_report(dump, ptxas)
  return case


def _kernel_text(kernels: list[dict]) -> str:
  parts = []
  for k in kernels:
    name = k["name"].removeprefix("chunked_attention_").removeprefix("cema_scan_")
    text = f"{name}: {k['threads']}t {k['smem'] / 1024:.0f}KiB"
    if k.get("registers") is not None:
      text += f" {k['registers']}r"
      if k.get("spill_bytes"):
        text += f" spill {k['spill_bytes']}B"
    parts.append(text)
  return "; ".join(parts)


def table(cases: list[Case]) -> str:
  head = ("| gpu | config | kernel | dtype | program | compiled | seconds | temp MiB | kernels (threads, smem, regs, "
          "spills) | error |")
  rows = [head, "|" + "---|" * 10]
  for c in cases:
    temp = f"{c.memory.get('temp_size_in_bytes', 0) / 2**20:.1f}" if c.compiled else ""
    rows.append(f"| {c.gpu} | {c.config} | {c.kernel} | {c.dtype} | {c.program} | {'yes' if c.compiled else 'NO'} | "
                f"{c.seconds:.1f} | {temp} | {_kernel_text(c.kernels)} | {c.error[:120]} |")
  return "\n".join(rows)


def parse_args(argv=None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--gpus", default="h100,a100", help=f"comma-separated, from {sorted(gpu.GPU_KINDS)}")
  parser.add_argument("--configs", default=",".join(ATTENTION), help=f"comma-separated, from {list(ATTENTION)}")
  parser.add_argument("--dtypes", default="bfloat16,float32", help="input dtypes")
  parser.add_argument("--kernels", default="attention,cema", help="attention and/or cema")
  parser.add_argument("--programs", default="", help="comma-separated subset of the programs (e.g. "
                      "fwd+seg,decode+seg); default: all")
  parser.add_argument("--no-ptxas", action="store_true", help="skip the per-kernel ptxas -v register/spill report")
  parser.add_argument("--out", default=os.path.join(RESULTS, "pallas_gpu_compile"),
                      help="output path without extension (.json and .md are written); '' to write nothing")
  return parser.parse_args(argv)


def main(argv=None) -> int:
  args = parse_args(argv)
  ok, why = gpu.cuda_available()
  if not ok:
    print(f"cannot compile for GPUs here: {why}", file=sys.stderr)
    return 2
  ptxas = None if args.no_ptxas else ptxas_path()
  cases = []
  for kind in args.gpus.split(","):
    devices = gpu.gpu_devices(kind, 1)
    for config in args.configs.split(","):
      for kernel in args.kernels.split(","):
        for dtype in args.dtypes.split(","):
          for program in PROGRAMS[kernel]:
            if args.programs and program not in args.programs.split(","):
              continue
            case = compile_case(Case(kind, config, kernel, dtype, program), devices, ptxas)
            cases.append(case)
            status = "ok" if case.compiled else f"FAILED {case.error[:100]}"
            print(f"{kind} {config} {kernel} {dtype} {program}: {status} ({case.seconds:.1f} s) "
                  f"{_kernel_text(case.kernels)}", flush=True)
  print()
  print(table(cases))
  if args.out:
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    ptxas_version = subprocess.run([ptxas, "--version"], capture_output=True, text=True,
                                   check=False).stdout.strip().splitlines()[-1] if ptxas else None
    record = {"machine": machine_info(), "cuda_plugin": why, "ptxas": ptxas_version,
              "gpus": {k: dataclasses.asdict(gpu.gpu_kind(k)) for k in args.gpus.split(",")},
              "note": "deviceless compile on a CPU host; memory is compiler-reported (memory_analysis), not measured",
              "cases": [dataclasses.asdict(c) for c in cases]}
    for spec in record["gpus"].values():
      spec["target_config"] = os.path.relpath(spec["target_config"], REPO_ROOT)
    with open(args.out + ".json", "w", encoding="utf-8") as f:
      json.dump(record, f, indent=1)
    with open(args.out + ".md", "w", encoding="utf-8") as f:
      f.write("# Pallas Triton kernels compiled for GPUs from a CPU host (no GPU)\n\n"
              f"{record['note']}. {why}, ptxas: {ptxas_version}. Generated by "
              "benchmarks/pallas_gpu_compile.py. Kernel columns: threads per program, shared memory, registers per "
              "thread, spill bytes (stores + loads) from ptxas -v.\n\n" + table(cases) + "\n")
    print(f"\nwrote {args.out}.json and {args.out}.md")
  return 0 if all(c.compiled for c in cases) else 1


if __name__ == "__main__":
  sys.exit(main())
