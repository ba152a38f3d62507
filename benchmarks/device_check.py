"""Everything the project needs from a GPU, in one run of at most 9 minutes on one H100/H200.

  python benchmarks/device_check.py                 # on the GPU: results + measured "auto" table
  python benchmarks/device_check.py --smoke         # CPU, tiny shapes, Pallas interpreted: proves the script (CI)

Parts, in this order, each in its own process (its own device memory; a part that overruns its budget is killed
and keeps the cases it had written; --smoke runs them in one process, its start-up being most of a tiny part):
  numerics   float32 logits of a small model on the device ("auto" choices, and both Pallas kernels) against the
             same parameters on the CPU (pure-JAX paths), matmul precision "highest"; the Pallas attention and CEMA
             kernels, forward and gradients, against pure-JAX references (device_check_kernels.py, _model.py)
  attention  XLA, Pallas and cuDNN chunked attention at the 200M / 1.3B / 7B head shapes, fwd and fwd+bwd, bf16
  cema       every CEMA implementation at 4K / 8K / 16K / 32K tokens (D from --cema-dims), fwd and fwd+bwd
  train      train step tokens/s and MFU, 200M (12 layers) and 1.3B (--train-layers-1b of 24 layers), bf16
  decode     greedy decode latency and throughput at batch 1 and 64 (200M, --decode-layers, bf16, 1K-token prompts)
Each part has a budget (--budgets) and the whole run a deadline (--deadline): parts past it are recorded as
skipped, and the JSON and markdown are written in any case. Writes, under --out-dir (default benchmarks/results;
a temporary directory with --smoke): device_check_<backend>.json (machine, versions, every case) and
device_check_<backend>.md (the tables; benchmarks/RESULTS.md links it). The measured "auto" choices (fastest
implementation that passed its numerics, per head shape and per CEMA length) go to --table-out (default
megalodon_jax/ops/impl_table.json, only this backend's list replaced; with --smoke: <out-dir>/impl_table.json, so
a CPU smoke run never touches the shipped table). No entries are written when the numerics part did not pass.
Exit status 1 when a numerics check failed (or the numerics part did not finish).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:  # the package may not be pip-installed (a bare GPU machine)
  sys.path.insert(0, REPO_ROOT)

from benchmarks import device_check_report as report  # pylint: disable=wrong-import-position

PARTS = ("numerics", "attention", "cema", "train", "decode")
BUDGETS = "numerics=60,attention=100,cema=130,train=130,decode=90"  # seconds; the sum stays under --deadline
SMOKE_BUDGETS = "numerics=150,attention=100,cema=100,train=100,decode=100"  # generous: CI machines are slow


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--smoke", action="store_true", help="tiny CPU shapes, Pallas interpreted, 1 repeat")
  p.add_argument("--out-dir", default=None, help="where the JSON and markdown go")
  p.add_argument("--table-out", default=None, help="the measured-choices table to update")
  p.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {PARTS}")
  p.add_argument("--deadline", type=float, default=None, help="seconds for the whole run (default 530; smoke 600)")
  p.add_argument("--budgets", default=None, help=f"seconds per part (default {BUDGETS})")
  p.add_argument("--repeats", type=int, default=None, help="timed runs per case (default 5; smoke 1)")
  p.add_argument("--max-seconds", type=float, default=2.0,
                 help="timed runs of a kernel case stop after about this many seconds (at least one)")
  p.add_argument("--max-bytes", type=float, default=None, help="skip cases whose buffers exceed this (80%% of HBM)")
  p.add_argument("--cema-dims", default="2048", help="CEMA channel counts D (1.3B: 2048; 200M 1024; 7B 4096)")
  p.add_argument("--train-layers-1b", type=int, default=8, help="layers of the 1.3B train-step case (of 24)")
  p.add_argument("--decode-layers", type=int, default=12, help="layers of the 200M decode model (of 12)")
  p.add_argument("--isolate", action=argparse.BooleanOptionalAction, default=None,
                  help="each part in its own process (default; --smoke: off)")
  p.add_argument("--part", default=None, help=argparse.SUPPRESS)  # child process: run this part
  p.add_argument("--part-out", default=None, help=argparse.SUPPRESS)
  p.add_argument("--part-deadline", type=float, default=None, help=argparse.SUPPRESS)
  args = p.parse_args(argv)
  bad = [x for x in args.parts.split(",") if x not in PARTS]
  if bad:
    raise SystemExit(f"--parts: unknown {bad}; choose from {PARTS}")
  args.deadline = args.deadline or (600.0 if args.smoke else 530.0)
  budgets = dict(kv.split("=") for kv in (args.budgets or (SMOKE_BUDGETS if args.smoke else BUDGETS)).split(","))
  args.budgets = {k: float(v) for k, v in budgets.items()}
  args.repeats = args.repeats or (1 if args.smoke else 5)
  args.isolate = (not args.smoke) if args.isolate is None else args.isolate
  args.cema_dims = tuple(int(d) for d in args.cema_dims.split(","))
  if args.part:
    return args
  if args.out_dir is None:
    args.out_dir = tempfile.mkdtemp(prefix="device_check_") if args.smoke else os.path.join(REPO_ROOT, "benchmarks",
                                                                                            "results")
  if args.table_out is None:
    from megalodon_jax.ops import impl_table  # pylint: disable=import-outside-toplevel
    args.table_out = os.path.join(args.out_dir, "impl_table.json") if args.smoke else impl_table.DEFAULT_PATH
  return args


class Sink(list):
  """A part's cases, rewritten to its JSON file after every case (a killed part keeps what it had)."""

  def __init__(self, path: str, header: dict):
    super().__init__()
    self.path, self.header = path, header

  def flush(self, **extra) -> None:
    tmp = self.path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
      json.dump({**self.header, "cases": list(self), **extra}, f, default=str)
    os.replace(tmp, self.path)


def run_part(args) -> int:
  """Child process: one part, its cases streamed to --part-out."""
  from megalodon_jax.platforms import skip_absent_tpu  # pylint: disable=import-outside-toplevel
  skip_absent_tpu()
  import jax  # pylint: disable=import-outside-toplevel
  from benchmarks import device_check_kernels as kernels  # pylint: disable=import-outside-toplevel
  from benchmarks import device_check_model as model  # pylint: disable=import-outside-toplevel
  from benchmarks.common import machine_info  # pylint: disable=import-outside-toplevel
  fn = {"numerics": model.numerics, "attention": kernels.attention, "cema": kernels.cema, "train": model.train,
        "decode": model.decode}[args.part]
  if args.max_bytes is None:
    stats = jax.devices()[0].memory_stats() or {}
    args.max_bytes = 0.8 * stats["bytes_limit"] if "bytes_limit" in stats else 8e9
  args = argparse.Namespace(**{**vars(args), "deadline": args.part_deadline})
  sink = Sink(args.part_out, {"machine": {**machine_info(), **report.versions()}})
  sink.flush(done=False)
  try:
    fn(args, sink)
  except Exception as e:  # pylint: disable=broad-except
    import traceback  # pylint: disable=import-outside-toplevel
    sink.flush(done=False, error=f"{type(e).__name__}: {e}"[:2000], traceback=traceback.format_exc()[-4000:])
    return 1
  sink.flush(done=True)
  return 0


def _child(args, part: str, path: str, timeout: float) -> dict:
  # The in-part deadline leaves room for the case under way when it passes (one compile and a few runs).
  cmd = [sys.executable, os.path.abspath(__file__), "--part", part, "--part-out", path,
         "--part-deadline", str(time.time() + 0.7 * timeout), "--repeats", str(args.repeats),
         "--max-seconds", str(args.max_seconds), "--cema-dims", ",".join(map(str, args.cema_dims)),
         "--train-layers-1b", str(args.train_layers_1b), "--decode-layers", str(args.decode_layers)]
  cmd += ["--smoke"] if args.smoke else []
  if args.max_bytes is not None:
    cmd += ["--max-bytes", str(args.max_bytes)]
  t0 = time.time()
  if not args.isolate:  # one process for every part: no per-part start-up (the CPU smoke run), no hard kill
    part_args = argparse.Namespace(**{**vars(args), "part": part, "part_out": path,
                                      "part_deadline": time.time() + 0.7 * timeout})
    status, tail = ("ok" if run_part(part_args) == 0 else "error"), ""
  else:
    try:
      proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False, cwd=REPO_ROOT)
      status, tail = ("ok" if proc.returncode == 0 else "error"), (proc.stderr or "")[-1500:]
    except subprocess.TimeoutExpired as e:
      status, tail = "timeout", (e.stderr or b"")[-1500:].decode(errors="replace") if e.stderr else ""
  result = {"status": status, "elapsed_s": time.time() - t0, "budget_s": timeout, "cases": []}
  try:
    with open(path, encoding="utf-8") as f:
      result.update(json.load(f))
  except (OSError, ValueError):
    result["error"] = "the part wrote nothing"
  if status != "ok":
    result["stderr_tail"] = tail
  return result


def main(argv=None) -> int:
  args = parse_args(argv)
  if args.part:
    return run_part(args)
  start = time.time()
  os.makedirs(args.out_dir, exist_ok=True)
  parts, machine = {}, None
  with tempfile.TemporaryDirectory(prefix="device_check_parts_") as tmp:
    for part in args.parts.split(","):
      remaining = start + args.deadline - time.time()
      if remaining < 10:
        parts[part] = {"status": "skipped", "reason": "run deadline reached", "cases": []}
        continue
      parts[part] = _child(args, part, os.path.join(tmp, part + ".json"), min(args.budgets[part], remaining))
      machine = machine or parts[part].pop("machine", None)
      parts[part].pop("machine", None)
      print(f"{part}: {parts[part]['status']}, {len(parts[part]['cases'])} cases, "
            f"{parts[part].get('elapsed_s', 0):.0f} s", flush=True)
  result = report.assemble(args, machine, parts, time.time() - start)
  backend = result["backend"]
  json_path = os.path.join(args.out_dir, f"device_check_{backend}.json")
  result["table"] = report.write_table(args.table_out, backend, result) if backend else None
  with open(json_path, "w", encoding="utf-8") as f:
    json.dump(result, f, indent=1, default=str)
  md = report.markdown(result)
  with open(os.path.join(args.out_dir, f"device_check_{backend}.md"), "w", encoding="utf-8") as f:
    f.write(md)
  print(md)
  print(f"wrote {json_path}; numerics {report.verdict(result['numerics_ok'])}", flush=True)
  return 1 if result["numerics_ok"] is False else 0


if __name__ == "__main__":
  sys.exit(main())
