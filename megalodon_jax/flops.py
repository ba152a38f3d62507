"""Analytic FLOP counts of a Megalodon LM, for MFU (docs/training.md#flops-and-mfu).

Conventions (the same as MaxText's):
  * A matmul [m, k] x [k, n] costs 2·m·n·k FLOPs; bias adds, activations, norms and softmax are not matmuls and
    are left out of the matmul count (XLA's `cost_analysis` counts them, so it reads a little higher).
  * Chunk-local attention: q·kᵀ and P·v over chunks of C, the last chunk of length L mod C when C does not
    divide L. Per chunk of length c this is 2·c²·(dz + dv)·H = 2·c²·(Z + E) FLOPs per sequence, i.e. the whole
    c×c score block, as a dense kernel computes it ("full"). MFU conventionally counts causal attention at half
    of that (MaxText since PR #1988), since half the block is masked out ("causal"). Both are
    returned; `forward_flops` puts the full count in its totals unless asked for the causal one, and
    `model_flops_per_token` (the MFU numerator) uses the causal one.
  * Our XLA attention (ops/attention.py) zero-pads the last chunk to C, so it actually executes
    ⌈L/C⌉·C² per head; that count is returned as "attention_padded" for comparison with XLA, never in totals.
  * CEMA is not a matmul of the model's parameters: it is the FFT convolution with the per-channel EMA kernel.
    We use the estimate d·(8·N + 15·log2(n_fft)) per token per layer with n_fft = 2·next_pow2(L)
    (the FFT length of the official fftconv and of ops/cema/fft.py), counted in "total" but not in "matmul": it is
    <0.5% at scale and memory-bound, so it does not belong in an MFU numerator.
  * Training costs 3x the forward matmuls (forward, plus two matmuls of the same size per forward matmul in the
    backward pass: the input gradient and the weight gradient). Rematerialisation is not counted: this is MFU,
    not HFU.
"""

from __future__ import annotations

import math
from typing import Optional

from megalodon_jax.config import MegalodonConfig

# Peak dense bf16 FLOP/s per device (no sparsity), public spec-sheet values: NVIDIA A100 / H100 / H200 data
# sheets, Google Cloud TPU system-architecture pages (v4, v5e, v5p, v6e Trillium); see docs/training.md#flops-and-mfu.
# Matched as case-insensitive substrings of jax `Device.device_kind`, first match wins, so the more specific
# entries come first (an "H100 PCIe" must not be read as an SXM H100, "TPU v5 lite" is v5e, not v5p).
PEAK_BF16_FLOPS: tuple[tuple[str, float], ...] = (
    ("H100 PCIe", 756e12),
    ("H200", 989e12),
    ("H100", 989e12),  # SXM; jax reports e.g. "NVIDIA H100 80GB HBM3"
    ("A100", 312e12),
    ("TPU v5 lite", 197e12),  # jax's device_kind for v5e
    ("TPU v5e", 197e12),
    ("TPU v5p", 459e12),
    ("TPU v5", 459e12),  # v5p reports "TPU v5" on some runtimes
    ("TPU v6 lite", 918e12),  # jax's device_kind for v6e (Trillium)
    ("TPU v6e", 918e12),
    ("TPU v4", 275e12),
)


def peak_flops(device_kind: str) -> Optional[float]:
  """Peak dense bf16 FLOP/s of one device from its jax `device_kind`, or None for an unknown device (e.g. CPU)."""
  kind = device_kind.lower()
  return next((value for key, value in PEAK_BF16_FLOPS if key.lower() in kind), None)


def forward_flops(config: MegalodonConfig, batch: int, seq_len: int, *,
                  causal_attention: bool = False) -> dict[str, float]:
  """Analytic FLOPs of one forward pass of `batch` sequences of `seq_len` tokens (no cache).

  Args:
    config: the model.
    batch: B, sequences.
    seq_len: L, tokens per sequence (any L ≥ 1; a partial last chunk is counted at its own length).
    causal_attention: count attention at half the c×c block (MFU convention) in "attention", "matmul" and
      "total"; by default the full block, as a dense kernel computes it.
  Returns:
    FLOPs for the whole batch, all layers: per-matrix entries "wv", "wz", "wr", "wh1", "wh2", "fc1", "fc2",
    "fc3" (0 without SwiGLU); groups "projections", "ffn", "lm_head"; "attention" (per `causal_attention`),
    "attention_full", "attention_causal", "attention_padded" (what the zero-padded XLA kernel executes);
    "cema" (estimate, see the module docstring); "matmul" = projections + ffn + lm_head + attention;
    "total" = matmul + cema.
  """
  if batch <= 0 or seq_len <= 0:
    raise ValueError(f"batch and seq_len must be positive; got batch={batch}, seq_len={seq_len}")
  c = config
  D, Z, E, F, N = c.model_dim, c.z_dim, c.value_dim, c.ffn_hidden_dim, c.cema_ndim
  layers = c.num_layers
  tokens = float(batch) * seq_len

  def dense(din: int, dout: int) -> float:  # one (tokens, din) x (din, dout) matmul in every layer
    return 2.0 * tokens * din * dout * layers

  out = {
      "wv": dense(D, E), "wz": dense(D, Z), "wr": dense(D, E), "wh1": dense(D, D), "wh2": dense(E, D),
      "fc1": dense(D, F), "fc2": dense(F, D), "fc3": dense(D, F) if c.swiglu else 0.0,
  }
  out["projections"] = out["wv"] + out["wz"] + out["wr"] + out["wh1"] + out["wh2"]
  out["ffn"] = out["fc1"] + out["fc2"] + out["fc3"]
  out["lm_head"] = 2.0 * tokens * D * c.out_size  # once, not per layer

  # q·kᵀ costs 2·c²·dz and P·v 2·c²·dv per head and chunk; summed over heads that is 2·c²·(Z + E).
  def attention(lengths: list[int]) -> float:
    return float(batch) * layers * sum(2.0 * n * n * (Z + E) for n in lengths)

  c_eff = min(c.chunk_size, seq_len)  # ops/attention.py: a sequence shorter than C is one chunk of L
  full, rest = divmod(seq_len, c_eff)  # full chunks of C, then one of the remainder (a chunk of 0 costs 0)
  out["attention_full"] = attention([c_eff] * full + [rest])
  out["attention_causal"] = 0.5 * out["attention_full"]
  out["attention_padded"] = attention([c_eff] * (full + (rest > 0)))  # the last chunk zero-padded to C
  out["attention"] = out["attention_causal"] if causal_attention else out["attention_full"]

  n_fft = 2 * (1 << max(0, (seq_len - 1).bit_length()))
  out["cema"] = tokens * layers * D * (8.0 * N + 15.0 * math.log2(n_fft))

  out["matmul"] = out["projections"] + out["ffn"] + out["lm_head"] + out["attention"]
  out["total"] = out["matmul"] + out["cema"]
  return out


def train_step_flops(config: MegalodonConfig, batch: int, seq_len: int, *, causal_attention: bool = False) -> float:
  """FLOPs of one training step (forward + backward) on `batch` x `seq_len` tokens: 3 x the forward matmuls.

  The backward pass runs two matmuls the size of each forward one (gradients of its input and of its weight);
  elementwise work, CEMA and remat recomputation are left out, as in MFU accounting.
  """
  return 3.0 * forward_flops(config, batch, seq_len, causal_attention=causal_attention)["matmul"]


def model_flops_per_token(config: MegalodonConfig, seq_len: int) -> float:
  """Training FLOPs per token for MFU: 3 x forward matmuls, causal attention counted at half
  (docs/training.md#flops-and-mfu).

  For L a multiple of C this is F_tok = 6·[layers·P + D·V] + 3·layers·C·(Z + E) of docs/training.md#flops-and-mfu;
  MFU is then tokens_per_second · model_flops_per_token / (num_devices · peak_flops(device_kind)).
  """
  return train_step_flops(config, 1, seq_len, causal_attention=True) / seq_len
