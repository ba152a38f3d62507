"""A step-time estimate (XLA cost model) for a compiled program: XLA's own time estimate (or the roofline of its FLOP
and byte counts), with every loop body counted once per iteration. An estimate from the compiler's cost model, never
a timing.

Why the loop scaling. XLA's cost analysis (`compiled.cost_analysis()`, HloCostAnalysis) counts the body of a
`while` loop once, whatever its trip count. A train step with `scan_layers=True` runs all blocks as one while loop
(forward and backward: one loop each), and the chunked CEMA and attention kernels loop over chunks inside a block,
so the raw `flops` of a scanned 32-layer step reads about 1/32 of the work (docs: tpu_without_a_tpu.md). Measured on
the tiny config on v5e-4 with 4 layers: 3.373 GFLOP scanned, 3.659 GFLOP unrolled; after the scaling below both
read the same (tests/test_aot.py::test_loop_scaling_matches_unrolled_layers).

How it is scaled (`loop_scaled_costs`): the optimised HLO module (`compiled.as_text()`) is parsed again on the host
and, for every while loop with a known trip count n, its body is made the entry of a copy of the module and costed
alone (the same HloCostAnalysis, run by the CPU client: on the whole module it gives exactly the FLOPs XLA:TPU
reports). The true count is the reported one plus, for every loop, (n - 1) x its body's cost x the number of times
its enclosing loops run (a nested loop's body is inside its parent's body cost once, so this sums correctly at any
depth). XLA:TPU's byte count differs from the CPU analysis' (it knows TPU memory spaces), so bytes are scaled by
the CPU analysis' ratio (scaled / reported); FLOPs are the same in both. Loops without a known trip count are left
as counted (reported in `unknown_trip_loops`).

Which time. XLA:TPU's cost analysis has an `optimal_seconds` entry, its own cost model's time for the module (loop
bodies once, like the counts). With libtpu 0.0.42.1 it is filled for the 7B steps on v5p (0.427 s for Megalodon-7B
at 32K, 2 sequences per chip) but is -6 (not computed) for the tiny step on v5e. When it is positive the estimate
is optimal_seconds x the FLOP loop factor (the loops hold nearly all of a scanned step's work: the factor is 36 for
the 32-layer Megalodon-7B step); otherwise it is the roofline max(FLOPs / peak bf16 FLOP/s, bytes / HBM
bandwidth) per chip, which is also reported (`est_roofline_seconds`): what the counts allow if compute and memory
traffic overlapped perfectly and collectives were free, a lower bound on the step time. Either way: an estimate
from the compiler's cost model, an upper bound on tokens/s and MFU, never a timing.

What it leaves out. XLA's counts and optimal_seconds do not see inside Pallas kernels (custom calls): a program that
runs its attention in one (Llama's splash attention on TPU, attention_impl=pallas) is estimated without that
attention's work. `kernels` counts such calls; benchmarks/family_speed.py adds the analytic attention FLOPs for
them (RESULTS.md, issue 22). Collectives are not in the counts either.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Optional

from megalodon_jax.flops import peak_flops

# HBM bandwidth per chip (bytes/s), public spec sheets (Google Cloud TPU system-architecture pages; NVIDIA data
# sheets), matched as case-insensitive substrings of jax's device_kind, first match wins (as flops.PEAK_BF16_FLOPS).
HBM_BYTES_PER_SECOND: tuple[tuple[str, float], ...] = (
    ("H100 PCIe", 2.0e12),
    ("H200", 4.8e12),
    ("H100", 3.35e12),
    ("A100", 2.039e12),
    ("TPU v5 lite", 819e9),  # v5e
    ("TPU v5e", 819e9),
    ("TPU v5p", 2765e9),
    ("TPU v5", 2765e9),
    ("TPU v6 lite", 1640e9),  # v6e
    ("TPU v6e", 1640e9),
    ("TPU v4", 1228e9),
)
LABEL = "estimate (XLA cost model)"

_HEADER = re.compile(r"^(ENTRY )?%?([\w.\-]+) \(.*\) -> .*\{\s*$")
_WHILE = re.compile(r"\bwhile\(")
_BODY = re.compile(r"\bbody=%?([\w.\-]+)")
_TRIP = re.compile(r"\"known_trip_count\":\{\"n\":\"(\d+)\"")
_CONDITION = re.compile(r"\bcondition=%?([\w.\-]+)")
_CONSTANT = re.compile(r"^\s*%?([\w.\-]+) = [su](?:32|64)\[\]\S* constant\((\d+)\)")
_COMPARE = re.compile(r"^\s*ROOT %?[\w.\-]+ = pred\[\]\S* compare\(%?([\w.\-]+), %?([\w.\-]+)\), direction=(LT|GT)")
_CALLEES = re.compile(r"\b(?:calls|to_apply|condition|body|true_computation|false_computation)=%?([\w.\-]+)")
_BRANCHES = re.compile(r"\bbranch_computations=\{([^}]*)\}")


def hbm_bandwidth(device_kind: str) -> Optional[float]:
  kind = device_kind.lower()
  return next((value for key, value in HBM_BYTES_PER_SECOND if key.lower() in kind), None)


@dataclasses.dataclass
class LoopScaling:
  """flops / bytes: the CPU analysis of the module with loop bodies counted per iteration, divided by its plain
  count (1.0 without loops).  loops: while loops with a known trip count.  unknown_trip_loops: those without."""
  flops: float
  bytes: float
  loops: int
  unknown_trip_loops: int
  kernels: int = 0  # Pallas (Mosaic / Triton) custom calls: XLA's counts leave out the work inside them


def _computations(text: str) -> tuple[dict, Optional[str], list]:
  """{name: [instruction lines]}, the entry's name, and the module's lines."""
  lines = text.splitlines()
  comps: dict[str, list[str]] = {}
  entry, current = None, None
  for line in lines:
    m = _HEADER.match(line)
    if m:
      current = m.group(2)
      comps[current] = []
      if m.group(1):
        entry = current
      continue
    if current is not None:
      if line.rstrip() == "}":  # a computation's end (an instruction's attributes may span lines opening with "}")
        current = None
      else:
        comps[current].append(line)
  return comps, entry, lines


def _trip_count(line: str, comps: dict) -> Optional[int]:
  """A while loop's trip count: XLA's known_trip_count when the backend config still carries it, else read from its
  condition `counter < N` (N a constant; jax's scans and fori_loops count from 0 in steps of 1)."""
  t = _TRIP.search(line)
  if t:
    return int(t.group(1))
  cond = _CONDITION.search(line)
  cond_lines = comps.get(cond.group(1), []) if cond else []
  constants = dict(m.groups() for m in map(_CONSTANT.match, cond_lines) if m)
  for l in cond_lines:
    m = _COMPARE.match(l)
    if m:
      a, b, direction = m.groups()
      bound = constants.get(b) if direction == "LT" else constants.get(a)
      return int(bound) if bound is not None else None
  return None


def _with_entry(lines: list[str], entry: str, name: str) -> str:
  """The module text with computation `name` as its entry (the module header reduced to its name: the entry layout
  and aliasing it names belong to the old entry)."""
  out = []
  for line in lines:
    if line.startswith("HloModule "):
      out.append("HloModule " + line.split()[1].rstrip(","))
      continue
    m = _HEADER.match(line)
    if m:
      line = line[len("ENTRY "):] if m.group(1) else line
      if m.group(2) == name:
        line = "ENTRY " + line
    out.append(line)
  return "\n".join(out)


def _cost(text: str) -> tuple[float, float]:
  import jax  # pylint: disable=import-outside-toplevel
  from jax._src.lib import xla_client  # pylint: disable=import-outside-toplevel
  from jaxlib import _hlo  # pylint: disable=import-outside-toplevel
  module = _hlo.hlo_module_from_text(text)
  cost = xla_client._xla.hlo_module_cost_analysis(jax.devices("cpu")[0].client, module)  # pylint: disable=protected-access
  return float(cost.get("flops", 0.0)), float(cost.get("bytes accessed", 0.0))


def loop_scaled_costs(hlo_text: str) -> LoopScaling:
  """How much the loop bodies of the optimised module `hlo_text` add when each runs its trip count (module doc)."""
  comps, entry, lines = _computations(hlo_text)
  if entry is None:
    return LoopScaling(1.0, 1.0, 0, 0)
  # Edges caller -> callee with the callee's runs per caller run (n for a while body of trip count n).
  edges: dict[str, list[tuple[str, int]]] = {}
  loops: list[tuple[str, str, int]] = []  # (computation holding the loop, body, trip count)
  unknown = 0
  for comp, body_lines in comps.items():
    for line in body_lines:
      trip = None
      if _WHILE.search(line):
        b, trip = _BODY.search(line), _trip_count(line, comps)
        if b and trip is not None:
          loops.append((comp, b.group(1), trip))
        elif b:
          unknown += 1
      callees = _CALLEES.findall(line)
      for branches in _BRANCHES.findall(line):
        callees += [c.strip().lstrip("%") for c in branches.split(",") if c.strip()]
      body = _BODY.search(line).group(1) if trip is not None else None
      for callee in callees:
        edges.setdefault(comp, []).append((callee, trip if callee == body else 1))
  runs: dict[str, float] = {}

  def visit(comp: str, times: float, depth: int = 0) -> None:  # a call graph is a DAG: accumulate over paths
    runs[comp] = runs.get(comp, 0.0) + times
    if depth < 64:
      for callee, n in edges.get(comp, ()):
        if callee in comps:
          visit(callee, times * n, depth + 1)

  # Leaves (fusions, reducers) hold no loops: only computations that call others are followed.
  edges = {c: [(k, n) for k, n in e if k in edges] for c, e in edges.items()}
  visit(entry, 1.0)
  flops, nbytes = _cost(hlo_text)
  extra_flops = extra_bytes = 0.0
  body_cost: dict[str, tuple[float, float]] = {}
  for comp, body, trip in loops:
    if trip <= 1 or runs.get(comp, 0.0) == 0.0:
      continue
    if body not in body_cost:
      body_cost[body] = _cost(_with_entry(lines, entry, body))
    bf, bb = body_cost[body]
    extra_flops += runs[comp] * (trip - 1) * bf
    extra_bytes += runs[comp] * (trip - 1) * bb
  kernels = sum(line.count('custom_call_target="tpu_custom_call"') + line.count('custom_call_target="__gpu$xla.gpu.triton"')
                for body_lines in comps.values() for line in body_lines)
  return LoopScaling(flops=(flops + extra_flops) / flops if flops else 1.0,
                     bytes=(nbytes + extra_bytes) / nbytes if nbytes else 1.0, loops=len(loops),
                     unknown_trip_loops=unknown, kernels=kernels)


@dataclasses.dataclass
class StepEstimate:
  """Per chip (per jax device). seconds: the estimated step time; source: "roofline" or "optimal_seconds"."""
  flops: float
  bytes: float
  seconds: float
  source: str
  bound: str  # "compute" or "memory": the roofline's larger side
  roofline_seconds: float  # max(flops / peak, bytes / bandwidth), reported whichever the source


def step_estimate(flops: float, nbytes: float, optimal_seconds: Optional[float], scaling: LoopScaling,
                  device_kind: str, devices_per_chip: int = 1) -> Optional[StepEstimate]:
  """The step-time estimate of one device from XLA's reported counts and the loop scaling; None for an unknown
  chip (no peak FLOP/s or bandwidth on record)."""
  peak, bandwidth = peak_flops(device_kind), hbm_bandwidth(device_kind)
  if not peak or not bandwidth:
    return None
  peak, bandwidth = peak / devices_per_chip, bandwidth / devices_per_chip
  f, b = flops * scaling.flops, nbytes * scaling.bytes
  compute, memory = f / peak, b / bandwidth
  roofline, bound = max(compute, memory), "compute" if compute >= memory else "memory"
  if optimal_seconds is not None and optimal_seconds > 0:
    return StepEstimate(f, b, optimal_seconds * scaling.flops, "optimal_seconds", bound, roofline)
  return StepEstimate(f, b, roofline, "roofline", bound, roofline)
