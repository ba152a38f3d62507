"""The official `mega200M` shape (12 layers, D 1024, chunk 2048) with the paper's 7B optimizer recipe.

Needs a prepared TFDS text dataset (--config.data.name, default pg19) and the Llama-2 SentencePiece model
(--config.data.tokenizer_path). 8K-token sequences (4 chunks), 256 sequences = 2M tokens per step.

Target: a v5p-128 slice (64 chips, fsdp 64, 4 sequences per chip); `python -m megalodon_jax.aot --config
configs/mega200m.py --topology v5p-128` shows the per-chip memory (benchmarks/RESULTS.md, "Fitting the hardware").
Without remat (this config's choice, for speed) every layer's activations are kept: 8 sequences per chip (v5p-64)
do not fit (same section); there use --config.model.remat=full or --config.grad_accum_steps=2.
"""

from megalodon_jax.configs import default, paper_recipe, set_preset


def get_config():
  c = default.get_config()
  set_preset(c, "mega200M")
  paper_recipe(c)
  c.model.remat = "none"
  c.seq_len = 8192
  c.batch_size = 256
  c.total_steps = 50_000
  return c
