"""The error type of the inference tools (generation, evaluation, loading)."""


class InferenceError(ValueError):
  """Bad input to generation or evaluation (prompt, token ids, flags, files); the message says what to fix."""
