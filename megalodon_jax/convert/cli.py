"""`megalodon-convert` (or `python -m megalodon_jax.convert`): JAX checkpoints ⇄ PyTorch files.

  to-pytorch --checkpoint CKPT --out DIR [--format official|hf|safetensors] [--dtype float32|bfloat16]
             [--model_parallel N] [--step S] [--overwrite]
  from-pytorch --torch PATH [--config params.json] --out DIR [--overwrite]

CKPT is a train.py workdir, its checkpoints/ folder, a step folder, or a from-pytorch output folder. Output
folders are written next to DIR under a temporary name and renamed into place at the end, so a failure never
leaves a partial DIR behind (on an object store, gs://..., they are written to a local temporary folder and uploaded
at the end: see `model_io.atomic_output`). Any path may be a gs:// URL. Flags are snake_case and accept their
kebab-case spelling (`--model-parallel`). Bad input ends with one `error: ...` paragraph on stderr and exit
status 2. Conversion is host work: JAX runs on the CPU unless JAX_PLATFORMS says otherwise.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Optional, Sequence

import jax

from megalodon_jax import cli_args, paths
from megalodon_jax.checkpoints import layout, model_io, tokenizer_copy
from megalodon_jax.checkpoints.locate import locate_checkpoint
from megalodon_jax.convert import hf, torch_files
from megalodon_jax.convert.official import from_official_state_dict, to_official_state_dict
from megalodon_jax.errors import ConvertError, StateDictError, exit_on_error


def build_parser() -> cli_args.Parser:
  parser = cli_args.Parser(prog=cli_args.prog_name("megalodon-convert", "megalodon_jax.convert"),
                           description="Convert Megalodon checkpoints between JAX (Orbax) and PyTorch.")
  sub = parser.add_subparsers(dest="command", required=True)
  to = sub.add_parser("to-pytorch", help="Orbax checkpoint -> official consolidated.pth / megalodon-hf / safetensors",
                      description="Export a train.py or from-pytorch checkpoint to PyTorch files (runs on CPU).")
  to.add_argument("--checkpoint", required=True,
                  help="train.py workdir, its checkpoints/ folder, a step folder, or a from-pytorch output folder")
  to.add_argument("--out", required=True, help="output folder (must not exist or be empty, unless --overwrite)")
  to.add_argument("--format", choices=("official", "hf", "safetensors"), default="official",
                  help="official: consolidated.pth + params.json; hf: megalodon-hf model.safetensors + config.json; "
                       "safetensors: model.safetensors with official keys + params.json")
  to.add_argument("--dtype", choices=tuple(torch_files.DTYPES), default="float32",
                  help="dtype of the floating tensors (int64 buffers and rope.freqs are kept)")
  to.add_argument("--model_parallel", type=int, default=1, metavar="N",
                  help="official format only: write N tensor-parallel shards consolidated.{rank:02d}.pth")
  to.add_argument("--step", type=int, default=None, help="step to export (default: the latest finished one)")
  to.add_argument("--overwrite", action="store_true", help="replace a non-empty --out folder (atomically)")
  frm = sub.add_parser("from-pytorch", help="official/megalodon-hf PyTorch weights -> params-only Orbax checkpoint",
                       description="Import PyTorch weights as a params-only Orbax checkpoint that train.py's "
                                   "--config.init_from and the inference tools load.")
  frm.add_argument("--torch", required=True,
                   help="consolidated.pth, a folder of consolidated.NN.pth shards, a folder holding consolidated.pth "
                        "or model.safetensors, or a .safetensors file")
  frm.add_argument("--config", default=None,
                   help="params.json (official ModelConf fields) or megalodon-hf config.json; default: beside --torch")
  frm.add_argument("--out", required=True, help="output folder (must not exist or be empty, unless --overwrite)")
  frm.add_argument("--overwrite", action="store_true", help="replace a non-empty --out folder (atomically)")
  return parser


def _cpu() -> jax.Device:
  return jax.devices("cpu")[0]


def to_pytorch(args: argparse.Namespace) -> None:
  if args.model_parallel < 1:
    raise ConvertError(f"--model_parallel must be >= 1, got {args.model_parallel}")
  if args.model_parallel > 1 and args.format != "official":
    raise ConvertError(f"--model_parallel applies to --format official only (got --format {args.format})")
  model_io.check_output(args.out, overwrite=args.overwrite)  # fail before the (slow) restore
  tokenizer_model = locate_checkpoint(args.checkpoint, args.step).tokenizer_model
  model, config, step = model_io.load_checkpoint(args.checkpoint, step=args.step, device=_cpu())
  tensors = to_official_state_dict(model)
  if args.format == "hf":
    problems = hf.hf_export_problems(tensors, config)
    if problems:
      raise StateDictError("cannot export to the megalodon-hf layout: " + "; ".join(problems) +
                           ". Use --format official or safetensors")
    print(hf.TIMESTEP_NORM_WARNING, file=sys.stderr)
  tensors = torch_files.cast(tensors, args.dtype)
  with model_io.atomic_output(args.out, overwrite=args.overwrite) as tmp:
    if args.format == "official":
      files = torch_files.write_official(tmp, tensors, config, args.model_parallel)
    elif args.format == "safetensors":
      files = torch_files.write_safetensors(tmp, tensors, config)
    else:
      files = torch_files.write_hf(tmp, tensors, config, args.dtype)
    if tokenizer_model is not None:  # the SentencePiece model the run trained with, beside the config
      files = [*files, os.path.basename(tokenizer_copy.write_copy(tmp, tokenizer_model))]
  print(f"wrote {paths.abspath(args.out)}: {', '.join(files)} ({args.format}, {args.dtype}, step {step}, "
        f"{config.num_params():,} parameters)")


def from_pytorch(args: argparse.Namespace) -> None:
  model_io.check_output(args.out, overwrite=args.overwrite)
  tensors, config = torch_files.read_official(args.torch, args.config)
  with jax.default_device(_cpu()):
    model = from_official_state_dict(tensors, config)
  source = paths.abspath(args.torch)
  torch_dir = source if paths.as_path(source).is_dir() else os.path.dirname(source)
  model_io.save_params_checkpoint(args.out, model, source=source, overwrite=args.overwrite,
                                  tokenizer_model=tokenizer_copy.read_copy(torch_dir))
  print(f"wrote {paths.abspath(args.out)}: params-only Orbax checkpoint + {layout.CONFIG_FILE} "
        f"({config.num_params():,} parameters); train with --config.init_from={paths.abspath(args.out)}")


def main(argv: Optional[Sequence[str]] = None) -> int:
  """Runs the command line; returns the exit status (0 ok, 2 bad input or arguments)."""
  args = build_parser().parse_args(argv)

  def body() -> int:
    (to_pytorch if args.command == "to-pytorch" else from_pytorch)(args)
    return 0

  # one_line=False: a state-dict mismatch lists one offending key per line
  return exit_on_error(body, also=(OSError,), one_line=False)


def run() -> int:
  """The `megalodon-convert` console script: `main` on the CPU unless JAX_PLATFORMS chose a platform (jax is
  imported already, but its backends start on first use, so the setting still applies)."""
  if "JAX_PLATFORMS" not in os.environ:
    jax.config.update("jax_platforms", "cpu")
  return main()
