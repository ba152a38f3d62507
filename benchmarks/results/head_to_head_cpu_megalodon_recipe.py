"""The head-to-head benchmark's chosen megalodon recipe (benchmarks/head_to_head.py --protocol cpu)."""

from megalodon_jax.configs import default


def get_config():
  c = default.get_config()
  c.model.num_layers = 4
  c.model.model_dim = 128
  c.model.z_dim = 64
  c.model.value_dim = 256
  c.model.num_heads = 2
  c.model.ffn_hidden_dim = 256
  c.model.swiglu = True
  c.model.cema_ndim = 8
  c.model.chunk_size = 128
  c.model.norm_num_groups = 16
  c.model.dtype = 'float32'
  c.model.family = 'megalodon'
  c.data.dataset = 'stdlib'
  c.data.tokenizer = 'bytes'
  c.data.max_documents = 400
  c.seq_len = 512
  c.batch_size = 8
  c.total_steps = 150
  c.log_every = 5
  c.eval_every = 25
  c.eval_batches = 4
  c.optimizer.lr = 0.004
  c.optimizer.warmup_steps = 15
  c.optimizer.scheduler = 'cosine'
  c.optimizer.end_ratio = 0.1
  c.optimizer.weight_decay = 0.1
  c.optimizer.clip = 1.0
  return c
