"""The checks every model family makes of its token inputs before any compute."""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np


def check_token_inputs(input_ids: jax.Array, vocab_size: int, positions: Optional[jax.Array] = None) -> None:
  """input_ids (B, L) integers, L >= 1, in [0, vocab_size) when concrete (an eager call; traced ids cannot be read);
  positions, if given, integers of the same shape. Raises ValueError / TypeError naming what is wrong."""
  if input_ids.ndim != 2:
    raise ValueError(f"input_ids must be (batch, length); got shape {tuple(input_ids.shape)}")
  if not jnp.issubdtype(input_ids.dtype, jnp.integer):
    raise TypeError(f"input_ids must be integers; got dtype {input_ids.dtype}")
  if input_ids.shape[1] == 0:
    raise ValueError("input_ids has length 0; pass at least one token")
  if positions is not None and (positions.shape != input_ids.shape or
                                not jnp.issubdtype(positions.dtype, jnp.integer)):
    raise ValueError(f"positions must be integers shaped like input_ids {tuple(input_ids.shape)}; got "
                     f"{positions.dtype} {tuple(positions.shape)}")
  try:
    ids = np.asarray(input_ids)
  except jax.errors.TracerArrayConversionError:
    return
  bad = (ids < 0) | (ids >= vocab_size)
  if bad.any():
    where = tuple(int(i) for i in np.argwhere(bad)[0])
    raise ValueError(f"token id {int(ids[where])} at position {where} is outside [0, vocab_size="
                     f"{vocab_size}); {int(bad.sum())} id(s) out of range")
