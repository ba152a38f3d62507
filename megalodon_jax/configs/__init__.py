"""Training configs, `--config <name>` (a checkout's configs/ links here); default.py documents every field. They import
each other as `megalodon_jax.configs.<name>`; below, what the large ones share: preset shapes, the paper's recipe."""

import ml_collections

from megalodon_jax.config import OFFICIAL_FIELDS, preset


def set_preset(c: ml_collections.ConfigDict, name: str, **overrides) -> None:
  """Copies the official ModelConf fields of preset `name` into c.model (vocab from the tokenizer: -1)."""
  shape = preset(name, **overrides)
  for field in OFFICIAL_FIELDS:
    if field != "vocab_size":
      c.model[field] = getattr(shape, field)


def paper_recipe(c: ml_collections.ConfigDict) -> None:
  """Megalodon-7B training (paper §4.1): AdamW (0.9, 0.95), eps 1e-8, lr 3.5e-4, cosine, 2500 warmup steps,
  weight decay 0.1, clip 1.0, no dropout, bf16 compute with float32 master weights, Llama-2 tokenizer."""
  o = c.optimizer
  o.lr = 3.5e-4
  o.warmup_steps = 2500
  o.scheduler = "cosine"
  o.b1, o.b2, o.eps = 0.9, 0.95, 1e-8
  o.weight_decay = 0.1
  o.clip = 1.0
  o.end_ratio = 0.1
  c.model.dtype = "bfloat16"
  c.model.param_dtype = "float32"
  c.model.remat = "full"  # activations of 32K-token sequences do not fit otherwise
  c.model.scan_layers = True  # one compiled block for all layers: compile time flat in depth
  c.data.dataset = "tfds"
  c.data.name = "pg19"  # any prepared TFDS text dataset; override with --config.data.name
  c.data.tokenizer = "sentencepiece"
  c.data.tokenizer_path = ""  # required: the Llama-2 tokenizer.model (--config.data.tokenizer_path=...)
  c.model.vocab_size = 32000  # the Llama-2 tokenizer's; fixed so that shapes (and the planner) need no file
  c.mesh.data, c.mesh.fsdp, c.mesh.tensor, c.mesh.sequence = 1, -1, 1, 1  # pure FSDP over all devices (ZeRO-3)
  c.checkpoint_every = 1000
  c.log_every = 10
  c.eval_every = 1000
  c.eval_batches = 16
