"""lm_eval's `generate_until` through the project's Generator: batched, streamed, cut at the stop strings.

Requests with equal generation settings run together, sorted by prompt length (the Generator prefills a batch up
to its shortest prompt and feeds the rest one token per step, so similar lengths waste least), `rows` prompts per
call. Decoding stops at the tokenizer's EOS (a stop id inside the jitted loop) and, on the host after every decode
block, as soon as every row's text holds one of its `until` strings; the text is then cut before the first one.
Prompts are never truncated: the Megalodon cache has a constant size, and the Llama baseline's KV cache is sized
to prompt plus generation (Generator).
"""

from __future__ import annotations

import json
from typing import Any, Optional, Sequence

import numpy as np

from megalodon_jax.data.tokenizers import Tokenizer
from megalodon_jax.errors import InferenceError
from megalodon_jax.inference.generation import Generator
from megalodon_jax.inference.sampling import Sampler

# gen_kwargs this model reads; lm_eval tasks may pass others (e.g. HF-only settings), which are ignored.
KNOWN_GEN_KWARGS = ("until", "max_gen_toks", "do_sample", "temperature", "top_k", "top_p", "seed")


def parse_gen_kwargs(gen_kwargs: dict, default_max: int) -> tuple[list[str], int, Sampler, int]:
  """(until strings, max new tokens, sampler, seed) of one request's gen_kwargs.

  Greedy unless `do_sample` is true (then temperature, top_k, top_p apply; temperature 0 is greedy anyway).
  """
  kw = dict(gen_kwargs or {})
  until = kw.get("until") or []
  until = [until] if isinstance(until, str) else list(until)
  if not all(isinstance(u, str) for u in until):
    raise InferenceError(f"gen_kwargs until={until!r}: expected strings")
  max_new = int(kw.get("max_gen_toks") or default_max)
  if max_new < 1:
    raise InferenceError(f"gen_kwargs max_gen_toks={max_new}: must be >= 1")
  if kw.get("do_sample"):
    try:
      sampler = Sampler(temperature=float(kw.get("temperature", 1.0)), top_k=int(kw.get("top_k") or 0),
                        top_p=float(kw.get("top_p", 1.0)))
    except ValueError as e:
      raise InferenceError(f"gen_kwargs: {e}") from None
  else:
    sampler = Sampler(temperature=0.0)
  return [u for u in until if u], max_new, sampler, int(kw.get("seed") or 0)


def cut_at_stops(text: str, until: Sequence[str]) -> tuple[str, bool]:
  """`text` up to the first occurrence of any stop string, and whether one occurred."""
  cut = min((i for i in (text.find(u) for u in until) if i >= 0), default=-1)
  return (text, False) if cut < 0 else (text[:cut], True)


def _run_batch(generator: Generator, tokenizer: Tokenizer, prompts: list[np.ndarray], until: list[str],
               max_new: int, sampler: Sampler, seed: int) -> list[str]:
  """Completions of one batch of prompts (token ids), cut at the stop strings."""
  stop_ids = [] if tokenizer.eos_id is None else [tokenizer.eos_id]
  tokens: list[list[int]] = [[] for _ in prompts]
  hit = [False] * len(prompts)
  for update in generator.stream(prompts, max_new_tokens=max_new, sampler=sampler, stop_ids=stop_ids, seed=seed):
    for i, new in enumerate(update.new_tokens):
      if new and not hit[i]:
        tokens[i].extend(new)
        hit[i] = bool(until) and cut_at_stops(tokenizer.decode(tokens[i]), until)[1]
    if all(h or f for h, f in zip(hit, update.finished)):
      break  # every row has ended or shows a stop string: no more decode blocks
  return [cut_at_stops(tokenizer.decode(t), until)[0] for t in tokens]


def generate_until(generator: Generator, tokenizer: Tokenizer, requests: Sequence[tuple[str, dict]], *,
                   prefix_token: int, rows: int, default_max: int) -> list[str]:
  """lm_eval's generate_until over (context, gen_kwargs) pairs; one string per request, in order.

  An empty context starts from `prefix_token`.
  """
  groups: dict[str, list[int]] = {}
  parsed: list[Any] = []
  prompts: list[np.ndarray] = []
  for i, (context, gen_kwargs) in enumerate(requests):
    parsed.append(parse_gen_kwargs(gen_kwargs, default_max))
    ids = np.asarray(tokenizer.encode(context), np.int32)
    prompts.append(ids if ids.size else np.asarray([prefix_token], np.int32))
    groups.setdefault(json.dumps(gen_kwargs, sort_keys=True, default=str), []).append(i)
  out: list[Optional[str]] = [None] * len(requests)
  for members in groups.values():
    members = sorted(members, key=lambda i: -prompts[i].size)
    until, max_new, sampler, seed = parsed[members[0]]
    for start in range(0, len(members), rows):
      batch = members[start:start + rows]
      texts = _run_batch(generator, tokenizer, [prompts[i] for i in batch], until, max_new, sampler, seed)
      for i, text in zip(batch, texts):
        out[i] = text
  return out
