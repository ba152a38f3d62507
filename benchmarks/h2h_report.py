"""The head-to-head benchmark's report: mean curves over seeds, the PNG and the printed tables
(benchmarks/head_to_head.py writes the summary they read)."""

from __future__ import annotations

import statistics
from typing import Optional

CACHE_CONTEXTS = (1024, 32768, 1 << 20)  # context lengths of the generation-cache table


def mean_curve(runs: list[dict]) -> list[dict]:
  by_step: dict[int, list] = {}
  for r in runs:
    for p in r["eval_curve"]:
      by_step.setdefault(p["step"], []).append(p)
  out = []
  for step in sorted(by_step):
    vals = [p["eval_bpb"] for p in by_step[step]]
    out.append({"step": step, "tokens": by_step[step][0]["tokens"], "mean": statistics.fmean(vals),
                "min": min(vals), "max": max(vals), "std": statistics.pstdev(vals) if len(vals) > 1 else 0.0,
                "seeds": len(vals)})
  return out


def plot(summary: dict, path: str) -> None:
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
  colors = {"megalodon": "tab:blue", "llama": "tab:orange"}
  for family, fam in summary["families"].items():
    c = colors.get(family)
    for run in fam["runs"]:
      pts = run["eval_curve"]
      ax1.plot([p["tokens"] for p in pts], [p["eval_bpb"] for p in pts], color=c, alpha=0.3, lw=0.8)
    mean = fam["mean_curve"]
    xs = [p["tokens"] for p in mean]
    ax1.plot(xs, [p["mean"] for p in mean], color=c, lw=2,
             label=f"{family} ({fam['params'] / 1e6:.2f}M, lr {fam['chosen_lr']:g}, seeds: {len(fam['runs'])})")
    ax1.fill_between(xs, [p["min"] for p in mean], [p["max"] for p in mean], color=c, alpha=0.15)
  ax1.set_xlabel("training tokens seen")
  ax1.set_ylabel("validation bits per byte")
  ax1.set_title(f"head to head ({summary['protocol']}): validation bpb")
  finals = [p["mean"] for fam in summary["families"].values() for p in fam["mean_curve"][1:]]
  if finals:  # the untrained step-0 point (8 bpb) would flatten the rest
    lo, hi = min(finals), max(finals)
    ax1.set_ylim(lo - 0.05 * (hi - lo + 1e-3), hi + 0.05 * (hi - lo + 1e-3))
  ax1.legend(fontsize=8)
  ax1.grid(alpha=0.3)
  styles = {"stream": "-", "full_kv_cache": "--", "sliding_window": ":"}
  for row_family, fam in summary["families"].items():
    by_method: dict[str, list] = {}
    for row in fam.get("context_eval") or []:
      by_method.setdefault(row["method"], []).append(row)
    for method, rows in by_method.items():
      rows.sort(key=lambda r: r["context"])
      ax2.plot([r["context"] for r in rows], [r["bpb"] for r in rows], styles.get(method, "-"), marker="o",
               color=colors.get(row_family), label=f"{row_family} {method}")
  ax2.set_xscale("log", base=2)
  ax2.set_xlabel("evaluation context length (tokens)")
  ax2.set_ylabel("bits per byte")
  ax2.set_title("held-out documents by context length")
  ax2.legend(fontsize=8)
  ax2.grid(alpha=0.3)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def _fmt_bytes(n: Optional[float]) -> str:
  if n is None:
    return "-"
  for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
    if abs(n) < 1024 or unit == "TiB":
      return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
    n /= 1024
  return str(n)


def tables(summary: dict) -> str:
  lines = []
  fams = summary["families"]
  lines.append("== learning-rate sweep (final validation bpb of the short runs) ==")
  for family, fam in fams.items():
    cells = ", ".join(f"{s['lr']:g}: {s['final_eval_bpb']:.4f}" for s in fam["sweep"])
    lines.append(f"{family:10s} {cells}  -> lr {fam['chosen_lr']:g}")
  lines.append("")
  lines.append("== validation bpb against training tokens (mean over seeds [min, max]) ==")
  steps = sorted({p["step"] for fam in fams.values() for p in fam["mean_curve"]})
  lines.append(f"{'step':>6s} {'tokens':>10s} " + " ".join(f"{f:>24s}" for f in fams))
  for step in steps:
    cells = []
    tokens = None
    for fam in fams.values():
      p = next((p for p in fam["mean_curve"] if p["step"] == step), None)
      tokens = p["tokens"] if p else tokens
      cells.append(f"{p['mean']:.4f} [{p['min']:.4f},{p['max']:.4f}]" if p else "-")
    lines.append(f"{step:6d} {tokens or 0:10d} " + " ".join(f"{c:>24s}" for c in cells))
  lines.append("")
  lines.append("== throughput and memory (full runs; medians over seeds) ==")
  mem_kind = summary["memory_measure"]
  lines.append(f"{'family':10s} {'params':>10s} {'tokens/s':>10s} {'step ms':>9s} {'wall s':>8s} {mem_kind:>22s}")
  for family, fam in fams.items():
    t = fam["throughput"]
    lines.append(f"{family:10s} {fam['params']:10,d} {t['tokens_per_s']:10.0f} {1e3 * t['step_time_s']:9.1f} "
                 f"{t['wall_s']:8.1f} {_fmt_bytes(t['peak_memory_bytes']):>22s}")
  lines.append("")
  rows = [r for fam in fams.values() for r in fam.get("context_eval") or []]
  contexts = sorted({r["context"] for r in rows})
  for key, title in (("bpb", "bpb of the first L tokens of each document"),
                     ("bpb_last_half", "bpb of the tokens at positions [L/2, L) (L/2 to L tokens of context)")):
    lines.append(f"== bpb against evaluation context length L, held-out documents, first seed's model: {title} ==")
    lines.append(f"{'model / method':28s} " + " ".join(f"{c:>9d}" for c in contexts))
    for family, fam in fams.items():
      ce = fam.get("context_eval") or []
      for m in sorted({r["method"] for r in ce}):
        cells = []
        for c in contexts:
          r = next((r for r in ce if r["method"] == m and r["context"] == c), None)
          cells.append(f"{r[key]:9.4f}" if r else f"{'-':>9s}")
        lines.append(f"{family + ' ' + m:28s} " + " ".join(cells))
    lines.append("")
  lines.append("== generation cache per sequence ==")
  lines.append(f"{'family':10s} " + " ".join(f"{n:>14,d}" for n in CACHE_CONTEXTS) + "  tokens of context")
  for family, fam in fams.items():
    by_n = {c["tokens"]: c["bytes"] for c in fam.get("cache_memory") or []}
    lines.append(f"{family:10s} " + " ".join(f"{_fmt_bytes(by_n.get(n)):>14s}" for n in CACHE_CONTEXTS))
  lines.append("")
  for family, fam in fams.items():
    lines.append(f"chosen {family} recipe: " + " ".join(fam["recipe"]))
  return "\n".join(lines)
