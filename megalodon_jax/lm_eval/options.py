"""The `megalodon` model's arguments (lm_eval's `--model_args key=value,...`), checked without jax.

`HarnessOptions.parse` turns the dict lm_eval hands a model (its `--model_args`, plus `batch_size`,
`max_batch_size` and `device` from its own flags) into checked settings; `check` also opens the checkpoint with
`loading.check_checkpoint` (no arrays, no jax), so `megalodon-lm-eval` reports a bad path or argument as one
`error:` line before any program loads.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Optional

from megalodon_jax.errors import InferenceError
from megalodon_jax.inference import loading
from megalodon_jax.inference.options import DEFAULT_BLOCK_SIZE, check_decode_sizes

MODEL_NAME = "megalodon"  # what `--model` names
DEFAULT_MAX_GEN_TOKS = 256
AUTO_GENERATION_ROWS = 16  # prompts per generation call with batch_size=auto
# Empty contexts (and rolling documents) start after this token when the tokenizer has no EOS: the byte tokenizer
# packs documents without a separator, so a newline is the closest thing to a document start it has seen.
BYTE_PREFIX_TOKEN = 10


@dataclasses.dataclass(frozen=True)
class HarnessOptions:
  """Settings of the `megalodon` lm_eval model.

  checkpoint: anything `megalodon-evaluate --checkpoint` takes (a train.py run directory, a step, a params-only
    or PyTorch checkpoint); `pretrained=` is an alias (lm_eval then names its output folder after it).
  step, config, tokenizer, tokenizer_path, dtype, cema_impl, matmul_precision: as the inference commands' flags of
    the same names.
  batch_size: rows per model call (an int), or None for "auto": scoring fills about `segment_len` tokens per call,
    generation runs AUTO_GENERATION_ROWS prompts; max_batch_size caps auto.
  segment_len: tokens per row per scoring call (Evaluator; default sized to about 1 GiB).
  max_gen_toks: generate_until's default token limit (a task's gen_kwargs `max_gen_toks` overrides it).
  prefix_token: the token an empty context (and every rolling document) starts from; None = the tokenizer's EOS,
    else BYTE_PREFIX_TOKEN.
  block_size, prefill_piece: the Generator's decode steps per call and largest prefill call.
  """
  checkpoint: str
  step: Optional[int] = None
  config: Optional[str] = None
  tokenizer: Optional[str] = None
  tokenizer_path: Optional[str] = None
  dtype: Optional[str] = None
  cema_impl: Optional[str] = None
  matmul_precision: Optional[str] = None
  batch_size: Optional[int] = None
  max_batch_size: Optional[int] = None
  segment_len: Optional[int] = None
  max_gen_toks: int = DEFAULT_MAX_GEN_TOKS
  prefix_token: Optional[int] = None
  block_size: int = DEFAULT_BLOCK_SIZE
  prefill_piece: Optional[int] = None

  @classmethod
  def parse(cls, args: Mapping[str, Any]) -> HarnessOptions:
    """Options from lm_eval's model arguments (values may come as str, int or bool); InferenceError for unknown or
    bad ones. `device` is accepted and ignored (jax places the model on its default device)."""
    args = {k: v for k, v in args.items() if v is not None and k != "device"}
    if "pretrained" in args:  # lm_eval's usual name, which also names its output folder
      if "checkpoint" in args:
        raise InferenceError("--model_args: give checkpoint= or pretrained= (its alias), not both")
      args["checkpoint"] = args.pop("pretrained")
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(args) - fields)
    if unknown:
      raise InferenceError(f"--model_args {', '.join(unknown)}: not arguments of the {MODEL_NAME} model; it takes "
                           f"{', '.join(sorted(fields))}")
    if "checkpoint" not in args or args["checkpoint"] == "":
      raise InferenceError(f"--model_args checkpoint=PATH is required for --model {MODEL_NAME} (a train.py run "
                           f"directory, a step folder, a params-only or PyTorch checkpoint)")
    out = dict(args)
    for name in ("checkpoint", "config", "tokenizer", "tokenizer_path", "dtype", "cema_impl", "matmul_precision"):
      if name in out:
        out[name] = str(out[name])  # lm_eval turns "checkpoint=7" into an int
    out["batch_size"] = _batch_size(args.get("batch_size"))
    for name, low in (("step", 0), ("max_batch_size", 1), ("segment_len", 1), ("max_gen_toks", 1),
                      ("prefix_token", 0), ("block_size", 1), ("prefill_piece", 1)):
      if name in out:
        out[name] = _int(name, out[name], low)
    opts = cls(**out)
    check_decode_sizes(None, opts.block_size, None)
    return opts

  def check(self) -> loading.Checked:
    """The checkpoint checked without jax (`loading.check_checkpoint`)."""
    execution = {k: getattr(self, k) for k in ("dtype", "cema_impl", "matmul_precision") if getattr(self, k)}
    return loading.check_checkpoint(self.checkpoint, step=self.step, config_path=self.config,
                                    tokenizer=self.tokenizer, tokenizer_path=self.tokenizer_path, **execution)

  def rows_per_call(self, auto: int) -> int:
    """Rows per call: batch_size, or `auto` capped by max_batch_size."""
    if self.batch_size is not None:
      return self.batch_size
    return max(1, min(auto, self.max_batch_size or auto))


def _int(name: str, value: Any, low: int) -> int:
  try:
    if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
      raise ValueError
    out = int(value)
  except (TypeError, ValueError):
    raise InferenceError(f"{MODEL_NAME} model argument {name}={value!r}: expected an integer") from None
  if out < low:
    raise InferenceError(f"{MODEL_NAME} model argument {name}={out}: must be >= {low}")
  return out


def _batch_size(value: Any) -> Optional[int]:
  """lm_eval's --batch_size: an int, or "auto" / "auto:N" (N: lm_eval's re-tuning count, unused here) -> None."""
  if value is None or (isinstance(value, str) and value.split(":")[0] == "auto"):
    return None
  return _int("batch_size", value, 1)
