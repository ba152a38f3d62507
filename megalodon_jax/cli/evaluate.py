"""`megalodon-evaluate` (or `python -m megalodon_jax.evaluate`): long-context perplexity of a checkpoint on text
files or a data split. Flags also accept kebab case (`--context-lengths`).

  python -m megalodon_jax.evaluate --checkpoint runs/tiny --split validation --context_lengths 64,256,1024 \\
      --output report.json --plot loss.png
  python -m megalodon_jax.evaluate --checkpoint runs/enwik8 --text_files 'books/*.txt' --max_document_tokens 2000000
  python -m megalodon_jax.evaluate --checkpoint consolidated.pth --tokenizer sentencepiece \\
      --tokenizer_path tokenizer.model --split validation --data dataset=tfds --data name=pg19 --window

Every document streams through the model in segments with the constant-size cache, so its length is limited
only by host memory for its token ids. The JSON report (to --output, else stdout) holds the loss, perplexity and,
for byte tokenizers, bits per byte over all scored tokens; the same by position bucket; and for each maximum
context length (see `inference/long_context.py` for the definitions). A summary goes to stderr. Bad input ends
with one `error: ...` line on stderr and exit status 2; the flags, the documents' paths (--split is opened, its
data set prepared if need be), the outputs and the checkpoint are checked before jax is imported. `--output` and
`--plot` never replace what is read: a folder, an input document, anything inside the checkpoint, or an existing
file of its run directory is refused before the model loads (a new file such as runs/tiny/eval.json is fine).
"""

from __future__ import annotations

import json
import math
import sys
from typing import Optional, Sequence

# Light imports only: the evaluator and the model import jax, which `run` reaches after the checks.
from megalodon_jax import paths as paths_lib
from megalodon_jax.checkpoints import output_guard
from megalodon_jax.cli import common
from megalodon_jax.cli.args import Parser, prog_name
from megalodon_jax.data import sources
from megalodon_jax.data.tokenizers import ByteTokenizer
from megalodon_jax.errors import InferenceError, exit_on_error
from megalodon_jax.inference import eval_documents, options

CONTEXT_DEFINITION = ("context_length L: the scored tokens of each document are cut into consecutive blocks of L and "
                      "the model restarts from an empty cache at every block (at most L tokens of context, L/2 on "
                      "average); null = full context (the whole document so far)")


def build_parser() -> Parser:
  p = Parser(prog=prog_name("megalodon-evaluate", "megalodon_jax.evaluate"),
                        description="Long-context evaluation (loss, perplexity, bits per byte) of a Megalodon "
                                    "checkpoint, streaming each document through the constant-memory cache.")
  common.add_checkpoint_flags(p)
  d = p.add_argument_group("documents (one of --text_files / --split)")
  src = d.add_mutually_exclusive_group(required=True)
  src.add_argument("--text_files", help="files, folders or globs, comma separated; one document per file")
  src.add_argument("--split", help="a split of the checkpoint's training data config (e.g. validation)")
  d.add_argument("--data", action="append", default=[], metavar="KEY=VALUE",
                 help="override a data setting for --split (repeatable), e.g. --data dataset=enwik8 "
                      "--data manual_dir=~/data")
  d.add_argument("--max_documents", type=int, default=None, help="evaluate at most this many documents")
  d.add_argument("--max_document_tokens", type=int, default=None, help="keep the first N tokens of each document")
  d.add_argument("--no_eos", action="store_true", help="do not prepend the tokenizer's EOS to documents")
  e = p.add_argument_group("evaluation")
  e.add_argument("--context_lengths", default="", help="maximum context lengths, comma separated, e.g. 4096,16384")
  e.add_argument("--segment_len", type=int, default=None, help="tokens per model call (default: sized to ~1 GiB)")
  e.add_argument("--rows_budget", type=int, default=None,
                 help="tokens of short rows (documents / blocks) evaluated side by side (default: segment_len)")
  e.add_argument("--window", action="store_true",
                 help="the official evaluation's TimestepNorm window (docs/streaming.md#evaluation): statistics "
                 "over the last chunks only")
  e.add_argument("--window_truncate_chunks", type=int, default=8, help="window: TRUNCATE_CHUNKS (official 8)")
  e.add_argument("--window_step_chunks", type=int, default=2, help="window: chunks per step (official 2)")
  o = p.add_argument_group("output")
  o.add_argument("--output", default=None, help="JSON report path (default: stdout)")
  o.add_argument("--plot", default=None, help="write a PNG of loss vs position and vs context length")
  return p


def _check_outputs(args, text_files: Optional[list[str]]) -> None:
  """--output and --plot are new files or files of ours: never a folder, an input document, the other output,
  something inside the checkpoint, or an existing file of its run directory (checkpoints/output_guard.py)."""
  inputs = [("read by --text_files", f) for f in text_files or ()]
  output_guard.check_output_file(args.output, "--output", args.checkpoint, InferenceError, inputs)
  if args.output is not None:
    inputs.append(("written as --output", args.output))
  output_guard.check_output_file(args.plot, "--plot", args.checkpoint, InferenceError, inputs)


def _check_split(args, checked) -> None:
  """--data and --split (given), checked before the weights load: the split is opened once here (which needs the
  dataset prepared, as reading it would anyway). The documents are read as bytes whatever the tokenizer, so the byte
  tokenizer stands in for a PyTorch checkpoint's, which is known only once the checkpoint loads."""
  cfg = eval_documents.data_config(checked.data_config, args.data, checked.tokenizer or ByteTokenizer())
  sources.prepare(cfg)
  sources.open_split(cfg, args.split, "--split")


def run(args) -> int:
  # Everything cheap is checked before the model loads.
  lengths = common.parse_ints(args.context_lengths, "--context_lengths", "integers")
  if any(v < 1 for v in lengths):
    raise InferenceError(f"--context_lengths {args.context_lengths!r}: lengths must be >= 1")
  for flag in ("max_documents", "max_document_tokens", "segment_len", "rows_budget"):
    value = getattr(args, flag)
    if value is not None and value < (2 if flag == "max_document_tokens" else 1):
      raise InferenceError(f"--{flag}={value} is too small")
  paths = eval_documents.text_file_paths(args.text_files) if args.text_files is not None else None
  _check_outputs(args, paths)
  if args.window and args.segment_len is not None:
    raise InferenceError("--segment_len does not apply with --window (its step is --window_step_chunks chunks)")
  window = options.NormWindow(args.window_truncate_chunks, args.window_step_chunks) if args.window else None
  checked = common.check_checkpoint(args)
  if args.split is not None:
    _check_split(args, checked)
  # pylint: disable=import-outside-toplevel  (they import jax: after every check above)
  from megalodon_jax.inference import long_context
  from megalodon_jax.inference.evaluation import Evaluator

  loaded = common.load(checked)
  tok = loaded.tokenizer
  if paths is not None:
    docs = eval_documents.text_file_documents(paths[:args.max_documents], tok)
    source = {"text_files": len(paths[:args.max_documents])}
  else:
    cfg = eval_documents.data_config(loaded.data_config, args.data, tok)
    docs = eval_documents.split_documents(cfg, args.split, tok, args.max_documents)
    source = {"split": args.split, "dataset": getattr(cfg, "dataset", "stdlib")}
  evaluator = Evaluator(loaded.model, segment_len=args.segment_len, window=window)
  eos = None if args.no_eos else tok.eos_id
  results = long_context.evaluate_documents(evaluator, docs, context_lengths=lengths, eos_id=eos,
                                            max_document_tokens=args.max_document_tokens,
                                            rows_budget=args.rows_budget)
  c = loaded.config
  settings = {
      "checkpoint": loaded.source, "checkpoint_kind": loaded.kind, "step": loaded.step, "tokenizer": repr(tok),
      "model": {"num_layers": c.num_layers, "model_dim": c.model_dim, "chunk_size": c.chunk_size,
                "vocab_size": c.vocab_size, "dtype": c.dtype, "num_params": c.num_params()},
      "source": source, "eos_prepended": eos is not None, "max_document_tokens": args.max_document_tokens,
      "segment_len": evaluator.segment_len,
      "window": {"enabled": window is not None, **({} if window is None else {
          "truncate_chunks": window.truncate_chunks, "step_chunks": window.step_chunks,
          "window_tokens": window.window_chunks * c.chunk_size})},
      "context_length_definition": CONTEXT_DEFINITION,
  }
  rep = long_context.report(results, byte_level=isinstance(tok, ByteTokenizer), settings=settings)
  text = json.dumps(rep, indent=2, allow_nan=True)
  if args.output:
    paths_lib.as_path(args.output).write_text(text + "\n", encoding="utf-8")
  else:
    print(text)
  if args.plot:
    with paths_lib.local_target(args.plot) as local:  # matplotlib writes local files
      long_context.plot(rep, local)
  key = "bpb" if "bpb" in rep else "ppl"
  parts = [f"{'full' if r['context_length'] is None else r['context_length']}: {r[key]:.4f}"
           for r in rep["by_context_length"]]
  print(f"{rep['documents']} documents, {rep['tokens']} tokens, loss {rep['loss']:.4f}, {key} {rep[key]:.4f} "
        f"({rep['tokens_per_second']:.0f} tokens/s); {key} by context length: {', '.join(parts)}; window "
        f"{'on' if window else 'off'}", file=sys.stderr)
  if not math.isfinite(rep["loss"]):
    print("warning: the loss is not finite", file=sys.stderr)
  return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
  """Runs the command line; returns the exit status (0 ok, 2 bad input)."""
  args = build_parser().parse_args(argv)
  return exit_on_error(lambda: run(args), also=(OSError,))  # an unreadable file is bad input too
