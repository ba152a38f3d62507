"""Llama2-7B in this trainer (`model.family = "llama"`), the paper's Transformer baseline (Megalodon paper §4.1,
Table 1 and Figure 5): 32 layers, width 4096, 32 heads of 128 (multi-head, no grouped-query heads), SwiGLU hidden
11008, vocabulary 32000 (the Llama-2 tokenizer), RMSNorm epsilon 1e-5, RoPE base 10000, untied embeddings
(6.74B parameters; Llama 2 paper, arXiv 2307.09288, Table 1 and the released config.json).

Run settings as configs/megalodon_7b.py, so the two compare on the same mesh and batch: pure FSDP over every
device, bf16 compute with float32 master weights, full remat, scanned blocks, 128 sequences per step; 4K context
(Llama 2's), so `--config.seq_len=32768` gives the 32K point of the paper's throughput comparison (Megalodon-7B's
own length). Optimizer: Llama 2's 7B recipe (AdamW 0.9 / 0.95, eps 1e-5, lr 3e-4 cosine to 10% with 2000 warmup
steps, weight decay 0.1, clip 1.0).

Check it on a slice without one: `python -m megalodon_jax.aot --config configs/llama2_7b.py --topology v5p-128
--programs train_step` (and `--config.seq_len=32768`); benchmarks/family_speed.py --tpu compares it with
Megalodon-7B. Needs a prepared TFDS text dataset (--config.data.name) and the Llama-2 tokenizer
(--config.data.tokenizer_path) to train.
"""

from megalodon_jax.configs import megalodon_7b
from megalodon_jax.llama.config import LlamaSection
from megalodon_jax.typed_config import config_dict


def get_config():
  c = megalodon_7b.get_config()  # mesh, batch, dtype, remat, scan_layers, data and tokenizer settings
  run = c.model
  c.model = config_dict(LlamaSection(
      num_layers=32, model_dim=4096, num_heads=32, ffn_hidden_dim=11008, vocab_size=32000, norm_eps=1e-5,
      rope_base=10000.0, share_emb=False,
      dtype=run.dtype, param_dtype=run.param_dtype, remat=run.remat, scan_layers=run.scan_layers))
  c.seq_len = 4096
  o = c.optimizer
  o.lr = 3e-4
  o.warmup_steps = 2000
  o.eps = 1e-5
  c.total_steps = 477_000
  return c
