"""`under_matmul_precision`: a model method run with its config's `matmul_precision` in force."""

from __future__ import annotations

import functools

import jax


def under_matmul_precision(method):
  """Runs a model method with `jax.default_matmul_precision(self.config.matmul_precision)` in force.

  The context applies while the method is traced, so every dot / einsum it binds without an explicit precision
  (projections, attention, the LM head; their gradients inherit it) records that precision; explicit ones (the
  CEMA einsums, always HIGHEST; the Pallas kernels) keep theirs. "default" enters no context: jax's own setting
  applies.
  """
  @functools.wraps(method)
  def run(self, *args, **kwargs):
    precision = self.config.matmul_precision
    if precision == "default":
      return method(self, *args, **kwargs)
    with jax.default_matmul_precision(precision):
      return method(self, *args, **kwargs)
  return run
