"""Train-step speed of Megalodon over Llama at (nearly) the same parameter count, by sequence length (issue 22).

  python benchmarks/family_speed.py                       # measured on this machine: small models, 512..32K tokens
  python benchmarks/family_speed.py --tpu                 # estimate (XLA cost model): 7B models on v5p-128, 4K / 32K
  python benchmarks/family_speed.py --tpu --only llama-32k

Measured part. Both families run the trainer's own step (`training.program.TrainProgram`: the same optimizer,
loss, shardings and donation as train.py) on this machine's first device, on synthetic token ids: Megalodon
4 layers x 128 (z 32, v 256, one head, FFN 256, CEMA 16, chunk 2048, 842,624 parameters) and Llama 4 layers x 128
(2 heads of 64, SwiGLU hidden 336 so that it has 844,928 parameters, +0.3%), vocabulary 256. Each case runs in its
own process: compile ahead of time (memory_analysis() gives the compiled buffers; a case over --max-gib is skipped
and reported), one warm-up step, then the median of --repeats timed steps ended by block_until_ready. Tokens per
step: --tokens (4096) split into sequences of the given length, one sequence at the longer lengths; from 8K tokens
on, one timed step (no warm-up; the compile is ahead of time). The table's
ratio is Megalodon's tokens/s over Llama's. Llama's attention on CPU is XLA's (ops/full_attention.py), which past
1024 queries runs a rematerialised block of queries at a time against every key: memory stays small, and the work is
the whole L x L block (twice in the backward pass), not its causal half. A case whose compiled buffers exceed
--max-gib is reported as skipped with what it needs, and not run.

Estimated part (--tpu). `python -m megalodon_jax.aot --programs train_step --json` (the planner: a real XLA:TPU
compile of the train step for the abstract slice) for Megalodon-7B (configs/megalodon_7b.py) and Llama2-7B
(configs/llama2_7b.py) on v5p-128 (64 chips, fsdp 64) at 4K and 32K tokens per sequence, 128 sequences per step
(2 per chip) for both. Its step time is an estimate (XLA cost model): XLA's FLOPs and bytes with loop bodies counted
per iteration, on the chip's roofline (megalodon_jax/aot/estimate.py), never a timing. Printed next to the paper's
measured Megalodon/Llama2 throughput ratios (0.946x at 4K, 1.32x at 32K; 256 A100s, paper §4.1 / Figure 5).

Results: --out (default benchmarks/results/family_speed_cpu.json) and --tpu-out (family_speed_tpu.json), with the
machine and versions.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
  sys.path.insert(0, REPO_ROOT)

RESULTS = os.path.join(REPO_ROOT, "benchmarks", "results")
MEGALODON = dict(num_layers=4, model_dim=128, z_dim=32, value_dim=256, num_heads=1, ffn_hidden_dim=256, cema_ndim=16,
                 chunk_size=2048, norm_num_groups=32)
LLAMA = dict(num_layers=4, model_dim=128, num_heads=2, ffn_hidden_dim=336)  # +0.3% parameters over MEGALODON
VOCAB = 256
FAMILIES = ("megalodon", "llama")
# (row, family, config, seq_len): 128 sequences per step on v5p-128 (the configs' batch), 2 per chip.
TPU_ROWS = [
    ("megalodon-4k", "megalodon", "configs/megalodon_7b.py", 4096),
    ("llama-4k", "llama", "configs/llama2_7b.py", 4096),
    ("megalodon-32k", "megalodon", "configs/megalodon_7b.py", 32768),
    ("llama-32k", "llama", "configs/llama2_7b.py", 32768),
]
PAPER_RATIO = {4096: 0.946, 32768: 1.32}  # Megalodon-7B / Llama2-7B training tokens/s, paper §4.1 (256 A100s)


def train_config(family: str, seq_len: int, batch: int, remat: str, dtype: str):
  from megalodon_jax.configs import tiny  # pylint: disable=import-outside-toplevel
  from megalodon_jax.llama.config import LlamaSection  # pylint: disable=import-outside-toplevel
  from megalodon_jax.typed_config import config_dict  # pylint: disable=import-outside-toplevel
  c = tiny.get_config()
  if family == "llama":
    c.model = config_dict(LlamaSection(**LLAMA, vocab_size=VOCAB, dtype=dtype, remat=remat))
  else:
    c.model.update(MEGALODON)
    c.model.vocab_size, c.model.dtype, c.model.remat = VOCAB, dtype, remat
  c.seq_len, c.batch_size = seq_len, batch
  c.total_steps, c.optimizer.warmup_steps = 1000, 10
  return c


def run_case(family: str, seq_len: int, args) -> dict:
  import jax  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  from benchmarks.common import memory_bytes, time_runs  # pylint: disable=import-outside-toplevel
  from megalodon_jax.training.program import TrainProgram  # pylint: disable=import-outside-toplevel
  batch = max(1, args.tokens // seq_len)
  result = {"family": family, "seq_len": seq_len, "batch": batch, "tokens": batch * seq_len}
  run = TrainProgram.build(train_config(family, seq_len, batch, args.remat, args.dtype), jax.devices()[:1],
                           vocab_size=VOCAB)
  result["num_params"] = run.model_config.num_params()
  ids = np.random.default_rng(0).integers(0, VOCAB, (batch, seq_len + 1), dtype=np.int32)
  data = run.global_batch({"inputs": ids[:, :-1], "targets": ids[:, 1:]})
  state = run.fresh_state()
  t0 = time.perf_counter()
  with jax.set_mesh(run.mesh):
    compiled = run.train_step.lower(state, data).compile()
  result["compile_s"] = time.perf_counter() - t0
  result["memory"] = memory_bytes(compiled)
  need = result["memory"].get("total_bytes", 0)
  if need > args.max_gib * 2**30:
    result.update(status="skip", reason=f"compiled buffers need {need / 2**30:.1f} GiB > --max-gib {args.max_gib}")
    return result
  held = {"state": state}

  def one_step():  # the state is donated: each step consumes the previous one's output
    held["state"], held["metrics"] = compiled(held["state"], data)
    return held["metrics"]

  # Long cases take one timed step, the first after the ahead-of-time compile (no warm-up: at these lengths a step
  # takes 10-100 s on a small CPU, and what a first call adds is small against that).
  long = seq_len >= args.long_from
  times = time_runs(one_step, args.long_repeats if long else args.repeats, warmups=0 if long else 1)
  step_s = statistics.median(times)
  flops = run.train_step_flops()
  result.update(status="ok", times_s=times, step_s=step_s, tokens_per_sec=result["tokens"] / step_s,
                model_tflop_per_step=flops / 1e12, loss=float(held["metrics"]["loss"]))
  return result


def run_isolated(family: str, seq_len: int, args) -> dict:
  cmd = [sys.executable, os.path.abspath(__file__), "--case", f"{family}:{seq_len}", "--tokens", str(args.tokens),
         "--repeats", str(args.repeats), "--long-repeats", str(args.long_repeats), "--long-from", str(args.long_from),
         "--max-gib", str(args.max_gib), "--remat", args.remat, "--dtype", args.dtype]
  start = time.perf_counter()
  proc = subprocess.run(cmd, capture_output=True, text=True, check=False, cwd=REPO_ROOT)
  lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
  if proc.returncode != 0 or not lines:
    return {"family": family, "seq_len": seq_len, "status": "error",
            "error": f"rc={proc.returncode}: {proc.stderr.strip()[-400:]}"}
  out = json.loads(lines[-1])
  out["wall_s"] = time.perf_counter() - start
  return out


def cpu_table(results: list[dict]) -> str:
  rows = ["| tokens/seq | batch | Megalodon step s | Megalodon tokens/s | Llama step s | Llama tokens/s | "
          "Megalodon / Llama tokens/s |", "|---|---|---|---|---|---|---|"]
  by = {(r["family"], r["seq_len"]): r for r in results}
  for n in sorted({r["seq_len"] for r in results}):
    m, l = by.get(("megalodon", n), {}), by.get(("llama", n), {})

    def cells(r):
      if r.get("status") == "ok":
        return f"{r['step_s']:.3f}", f"{r['tokens_per_sec']:,.0f}"
      return (r.get("status", "-"), (r.get("reason") or r.get("error") or "")[:70])
    ratio = (f"{m['tokens_per_sec'] / l['tokens_per_sec']:.2f}" if m.get("status") == l.get("status") == "ok"
             else "-")
    rows.append(f"| {n} | {m.get('batch', l.get('batch', '-'))} | {' | '.join(cells(m))} | {' | '.join(cells(l))} | "
                f"{ratio} |")
  return "\n".join(rows)


def run_tpu_row(row: str, family: str, config: str, seq_len: int, topology: str) -> dict:
  cmd = [sys.executable, "-m", "megalodon_jax.aot", "--config", config, "--topology", topology, "--programs",
         "train_step", "--json", f"--config.seq_len={seq_len}"]
  start = time.perf_counter()
  proc = subprocess.run(cmd, capture_output=True, text=True, check=False, cwd=REPO_ROOT)
  reports = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
  base = {"row": row, "family": family, "config": config, "seq_len": seq_len, "topology": topology,
          "exit": proc.returncode, "wall_s": time.perf_counter() - start, "command": " ".join(cmd[1:])}
  if not reports:
    return {**base, "error": "\n".join(proc.stderr.strip().splitlines()[-4:])}
  return {**base, **reports[0]}


# Splash attention on TPU (Llama's full_attention_impl "auto") is a Pallas kernel, a custom call whose work XLA's cost
# model does not count. Its work, per step: the causal forward, again under full remat, and a backward of 2.5x the
# forward (flash-style: the scores are recomputed; dq, dk, dv), i.e. 4.5x the causal forward attention FLOPs.
KERNEL_ATTENTION_FACTOR = 4.5


def kernel_attention(row: dict) -> float:
  """Per-chip FLOPs of the attention that runs inside Pallas kernels in this row's step (0 for a row without any)."""
  if row.get("family") != "llama" or not (row.get("loop_scaling") or {}).get("kernels", 1):
    return 0.0
  from megalodon_jax.cli import config_flags  # pylint: disable=import-outside-toplevel
  from megalodon_jax.llama import flops as llama_flops  # pylint: disable=import-outside-toplevel
  from megalodon_jax.training.train_config import TrainConfig  # pylint: disable=import-outside-toplevel
  cfg, _ = config_flags.load_config(os.path.join(REPO_ROOT, row["config"]))
  cfg.seq_len = row["seq_len"]
  typed = TrainConfig.of(cfg)
  fwd = llama_flops.forward_flops(typed.model_config(32000), typed.batch_size, typed.seq_len)["attention_causal"]
  return KERNEL_ATTENTION_FACTOR * fwd / row["chips"]


def with_kernels(row: dict) -> dict:
  """est_* of `row` with the kernels' attention added at the XLA-estimated speed of the rest of the step (its est
  seconds per FLOP): est_k_step_seconds, est_k_tokens_per_second_per_chip, est_k_mfu."""
  if not row.get("est_step_seconds"):
    return row
  extra = kernel_attention(row)
  seconds = row["est_step_seconds"] * (1 + extra / row["est_flops"])
  tokens = row["shape"]["batch"] * row["shape"]["seq_len"]
  mfu = row["est_mfu"] * row["est_step_seconds"] / seconds
  return {**row, "kernel_attention_flops": extra, "est_k_step_seconds": seconds,
          "est_k_tokens_per_second_per_chip": tokens / seconds / row["chips"], "est_k_mfu": mfu}


def tpu_table(rows: list[dict]) -> str:
  lines = ["| model | tokens/seq | seqs/chip | compiled | peak GiB/chip | fits | est step s | "
           "est tokens/s/chip | est MFU | bound | XLA TFLOP/chip (reported / loops scaled) | analytic TFLOP/chip |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|"]
  rows = [with_kernels(r) for r in rows]
  for r in rows:
    if "compiled" not in r:
      lines.append(f"| {r['row']} | {r['seq_len']} | | error: {r.get('error', '')[:120]} | | | | | | | | |")
      continue
    est = r.get("est_step_seconds")
    peak = f"{r['peak_gib']:.1f}" if r["compiled"] else (f"> {r['peak_gib']:.1f} (OOM)" if r["peak_gib"] else "-")
    xla = (f"{r['xla_flops'] / 1e12:.1f} / {r['est_flops'] / 1e12:.1f}" if r.get("est_flops") else
           f"{r['xla_flops'] / 1e12:.1f} / -" if r.get("xla_flops") else "-")
    tok = f"{r['est_tokens_per_second_per_chip']:,.0f}" if est else "-"
    mfu = f"{100 * r['est_mfu']:.1f}%" if est else "-"
    lines.append(
        f"| {r['row']} | {r['seq_len']} | {r['shape']['seqs_per_chip']:g} | {'yes' if r['compiled'] else 'no'} | "
        f"{peak} | {'yes' if r['fits'] else 'no'} | {f'{est:.2f}' if est else '-'} | {tok} | {mfu} | "
        f"{r.get('est_bound') or '-'} | {xla} | {r['analytic_flops'] / 1e12:.1f} |")
  lines += ["", "With the attention inside Pallas kernels added (analytic FLOPs x 4.5, at the XLA-estimated speed of the "
            "rest of the step; 0 for Megalodon, whose attention and CEMA are XLA ops here):", "",
            "| model | tokens/seq | kernel attention TFLOP/chip | est step s | est tokens/s/chip | est MFU |",
            "|---|---|---|---|---|---|"]
  for r in rows:
    if r.get("est_k_step_seconds"):
      lines.append(f"| {r['row']} | {r['seq_len']} | {r['kernel_attention_flops'] / 1e12:.1f} | "
                   f"{r['est_k_step_seconds']:.2f} | {r['est_k_tokens_per_second_per_chip']:,.0f} | "
                   f"{100 * r['est_k_mfu']:.1f}% |")
  by = {(r["family"], r["seq_len"]): r for r in rows}
  lines += ["", "| tokens/seq | Megalodon-7B / Llama2-7B est tokens/s: XLA's counts as reported | with the kernels' "
            "attention added | paper (measured, 256 A100s) |", "|---|---|---|---|"]
  for n, paper in PAPER_RATIO.items():
    m, l = by.get(("megalodon", n), {}), by.get(("llama", n), {})
    if m.get("est_step_seconds") and l.get("est_step_seconds"):
      raw = m["est_tokens_per_second_per_chip"] / l["est_tokens_per_second_per_chip"]
      fixed = m["est_k_tokens_per_second_per_chip"] / l["est_k_tokens_per_second_per_chip"]
      lines.append(f"| {n} | {raw:.3f} | {fixed:.3f} | {paper} |")
    else:
      lines.append(f"| {n} | - (see above) | - | {paper} |")
  return "\n".join(lines)


def _load(path: str) -> dict:
  if os.path.exists(path):
    with open(path, encoding="utf-8") as f:
      return json.load(f)
  return {}


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--seq-lens", default="512,4096,8192,16384,32768")
  p.add_argument("--families", default="megalodon,llama")
  p.add_argument("--tokens", type=int, default=4096, help="tokens per step (batch = max(1, tokens // seq_len))")
  p.add_argument("--repeats", type=int, default=2, help="timed steps after one warm-up step")
  p.add_argument("--long-repeats", type=int, default=1, help="timed steps at lengths >= --long-from (no warm-up)")
  p.add_argument("--long-from", type=int, default=8192)
  p.add_argument("--max-gib", type=float, default=14.0, help="skip a case whose compiled buffers need more")
  p.add_argument("--remat", default="none", choices=["none", "full"])
  p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
  p.add_argument("--out", default=os.path.join(RESULTS, "family_speed_cpu.json"))
  p.add_argument("--tpu", action="store_true", help="the 7B estimates (XLA cost model) on --topology instead")
  p.add_argument("--topology", default="v5p-128")
  p.add_argument("--only", default="", help="with --tpu: comma-separated rows (" +
                 ", ".join(r[0] for r in TPU_ROWS) + "); the others' results in --tpu-out are kept")
  p.add_argument("--tpu-out", default=os.path.join(RESULTS, "family_speed_tpu.json"))
  p.add_argument("--case", default=None, help=argparse.SUPPRESS)
  return p.parse_args(argv)


def main(argv=None) -> int:
  args = parse_args(argv)
  if args.case is not None:
    family, seq_len = args.case.split(":")
    print(json.dumps(run_case(family, int(seq_len), args)))
    return 0
  from benchmarks.common import machine_info  # pylint: disable=import-outside-toplevel
  if args.tpu:
    only = set(filter(None, args.only.split(",")))
    saved = _load(args.tpu_out)
    rows = {r["row"]: r for r in saved.get("rows", [])}
    for name, family, config, seq_len in TPU_ROWS:
      if only and name not in only:
        continue
      print(f"{name}: compiling {config} at {seq_len} for {args.topology} ...", file=sys.stderr, flush=True)
      rows[name] = run_tpu_row(name, family, config, seq_len, args.topology)
      out = {"machine": machine_info(), "note": "estimate (XLA cost model), not a timing",
             "rows": [rows[r[0]] for r in TPU_ROWS if r[0] in rows]}
      with open(args.tpu_out, "w", encoding="utf-8") as f:
        json.dump(out, f, indent=2)
    print(tpu_table([rows[r[0]] for r in TPU_ROWS if r[0] in rows]))
    return 0
  results, load_before = [], os.getloadavg()
  for seq_len in [int(x) for x in args.seq_lens.split(",")]:
    for family in args.families.split(","):
      results.append(run_isolated(family, seq_len, args))
      r = results[-1]
      _save_cpu(args, load_before, results)
      print(f"{family} {seq_len}: {r.get('status')} {r.get('step_s', '')} {r.get('reason', r.get('error', ''))}",
            file=sys.stderr, flush=True)
  info = _save_cpu(args, load_before, results)
  print(f"{info['device_kind']} x1, {info.get('cpu_model')}, jax {info['jax']}; {args.tokens} tokens per step, "
        f"dtype {args.dtype}, remat {args.remat}; load average {load_before[0]:.1f} before, "
        f"{os.getloadavg()[0]:.1f} after")
  print(cpu_table(results))
  return 0


def _save_cpu(args, load_before, results) -> dict:
  """Writes the results so far to --out (each case as it ends: a run stopped halfway keeps what it measured)."""
  from benchmarks.common import machine_info  # pylint: disable=import-outside-toplevel
  info = machine_info()
  with open(args.out, "w", encoding="utf-8") as f:
    json.dump({"machine": info, "loadavg_before_after": [load_before, os.getloadavg()], "args": vars(args),
               "megalodon": MEGALODON, "llama": LLAMA, "vocab_size": VOCAB, "results": results}, f, indent=2)
  return info


if __name__ == "__main__":
  sys.exit(main())
