"""Shared pieces of the inference command lines: checkpoint flags, comma-separated integer flags and model loading
(the argument parser itself is `cli/args.py`'s `Parser`).

Nothing here imports jax until `load`: a command checks its flags, files and checkpoint path first
(`check_checkpoint`), so bad input is reported before jax starts (well under a second).
"""

from __future__ import annotations

import argparse
import sys

from megalodon_jax import platforms
from megalodon_jax.config import MATMUL_PRECISIONS
from megalodon_jax.errors import InferenceError
from megalodon_jax.inference import loading


def add_checkpoint_flags(parser: argparse.ArgumentParser) -> None:
  g = parser.add_argument_group("checkpoint")
  g.add_argument("--checkpoint", required=True,
                 help="train.py workdir, its checkpoints/ folder, a step folder, a from-pytorch folder, or an official "
                      "PyTorch consolidated.pth / .safetensors (or a folder holding one)")
  g.add_argument("--step", type=int, default=None, help="step of a train.py workdir (default: the latest)")
  g.add_argument("--config", default=None, help="PyTorch checkpoints: params.json / config.json (default: beside it)")
  g.add_argument("--tokenizer", choices=("bytes", "sentencepiece"), default=None,
                 help="overrides the tokenizer recorded in a train.py checkpoint (needed for other checkpoints unless "
                      "the vocabulary has 256 tokens)")
  g.add_argument("--tokenizer_path", default=None, help="the SentencePiece .model file")
  g.add_argument("--dtype", choices=("float32", "bfloat16"), default=None,
                 help="activation dtype (default: the checkpoint's); CEMA, norms and logits stay float32")
  g.add_argument("--cema_impl", default=None, help="CEMA implementation override (default: the checkpoint's, auto)")
  g.add_argument("--matmul_precision", choices=MATMUL_PRECISIONS, default=None,
                 help="precision of the model's matmuls (default: the checkpoint's); float32 on TPU needs highest for "
                      "full float32 products")


def parse_ints(text: str, flag: str, what: str) -> list[int]:
  """The integers of a comma-separated flag value (spaces and empty items ignored); InferenceError naming `flag` and
  `what` was expected otherwise."""
  try:
    return [int(t) for t in text.replace(" ", "").split(",") if t]
  except ValueError:
    raise InferenceError(f"{flag} {text!r}: expected comma-separated {what}") from None


def check_checkpoint(args: argparse.Namespace) -> loading.Checked:
  """The checkpoint flags checked without jax (`loading.check_checkpoint`): path, --step, --config and, for an
  Orbax checkpoint, the tokenizer."""
  execution = {k: getattr(args, k) for k in ("dtype", "cema_impl", "matmul_precision") if getattr(args, k) is not None}
  return loading.check_checkpoint(args.checkpoint, step=args.step, config_path=args.config, tokenizer=args.tokenizer,
                                  tokenizer_path=args.tokenizer_path, **execution)


def load(checked: loading.Checked) -> loading.Loaded:
  """The model of a checked checkpoint; its notes go to stderr. libtpu is kept quiet on machines without a TPU
  (platforms.py): this is where jax's backends start."""
  platforms.skip_absent_tpu()
  loaded = loading.load_checked(checked)
  for note in loaded.notes:
    print(f"note: {note}", file=sys.stderr)
  return loaded
