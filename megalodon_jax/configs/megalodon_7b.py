"""Megalodon-7B as in the paper (paper §4.1): `mega7.3B` with 4096-token chunks and RoPE base 1e5, 32K context,
4M tokens per step (128 x 32768), AdamW (0.9, 0.95) lr 3.5e-4 cosine with 2500 warmup, wd 0.1, clip 1.0
(docs/model.md#configurations, docs/training.md#optimizer).

The paper trained 2T tokens (~477K steps) on 256 A100s with FSDP and 2-way chunk (context) parallelism; here: pure
FSDP over every device with full remat, so the 128 sequences of a step fit at most 128 data x fsdp devices. On 256
devices add tensor parallelism: --config.mesh.tensor=2 (fsdp -1 then fills 128).
Needs a prepared TFDS text dataset (--config.data.name) and the Llama-2 tokenizer (--config.data.tokenizer_path).

Target: a v5p-128 slice (64 chips, fsdp 64, 2 sequences of 32K per chip). Its train step compiles for it with the
`auto` settings (XLA attention one chunk at a time, chunked CEMA) to a per-chip peak well inside the 95.74 GiB of a
v5p chip (benchmarks/RESULTS.md, "Fitting the hardware"; check any variant with
`python -m megalodon_jax.aot --config configs/megalodon_7b.py --topology v5p-128`). The same recipe at 4K context
(--config.seq_len=4096 --config.batch_size=1024, 16 sequences per chip) fits too. One sequence per chip without the
sequence axis fits at 64K tokens (--config.seq_len=65536 --config.batch_size=64) but not at 128K (same section); longer
contexts split each sequence over chips with --config.mesh.sequence.
"""

from megalodon_jax.configs import default, paper_recipe, set_preset


def get_config():
  c = default.get_config()
  set_preset(c, "megalodon_7b")
  paper_recipe(c)
  c.seq_len = 32768
  c.batch_size = 128
  c.total_steps = 477_000
  return c
