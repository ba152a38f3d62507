"""The reproducible Megalodon of the head-to-head CPU protocol (benchmarks/head_to_head.py, benchmarks/RESULTS.md):
a 0.97M-parameter byte-level model trained on the built-in corpus (this Python's standard-library sources, no
download) in about 4 minutes on 2 CPU cores.

  python train.py --config configs/megalodon_1m_stdlib.py --workdir runs/megalodon_1m_stdlib

ends at a validation bpb of 2.22 (2.2177 in the protocol's seed-0 run on Python 3.11.7: the corpus is that
Python's own sources, so another Python version trains on other files). The learning rate is the protocol's
sweep winner; `--config.model.family=llama --config.model.ffn_hidden_dim=424 --config.optimizer.lr=0.002` is the
Llama baseline of the same size and budget.
"""

from megalodon_jax.configs import default


def get_config():
  c = default.get_config()
  m = c.model
  m.num_layers = 4
  m.model_dim = 128
  m.z_dim = 64
  m.value_dim = 256
  m.num_heads = 2
  m.ffn_hidden_dim = 256
  m.swiglu = True  # the paper's 7B FFN; the Llama baseline's too
  m.cema_ndim = 8
  m.chunk_size = 128  # 4 chunks per 512-byte training sequence
  m.norm_num_groups = 16
  m.dtype = "float32"  # CPU has no fast bfloat16 matmuls

  c.data.dataset = "stdlib"
  c.data.tokenizer = "bytes"  # bits per byte = nats per token / ln 2
  c.data.max_documents = 400

  c.seq_len = 512
  c.batch_size = 8
  c.total_steps = 150  # 614K training bytes
  o = c.optimizer
  o.lr = 4e-3  # the sweep's best of 1e-3, 2e-3, 4e-3, 8e-3
  o.warmup_steps = 15
  o.scheduler = "cosine"
  o.end_ratio = 0.1
  o.weight_decay = 0.1
  o.clip = 1.0

  c.log_every = 5
  c.eval_every = 25
  c.eval_batches = 4
  c.checkpoint_every = 150
  c.num_samples = 1
  c.sample_len = 128
  return c
