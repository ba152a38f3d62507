"""`megalodon-generate` (or `python -m megalodon_jax.generate`): sample continuations of prompts from a checkpoint,
streamed to stdout (statistics and notes go to stderr). Flags also accept kebab case (`--max-new-tokens`).

  python -m megalodon_jax.generate --checkpoint runs/tiny --prompt "def main(" --max_new_tokens 200
  python -m megalodon_jax.generate --checkpoint runs/tiny --prompt_lines prompts.txt --temperature 0.8 --top_p 0.9
  python -m megalodon_jax.generate --checkpoint consolidated.pth --tokenizer sentencepiece \\
      --tokenizer_path tokenizer.model --prompt_file book.txt --top_k 50

One prompt: its continuation is printed as it is produced (after every decode block). Several prompts: they run
as one batch and each completion is printed, under a `=== completion i ===` header, as soon as it ends.
`--output_jsonl` also writes {"index", "prompt", "completion", "tokens", "finish_reason"} per prompt (a new file, or
one outside the checkpoint's directory: it never replaces what is read). Prompts are UTF-8 text: a --prompt with
bytes that are not (a shell's $'\\xff') or a prompt file that is not UTF-8 is refused, naming the byte offset. Bad
input ends with one `error: ...` line on stderr and exit status 2 (prompts, the output path, the sampling and
decoding flags and the checkpoint are checked before jax starts and the model loads; --prefill_piece of a PyTorch
checkpoint, whose chunk size comes with its tensors, once it has loaded).
"""

from __future__ import annotations

import json
import sys
import time
from typing import Optional, Sequence

# Light imports only: the sampler, the generator and the model import jax, which `run` reaches after the checks.
from megalodon_jax import paths
from megalodon_jax.checkpoints import output_guard
from megalodon_jax.cli import common
from megalodon_jax.cli.args import Parser, prog_name
from megalodon_jax.errors import InferenceError, exit_on_error
from megalodon_jax.inference import options
from megalodon_jax.inference.detokenize import TextStream


def build_parser() -> Parser:
  p = Parser(prog=prog_name("megalodon-generate", "megalodon_jax.generate"),
                        description="Generate text from a Megalodon checkpoint with the constant-memory cache.")
  common.add_checkpoint_flags(p)
  g = p.add_argument_group("prompts (at least one; all given are run as one batch)")
  g.add_argument("--prompt", action="append", default=[], help="a prompt text (repeatable)")
  g.add_argument("--prompt_file", action="append", default=[], help="a file whose whole text is one prompt")
  g.add_argument("--prompt_lines", default=None, help="a file with one prompt per non-empty line")
  g.add_argument("--prompt_ids", action="append", default=[], help="a prompt as comma-separated token ids")
  s = p.add_argument_group("sampling")
  s.add_argument("--max_new_tokens", type=int, default=256, help="tokens to generate per prompt at most")
  s.add_argument("--temperature", type=float, default=1.0, help="0 = greedy")
  s.add_argument("--top_k", type=int, default=0, help="keep the k most likely tokens (0 = all)")
  s.add_argument("--top_p", type=float, default=1.0, help="nucleus: keep tokens up to this mass (1 = all)")
  s.add_argument("--seed", type=int, default=0, help="PRNG seed")
  s.add_argument("--stop_ids", default="", help="comma-separated ids that end a completion (not printed)")
  s.add_argument("--no_eos_stop", action="store_true", help="do not stop at the tokenizer's EOS")
  r = p.add_argument_group("execution and output")
  r.add_argument("--block_size", type=int, default=options.DEFAULT_BLOCK_SIZE, help="decode steps per jitted call")
  r.add_argument("--prefill_piece", type=int, default=None, help="largest prefill call in tokens (chunk multiple)")
  r.add_argument("--echo", action="store_true", help="print each prompt before its completion")
  r.add_argument("--output_jsonl", default=None, help="also write the completions here as JSON lines")
  return p


def _utf8_error(flag: str, what: str, offset: int, byte: int) -> InferenceError:
  return InferenceError(f"{flag} {what}: byte {offset} (0x{byte:02x}) is not valid UTF-8; prompts are UTF-8 text "
                        f"(pass token ids with --prompt_ids instead)")


def _check_argv_text(text: str, flag: str, index: int) -> str:
  """`text` from the command line, checked to be UTF-8: Python decodes argv bytes that are not with surrogate
  escapes (U+DC80..U+DCFF), which no tokenizer can encode."""
  try:
    text.encode("utf-8")
  except UnicodeEncodeError as e:
    offset = len(text[:e.start].encode("utf-8", errors="surrogateescape"))  # in the bytes the shell passed
    raise _utf8_error(flag, f"#{index + 1}", offset, ord(text[e.start]) & 0xFF) from None
  return text


def _read(path: str, flag: str) -> str:
  try:
    data = paths.as_path(path).read_bytes()
  except OSError as e:
    raise InferenceError(f"{flag} {path}: cannot read the prompt file ({type(e).__name__}: {e})") from None
  try:
    return data.decode("utf-8")
  except UnicodeDecodeError as e:
    raise _utf8_error(flag, path, e.start, data[e.start]) from None


def _collect_prompts(args) -> list:
  """Prompt texts (str) and id lists, in flag order; checked before the (slow) model load."""
  prompts: list = [_check_argv_text(text, "--prompt", i) for i, text in enumerate(args.prompt)]
  prompts += [_read(path, "--prompt_file") for path in args.prompt_file]
  if args.prompt_lines is not None:
    lines = [line for line in _read(args.prompt_lines, "--prompt_lines").splitlines() if line.strip()]
    if not lines:
      raise InferenceError(f"--prompt_lines {args.prompt_lines}: the file holds no non-empty line")
    prompts += lines
  prompts += [common.parse_ints(text, "--prompt_ids", "integer token ids") for text in args.prompt_ids]
  if not prompts:
    raise InferenceError("no prompt given: use --prompt, --prompt_file, --prompt_lines or --prompt_ids")
  for i, pr in enumerate(prompts):
    if len(pr) == 0:
      raise InferenceError(f"prompt {i} is empty: generation needs at least one prompt token")
  return prompts


def run(args) -> int:
  prompts = _collect_prompts(args)
  inputs = [("read by --prompt_file", f) for f in args.prompt_file]
  inputs += [("read by --prompt_lines", args.prompt_lines)] if args.prompt_lines else []
  output_guard.check_output_file(args.output_jsonl, "--output_jsonl", args.checkpoint, InferenceError, inputs)
  if args.max_new_tokens < 1:
    raise InferenceError(f"--max_new_tokens must be >= 1, got {args.max_new_tokens}")
  try:
    options.check_sampling(args.temperature, args.top_k, args.top_p)
  except ValueError as e:
    raise InferenceError(f"--{e}") from None
  stop_ids = common.parse_ints(args.stop_ids, "--stop_ids", "integer token ids")
  checked = common.check_checkpoint(args)
  # An Orbax checkpoint's recorded config gives the chunk size now; a PyTorch one's is read with the weights.
  chunk_size = checked.info.config.chunk_size if checked.info is not None else None
  options.check_decode_sizes(args.prefill_piece, args.block_size, chunk_size)
  # pylint: disable=import-outside-toplevel  (they import jax: after every check above)
  from megalodon_jax.inference.generation import Generator
  from megalodon_jax.inference.sampling import Sampler
  sampler = Sampler(args.temperature, args.top_k, args.top_p)
  loaded = common.load(checked)
  tok = loaded.tokenizer
  ids = [tok.encode(p).tolist() if isinstance(p, str) else p for p in prompts]
  vocab = loaded.config.vocab_size
  for i, row in enumerate(ids):
    if not row:
      raise InferenceError(f"prompt {i} encodes to no tokens")
    bad = [(j, t) for j, t in enumerate(row) if not 0 <= t < vocab]
    if bad:  # checked here, before anything is printed or compiled
      raise InferenceError(f"prompt {i}: token id {bad[0][1]} at index {bad[0][0]} is outside the vocabulary "
                           f"[0, {vocab})")
  if tok.eos_id is not None and not args.no_eos_stop:
    stop_ids.append(tok.eos_id)
  gen = Generator(loaded.model, prefill_piece=args.prefill_piece, block_size=args.block_size)
  streams = [TextStream(tok) for _ in ids]
  texts = ["" for _ in ids]
  counts = [0] * len(ids)
  single = len(ids) == 1
  out = sys.stdout
  if single and args.echo:
    out.write(tok.decode(ids[0]))
    out.flush()
  start, printed = time.perf_counter(), [False] * len(ids)
  reasons = ["length"] * len(ids)
  for update in gen.stream(ids, max_new_tokens=args.max_new_tokens, sampler=sampler, stop_ids=stop_ids,
                           seed=args.seed):
    for i, new in enumerate(update.new_tokens):
      counts[i] += len(new)
      piece = streams[i].push(new)
      if update.finished[i] and not printed[i]:
        piece += streams[i].flush()
        reasons[i] = update.finish_reasons[i]
      texts[i] += piece
      if single:
        out.write(piece)
      elif update.finished[i] and not printed[i]:
        head = f"=== completion {i} ({reasons[i]}) ===\n"
        out.write(head + (tok.decode(ids[i]) if args.echo else "") + texts[i] + "\n")
      printed[i] = printed[i] or update.finished[i]
    out.flush()
  if single:
    out.write("\n")
  seconds, total = time.perf_counter() - start, sum(counts)
  print(f"[{total} tokens in {seconds:.2f} s, {total / max(seconds, 1e-9):.1f} tokens/s including compilation]",
        file=sys.stderr)
  if args.output_jsonl:
    lines = [json.dumps({"index": i, "prompt": prompt if isinstance(prompt, str) else tok.decode(prompt),
                         "completion": text, "tokens": counts[i], "finish_reason": reasons[i]}, ensure_ascii=False)
             for i, (prompt, text) in enumerate(zip(prompts, texts))]
    paths.as_path(args.output_jsonl).write_text("".join(line + "\n" for line in lines), encoding="utf-8")
  return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
  """Runs the command line; returns the exit status (0 ok, 2 bad input)."""
  args = build_parser().parse_args(argv)
  return exit_on_error(lambda: run(args), also=(OSError,))  # an unreadable file is bad input too
