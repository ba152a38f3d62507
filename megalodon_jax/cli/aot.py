"""`megalodon-aot --config <name or path> --topology <target> [--config.<key>=<value> ...]` (or
`python -m megalodon_jax.aot ...`)

Compiles, on this machine and without any accelerator, the train step exactly as train.py would run it and the
generator's prefill and one-token decode steps, for a TPU slice or a GPU host, and prints what one chip needs.
Exit status: 0 when every program fits (peak <= 90% of the chip's memory), 1 when one does not fit or fails to
compile (the largest temporaries and what to change are printed), 2 for bad input (unknown topology, bad config).
No data set or tokenizer file is read: shapes come from the config (model.vocab_size, or 256 for the byte
tokenizer). `--config` and its overrides work as in megalodon-train (cli/config_flags.py).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Optional, Sequence

from megalodon_jax import mesh_axes, paths
from megalodon_jax.aot import gpu  # no jax: it reads installed packages and sets environment variables
from megalodon_jax.aot import topology as topo_lib
from megalodon_jax.cli import config_flags
from megalodon_jax.cli.args import Parser, prog_name
from megalodon_jax.errors import ConfigError, TopologyError, exit_on_error

PROGRAMS = ("train_step", "prefill", "decode")


def build_parser() -> Parser:
  p = Parser(prog=prog_name("megalodon-aot", "megalodon_jax.aot"),
                      description="Compile the train step and the generator's prefill / decode for a TPU slice or a "
                                  "GPU host without one, and report what one chip needs.",
                      epilog="--config.KEY=VALUE overrides a field of the config, as in megalodon-train.")
  p.add_argument("--config", required=True, metavar="NAME_OR_PATH",
                 help="a shipped config's name (e.g. tiny) or a path to a config .py file")
  p.add_argument("--topology", required=True,
                 help="target: a TPU slice (v5p-128, v5e-8, v6e-16, v4-32, v5p:4x4x4) or a GPU host (h100-8, a100-8)")
  p.add_argument("--programs", default=",".join(PROGRAMS), help="programs to compile, comma separated")
  p.add_argument("--json", action="store_true",
                 help="print one JSON object per program on stdout (the table goes to stderr)")
  p.add_argument("--infer_batch", type=int, default=None,
                 help="sequences generated at once (default: one per chip along mesh.data x mesh.fsdp)")
  p.add_argument("--prefill_tokens", type=int, default=None,
                 help="tokens per prefill call (default: the generator's piece, about 4096)")
  p.add_argument("--dump_dir", default=None, help="keep XLA's dumps (HLO, buffer assignment) in this folder")
  p.add_argument("--top", type=int, default=8, help="largest temporaries to list for a program that does not fit")
  return p


def vocab_size_for(cfg) -> int:
  """The vocabulary the model is built with: model.vocab_size, or the byte tokenizer's 256, or the SentencePiece
  model's size when its file is readable. Raises ConfigError naming the flag to set otherwise."""
  if cfg.model.vocab_size != -1:
    return int(cfg.model.vocab_size)
  if cfg.data.tokenizer == "bytes":
    return 256
  path = cfg.data.tokenizer_path
  if path and paths.as_path(path).exists():
    from megalodon_jax import data  # pylint: disable=import-outside-toplevel
    return data.make_tokenizer(cfg.data).vocab_size
  raise ConfigError("the vocabulary size is unknown: set --config.model.vocab_size=<size> (32000 for the Llama-2 "
                    "tokenizer) or --config.data.tokenizer_path to a readable SentencePiece model")


def _settings(cfg, model_cfg, seq_len: int, platform: str) -> dict:
  settings = {"remat": model_cfg.remat_policy, "scan_layers": model_cfg.scan_layers, "dtype": model_cfg.dtype,
              "grad_accum_steps": cfg.grad_accum_steps, "loss_piece": cfg.loss_piece, "mesh_data": cfg.mesh.data,
              "family": cfg.family}
  if not hasattr(model_cfg, "cema_impl"):  # a family without Megalodon's kernels (llama): its attention setting
    settings["full_attention_impl"] = getattr(model_cfg, "full_attention_impl", None)
    return settings
  from megalodon_jax.ops.attention import resolve_attention_impl  # pylint: disable=import-outside-toplevel
  from megalodon_jax.ops.cema import default_impl  # pylint: disable=import-outside-toplevel
  from megalodon_jax.ops.impl_names import pallas_dropout_problem  # pylint: disable=import-outside-toplevel
  head = dict(chunk_size=model_cfg.chunk_size, z_head_dim=model_cfg.z_head_dim,
              v_head_dim=model_cfg.value_dim // model_cfg.num_heads,
              pallas_ok=not pallas_dropout_problem(model_cfg.attention_dropout, model_cfg.efficient_attn is not None))
  cema_impl = model_cfg.cema_impl
  if cema_impl == "auto":
    cema_impl = default_impl(seq_len, platform, dim=model_cfg.model_dim)
  return {**settings, "attention_impl": resolve_attention_impl(model_cfg.attention_impl, platform, **head),
          "cema_impl": cema_impl}


def _table(reports) -> str:
  head = ("program", "topology", "mesh", "seq_len", "seqs/chip", "peak GiB", "HBM GiB", "fits", "compile s",
          "XLA TFLOP", "analytic TFLOP", "est step s*", "est tok/s/chip*", "est MFU*")
  rows = [head]
  for r in reports:
    mesh = "x".join(f"{k}{v}" for k, v in r.mesh.items() if v > 1) or "1"
    rows.append((r.program, r.topology, mesh, str(r.shape.get("seq_len")), f"{r.shape.get('seqs_per_chip', 0):g}",
                 f"{r.peak_gib:.2f}" if r.compiled else f">{r.peak_gib:.2f}" if r.peak_gib else "-",
                 f"{r.hbm_gib:.2f}", "yes" if r.fits else "NO", f"{r.compile_seconds:.1f}",
                 f"{r.xla_flops / 1e12:.3g}" if r.xla_flops else "-", f"{r.analytic_flops / 1e12:.3g}",
                 *_estimate_cells(r)))
  widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
  table = "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in rows)
  if any(r.est_step_seconds for r in reports):
    table += ("\n* estimate (XLA cost model), not a timing: XLA's optimal_seconds (or, where XLA leaves it unset, the "
              "roofline of its flops and bytes) with every loop body counted per iteration; MFU = analytic train-step "
              "FLOPs / (chips x peak bf16 x est step s). megalodon_jax/aot/estimate.py")
    kernels = sum((r.loop_scaling or {}).get("kernels", 0) for r in reports if r.est_step_seconds)
    if kernels:
      table += (f"\n  the train step calls {kernels} Pallas kernel(s): XLA's cost model does not see the work inside "
                "them (e.g. splash attention), so the estimate leaves it out")
  return table


def _estimate_cells(r) -> tuple[str, str, str]:
  if not r.est_step_seconds:
    return "-", "-", "-"
  return (f"{r.est_step_seconds:.3g}", f"{r.est_tokens_per_second_per_chip:,.0f}", f"{100 * r.est_mfu:.1f}%")


def _details(r) -> str:
  from megalodon_jax.aot.buffers import short_op  # pylint: disable=import-outside-toplevel
  lines = [f"\n{r.program} on {r.topology}: " + ("compiled, needs more than 90% of the chip's memory" if r.compiled
                                                 else "did not compile")]
  if r.error:
    lines.append("  compiler: " + r.error.replace("\n", "\n            "))
  if r.compiled:
    lines.append(f"  per chip: arguments {r.argument_gib:.2f} GiB, outputs {r.output_gib:.2f} GiB (aliased "
                 f"{r.alias_gib:.2f}), temporaries {r.temp_gib:.2f} GiB; peak {r.peak_gib:.2f} of {r.hbm_gib:.2f} GiB")
  if r.largest:
    lines.append("  largest temporaries (per chip):")
    lines.extend(f"    {t['gib']:8.3f} GiB  {t['shape']:<28} {short_op(t['source'] or t['instruction'])}"
                 for t in r.largest)
  if r.suggestions:
    lines.append("  try:")
    lines.extend(f"    - {s}" for s in r.suggestions)
  return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
  """Exit status: 0 every program fits, 1 one does not, 2 bad flags or config (flag errors and `--help` raise
  SystemExit, as argparse does)."""
  argv = sys.argv[1:] if argv is None else list(argv)
  rest, overrides = config_flags.split_overrides(argv)
  args = build_parser().parse_args(rest)
  return exit_on_error(lambda: _main(args, overrides), one_line=False)


def _main(args: argparse.Namespace, overrides: list) -> int:
  problem = topo_lib.is_known(args.topology)
  if problem:  # bad input, like every error below: exit_on_error prints it and returns 2
    raise TopologyError(problem)
  programs_wanted = [p for p in args.programs.replace(" ", "").split(",") if p]
  unknown = sorted(set(programs_wanted) - set(PROGRAMS))
  if unknown:
    raise ConfigError(f"--programs: unknown {unknown}; choose from train_step, prefill, decode")
  cfg, _ = config_flags.load_config(args.config)  # ConfigError: exit_on_error -> 2
  config_flags.apply_overrides(cfg, overrides)
  # The whole config, as train.py checks it, before jax starts (the mesh as far as it goes without the target's
  # device count; the run is built, and checked again with it, below).
  from megalodon_jax.training.train_config import TrainConfig  # pylint: disable=import-outside-toplevel
  cfg = TrainConfig.of(cfg)  # every field checked before jax starts (ConfigError: exit_on_error -> 2)
  gpu_target = args.topology.lower().startswith(("h100", "a100"))
  if gpu_target:
    gpu.prepare_environment()  # before jax starts its backends
  try:
    vocab = vocab_size_for(cfg)
  except ValueError as e:  # ConfigError, or a ValueError from reading the SentencePiece model
    raise ConfigError(str(e)) from None
  cfg.model_config(vocab)  # a vocab_size below the tokenizer's (ConfigError -> 2), as the run below builds it
  if gpu_target and not gpu.cuda_available()[0]:
    # Without the CUDA plugin, resolving the GPU target fails at its first check, which needs no jax: made here,
    # before the import below (~2 s), it reports the missing plugin at once, in topology.py's words.
    topo_lib.resolve(args.topology)

  import jax  # pylint: disable=import-outside-toplevel
  from megalodon_jax import platforms  # pylint: disable=import-outside-toplevel
  platforms.skip_absent_tpu()  # the CPU backend only: TPU programs compile through libtpu's topologies
  from megalodon_jax.aot import planner, programs  # pylint: disable=import-outside-toplevel
  from megalodon_jax.training.program import TrainProgram  # pylint: disable=import-outside-toplevel
  from pallas_kernels.platform import target_platform  # pylint: disable=import-outside-toplevel
  target = topo_lib.resolve(args.topology)  # TopologyError, ConfigError, ShardingError: exit_on_error -> 2
  with target_platform(target.platform):
    run = TrainProgram.build(cfg, list(target.devices), vocab_size=vocab)
  out = sys.stderr if args.json else sys.stdout  # with --json, stdout holds the JSON lines only
  print(f"logical axes on the mesh {dict(run.mesh.shape)}:\n{mesh_axes.logical_axes_table(run.mesh, run.rules)}",
        file=out)
  with jax.set_mesh(run.mesh), target_platform(target.platform):
    todo = [programs.train_program(run)] if "train_step" in programs_wanted else []
    if {"prefill", "decode"} & set(programs_wanted):
      todo += [p for p in programs.inference_programs(run, args.infer_batch, args.prefill_tokens)
               if p.name in programs_wanted]
  reports = []
  for program in todo:
    settings = _settings(cfg, run.model_config, program.shape["seq_len"], target.platform)
    dump = os.path.join(args.dump_dir, program.name) if args.dump_dir else None
    report = planner.compile_program(program, target, run.mesh, settings, dump_dir=dump, top=args.top)
    reports.append(report)
    if args.json:
      print(json.dumps(report.as_json()), flush=True)
  print(_table(reports), file=out)
  for r in reports:
    if not r.fits:
      print(_details(r), file=out)
  return 0 if all(r.fits for r in reports) else 1

