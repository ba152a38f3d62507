"""The `megalodon` model of lm-evaluation-harness: any checkpoint of this project (either family) behind lm_eval's
`LM` interface.

Importing this module registers the model under the name `megalodon` (`lm_eval.api.registry`); then
`lm_eval.simple_evaluate(model="megalodon", model_args={"checkpoint": RUN}, ...)` or the `megalodon-lm-eval`
command line run any lm_eval task on it. Importing it imports jax; the weights load when the class is instantiated.

- loglikelihood: (context, continuation) pairs tokenized as lm_eval's Hugging Face model does (the context's
  trailing spaces move into the continuation; the continuation is what encoding the whole adds after the context's
  tokens; an empty context starts from the prefix token), scored in batches through the Evaluator
  (`scoring.score_rows`). Contexts are never truncated.
- loglikelihood_rolling: each document, after the prefix token, streamed whole through the cache: every token is
  scored once, with the whole document before it as context (no windows).
- generate_until: the Generator (`generation.generate_until`).
The prefix token is the tokenizer's EOS (what training appends after every document), or a newline for the byte
tokenizer, which has none (`options.BYTE_PREFIX_TOKEN`; `prefix_token=` overrides it).
"""

from __future__ import annotations

from typing import Any, Optional

import numpy as np
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model
from lm_eval.utils import simple_parse_args_string

from megalodon_jax import platforms
from megalodon_jax.errors import InferenceError
from megalodon_jax.families import of_config
from megalodon_jax.inference import loading
from megalodon_jax.inference.evaluation import Evaluator
from megalodon_jax.inference.generation import Generator
from megalodon_jax.lm_eval import generation, scoring
from megalodon_jax.lm_eval.options import AUTO_GENERATION_ROWS, BYTE_PREFIX_TOKEN, MODEL_NAME, HarnessOptions


@register_model(MODEL_NAME)
class MegalodonHarnessModel(LM):
  """lm_eval's `LM` over a checkpoint of this project. Arguments: `options.HarnessOptions` (lm_eval's `--model_args`
  plus its `batch_size`, `max_batch_size` and `device`); InferenceError (or a checkpoint error) for bad ones."""

  def __init__(self, **model_args: Any):
    super().__init__()
    opts = HarnessOptions.parse(model_args)
    checked = opts.check()  # path and arguments, before any array is read
    platforms.skip_absent_tpu()  # before jax's backends start (cli/common.load)
    self.loaded = loading.load_checked(checked)
    self.options = opts
    self.tokenizer = self.loaded.tokenizer
    model = self.loaded.model
    self.evaluator = Evaluator(model, segment_len=opts.segment_len)
    self.generator = Generator(model, prefill_piece=opts.prefill_piece, block_size=opts.block_size)
    eos = self.tokenizer.eos_id
    self.prefix_token = opts.prefix_token if opts.prefix_token is not None else (
        BYTE_PREFIX_TOKEN if eos is None else eos)
    if self.prefix_token >= self.loaded.config.vocab_size:
      raise InferenceError(f"prefix_token={self.prefix_token} is outside the vocabulary [0, "
                       f"{self.loaded.config.vocab_size})")

  @classmethod
  def create_from_arg_obj(cls, arg_dict: dict, additional_config: Optional[dict] = None) -> MegalodonHarnessModel:
    """lm_eval's constructor hook: its own settings (batch_size, max_batch_size, device) under the model
    arguments, so `--model_args batch_size=8` overrides lm_eval's default `--batch_size` of 1."""
    extra = {k: v for k, v in (additional_config or {}).items() if v is not None}
    return cls(**{**extra, **arg_dict})

  @classmethod
  def create_from_arg_string(cls, arg_string: str,
                             additional_config: Optional[dict] = None) -> MegalodonHarnessModel:
    return cls.create_from_arg_obj(simple_parse_args_string(arg_string), additional_config)

  # ------------------------------------------------------------------------------------------------ tokenization

  def _encode(self, text: str) -> np.ndarray:
    return np.asarray(self.tokenizer.encode(text), np.int32).reshape(-1)

  def encode_pair(self, context: str, continuation: str) -> tuple[np.ndarray, np.ndarray]:
    """(context ids, continuation ids) as lm_eval's Hugging Face model splits them (see the module docstring)."""
    if not context:
      return np.asarray([self.prefix_token], np.int32), self._encode(continuation)
    spaces = len(context) - len(context.rstrip())
    if spaces:
      context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole = self._encode(context + continuation)
    ctx = self._encode(context)
    if ctx.size == 0:  # a context of spaces only: everything is continuation
      ctx = np.asarray([self.prefix_token], np.int32)
      return ctx, whole
    return ctx, whole[ctx.size:]

  # ------------------------------------------------------------------------------------------------ lm_eval API

  def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
    """(log P(continuation | context), greedy) per request; args (context, continuation)."""
    del disable_tqdm  # no progress bar: batches are few and large
    pairs = [self.encode_pair(*r.args) for r in requests]
    rows = [np.concatenate(p) for p in pairs]
    results = scoring.score_rows(self.evaluator, rows, [p[1].size for p in pairs],
                                 rows_per_call=self.options.batch_size)
    out = []
    for request, res in zip(requests, results):
      answer = (res.logprob, res.greedy)
      self.cache_hook.add_partial("loglikelihood", request.args, answer)
      out.append(answer)
    return out

  def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
    """log P(document) per request (args (document,)), every token scored once with full context."""
    del disable_tqdm
    docs = [self._encode(r.args[0]) for r in requests]
    rows = [np.concatenate([np.asarray([self.prefix_token], np.int32), d]) for d in docs]
    results = scoring.score_rows(self.evaluator, rows, [d.size for d in docs], rows_per_call=self.options.batch_size)
    out = []
    for request, res in zip(requests, results):
      self.cache_hook.add_partial("loglikelihood_rolling", request.args, res.logprob)
      out.append(res.logprob)
    return out

  def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
    """Completions of (context, gen_kwargs) requests, cut at gen_kwargs' `until` strings."""
    del disable_tqdm
    args = [r.args for r in requests]
    texts = generation.generate_until(self.generator, self.tokenizer, args, prefix_token=self.prefix_token,
                                      rows=self.options.rows_per_call(AUTO_GENERATION_ROWS),
                                      default_max=self.options.max_gen_toks)
    for a, text in zip(args, texts):
      self.cache_hook.add_partial("generate_until", a, text)
    return texts

  def get_model_info(self) -> dict:
    """What lm_eval records in its results' config."""
    c = self.loaded.config
    return {"checkpoint": self.loaded.source, "checkpoint_kind": self.loaded.kind, "step": self.loaded.step,
            "family": of_config(c).name, "num_params": int(c.num_params()), "tokenizer": repr(self.tokenizer),
            "prefix_token": int(self.prefix_token), "segment_len": int(self.evaluator.segment_len)}

  @property
  def tokenizer_name(self) -> str:
    return repr(self.tokenizer)

  @property
  def max_length(self) -> Optional[int]:
    """No limit: documents stream through the cache whatever their length."""
    return None
