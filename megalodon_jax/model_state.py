"""An nnx model as plain state, and back: `split_model` separates its trainable params, its other saved variables
(buffers such as RoPE frequencies and TimestepNorm priors) and its dropout RNG variables (rebuilt from the seed).

The train step, the checkpoints, conversion and the ahead-of-time compiles all use this one split, so a
checkpoint's `params` tree is the same everywhere.
"""

from __future__ import annotations

import jax
from flax import nnx


def split_model(model: nnx.Module) -> tuple[nnx.GraphDef, nnx.State, nnx.State, nnx.State]:
  """(graphdef, params, buffers, rng_vars): trainable params, other saved variables, dropout RNG variables."""
  graphdef, rng_vars, params, buffers = nnx.split(model, nnx.RngState, nnx.Param, ...)
  return graphdef, params, buffers, rng_vars


def merge_model(graphdef: nnx.GraphDef, params: nnx.State, buffers: nnx.State, rng_vars: nnx.State) -> nnx.Module:
  """The module from `split_model`'s parts, built from fresh Variable objects (the arrays are shared, not copied).

  Fresh Variables belong to the trace the module is merged in: reseeding and NNX transforms inside the model
  (nnx.remat writes its state back) mutate them, which NNX forbids for Variables created in an outer trace.
  """
  fresh = lambda tree: jax.tree.map(lambda x: x, tree)  # noqa: E731
  return nnx.merge(graphdef, fresh(rng_vars), fresh(params), fresh(buffers))
