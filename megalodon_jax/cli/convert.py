"""`megalodon-convert` (or `python -m megalodon_jax.convert`): JAX checkpoints ⇄ PyTorch files.

  to-pytorch --checkpoint CKPT --out DIR [--format official|hf|safetensors] [--dtype float32|bfloat16]
             [--model_parallel N] [--max_shard_size SIZE] [--step S] [--overwrite] [--push_to_hub REPO_ID [--private]]
  from-pytorch --torch PATH|REPO_ID [--revision R] [--config params.json] --out DIR [--overwrite]
  to-hf-llama --checkpoint CKPT --out DIR [--dtype float32|bfloat16] [--max_position_embeddings N] [--step S]
              [--max_shard_size SIZE] [--overwrite] [--push_to_hub REPO_ID [--private]]

to-pytorch exports the Megalodon family; to-hf-llama exports a checkpoint of the Llama baseline family
(`--config.model.family=llama`) as a Hugging Face `transformers` LlamaForCausalLM folder (model.safetensors +
config.json, convert/hf_llama.py) that `LlamaForCausalLM.from_pretrained(DIR)` loads.

The Hugging Face formats (--format hf and safetensors, to-hf-llama) write model.safetensors, or above
--max_shard_size (default 5GB, huggingface_hub's meaning) model-0000K-of-0000N.safetensors shards with
model.safetensors.index.json (convert/safetensors_shards.py). --format hf and to-hf-llama also write a model card,
README.md (convert/model_card.py: architecture, parameter count, training config, data, the run's final metrics);
every format does with --push_to_hub REPO_ID, which then uploads the finished folder to the Hub (convert/hub.py;
token from HF_TOKEN or `hf auth login`, checked first). from-pytorch reads sharded safetensors too, and --torch may
name a Hub model repo (owner/name, when no such local path exists), downloaded with huggingface_hub.

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
  model.safetensors or its shards and index, params.json, config.json, tokenizer.model, README.md: so re-exporting
  in another format works), for to-hf-llama the safetensors files, config.json, tokenizer.model and README.md, for
  from-pytorch the entries of a params-only Orbax checkpoint (`output_guard.PARAMS_CHECKPOINT_ENTRIES`). Any other
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
from megalodon_jax.convert import hub, model_card, safetensors_shards
from megalodon_jax.errors import ConvertError, StateDictError, exit_on_error

# What torch_files (which imports jax) calls DTYPES, PARAMS_JSON and HF_CONFIG_JSON; tests/test_fast_errors.py keeps
# them equal.
EXPORT_DTYPES = ("float32", "bfloat16")
PARAMS_JSON = "params.json"
HF_CONFIG_JSON = "config.json"

# Every file a to-pytorch export writes, whatever its format (torch_files.write_official / write_safetensors /
# write_hf, and the tokenizer copy): --overwrite replaces a folder holding these only.
EXPORT_ENTRIES = output_guard.KnownEntries(
    re.compile(r"consolidated(\.\d{2,})?\.pth|" + safetensors_shards.ENTRY_PATTERN + "|" + re.escape(PARAMS_JSON)
               + "|" + re.escape(HF_CONFIG_JSON) + "|" + re.escape(tokenizer_copy.TOKENIZER_FILE) + "|"
               + re.escape(model_card.CARD_FILE)),
    "a to-pytorch export",
    "consolidated.pth, consolidated.NN.pth, model.safetensors (or model-NNNNN-of-NNNNN.safetensors + "
    "model.safetensors.index.json), params.json, config.json, tokenizer.model, README.md")
# What a to-hf-llama export writes (convert/hf_llama.write_hf_llama, the tokenizer copy and the model card).
HF_LLAMA_ENTRIES = output_guard.KnownEntries(
    re.compile(safetensors_shards.ENTRY_PATTERN + "|" + re.escape(HF_CONFIG_JSON) + "|"
               + re.escape(tokenizer_copy.TOKENIZER_FILE) + "|" + re.escape(model_card.CARD_FILE)),
    "a to-hf-llama export", f"{safetensors_shards.ENTRY_TEXT}, config.json, tokenizer.model, README.md")
# max_position_embeddings of the exported config.json when the checkpoint records no training seq_len.
DEFAULT_MAX_POSITIONS = 4096
PUSH_HELP = ("after writing --out, upload it to this Hugging Face Hub model repo (created if missing) with "
             "huggingface_hub; needs a token (HF_TOKEN or `hf auth login`); writes the model card README.md whatever "
             "the format")
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
                       "model*.safetensors and its index, params.json, config.json, tokenizer.model, README.md)")
  _add_hub_flags(to, "--format hf and safetensors only: ")
  frm = sub.add_parser("from-pytorch", help="official/megalodon-hf PyTorch weights -> params-only Orbax checkpoint",
                       description="Import PyTorch weights as a params-only Orbax checkpoint that train.py's "
                                   "--config.init_from and the inference tools load.")
  frm.add_argument("--torch", required=True,
                   help="consolidated.pth, a folder of consolidated.NN.pth shards, a folder holding consolidated.pth, "
                        "model.safetensors or sharded safetensors (model.safetensors.index.json), a .safetensors "
                        "file; or a Hugging Face Hub model repo id owner/name (when no such local path exists), "
                        "downloaded with huggingface_hub")
  frm.add_argument("--revision", default=None,
                   help="with a Hub repo id: the branch, tag or commit to download (default: main)")
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
                     help=OVERWRITE_HELP + " (model*.safetensors and its index, config.json, tokenizer.model, "
                          "README.md)")
  _add_hub_flags(llama, "")
  return parser


def _add_hub_flags(sub: argparse.ArgumentParser, which: str) -> None:
  sub.add_argument("--max_shard_size", default=None, metavar="SIZE",
                   help=f"{which}write safetensors shards of at most SIZE (500MB, 5GB, or bytes; huggingface_hub's "
                        f"units) + model.safetensors.index.json when the weights are larger (default "
                        f"{safetensors_shards.DEFAULT_MAX_SHARD_SIZE})")
  sub.add_argument("--push_to_hub", default=None, metavar="REPO_ID", help=PUSH_HELP)
  sub.add_argument("--private", action="store_true", help="with --push_to_hub: create the repo private")


def _check_hub_flags(args: argparse.Namespace, sharded: bool) -> None:
  """--max_shard_size, --push_to_hub and --private, checked before anything is loaded: a size, a format that
  shards, a repo id, a token, a local --out. Sets args.max_shard_size (bytes or the default) and args.token."""
  if args.max_shard_size is not None and not sharded:
    raise ConvertError(f"--max_shard_size applies to the safetensors formats (--format hf or safetensors), not "
                       f"--format {args.format}")
  args.max_shard_size = safetensors_shards.parse_max_shard_size(
      args.max_shard_size or safetensors_shards.DEFAULT_MAX_SHARD_SIZE)
  if args.private and not args.push_to_hub:
    raise ConvertError("--private applies to --push_to_hub only")
  args.token = None
  if args.push_to_hub:
    if paths.is_remote(args.out):
      raise ConvertError(f"--push_to_hub uploads a local folder: --out {args.out} is remote; export to a local "
                         "folder to push it")
    args.token = hub.push_token(args.push_to_hub)


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


def _run_metrics(checkpoint: str) -> Optional[list[dict]]:
  """The records of metrics.jsonl of the training run `checkpoint` belongs to, or None when it is not in a run
  directory (or the run has no metrics.jsonl). An unreadable file is reported on stderr and left out of the card."""
  from megalodon_jax.training.metrics import METRICS_FILE, read_metrics  # pylint: disable=import-outside-toplevel
  root = output_guard.checkpoint_areas(checkpoint).root
  path = paths.join(root, METRICS_FILE)
  if layout.folder_kind(root) != "workdir" or not paths.as_path(path).is_file():
    return None
  try:
    return read_metrics(path)
  except (OSError, ValueError) as e:
    print(f"warning: {path} is unreadable ({e}); the model card lists no metrics", file=sys.stderr)
    return None


def _write_card(args: argparse.Namespace, folder: str, files: list[str], info, config, step, **card) -> list[str]:
  """Writes the model card into `folder` (the export being written); returns `files` with README.md."""
  where = args.push_to_hub or paths.abspath(args.out)
  name = model_card.write_card(folder, model_card.CardInfo(
      title=args.push_to_hub or os.path.basename(paths.abspath(args.out).rstrip("/")), family=info.family,
      architecture=config.official_kwargs(), num_params=config.num_params(), step=step, dtype=args.dtype,
      files=files, train_config=info.train_config, metrics=_run_metrics(args.checkpoint),
      load=card.pop("load").format(where=where), **card))
  return [*files, name]


def _push(args: argparse.Namespace) -> None:
  if args.push_to_hub:
    url = hub.push(paths.abspath(args.out), args.push_to_hub, token=args.token, private=args.private)
    print(f"pushed {paths.abspath(args.out)} to the Hub: {args.push_to_hub} ({url})")


_LOAD_LLAMA = ("```python\nimport transformers\n\nmodel = transformers.LlamaForCausalLM.from_pretrained(\"{where}\")\n"
               "```")
_LOAD_MEGALODON = {
    "hf": "megalodon-hf's `MegalodonForCausalLM.from_pretrained(\"{where}\")` reads this layout (its TimestepNorm "
          "differs from the official one; megalodon-jax's docs/export.md#megalodon-hf). Back to a megalodon-jax "
          "checkpoint:\n\n```bash\nmegalodon-convert from-pytorch --torch {where} --out imported/\n```",
    "official": "```bash\nmegalodon-convert from-pytorch --torch {where} --out imported/\n```\n\nor in PyTorch "
                "(no JAX): `megalodon_jax.pytorch.load(DIR)` of the downloaded folder.",
}


def to_hf_llama(args: argparse.Namespace) -> None:
  if args.max_position_embeddings is not None and args.max_position_embeddings < 1:
    raise ConvertError(f"--max_position_embeddings must be >= 1, got {args.max_position_embeddings}")
  _check_hub_flags(args, sharded=True)
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
                                    max_position_embeddings=int(max_positions), max_shard_size=args.max_shard_size)
    if info.tokenizer_model is not None:  # the SentencePiece model the run trained with, beside the config
      files = [*files, os.path.basename(tokenizer_copy.write_copy(tmp, info.tokenizer_model))]
    files = _write_card(args, tmp, files, info, config, step, layout="transformers LlamaForCausalLM",
                        load=_LOAD_LLAMA, tags=["llama", "megalodon-jax", "baseline"])
  print(f"wrote {paths.abspath(args.out)}: {', '.join(files)} (LlamaForCausalLM, {args.dtype}, step {step}, "
        f"{config.num_params():,} parameters)")
  _push(args)


def to_pytorch(args: argparse.Namespace) -> None:
  if args.model_parallel < 1:
    raise ConvertError(f"--model_parallel must be >= 1, got {args.model_parallel}")
  if args.model_parallel > 1 and args.format != "official":
    raise ConvertError(f"--model_parallel applies to --format official only (got --format {args.format})")
  _check_hub_flags(args, sharded=args.format != "official")
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
      files = torch_files.write_safetensors(tmp, tensors, config, args.max_shard_size)
    else:
      files = torch_files.write_hf(tmp, tensors, config, args.dtype, args.max_shard_size)
    if tokenizer_model is not None:  # the SentencePiece model the run trained with, beside the config
      files = [*files, os.path.basename(tokenizer_copy.write_copy(tmp, tokenizer_model))]
    if args.format == "hf" or args.push_to_hub:  # the Hub's layout: its card; the others get one to be pushed
      files = _write_card(
          args, tmp, files, info, config, step,
          layout="megalodon-hf (MegalodonForCausalLM)" if args.format == "hf" else f"official PyTorch ({args.format})",
          load=_LOAD_MEGALODON["hf" if args.format == "hf" else "official"],
          library_name="transformers" if args.format == "hf" else "pytorch",
          tags=["megalodon", "megalodon-jax"] + (["safetensors"] if args.format != "official" else []))
  print(f"wrote {paths.abspath(args.out)}: {', '.join(files)} ({args.format}, {args.dtype}, step {step}, "
        f"{config.num_params():,} parameters)")
  _push(args)


def from_pytorch(args: argparse.Namespace) -> None:
  repo_id = hub.torch_source(args.torch)  # a local path or gs:// URL (None), else a Hub repo id, else an error
  if args.revision is not None and repo_id is None:
    raise ConvertError(f"--revision applies to a Hub repo id; --torch {args.torch} is a path")
  sources = ([("--torch", args.torch)] if repo_id is None else []) + ([("--config", args.config)] if args.config
                                                                      else [])
  _check_out(args, sources)  # before reading the tensors
  if repo_id is not None:  # downloaded into huggingface_hub's cache, then read like a local folder
    args.torch = hub.download(repo_id, args.revision)
    print(f"downloaded {repo_id}{'@' + args.revision if args.revision else ''} from the Hub into {args.torch}")
  elif not paths.is_remote(args.torch) and not (args.config and paths.is_remote(args.config)):
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
  local = paths.abspath(args.torch)
  torch_dir = local if paths.as_path(local).is_dir() else os.path.dirname(local)
  source = local if repo_id is None else f"hf://{repo_id}" + (f"@{args.revision}" if args.revision else "")
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
