"""`megalodon-convert` (or `python -m megalodon_jax.convert`): JAX checkpoints ⇄ PyTorch files.

  to-pytorch --checkpoint CKPT --out DIR [--format official|hf|safetensors] [--dtype float32|bfloat16]
             [--model_parallel N] [--step S] [--overwrite]
  from-pytorch --torch PATH [--config params.json] --out DIR [--overwrite]
  to-hf-llama --checkpoint CKPT --out DIR [--dtype float32|bfloat16] [--max_position_embeddings N] [--step S]
              [--overwrite]

to-pytorch exports the Megalodon family; to-hf-llama exports a checkpoint of the Llama baseline family
(`--config.model.family=llama`) as a Hugging Face `transformers` LlamaForCausalLM folder (model.safetensors +
config.json, convert/hf_llama.py) that `LlamaForCausalLM.from_pretrained(DIR)` loads.

CKPT is a train.py workdir, its checkpoints/ folder, a step folder, or a from-pytorch output folder. Output
folders are written next to DIR under a temporary name and renamed into place at the end, so a failure never
leaves a partial DIR behind (on an object store, gs://..., they are written to a local temporary folder and uploaded
at the end: see `model_io.atomic_output`). Any path may be a gs:// URL. Flags are snake_case and accept their
kebab-case spelling (`--model-parallel`). Bad input ends with one `error: ...` paragraph on stderr and exit
status 2; flags and paths are checked before jax, flax, orbax or torch are imported, so that comes at once.
Conversion is host work: JAX runs on the CPU unless JAX_PLATFORMS says otherwise.

What is read is never written over (checked before anything is loaded or created):
- DIR may not be, contain, or lie inside what the command reads: for to-pytorch the whole run directory of CKPT
  (a step folder's run is two levels up), for from-pytorch the --torch path and the --config file. Paths compare
  after resolving symlinks (gs:// URLs as normalised strings): `checkpoints/output_guard.py`.
- A non-empty DIR is replaced only with --overwrite, and only when every entry in it is one this kind of output
  writes: for to-pytorch any file a to-pytorch export of any format writes (consolidated.pth, consolidated.NN.pth,
  model.safetensors, params.json, config.json, tokenizer.model: so re-exporting in another format works), for
  to-hf-llama model.safetensors, config.json and tokenizer.model, for from-pytorch the entries of a params-only
  Orbax checkpoint (`output_guard.PARAMS_CHECKPOINT_ENTRIES`). Any other
  entry is named in the error and nothing is deleted. The earlier output is then replaced whole.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from typing import Optional, Sequence

# Light imports only (no jax, flax, orbax, torch): the converters and model_io are imported after the checks.
from megalodon_jax import paths, platforms
from megalodon_jax.checkpoints import layout, output_guard, tokenizer_copy
from megalodon_jax.checkpoints.locate import locate_checkpoint
from megalodon_jax.cli.args import Parser, prog_name
from megalodon_jax.errors import ConvertError, StateDictError, exit_on_error

# What torch_files (which imports jax) calls DTYPES, PARAMS_JSON and HF_CONFIG_JSON; tests/test_fast_errors.py keeps
# them equal.
EXPORT_DTYPES = ("float32", "bfloat16")
PARAMS_JSON = "params.json"
HF_CONFIG_JSON = "config.json"

# Every file a to-pytorch export writes, whatever its format (torch_files.write_official / write_safetensors /
# write_hf, and the tokenizer copy): --overwrite replaces a folder holding these only.
EXPORT_ENTRIES = output_guard.KnownEntries(
    re.compile(r"consolidated(\.\d{2,})?\.pth|model\.safetensors|" + re.escape(PARAMS_JSON) + "|"
               + re.escape(HF_CONFIG_JSON) + "|" + re.escape(tokenizer_copy.TOKENIZER_FILE)),
    "a to-pytorch export",
    "consolidated.pth, consolidated.NN.pth, model.safetensors, params.json, config.json, tokenizer.model")
# What a to-hf-llama export writes (convert/hf_llama.write_hf_llama and the tokenizer copy).
HF_LLAMA_ENTRIES = output_guard.KnownEntries(
    re.compile(r"model\.safetensors|" + re.escape(HF_CONFIG_JSON) + "|" + re.escape(tokenizer_copy.TOKENIZER_FILE)),
    "a to-hf-llama export", "model.safetensors, config.json, tokenizer.model")
# max_position_embeddings of the exported config.json when the checkpoint records no training seq_len.
DEFAULT_MAX_POSITIONS = 4096
OVERWRITE_HELP = ("replace an earlier output in --out (atomically): allowed only when every entry in it is one this "
                  "command writes; anything else is named and nothing is deleted")


def build_parser() -> Parser:
  parser = Parser(prog=prog_name("megalodon-convert", "megalodon_jax.convert"),
                           description="Convert Megalodon checkpoints between JAX (Orbax) and PyTorch.")
  sub = parser.add_subparsers(dest="command", required=True)
  to = sub.add_parser("to-pytorch", help="Orbax checkpoint -> official consolidated.pth / megalodon-hf / safetensors",
                      description="Export a train.py or from-pytorch checkpoint to PyTorch files (runs on CPU).")
  to.add_argument("--checkpoint", required=True,
                  help="train.py workdir, its checkpoints/ folder, a step folder, or a from-pytorch output folder")
  to.add_argument("--out", required=True,
                  help="output folder: new, empty, or an earlier to-pytorch export with --overwrite; never inside, "
                       "containing or equal to the run directory of --checkpoint")
  to.add_argument("--format", choices=("official", "hf", "safetensors"), default="official",
                  help="official: consolidated.pth + params.json; hf: megalodon-hf model.safetensors + config.json; "
                       "safetensors: model.safetensors with official keys + params.json")
  to.add_argument("--dtype", choices=EXPORT_DTYPES, default="float32",
                  help="dtype of the floating tensors (int64 buffers and rope.freqs are kept)")
  to.add_argument("--model_parallel", type=int, default=1, metavar="N",
                  help="official format only: write N tensor-parallel shards consolidated.{rank:02d}.pth")
  to.add_argument("--step", type=int, default=None, help="step to export (default: the latest finished one)")
  to.add_argument("--overwrite", action="store_true",
                  help=OVERWRITE_HELP + " (any to-pytorch format may replace any other: consolidated*.pth, "
                       "model.safetensors, params.json, config.json, tokenizer.model)")
  frm = sub.add_parser("from-pytorch", help="official/megalodon-hf PyTorch weights -> params-only Orbax checkpoint",
                       description="Import PyTorch weights as a params-only Orbax checkpoint that train.py's "
                                   "--config.init_from and the inference tools load.")
  frm.add_argument("--torch", required=True,
                   help="consolidated.pth, a folder of consolidated.NN.pth shards, a folder holding consolidated.pth "
                        "or model.safetensors, or a .safetensors file")
  frm.add_argument("--config", default=None,
                   help="params.json (official ModelConf fields) or megalodon-hf config.json; default: beside --torch")
  frm.add_argument("--out", required=True,
                   help="output folder: new, empty, or an earlier from-pytorch output with --overwrite; never "
                        "inside, containing or equal to --torch or --config")
  frm.add_argument("--overwrite", action="store_true",
                   help=OVERWRITE_HELP + " (the entries of a params-only Orbax checkpoint and its "
                        "megalodon_config.json, tokenizer.model)")
  llama = sub.add_parser("to-hf-llama", help="Llama-family Orbax checkpoint -> Hugging Face LlamaForCausalLM folder",
                         description="Export a checkpoint of the Llama baseline family as model.safetensors + "
                                     "config.json that transformers' LlamaForCausalLM.from_pretrained loads (runs on "
                                     "CPU).")
  llama.add_argument("--checkpoint", required=True,
                     help="train.py workdir, its checkpoints/ folder, a step folder, or a params-only folder")
  llama.add_argument("--out", required=True,
                     help="output folder: new, empty, or an earlier to-hf-llama export with --overwrite; never "
                          "inside, containing or equal to the run directory of --checkpoint")
  llama.add_argument("--dtype", choices=EXPORT_DTYPES, default="float32", help="dtype of the stored weights")
  llama.add_argument("--max_position_embeddings", type=int, default=None, metavar="N",
                     help="config.json's max_position_embeddings (default: the run's seq_len, else "
                          f"{DEFAULT_MAX_POSITIONS}); RoPE itself has no limit")
  llama.add_argument("--step", type=int, default=None, help="step to export (default: the latest finished one)")
  llama.add_argument("--overwrite", action="store_true",
                     help=OVERWRITE_HELP + " (model.safetensors, config.json, tokenizer.model)")
  return parser


def _check_out(args: argparse.Namespace, sources: list[tuple[str, str]]) -> None:
  """--out is separate from what the subcommand reads (`sources`: (what, path) pairs) and new, empty, or an earlier
  output of this subcommand (`output_guard.check_separate`, `output_guard.check_output_folder`)."""
  output_guard.check_separate(args.out, "--out", sources, ConvertError)
  known = {"to-pytorch": EXPORT_ENTRIES, "to-hf-llama": HF_LLAMA_ENTRIES}.get(
      args.command, output_guard.PARAMS_CHECKPOINT_ENTRIES)
  output_guard.check_output_folder(args.out, "--out", known, ConvertError, overwrite=args.overwrite)


def _start_jax(args: argparse.Namespace):
  """jax, once every cheap check has passed: on the CPU when the console script asked for it (`run`), libtpu quiet
  on a machine without a TPU (platforms.py). Returns the CPU device the arrays go to."""
  import jax  # pylint: disable=import-outside-toplevel
  if args.cpu_by_default and "JAX_PLATFORMS" not in os.environ:
    jax.config.update("jax_platforms", "cpu")  # jax is imported, but its backends start on first use
  platforms.skip_absent_tpu()
  return jax.devices("cpu")[0]


def _run_source(args: argparse.Namespace) -> tuple[str, str]:
  """(what, path) that --out must stay clear of: the whole run directory of a --checkpoint folder."""
  if paths.as_path(args.checkpoint).is_dir():  # the whole run is at stake, not just the step read
    return (f"the run directory of --checkpoint {args.checkpoint}",
            output_guard.checkpoint_areas(args.checkpoint).root)
  return ("--checkpoint", args.checkpoint)  # not a checkpoint: refused by locate_checkpoint


def _check_family(info, wanted: str, command: str, other: str) -> None:
  if info.family != wanted:
    raise ConvertError(f"--checkpoint {info.params_path} holds a model of the {info.family!r} family; {command} "
                       f"exports the {wanted!r} family (use {other})")


def to_hf_llama(args: argparse.Namespace) -> None:
  if args.max_position_embeddings is not None and args.max_position_embeddings < 1:
    raise ConvertError(f"--max_position_embeddings must be >= 1, got {args.max_position_embeddings}")
  _check_out(args, [_run_source(args)])  # before the (slow) restore
  info = locate_checkpoint(args.checkpoint, args.step)
  _check_family(info, "llama", "to-hf-llama", "to-pytorch")
  max_positions = args.max_position_embeddings or (info.train_config or {}).get("seq_len") or DEFAULT_MAX_POSITIONS
  cpu = _start_jax(args)
  # pylint: disable=import-outside-toplevel  (jax, flax, orbax: after the checks above)
  from megalodon_jax.checkpoints import model_io
  from megalodon_jax.convert import hf_llama
  model, config, step = model_io.load_checkpoint(args.checkpoint, step=args.step, device=cpu)
  tensors = hf_llama.to_hf_state_dict(model, config)
  with model_io.atomic_output(args.out, overwrite=args.overwrite, known=HF_LLAMA_ENTRIES) as tmp:
    files = hf_llama.write_hf_llama(tmp, tensors, config, dtype=args.dtype,
                                    max_position_embeddings=int(max_positions))
    if info.tokenizer_model is not None:  # the SentencePiece model the run trained with, beside the config
      files = [*files, os.path.basename(tokenizer_copy.write_copy(tmp, info.tokenizer_model))]
  print(f"wrote {paths.abspath(args.out)}: {', '.join(files)} (LlamaForCausalLM, {args.dtype}, step {step}, "
        f"{config.num_params():,} parameters)")


def to_pytorch(args: argparse.Namespace) -> None:
  if args.model_parallel < 1:
    raise ConvertError(f"--model_parallel must be >= 1, got {args.model_parallel}")
  if args.model_parallel > 1 and args.format != "official":
    raise ConvertError(f"--model_parallel applies to --format official only (got --format {args.format})")
  _check_out(args, [_run_source(args)])  # before the (slow) restore
  info = locate_checkpoint(args.checkpoint, args.step)
  _check_family(info, "megalodon", "to-pytorch", "to-hf-llama")
  tokenizer_model = info.tokenizer_model
  cpu = _start_jax(args)
  # pylint: disable=import-outside-toplevel  (jax, flax, orbax: after the checks above)
  from megalodon_jax.checkpoints import model_io
  from megalodon_jax.convert import hf, torch_files
  from megalodon_jax.convert.official import to_official_state_dict
  model, config, step = model_io.load_checkpoint(args.checkpoint, step=args.step, device=cpu)
  tensors = to_official_state_dict(model)
  if args.format == "hf":
    problems = hf.hf_export_problems(tensors, config)
    if problems:
      raise StateDictError("cannot export to the megalodon-hf layout: " + "; ".join(problems) +
                           ". Use --format official or safetensors")
    print(hf.TIMESTEP_NORM_WARNING, file=sys.stderr)
  tensors = torch_files.cast(tensors, args.dtype)
  with model_io.atomic_output(args.out, overwrite=args.overwrite, known=EXPORT_ENTRIES) as tmp:
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
  sources = [("--torch", args.torch)] + ([("--config", args.config)] if args.config else [])
  _check_out(args, sources)  # before reading the tensors
  if not paths.is_remote(args.torch) and not (args.config and paths.is_remote(args.config)):
    torch_path = os.path.abspath(os.path.expanduser(args.torch))
    if not os.path.exists(torch_path):  # torch_files.read_official's first check, made before importing it
      raise ConvertError(f"{torch_path} does not exist")
  cpu = _start_jax(args)
  # pylint: disable=import-outside-toplevel  (jax, flax, orbax, torch: after the checks above)
  import jax

  from megalodon_jax.checkpoints import model_io
  from megalodon_jax.convert import torch_files
  from megalodon_jax.convert.official import from_official_state_dict
  tensors, config = torch_files.read_official(args.torch, args.config)
  with jax.default_device(cpu):
    model = from_official_state_dict(tensors, config)
  source = paths.abspath(args.torch)
  torch_dir = source if paths.as_path(source).is_dir() else os.path.dirname(source)
  model_io.save_params_checkpoint(args.out, model, source=source, overwrite=args.overwrite,
                                  tokenizer_model=tokenizer_copy.read_copy(torch_dir))
  print(f"wrote {paths.abspath(args.out)}: params-only Orbax checkpoint + {layout.CONFIG_FILE} "
        f"({config.num_params():,} parameters); train with --config.init_from={paths.abspath(args.out)}")


def main(argv: Optional[Sequence[str]] = None, *, cpu_by_default: bool = False) -> int:
  """Runs the command line; returns the exit status (0 ok, 2 bad input or arguments). `cpu_by_default`: run jax on
  the CPU unless JAX_PLATFORMS chose a platform."""
  args = build_parser().parse_args(argv)
  args.cpu_by_default = cpu_by_default

  def body() -> int:
    {"to-pytorch": to_pytorch, "to-hf-llama": to_hf_llama, "from-pytorch": from_pytorch}[args.command](args)
    return 0

  # one_line=False: a state-dict mismatch lists one offending key per line
  return exit_on_error(body, also=(OSError,), one_line=False)


def run() -> int:
  """The `megalodon-convert` console script and `python -m megalodon_jax.convert`: `main` on the CPU unless
  JAX_PLATFORMS chose a platform."""
  return main(cpu_by_default=True)
