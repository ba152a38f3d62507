"""Analytic FLOP model (megalodon_jax/flops.py): hand-computed cases, conventions, and XLA's own count."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from megalodon_jax import flops
from megalodon_jax.config import MegalodonConfig, preset
from megalodon_jax.model import MegalodonLM

# D=4, Z=2, E=6, F=8, V=10, one layer, one head, chunk 2: small enough to count every matmul by hand.
TINY = dict(num_layers=1, model_dim=4, z_dim=2, value_dim=6, num_heads=1, ffn_hidden_dim=8, cema_ndim=2,
            chunk_size=2, vocab_size=10, norm_num_groups=2)


def test_hand_computed_tiny_case():
  cfg = MegalodonConfig(**TINY)
  f = flops.forward_flops(cfg, batch=1, seq_len=3)
  # Per token: wv 4x6, wz 4x2, wr 4x6, wh1 4x4, wh2 6x4 = 96 MACs = 192 FLOPs; 3 tokens.
  assert (f["wv"], f["wz"], f["wr"], f["wh1"], f["wh2"]) == (144, 48, 144, 96, 144)
  assert f["projections"] == 576
  # Plain FFN: fc1 4x8 + fc2 8x4 = 64 MACs per token; no fc3.
  assert (f["fc1"], f["fc2"], f["fc3"], f["ffn"]) == (192, 192, 0, 384)
  assert f["lm_head"] == 3 * 2 * 4 * 10
  # Chunks of 2 and 1 tokens: 2·(2² + 1²)·(Z + E) = 80; causal halves it; the padded kernel runs 2·(2² + 2²)·8.
  assert (f["attention_full"], f["attention_causal"], f["attention_padded"]) == (80, 40, 128)
  assert f["attention"] == 80
  assert f["matmul"] == 576 + 384 + 240 + 80
  assert f["total"] == f["matmul"] + f["cema"]
  assert f["cema"] > 0


def test_swiglu_batch_layers_and_short_sequences():
  cfg = MegalodonConfig(**TINY)
  f = flops.forward_flops(cfg, batch=1, seq_len=3)
  g = flops.forward_flops(cfg.replace(swiglu=True, num_layers=3), batch=2, seq_len=3)
  assert g["fc3"] == g["fc1"] == 2 * 3 * f["fc1"]
  assert g["projections"] == 2 * 3 * f["projections"]
  assert g["lm_head"] == 2 * f["lm_head"]  # the head is not per layer
  # A sequence shorter than the chunk is one chunk of its own length.
  one = flops.forward_flops(cfg.replace(chunk_size=8), batch=1, seq_len=3)
  assert one["attention_full"] == one["attention_padded"] == 2 * 9 * 8
  with pytest.raises(ValueError):
    flops.forward_flops(cfg, batch=0, seq_len=3)


def test_causal_option_and_train_step_is_three_forward_matmuls():
  cfg = MegalodonConfig(**TINY)
  full = flops.forward_flops(cfg, 2, 5)
  causal = flops.forward_flops(cfg, 2, 5, causal_attention=True)
  assert causal["attention"] == full["attention"] / 2
  assert causal["matmul"] == full["matmul"] - full["attention"] / 2
  assert flops.train_step_flops(cfg, 2, 5) == 3 * full["matmul"]
  assert flops.train_step_flops(cfg, 2, 5, causal_attention=True) == 3 * causal["matmul"]
  assert flops.model_flops_per_token(cfg, 5) == 3 * causal["matmul"] / (2 * 5)


def test_model_flops_per_token_matches_the_documented_formula():
  # docs/training.md#flops-and-mfu: F_tok = 6·[L·P + d·V] + 3·L·c·(z + v), P = d·(3v + z + d) + 3·d·f (SwiGLU);
  # it gives 47.09 GFLOP/token for Megalodon-7B (c = 4096, V = 32K).
  cfg = preset("megalodon_7b")
  d, z, v, f, c, n_layers, vocab = 4096, 1024, 8192, 8192, 4096, 32, 32000
  p = d * (3 * v + z + d) + 3 * d * f
  expected = 6 * (n_layers * p + d * vocab) + 3 * n_layers * c * (z + v)
  assert flops.model_flops_per_token(cfg, 4 * c) == pytest.approx(expected, rel=1e-12)
  assert expected / 1e9 == pytest.approx(47.09, abs=0.01)
  # Flat in context length once L is a multiple of C: the attention term depends on c, not L.
  assert flops.model_flops_per_token(cfg, c) == pytest.approx(expected, rel=1e-12)


def test_peak_flops_table():
  assert flops.peak_flops("NVIDIA H100 80GB HBM3") == 989e12
  assert flops.peak_flops("NVIDIA H100 PCIe") == 756e12
  assert flops.peak_flops("NVIDIA H200") == 989e12
  assert flops.peak_flops("NVIDIA A100-SXM4-80GB") == 312e12
  assert flops.peak_flops("TPU v4") == 275e12
  assert flops.peak_flops("TPU v5 lite") == flops.peak_flops("TPU v5e") == 197e12
  assert flops.peak_flops("TPU v5p") == 459e12
  assert flops.peak_flops("TPU v6 lite") == flops.peak_flops("TPU v6e") == 918e12
  assert flops.peak_flops("cpu") is None


def _xla_forward_flops(cfg: MegalodonConfig, batch: int, seq_len: int) -> float:
  graphdef, state = nnx.split(MegalodonLM(cfg, rngs=nnx.Rngs(0)))
  fwd = jax.jit(lambda state, ids: nnx.merge(graphdef, state)(ids))
  analysis = fwd.lower(state, jnp.zeros((batch, seq_len), jnp.int32)).compile().cost_analysis()
  if isinstance(analysis, (list, tuple)):  # older jax returns one dict per computation
    analysis = analysis[0]
  return float(analysis["flops"])


# Analytic "total" / XLA cost_analysis "flops" on CPU (jax 0.10.2), batch 2:
#   cema_impl   config                          L=64    L=80
#   chunked     D128 H2 C32 swiglu V512         0.939   0.933
#   chunked     D128 H1 C16 plain  V512         0.931   0.936
#   fft         same two configs                0.952 / 0.946   0.905 / 0.903
#   chunked     D96  H2 C32, D64 H1 C16         0.908 / 0.870   0.900 / 0.878   (not tested: >10% at D=64)
# The analytic total reads low because XLA also counts elementwise work (norms, SiLU, softmax, RoPE, gates,
# CEMA coefficients), which grows relative to the matmuls as D shrinks (~6% at D=128, ~13% at D=64); matmul-only
# vs XLA is 0.87-0.89 at D=128. We test "chunked" ("auto"'s CPU choice for 128 <= L < 512 and past 4K): its
# cost is linear in L, whereas "fft" pads to 2·next_pow2(L), so XLA's count jumps from L=64 (n_fft 128) to L=80 (n_fft 256) while the
# documented CEMA estimate barely moves. "sequential" reads closest (1.01-1.03), most likely only because XLA's cost
# analysis counts a while-loop (lax.scan) body once rather than per step, so the CEMA recurrence is mostly missing
# from its count: an accident, not agreement.
XLA_CONFIGS = [
    dict(model_dim=128, z_dim=64, value_dim=256, ffn_hidden_dim=256, num_heads=2, chunk_size=32, vocab_size=512,
         swiglu=True),
    dict(model_dim=128, z_dim=64, value_dim=256, ffn_hidden_dim=256, num_heads=1, chunk_size=16, vocab_size=512),
]


@pytest.mark.parametrize("seq_len", [64, 80])  # 80 is not a multiple of 32: a partial last chunk
@pytest.mark.parametrize("arch", XLA_CONFIGS, ids=["d128_h2_c32_swiglu", "d128_h1_c16"])
def test_analytic_total_within_10_percent_of_xla(arch, seq_len):
  cfg = MegalodonConfig(num_layers=2, cema_ndim=16, norm_num_groups=16, cema_impl="chunked", **arch)
  analytic = flops.forward_flops(cfg, 2, seq_len)
  xla = _xla_forward_flops(cfg, 2, seq_len)
  ratio = analytic["total"] / xla
  assert 0.9 <= ratio <= 1.1, f"analytic/XLA = {ratio:.3f} (analytic {analytic['total']:.4g}, XLA {xla:.4g})"
  # XLA counts strictly more than our matmuls (it adds elementwise work), never less.
  assert analytic["matmul"] < xla
