"""Autoregressive sampling with the streaming cache: the prompt is processed once, then one token per step."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from megalodon_jax.pytorch.model import Mega


def sample_next(logits: Tensor, temperature: float = 0.0, top_k: Optional[int] = None,
                generator: Optional[torch.Generator] = None) -> Tensor:
  """Next tokens from last-position logits.

  Args:
    logits: (B, V) float.
    temperature: 0 for greedy argmax; otherwise softmax(logits / temperature) sampling.
    top_k: sample among the k most likely tokens only (None: all).
    generator: torch RNG for sampling (on the logits' device).
  Returns:
    (B,) int64 token ids.
  """
  if temperature < 0:
    raise ValueError(f"temperature={temperature} must be >= 0")
  if top_k is not None and top_k < 1:
    raise ValueError(f"top_k={top_k} must be None or >= 1")
  if temperature == 0:
    return logits.argmax(-1)
  scaled = logits.float() / temperature
  if top_k is not None and top_k < scaled.shape[-1]:
    kth = torch.topk(scaled, top_k, dim=-1).values[..., -1:]
    scaled = scaled.masked_fill(scaled < kth, float("-inf"))
  probs = torch.softmax(scaled, dim=-1)
  return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate(model: Mega, tokens: Tensor, max_new_tokens: int, temperature: float = 0.0,
             top_k: Optional[int] = None, generator: Optional[torch.Generator] = None) -> Tensor:
  """Continues each prompt row by `max_new_tokens` tokens.

  Args:
    model: a `Mega` (run in eval mode here; its mode is restored afterwards).
    tokens: (B, L) int prompt, L ≥ 1, on the model's device.
    max_new_tokens: number of tokens to append (≥ 0).
    temperature, top_k, generator: see `sample_next` (temperature 0 = greedy).
  Returns:
    (B, L + max_new_tokens) int64: the prompt followed by the generated tokens.
  """
  if max_new_tokens < 0:
    raise ValueError(f"max_new_tokens={max_new_tokens} must be >= 0")
  was_training = model.training
  model.eval()
  try:
    out = [tokens.long()]
    if max_new_tokens == 0:
      return out[0]
    logits, cache = model(out[0], model.init_cache(tokens.shape[0]))  # prefill: the whole prompt at once
    for step in range(max_new_tokens):
      nxt = sample_next(logits[:, -1], temperature, top_k, generator).unsqueeze(-1)
      out.append(nxt)
      if step + 1 < max_new_tokens:
        logits, cache = model(nxt, cache)
    return torch.cat(out, dim=1)
  finally:
    model.train(was_training)
