"""Byte-level enwik8 (standard 90M/5M/5M split) with Mega's enwik8-base shape in Megalodon blocks
(docs/model.md#configurations).

Hyper-parameters are Mega v1's `mega_lm_enwik8_base` (not published for Megalodon): 12 layers, D 512, E 1024, Z 128,
N 16, F 1024, chunk 2048 (train), tied embeddings, dropout 0.1; Adam (0.9, 0.98), lr 5e-3 with 24K warmup from 1e-7
and linear decay over 400K updates, clip 0.25, wd 0.1; 8 x 8192 bytes per update.
Put `enwik8` or `enwik8.zip` in --config.data.manual_dir (downloaded there when online).
"""

from megalodon_jax.configs import default


def get_config():
  c = default.get_config()
  m = c.model
  m.num_layers = 12
  m.model_dim = 512
  m.z_dim = 128
  m.value_dim = 1024
  m.num_heads = 1
  m.ffn_hidden_dim = 1024
  m.cema_ndim = 16
  m.chunk_size = 2048
  m.norm_num_groups = 32
  m.share_emb = True
  m.dropout = 0.1
  m.hidden_dropout = 0.0
  m.attention_dropout = 0.0
  m.dtype = "bfloat16"

  d = c.data
  d.dataset = "enwik8"
  d.manual_dir = "data/enwik8"
  d.tokenizer = "bytes"

  c.seq_len = 8192  # 4 chunks per sequence
  c.batch_size = 8
  c.total_steps = 400_000
  o = c.optimizer
  o.lr = 5e-3
  o.warmup_steps = 24_000
  o.init_ratio = 2e-5  # 1e-7 / 5e-3: warmup from 1e-7
  o.scheduler = "linear"
  o.end_ratio = 0.0
  o.b1, o.b2, o.eps = 0.9, 0.98, 1e-8
  o.weight_decay = 0.1
  o.clip = 0.25

  c.checkpoint_every = 5000
  c.log_every = 100
  c.eval_every = 5000
  c.eval_batches = 16
  c.num_samples = 2
  c.sample_len = 256
  return c
