"""Where a deviceless XLA:TPU compile spends its time: per stage, per HLO pass, and per kernel grouped by where in the
model the kernel comes from.

  python benchmarks/tpu_compile_profile.py --config tiny --topology v5e-4
  python benchmarks/tpu_compile_profile.py --config megalodon_7b --topology v5p-128 --out results/x.json   # ~7 min
  python benchmarks/tpu_compile_profile.py --config tiny --topology v5e-4 -- --config.model.scan_layers=true

Runs the planner (`python -m megalodon_jax.aot ... --json --dump_dir D`) in a child process with a fresh
compilation cache and libtpu's own logging turned on:

- `hlo_pass_pipeline=1`: the seconds of every HLO pass (summed over its runs);
- `lowering_emitter=2`: when the backend starts and finishes lowering each kernel (one HLO instruction after fusion:
  a fusion, a collective, a copy) to LLO and optimizing it; the difference is the kernel's lowering seconds;
- the stage lines (HLO_PASSES, BACKEND_PASSES, CODE_GENERATION, END_TO_END) libtpu writes anyway.

Kernels are lowered by several threads at once (more threads than this machine's cores), so a kernel's seconds
include time it waited for a core: their sum is larger than the backend stage's wall time, and only the shares are
meaningful. Each kernel is named after its HLO instruction; its `op_name` metadata in the dumped optimized HLO says
which jax operation it came from, and whether it sits in a loop body (`while/body`: the layer scan, the chunk loops)
or runs once per step at the top level. Logging slows the compile by about 10%; time the compile itself with the
planner alone.
"""

from __future__ import annotations

import argparse
import collections
import glob
import json
import os
import pathlib
import re
import subprocess
import sys
import tempfile

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
  sys.path.insert(0, REPO_ROOT)

from megalodon_jax.aot import buffers  # pylint: disable=wrong-import-position  # noqa: E402
LOG_LINE = re.compile(r"^[IWE]\d{4} (\d\d):(\d\d):(\d\d\.\d+)\s+(\d+) (\S+)\] (.*)$")
STAGE = re.compile(r"(HLO_PASSES|BACKEND_PASSES|CODE_GENERATION|END_TO_END) stage duration: (.+)$")
PASS = re.compile(r"HLO pass: (\S+) time: .*?\((\d+) us\)")


def duration_seconds(text: str) -> float:
  """libtpu's absl durations: '6m31.7s', '1m1.6s', '52.7s', '850ms'."""
  total = 0.0
  for value, unit in re.findall(r"([\d.]+)(h|ms|us|m|s)", text):
    total += float(value) * {"h": 3600, "m": 60, "s": 1, "ms": 1e-3, "us": 1e-6}[unit]
  return total


def parse_log(lines) -> dict:
  """Stage seconds, HLO pass seconds (summed by pass name) and kernel lowering seconds (by instruction name)."""
  stages, passes, kernels, started = {}, collections.Counter(), collections.Counter(), {}
  for line in lines:
    m = LOG_LINE.match(line)
    if not m:
      continue
    t = int(m.group(1)) * 3600 + int(m.group(2)) * 60 + float(m.group(3))
    thread, msg = m.group(4), m.group(6)
    if "SEQUENTIAL_TRY_START" in msg:
      started[(thread, re.search(r"hlo=(\S+)", msg).group(1))] = t
    elif msg.startswith("Finished lowering "):
      name = msg.split()[2]
      if (thread, name) in started:
        kernels[name] += t - started.pop((thread, name))
    elif (s := STAGE.search(msg)) is not None:
      stages[s.group(1)] = duration_seconds(s.group(2))
    elif (p := PASS.search(msg)) is not None:
      passes[p.group(1)] += int(p.group(2)) / 1e6
  return {"stages": stages, "passes": passes, "kernels": kernels}


def source_group(op_name: str) -> str:
  """'loop <last two op_name parts>' for kernels in a loop body, 'top <...>' otherwise; '?' without metadata.
  `op_name` as `aot.buffers.op_names` gives it ("op_name @ source line"); the source line is not part of the group."""
  op_name = op_name.split(" @ ", 1)[0]
  if not op_name:
    return "? (no metadata: collectives, copies, layout changes)"
  parts = op_name.split("/")
  return ("loop " if "while/body" in op_name else "top  ") + "/".join(parts[-2:])


def group_kernels(kernels: dict[str, float], names: dict[str, str]) -> list[tuple[str, float, int]]:
  seconds, count = collections.Counter(), collections.Counter()
  for kernel, s in kernels.items():
    g = source_group(names.get(kernel, ""))
    seconds[g] += s
    count[g] += 1
  return [(g, s, count[g]) for g, s in seconds.most_common()]


def run(args, extra: list[str]) -> dict:
  with tempfile.TemporaryDirectory() as tmp:
    env = dict(os.environ, MEGALODON_JAX_CACHE=os.path.join(tmp, "cache"), TPU_STDERR_LOG_LEVEL="0",
               TPU_MIN_LOG_LEVEL="0", TPU_VMODULE="hlo_pass_pipeline=1,lowering_emitter=2")
    dump = os.path.join(tmp, "dump")
    cmd = [sys.executable, "-m", "megalodon_jax.aot", "--config", args.config, "--topology", args.topology,
           "--programs", args.program, "--json", "--dump_dir", dump, *extra]
    log_path = os.path.join(tmp, "stderr.txt")
    with open(log_path, "w", encoding="utf-8") as err:
      proc = subprocess.run(cmd, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=err, text=True, check=False)
    with open(log_path, encoding="utf-8", errors="replace") as f:
      parsed = parse_log(f)
    if proc.returncode != 0 or not parsed["kernels"]:
      with open(log_path, encoding="utf-8", errors="replace") as f:
        tail = f.readlines()[-20:]
      raise SystemExit(f"the planner failed (exit {proc.returncode}) or libtpu logged no kernels:\n{''.join(tail)}")
    hlo = glob.glob(os.path.join(dump, "**", "*after_optimizations.txt"), recursive=True)
    # The program's module is the largest one dumped, as the planner reads it (aot/buffers.py).
    names = buffers.op_names(pathlib.Path(max(hlo, key=os.path.getsize)).read_text()) if hlo else {}
  report = json.loads(proc.stdout)
  report = report[0] if isinstance(report, list) else report
  return {"command": " ".join(cmd[1:]), "planner": {k: report.get(k) for k in ("compile_seconds", "peak_gib", "fits")},
          **parsed, "groups": group_kernels(parsed["kernels"], names)}


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n", maxsplit=1)[0])
  p.add_argument("--config", required=True, help="a shipped config name or path, as the planner takes it")
  p.add_argument("--topology", required=True)
  p.add_argument("--program", default="train_step")
  p.add_argument("--top", type=int, default=20, help="rows per table")
  p.add_argument("--out", default="", help="write the record as JSON here")
  args, extra = p.parse_known_args()
  extra = [a for a in extra if a != "--"]
  from benchmarks.common import machine_info  # pylint: disable=import-outside-toplevel

  r = run(args, extra)
  kernels = r["kernels"]
  total = sum(kernels.values())
  print(f"# {r['command']}")
  print(f"planner: {r['planner']}")
  print("| stage | s |\n|---|---|")
  for stage, s in r["stages"].items():
    print(f"| {stage} | {s:.1f} |")
  print("\n| HLO pass | s |\n|---|---|")
  for name, s in r["passes"].most_common(args.top):
    print(f"| {name} | {s:.2f} |")
  print(f"\n{len(kernels)} kernels, {total:.1f} s of lowering summed over threads\n")
  print("| where (op_name) | kernels | s | share |\n|---|---|---|---|")
  for g, s, n in r["groups"][:args.top]:
    print(f"| {g} | {n} | {s:.1f} | {s / total:.0%} |")
  print("\n| slowest kernels | s |\n|---|---|")
  for name, s in kernels.most_common(args.top):
    print(f"| {name} | {s:.2f} |")
  if args.out:
    record = {**r, "passes": dict(r["passes"].most_common()), "kernels": dict(kernels.most_common()),
              "machine": machine_info()}
    with open(args.out, "w", encoding="utf-8") as f:
      json.dump(record, f, indent=1)


if __name__ == "__main__":
  main()
