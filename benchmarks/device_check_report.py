"""benchmarks/device_check.py's results: the assembled JSON, the measured-choices table (megalodon_jax/ops/
impl_table.py's format) and the markdown tables. No jax import: the parent process never starts a backend (each
part's process owns the device)."""

from __future__ import annotations

import importlib.metadata
import json
import os
import subprocess

from megalodon_jax.ops import impl_table

TABLE_IMPLS = {"attention": ("xla", "pallas")}  # what attention_impl can be; cuDNN is timed for comparison only


def versions() -> dict:
  out = {}
  for name in ("jax", "jaxlib", "flax", "optax", "numpy", "jax-cuda12-plugin"):
    try:
      out[f"{name}_version"] = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
      pass
  return out


def _commit() -> str | None:
  try:
    return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True,
                          cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip()
  except (OSError, subprocess.CalledProcessError):
    return None


def assemble(args, machine: dict | None, parts: dict, elapsed: float) -> dict:
  """The run's JSON: machine, settings, every part's cases, and whether all numerics passed."""
  platform = (machine or {}).get("platform")
  backend = {"cuda": "gpu", "rocm": "gpu"}.get(platform, platform)
  numerics = parts.get("numerics", {})
  checks = [c for c in numerics.get("cases", []) if "check" in c]
  bench_bad = [c for p in ("attention", "cema") for c in parts.get(p, {}).get("cases", [])
               if c.get("numerics_ok") is False]
  # True: every check ran and passed; False: one failed, or the part did not finish; None: the part was not asked for
  numerics_ok = (numerics.get("status") == "ok" and bool(checks) and all(c["ok"] for c in checks)
                 and not bench_bad) if numerics or bench_bad else None
  settings = {k: v for k, v in vars(args).items() if k not in ("part", "part_out", "part_deadline")}
  return {"machine": machine, "backend": backend or "unknown", "commit": _commit(), "smoke": args.smoke,
          "settings": settings, "elapsed_s": elapsed, "numerics_ok": numerics_ok,
          "max_numerics_error": max((c["rel_err"] for c in checks), default=None), "parts": parts}


def _ok(case) -> bool:
  return case.get("status") in ("ok", "slow") and case.get("numerics_ok", True)


def choices(result: dict) -> list[dict]:
  """The fastest fwd+bwd implementation per attention head shape and per CEMA (D, length), among those whose
  forward and backward both ran and passed their numerics; none at all when the numerics part did not pass."""
  if result["numerics_ok"] is not True:
    return []
  entries = []
  att = result["parts"].get("attention", {}).get("cases", [])
  for shape in dict.fromkeys((c["chunk"], c["dz"], c["dv"]) for c in att):
    times = {}
    for impl in TABLE_IMPLS["attention"]:
      runs = {c["mode"]: c for c in att if (c["chunk"], c["dz"], c["dv"]) == shape and c["impl"] == impl}
      if len(runs) == 2 and all(_ok(c) for c in runs.values()):
        times[impl] = runs["bwd"]["median_ms"]
    if times:
      entries.append({"op": "attention", "chunk_size": shape[0], "z_head_dim": shape[1], "v_head_dim": shape[2],
                      "impl": min(times, key=times.get), "_fwd_bwd_ms": times})
  cema = result["parts"].get("cema", {}).get("cases", [])
  for dim in dict.fromkeys(c["dim"] for c in cema):
    lengths = sorted({c["length"] for c in cema if c["dim"] == dim})
    for i, length in enumerate(lengths):
      times = {}
      for impl in dict.fromkeys(c["impl"] for c in cema):
        runs = {c["mode"]: c for c in cema if (c["dim"], c["length"], c["impl"]) == (dim, length, impl)}
        if len(runs) == 2 and all(_ok(c) for c in runs.values()):
          times[impl] = runs["bwd"]["median_ms"]
      if times:
        entries.append({"op": "cema", "min_length": length,
                        "max_length": lengths[i + 1] - 1 if i + 1 < len(lengths) else None, "dim": dim,
                        "impl": min(times, key=times.get), "_fwd_bwd_ms": times})
  return entries


def write_table(path: str, backend: str, result: dict) -> dict:
  """Replaces `backend`'s list in the table at `path` (other backends and notes kept); returns what was written."""
  entries = choices(result)
  table = {}
  if os.path.exists(path):
    try:
      with open(path, encoding="utf-8") as f:
        table = json.load(f)
      impl_table.validate(table)
    except (OSError, ValueError):
      table = {}  # a malformed table is replaced (impl_table ignores it anyway)
  if backend not in impl_table.BACKENDS:
    return {"path": path, "written": False, "reason": f"backend {backend!r} has no table", "entries": entries}
  table[backend] = entries
  impl_table.validate(table)
  tmp = path + ".tmp"
  with open(tmp, "w", encoding="utf-8") as f:
    json.dump(table, f, indent=1)
    f.write("\n")
  os.replace(tmp, path)
  return {"path": path, "written": True, "entries": entries}


# ---------------------------------------------------------------- markdown

def _ms(case) -> str:
  if case is None:
    return "-"
  if "median_ms" not in case:
    return case.get("status", "-")
  return f"{case['median_ms']:.3g}"


def _rows(header: list[str], rows: list[list]) -> list[str]:
  return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + [
      "| " + " | ".join(str(x) for x in row) + " |" for row in rows]


def _attention(cases) -> list[str]:
  index = {(c["model"], c["impl"], c["mode"]): c for c in cases}
  rows = []
  for model, impl in dict.fromkeys((c["model"], c["impl"]) for c in cases):
    fwd, bwd = index.get((model, impl, "fwd")), index.get((model, impl, "bwd"))
    s = fwd or bwd
    err = lambda c: f"{c['rel_err_vs_xla']:.2g}" if c and "rel_err_vs_xla" in c else "-"  # noqa: E731
    tf = lambda c: f"{c['tflops']:.3g}" if c and "tflops" in c else "-"  # noqa: E731
    rows.append([model, s["heads"], s["dz"], s["dv"], s["chunk"], s["seq_len"], impl, _ms(fwd), tf(fwd), _ms(bwd),
                 tf(bwd), f"{err(fwd)} / {err(bwd)}"])
  return _rows(["model", "H", "dz", "dv", "C", "L", "impl", "fwd ms", "fwd TF/s", "f+b ms", "f+b TF/s",
                "rel. err vs xla fwd / f+b"], rows)


def _cema(cases) -> list[str]:
  index = {(c["dim"], c["length"], c["impl"], c["mode"]): c for c in cases}
  rows = []
  for dim, length, impl in dict.fromkeys((c["dim"], c["length"], c["impl"]) for c in cases):
    fwd = index.get((dim, length, impl, "fwd"))
    err = f"{fwd['rel_err_vs_sequential']:.2g}" if fwd and "rel_err_vs_sequential" in fwd else "-"
    rows.append([dim, length, impl, _ms(fwd), _ms(index.get((dim, length, impl, "bwd"))), err])
  return _rows(["D", "L", "impl", "fwd ms", "fwd+bwd ms", "rel. err vs sequential"], rows)


def _train(cases) -> list[str]:
  rows = []
  for c in cases:
    if c.get("status") != "ok":
      rows.append([c.get("model"), c.get("layers", "-"), c.get("seq_len"), c.get("batch"), c.get("status"), "", "", "",
                   "", ""])
      continue
    mfu = "-" if c["mfu"] is None else f"{100 * c['mfu']:.1f}%"
    rows.append([c["model"], c.get("layers", "-"), c["seq_len"], c["batch"], f"{c['num_params']:,}",
                 f"{c['step_ms']:.1f}", f"{c['tokens_per_sec']:,.0f}", f"{c['tflops_per_sec']:.3g}", mfu,
                 f"{c['compile_s']:.0f}"])
  return _rows(["model", "layers", "seq_len", "batch", "params", "step ms", "tokens/s", "TFLOP/s", "MFU",
                "compile s"], rows)


def _decode(cases) -> list[str]:
  rows = []
  for c in cases:
    head = [c.get(k) for k in ("model", "layers", "dtype", "batch", "prompt", "block")]
    if c.get("status") != "ok":
      rows.append(head + [c.get("status"), "", ""])
      continue
    rows.append(head + [f"{c['ms_per_step']:.3g}", f"{c['tokens_per_sec']:,.0f}", f"{c['first_block_s']:.3g}"])
  return _rows(["model", "layers", "dtype", "batch", "prompt", "block", "ms / step", "tokens/s",
                "first block s (prefill)"], rows)


def verdict(ok) -> str:
  return {True: "passed", False: "FAILED", None: "not run"}[ok]


def markdown(result: dict) -> str:
  m = result["machine"] or {}
  lines = ["# Device check (benchmarks/device_check.py)", "",
           f"Machine: {m.get('device_kind')} x {m.get('device_count')} ({m.get('platform')}), CPU {m.get('cpu_model')}"
           f" x {m.get('cpu_count')}; jax {m.get('jax_version', m.get('jax'))}, jaxlib {m.get('jaxlib_version')}, "
           f"flax {m.get('flax_version')}, Python {m.get('python')}. Commit {result['commit']}. "
           f"{'SMOKE RUN (tiny CPU shapes, Pallas interpreted): the times mean nothing. ' if result['smoke'] else ''}"
           f"Whole run {result['elapsed_s']:.0f} s; numerics {verdict(result['numerics_ok'])}.", ""]
  lines += ["| part | status | seconds | cases |", "|---|---|---|---|"]
  for name, part in result["parts"].items():
    lines.append(f"| {name} | {part['status']} | {part.get('elapsed_s', 0):.0f} | {len(part['cases'])} |")
  sections = (("numerics", "Numerics (relative error: max |device - reference| / max |reference|)", None),
              ("attention", "Attention, bfloat16, B = 1 (cuDNN: v split into dv/dz heads)", _attention),
              ("cema", "CEMA, x bfloat16 (1, L, D), N = 16", _cema),
              ("train", "Train step, bfloat16 compute, float32 parameters, AdamW", _train),
              ("decode", "Greedy decode (Generator.stream)", _decode))
  for name, title, table in sections:
    cases = [c for c in result["parts"].get(name, {}).get("cases", []) if c.get("status") != "skipped" or table]
    if not cases:
      continue
    lines += ["", f"## {title}", ""]
    if table is None:
      lines += _rows(["check", "rel. error", "tol", "ok"],
                     [[c["check"], f"{c['rel_err']:.3g}", c["tol"], c["ok"]] for c in cases if "check" in c])
    else:
      lines += table(cases)
  entries = (result.get("table") or {}).get("entries", [])
  lines += ["", "## Measured auto choices", "",
            f"Written to `{(result.get('table') or {}).get('path')}`: " + (
                "; ".join(f"{e['op']} " + ", ".join(f"{k}={v}" for k, v in e.items()
                                                    if k not in ("op", "impl") and not k.startswith("_"))
                          + f" -> {e['impl']}" for e in entries) or "no entries") + "."]
  return "\n".join(lines) + "\n"
