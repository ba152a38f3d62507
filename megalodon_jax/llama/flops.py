"""Analytic FLOP counts of the Llama baseline, with the conventions of `megalodon_jax.flops` (MaxText's): a
[m, k] x [k, n] matmul costs 2·m·n·k; training costs 3x the forward matmuls; causal attention counted at half of
the full L x L score block for MFU.
"""

from __future__ import annotations

from megalodon_jax.llama.config import LlamaConfig


def forward_flops(config: LlamaConfig, batch: int, seq_len: int, *, causal_attention: bool = False) -> dict[str, float]:
  """FLOPs of one forward pass of `batch` sequences of `seq_len` tokens (no cache), all layers.

  Returns "wq", "wk", "wv", "wo", "ffn" (gate, up and down), "projections" (q, k, v, o), "lm_head",
  "attention_full" (q·kᵀ and P·v over the whole L x L block), "attention_causal" (half of it), "attention" (per
  `causal_attention`), and "matmul" = "total" = projections + ffn + lm_head + attention.
  """
  if batch <= 0 or seq_len <= 0:
    raise ValueError(f"batch and seq_len must be positive; got batch={batch}, seq_len={seq_len}")
  c = config
  D, F, hd, H, K = c.model_dim, c.ffn_hidden_dim, c.head_size, c.num_heads, c.kv_heads
  tokens = float(batch) * seq_len

  def dense(din: int, dout: int) -> float:
    return 2.0 * tokens * din * dout * c.num_layers

  out = {"wq": dense(D, H * hd), "wk": dense(D, K * hd), "wv": dense(D, K * hd), "wo": dense(H * hd, D),
         "ffn": 3 * dense(D, F), "lm_head": 2.0 * tokens * D * c.vocab_size}
  out["projections"] = out["wq"] + out["wk"] + out["wv"] + out["wo"]
  # q·kᵀ and P·v: 2·L²·hd each per query head.
  out["attention_full"] = float(batch) * c.num_layers * 4.0 * seq_len * seq_len * hd * H
  out["attention_causal"] = 0.5 * out["attention_full"]
  out["attention"] = out["attention_causal"] if causal_attention else out["attention_full"]
  out["matmul"] = out["projections"] + out["ffn"] + out["lm_head"] + out["attention"]
  out["total"] = out["matmul"]
  return out


def train_step_flops(config: LlamaConfig, batch: int, seq_len: int, *, causal_attention: bool = False) -> float:
  """FLOPs of one training step on `batch` x `seq_len` tokens: 3 x the forward matmuls (no remat)."""
  return 3.0 * forward_flops(config, batch, seq_len, causal_attention=causal_attention)["matmul"]


def model_flops_per_token(config: LlamaConfig, seq_len: int) -> float:
  """Training FLOPs per token for MFU (causal attention at half): 6·N_matmul + 6·layers·L·hd·H."""
  return train_step_flops(config, 1, seq_len, causal_attention=True) / seq_len
