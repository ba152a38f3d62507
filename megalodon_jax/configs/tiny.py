"""Tiny model on the built-in corpus (this Python's standard-library sources): trains on a laptop CPU in about a
minute, no download. `python train.py --config configs/tiny.py`."""

from megalodon_jax.configs import default


def get_config():
  c = default.get_config()
  m = c.model
  m.num_layers = 2
  m.model_dim = 64
  m.z_dim = 32
  m.value_dim = 128
  m.num_heads = 2
  m.ffn_hidden_dim = 128
  m.cema_ndim = 8
  m.chunk_size = 64
  m.norm_num_groups = 8
  m.dtype = "float32"  # CPU has no fast bfloat16 matmuls

  c.data.dataset = "stdlib"
  c.data.max_documents = 400

  c.seq_len = 128
  c.batch_size = 8
  c.total_steps = 200
  c.optimizer.lr = 3e-3
  c.optimizer.warmup_steps = 20

  c.checkpoint_every = 100
  c.log_every = 10
  c.eval_every = 100
  c.eval_batches = 4
  c.num_samples = 1
  c.sample_len = 64
  return c
