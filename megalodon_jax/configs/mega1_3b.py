"""The official `mega1.3B` shape (24 layers, D 2048, 2 heads, chunk 2048) with the paper's 7B optimizer recipe.

Needs a prepared TFDS text dataset (--config.data.name, default pg19) and the Llama-2 SentencePiece model
(--config.data.tokenizer_path). 16K-token sequences (8 chunks), 256 sequences = 4M tokens per step.

Target: a v5p-128 slice (64 chips, fsdp 64, 4 sequences per chip); `python -m megalodon_jax.aot --config
configs/mega1_3b.py --topology v5p-128` shows the per-chip memory (benchmarks/RESULTS.md, "Fitting the hardware").
"""

from megalodon_jax.configs import default, paper_recipe, set_preset


def get_config():
  c = default.get_config()
  set_preset(c, "mega1.3B")
  paper_recipe(c)
  c.seq_len = 16384
  c.batch_size = 256
  c.total_steps = 100_000
  return c
