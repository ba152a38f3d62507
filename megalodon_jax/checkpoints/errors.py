"""The errors raised while finding, reading and writing checkpoints."""

from __future__ import annotations


class CheckpointError(RuntimeError):
  """A checkpoint or checkpoint directory cannot be used; the message names the path and what to do."""


class ConvertError(ValueError):
  """Bad converter input or output path; the message says which path and what to do."""
