"""Compile a program for a target and report what one chip needs: the memory the compiler assigns, FLOPs, and
what to change when it does not fit; for the train step also an estimate (XLA cost model) of its step time, the
tokens/s and the MFU that implies (aot/estimate.py: XLA's counts with loop bodies counted per iteration, on the
chip's roofline; not a timing). This reads the compiler's report; nothing runs.
"""

from __future__ import annotations

import dataclasses
import re
import tempfile
import time
from typing import Any, Optional

import jax

from megalodon_jax.aot import buffers, estimate
from megalodon_jax.aot.programs import Program
from megalodon_jax.aot.topology import GIB, Target
from pallas_kernels.platform import target_platform

# A program fits when its peak is at most this share of the chip's memory: the runtime, the compiled code and
# fragmentation need the rest.
FIT_FRACTION = 0.9
_LOWERING = {"tpu": "tpu", "gpu": "cuda"}
_OOM = re.compile(r"HLO temporaries \(([\d.]+)([KMGT])\)")


@dataclasses.dataclass
class Report:
  """One compiled program on one target; byte figures are per chip (per jax device), in GiB."""
  program: str
  topology: str
  chips: int
  mesh: dict
  compiled: bool
  compile_seconds: float
  argument_gib: float
  output_gib: float
  alias_gib: float
  temp_gib: float
  peak_gib: float
  hbm_gib: float
  fits: bool
  xla_flops: Optional[float]
  analytic_flops: float
  shape: dict
  settings: dict
  buffer_temp_gib: Optional[float] = None
  largest: list = dataclasses.field(default_factory=list)
  suggestions: list = dataclasses.field(default_factory=list)
  error: str = ""
  # The train step's estimate (XLA cost model), per chip unless named global; None when not estimated (another
  # program, a failed compile, a chip without peak FLOP/s or bandwidth on record). Never a timing.
  xla_bytes: Optional[float] = None  # cost_analysis "bytes accessed", as reported (loop bodies once)
  xla_optimal_seconds: Optional[float] = None  # cost_analysis "optimal_seconds" (-6 with libtpu 0.0.42.1: not computed)
  loop_scaling: Optional[dict] = None  # estimate.LoopScaling: factors applied to the reported flops and bytes
  est_flops: Optional[float] = None  # XLA flops with every loop body counted per iteration
  est_bytes: Optional[float] = None
  est_step_seconds: Optional[float] = None
  est_tokens_per_second: Optional[float] = None  # global: batch x seq_len / est_step_seconds
  est_tokens_per_second_per_chip: Optional[float] = None
  est_mfu: Optional[float] = None  # analytic train-step FLOPs (causal) / (chips x peak bf16 x est_step_seconds)
  est_source: str = ""  # "roofline" (max of flops / peak, bytes / HBM bandwidth) or "optimal_seconds"
  est_roofline_seconds: Optional[float] = None  # max(est_flops / peak, est_bytes / HBM bandwidth)
  est_bound: str = ""  # the roofline's larger side: "compute" or "memory"
  est_label: str = ""  # estimate.LABEL when estimated

  def as_json(self) -> dict[str, Any]:
    return dataclasses.asdict(self)


def _oom_temp_gib(message: str) -> Optional[float]:
  """The temporaries figure from an XLA out-of-memory message ("... HLO temporaries (887.55G) ...")."""
  m = _OOM.search(message)
  if not m:
    return None
  scale = {"K": 1 / 1024 ** 2, "M": 1 / 1024, "G": 1.0, "T": 1024.0}[m.group(2)]
  return float(m.group(1)) * scale


def compile_program(program: Program, target: Target, mesh, settings: dict, *, dump_dir: Optional[str] = None,
                    top: int = 8) -> Report:
  """Traces, lowers and compiles `program` for `target` under `mesh`; never raises for a compile failure.

  settings: the execution settings that shaped the program (remat, implementations, mesh sizes), kept in the
  report and used for the suggestions.
  """
  hbm = target.hbm_bytes / GIB
  base = dict(program=program.name, topology=target.name, chips=target.chips,
              mesh={k: int(v) for k, v in mesh.shape.items()}, hbm_gib=hbm, analytic_flops=program.analytic_flops,
              shape=program.shape, settings=settings)
  with tempfile.TemporaryDirectory(prefix="megalodon_aot_") as tmp:
    dump = dump_dir or tmp
    start = time.perf_counter()
    try:
      with jax.set_mesh(mesh), target_platform(target.platform):
        lowered = program.fn.trace(*program.args).lower(lowering_platforms=(_LOWERING[target.platform],))
        compiled = lowered.compile(compiler_options={"xla_dump_to": dump})
    except Exception as e:  # pylint: disable=broad-except
      seconds = time.perf_counter() - start
      temp = _oom_temp_gib(str(e)) or 0.0
      report = Report(**base, compiled=False, compile_seconds=seconds, argument_gib=0.0, output_gib=0.0,
                      alias_gib=0.0, temp_gib=temp, peak_gib=temp, fits=False, xla_flops=None,
                      error="\n".join([l for l in str(e).splitlines() if l.strip()][:3]))
    else:
      seconds = time.perf_counter() - start
      mem = compiled.memory_analysis()
      cost = compiled.cost_analysis()
      cost = cost[0] if isinstance(cost, (list, tuple)) else cost
      arg, out = mem.argument_size_in_bytes / GIB, mem.output_size_in_bytes / GIB
      alias, temp = mem.alias_size_in_bytes / GIB, mem.temp_size_in_bytes / GIB
      peak = arg + out - alias + temp
      report = Report(**base, compiled=True, compile_seconds=seconds, argument_gib=arg, output_gib=out,
                      alias_gib=alias, temp_gib=temp, peak_gib=peak, fits=peak <= FIT_FRACTION * hbm,
                      xla_flops=float(cost.get("flops", 0.0)) if cost else None)
      if cost:
        report.xla_bytes = float(cost.get("bytes accessed", 0.0))
        report.xla_optimal_seconds = float(cost["optimal_seconds"]) if "optimal_seconds" in cost else None
      if cost and program.name == "train_step":
        _estimate(report, compiled, program, target)
    parsed = buffers.read_dump(dump, f"jit_{program.name}", top) or buffers.read_dump(dump, program.name, top)
    if parsed is not None:
      report.buffer_temp_gib = parsed.temp_bytes / GIB
      report.largest = [{"shape": t.shape, "gib": t.bytes / GIB, "instruction": t.instruction, "source": t.op_name}
                        for t in parsed.largest]
    if not report.fits:
      report.suggestions = suggest(report)
    return report


def _estimate(report: Report, compiled, program: Program, target: Target) -> None:
  """Fills the report's est_* fields (aot/estimate.py); an estimate that cannot be made leaves them None."""
  try:
    scaling = estimate.loop_scaled_costs(compiled.as_text())
  except Exception as e:  # pylint: disable=broad-except
    report.loop_scaling = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"}
    return
  devices = len(target.devices)
  per_chip = max(1, devices // target.chips)
  step = estimate.step_estimate(report.xla_flops or 0.0, report.xla_bytes or 0.0, report.xla_optimal_seconds,
                                scaling, target.device_kind, per_chip)
  report.loop_scaling = dataclasses.asdict(scaling)
  if step is None or step.seconds <= 0:
    return
  tokens = program.shape["batch"] * program.shape["seq_len"]
  peak_chip = estimate.peak_flops(target.device_kind)
  report.est_flops, report.est_bytes = step.flops, step.bytes
  report.est_step_seconds = step.seconds
  report.est_tokens_per_second = tokens / step.seconds
  report.est_tokens_per_second_per_chip = report.est_tokens_per_second / target.chips
  report.est_mfu = program.analytic_flops * devices / (target.chips * peak_chip * step.seconds)
  report.est_source, report.est_bound, report.est_label = step.source, step.bound, estimate.LABEL
  report.est_roofline_seconds = step.roofline_seconds


def _global_batch_tensors(report: Report) -> list[str]:
  """Temporaries whose leading dimension is the global batch although each chip holds fewer sequences."""
  batch, per_chip = report.shape.get("batch", 0), report.shape.get("seqs_per_chip", 0)
  if not batch or per_chip >= batch:
    return []
  return [t["shape"] for t in report.largest if re.search(rf"\[{batch},", t["shape"]) and t["gib"] > 0.001]


def suggest(report: Report) -> list[str]:
  """What to change, most likely to help first, from the report's shape, settings and largest temporaries."""
  s, out = report.settings, []
  per_chip = report.shape.get("seqs_per_chip", 1)
  if report.error and report.temp_gib == 0.0:
    return ["the compile failed for a reason other than memory; see the error above"]
  whole = _global_batch_tensors(report)
  if whole:
    out.append(f"tensors of the whole global batch sit on every chip ({', '.join(whole[:3])}): an activation is not "
               f"sharded over the batch; report this as a bug with the table above")
  if report.program == "train_step":
    if s.get("remat") != "full":
      out.append("recompute each block in the backward pass: --config.model.remat=full")
    if not s.get("scan_layers"):
      out.append("scan the blocks (their activations are saved once per layer either way, but one program for all "
                 "layers keeps the compiler's schedule simple): --config.model.scan_layers=True")
    if per_chip > 1:
      accum = s.get("grad_accum_steps", 1)
      out.append(f"fewer sequences per chip at once ({per_chip:g} now): --config.grad_accum_steps={accum * 2} "
                 f"(same tokens per step), or more chips")
    if "attention_impl" in s and s.get("attention_impl") != "pallas":
      out.append("the Pallas attention kernel keeps one tile of scores at a time: --config.model.attention_impl=pallas")
    if "cema_impl" in s and s.get("cema_impl") not in ("chunked", "pallas"):
      out.append("a CEMA that never holds (length x model_dim x cema_ndim) or FFT buffers: "
                 "--config.model.cema_impl=chunked (or pallas)")
  if report.argument_gib > 0.5 * report.hbm_gib:
    out.append(f"parameters and optimizer state take {report.argument_gib:.1f} GiB per chip: shard them over more "
               f"chips (--config.mesh.fsdp=-1, mesh.data=1) or add tensor parallelism (--config.mesh.tensor=2)")
  if s.get("mesh_data", 1) > 1:
    out.append("parameters are replicated over mesh.data; move those chips to fsdp: --config.mesh.data=1 "
               "--config.mesh.fsdp=-1")
  if report.program == "train_step" and "cema_impl" in s:  # the sequence axis: Megalodon's chunk parallelism
    out.append("split each sequence over chips with the sequence mesh axis (--config.mesh.sequence=2, 4, ...; "
               "seq_len must be a multiple of mesh.sequence x model.chunk_size)")
  return out
