"""CEMA with the Pallas scan kernel (pallas_kernels/cema) for TPU/GPU, interpreted on CPU."""

from __future__ import annotations

from typing import Optional

import jax

from megalodon_jax import mesh_axes
from megalodon_jax.ops.cema.coefficients import CEMACoeffs


def cema_pallas(x: jax.Array, coeffs: CEMACoeffs, omega: jax.Array, h0: Optional[jax.Array] = None,
                return_state: bool = False, *, resets: Optional[jax.Array] = None):
  """CEMA with the Pallas scan kernel.

  Under a mesh the kernel runs in `shard_map` over the ambient mesh's axes that split the batch
  (`mesh_axes.split_axes(mesh, B, "batch")`), as the Pallas attention does: XLA cannot partition a Mosaic
  kernel. The sequence axis is never split (the scan runs along it).

  Args:
    x: (B, L, D) any float dtype.  coeffs: (D, N) float32 fields.  omega: (D, 1) or (D,).
    h0: optional (B, D, N, 2) float32.  return_state: also return h_{L-1}.
    resets: optional (B, L) bool, True where a document starts; split over the batch axes like x.
  Returns:
    y (B, L, D) float32 and the final state (B, D, N, 2) float32 or None.
  """
  # Imported here, not at the top: Pallas is only loaded by models that ask for the kernel.
  from pallas_kernels.cema import cema_scan  # pylint: disable=import-outside-toplevel
  # Axes already manual (inside the chunk-parallel shard_map, ops/sequence_parallel.py) are split by the caller.
  batch_axes = mesh_axes.split_axes(jax.sharding.get_abstract_mesh(), x.shape[0], "batch")
  y, state = cema_scan(x, coeffs.p, coeffs.q_re, coeffs.q_im, coeffs.g_re, coeffs.g_im, omega.reshape(-1), h0,
                       batch_axes=batch_axes, resets=resets)
  return y, (state if return_state else None)
