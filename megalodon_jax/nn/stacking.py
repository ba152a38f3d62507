"""`stack_blocks`: identical blocks' parameters stacked along a new leading axis, for one `lax.scan` over depth."""

from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp
from flax import nnx


def stack_blocks(blocks: Sequence[nnx.Module]) -> tuple[Any, Any]:
  """(graphdef, stacked state) of `blocks`: one graph, every state leaf stacked along a new leading axis (a
  transient copy; the blocks keep storing their own parameters). ValueError if a block differs in structure."""
  splits = [nnx.split(b) for b in blocks]
  graphdef = splits[0][0]
  for i, (block_graphdef, _) in enumerate(splits[1:], 1):
    if block_graphdef != graphdef:
      raise ValueError(f"scan_layers: block {i} differs in structure from block 0 and cannot be stacked")
  return graphdef, jax.tree.map(lambda *leaves: jnp.stack(leaves), *(state for _, state in splits))
