"""Document boundaries of packed rows (data.document_boundaries="reset"): what each layer needs to restart.

The data pipeline gives, per token, its index in its document (`positions`, 0 = a document starts here). The
model turns that once into a `Documents` bundle that every block reads: CEMA and TimestepNorm restart their state
at `resets`; the attention masks keys of other documents with `segment_ids` (docs/model.md#attention). RoPE
positions are not touched: they stay chunk-local, as in the official model.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp


class Documents(NamedTuple):
  """resets: (B, L) bool, True where a document starts.  segment_ids: (B, L) int32 document ids, increasing along
  the stream.  cache_segment_ids: (B, C) int32 ids of the KV-cache slots when streaming with a cache, else None.
  """
  resets: jax.Array
  segment_ids: jax.Array
  cache_segment_ids: Optional[jax.Array] = None


def from_positions(positions: jax.Array, cache_segment_ids: Optional[jax.Array] = None,
                   count: Optional[jax.Array] = None) -> Documents:
  """Documents of a (B, L) int array of in-document positions.

  Without a cache the first document of a row gets id 0 whatever its position. With a cache (`cache_segment_ids`
  (B, C) and `count`, the cached slots of the current chunk), ids continue from the last cached token's, so a
  document that carries on from the previous call keeps its id and the attention keeps seeing its cached keys.
  """
  if positions.ndim != 2:
    raise ValueError(f"positions must be (batch, length); got shape {tuple(positions.shape)}")
  resets = positions == 0
  ids = jnp.cumsum(resets, axis=1, dtype=jnp.int32)
  if cache_segment_ids is not None:
    last = jnp.take(cache_segment_ids, jnp.maximum(count - 1, 0), axis=1)  # (B,): meaningful when count > 0
    ids = ids + jnp.where(count > 0, last, 0)[:, None]
  return Documents(resets, ids, cache_segment_ids)
