"""Default training configuration: the typed config's defaults, and the few model fields a first run changes.

Run: `python train.py --config configs/default.py --config.total_steps=1000`. Any field can be overridden on the
command line as `--config.<key>=<value>` (nested: `--config.model.num_layers=4`, `--config.data.path=...`).

Every field, its type, its default and its check are written once, in the typed config
(docs/training.md#the-training-config): the run's fields and the mesh in megalodon_jax/training/train_config.py,
`model` in megalodon_jax/architecture.py (official ModelConf fields) and megalodon_jax/config.py (execution
settings), `data` in megalodon_jax/data/config.py, `optimizer` in megalodon_jax/training/optimizer_args.py, and the
default `logical_axis_rules` in megalodon_jax/mesh_axes.py. A config file starts from them and overrides only what
it changes, each with its reason; the other shipped configs start from this one.
"""

from megalodon_jax.training.train_config import command_line_dict


def get_config():
  c = command_line_dict()
  m = c.model
  # A model small enough to train in minutes on one accelerator, as a starting point to scale from (the model's
  # own defaults, 8 x 1024 with 2048-token chunks, are the official ModelConf's).
  m.num_layers = 4
  m.model_dim = 256
  m.z_dim = 64
  m.value_dim = 512
  m.ffn_hidden_dim = 512
  m.chunk_size = 256  # training seq_len must be a multiple of it (or shorter)
  # Accelerators multiply bfloat16 at full speed; CEMA, the norms, softmax and the loss stay float32 regardless.
  m.dtype = "bfloat16"
  return c
